"""Editing through the picture's readable prompt: invert the picture to words, put the edit into those words, and
draw the new words (optionally with what the words missed taken back from the picture).

SD-IPC's Eq. 8 adds the edit text's states to the picture's converted embedding. When the picture already carries
the attribute the edit changes (a red circle, edited to "blue"), the sum holds both values, and the generator
draws one of them or a mix (purple). Here the edit replaces the attribute instead:

1. `T_src`, the picture's prompt: written by VGD (`invert_image`), or given by the caller.
2. `T_tgt = rewrite_prompt(T_src, edit)`: the edit put in place of the words of `T_src` it replaces ("a red circle
   on the left" + "blue" -> "a blue circle on the left"), inserted, or appended (`rewrite_candidates`). Which is
   decided by the LLM: the candidate it finds most likely (mean log-probability per token) as the answer to VGD's
   inversion chat whose condition is the edit wins, so the result reads as a prompt and names the edit.
3. The generator's states: those of `T_tgt`, and from its EOS on, `alpha` times the edit direction
   `h_tgt - h_src` added to the picture's converted embedding's share that `T_src` does not explain:
   `states[i >= eos] = h_src_eos + alpha * (h_tgt[i] - h_src_eos) + residual * (f_cnvrt - h_src_eos)`.
   At `alpha = 1` and `residual = 0` that is exactly `T_tgt`'s states; `alpha` > 1 pushes further along the edit,
   and `residual` brings back what the words missed (SD-IPC's `f_cnvrt`, Eq. 6). On the bundled set a residual
   kept no more of the picture and applied the edit less often, so it is 0 by default (lab/RESULTS.md, "Figures
   behind the code's choices").
"""

from __future__ import annotations

import re

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.sd_ipc import ImageToPrompt
from pictoprompt.models.clip import ClipModel
from pictoprompt.models.llm import LanguageModel
from pictoprompt.prompts import vgd_messages

ARTICLES = ("a", "an", "the")
PROMPT_BUDGET = 32
"""The length the inversion chat promises when it scores a rewrite, as when VGD writes a prompt."""
RESIDUAL = 0.0
"""How much of what the source prompt misses of the picture comes back (`edited_states`)."""
EARLIER_MARGIN = 0.1
"""Nats per token within which a rewrite dropping fewer words, or changing an earlier one, wins over a more likely
one."""


def _fix_articles(text: str) -> str:
    """'a orange' -> 'an orange', 'an blue' -> 'a blue', 'a a star' -> 'a star'."""
    text = re.sub(r"\b(a|an|the) (?:a|an|the) ", r"\1 ", text)
    text = re.sub(r"\ban? (?=[aeiou])", "an ", text)
    return re.sub(r"\ban (?=[^aeiou\W])", "a ", text)


def rewrite_candidates(source: str, edit: str) -> list[tuple[str, int, int]]:
    """Every way of putting `edit` into `source`, each with the index of the first word it changes and how many
    source words it drops: in place of a run of source words, before a source word, or after the whole prompt;
    distinct.

    A one-word edit replaces one word ("blue" for "red"); a longer one a run of up to two words more than its own
    ("on the right" for "in the bottom left corner"), or after the whole prompt, with or without a comma. The
    edit's leading article is dropped where the source
    already has one ("a star" in "a red circle" gives "a red star").
    """
    words, edit_words = source.split(), edit.split()
    if not words:
        raise InvalidInputError("The picture's prompt is empty, so there is nothing to edit; give a prompt.")
    if not edit_words:
        raise InvalidInputError("The edit is empty; say what should change, for example 'blue' or 'on the left'.")
    insertions = [edit_words]
    if len(edit_words) > 1 and edit_words[0].lower() in ARTICLES:
        insertions.append(edit_words[1:])
    candidates: dict[str, tuple[int, int]] = {}
    for insertion in insertions:
        longest = 1 if len(insertion) == 1 else len(insertion) + 2
        for start in range(len(words)):
            for end in range(start, min(len(words), start + longest) + 1):
                text = _fix_articles(" ".join([*words[:start], *insertion, *words[end:]]))
                candidates.setdefault(text, (start, end - start))
    # After the whole prompt: as it reads on ("a green heart on the left"), or as a clause of its own.
    candidates.setdefault(_fix_articles(f"{source.rstrip(' ,.')} {edit}"), (len(words), 0))
    candidates.setdefault(_fix_articles(f"{source.rstrip(' ,.')}, {edit}"), (len(words), 0))
    candidates.pop(_fix_articles(source), None)
    return [(text, start, dropped) for text, (start, dropped) in candidates.items()]


def rewrite_prompt(llm: LanguageModel, source: str, edit: str) -> str:
    """`source` with `edit` put in (the module's step 2): the candidate the LLM finds most likely, by mean
    log-probability per token. Among those within `EARLIER_MARGIN` of the best, the one dropping the fewest source
    words wins (an edit changes one thing: "a star" makes "a red circle" a red star, not "a star"), then the one
    changing the earliest word (a prompt names its subject first, and an edit that does not say otherwise, such as
    "on a red background", is about it)."""
    candidates = rewrite_candidates(source.strip(), edit.strip())
    prompt = llm.chat_prompt(*vgd_messages("inversion", PROMPT_BUDGET, condition=edit.strip()))
    tokens = [llm.tokenize(text) for text, _, _ in candidates]
    totals = llm.log_likelihoods(prompt, tokens)
    means = [total / max(1, len(ids)) for total, ids in zip(totals, tokens, strict=True)]
    best = max(means)
    close = [i for i, mean in enumerate(means) if mean >= best - EARLIER_MARGIN]
    return candidates[min(close, key=lambda i: (candidates[i][2], candidates[i][1], -means[i]))][0]


def edited_states(
    source_states: Tensor,
    source_eos: int,
    target_states: Tensor,
    target_eos: int,
    f_cnvrt: Tensor | None = None,
    alpha: float = 1.0,
    residual: float = 0.0,
) -> Tensor:
    """The generator's prompt states (B, L, D) for an edit from `T_src` to `T_tgt` (the module's step 3).

    `source_states` and `target_states` are the text encoder's states (1, L, D) of the two prompts; `f_cnvrt`
    (B, D) is the picture's converted embedding, needed when `residual` is not 0.
    """
    if residual and f_cnvrt is None:
        raise ValueError("a residual needs the picture's converted embedding")
    batch = 1 if f_cnvrt is None else f_cnvrt.shape[0]
    target = target_states.float().expand(batch, -1, -1).clone()
    source_eos_state = source_states[0, source_eos].float()
    tail = source_eos_state + alpha * (target[:, target_eos:] - source_eos_state)
    if residual:
        tail = tail + residual * (f_cnvrt.float() - source_eos_state).unsqueeze(1)
    target[:, target_eos:] = tail
    return target


def prompt_edit_states(
    clip: ClipModel,
    pipeline: DiffusionPipeline,
    image_embeds: Tensor,
    source: str,
    target: str,
    alpha: float = 1.0,
    residual: float = RESIDUAL,
) -> tuple[Tensor, Tensor]:
    """The generator's conditioning for an edit of the picture(s) `image_embeds` (B, P) from `source` to `target`
    (`edited_states`), and the empty prompt's states as the negative."""
    with torch.no_grad():
        converter = ImageToPrompt.cached(clip, pipeline)
        states, eos = converter.text_states([source, target])
        f_cnvrt = converter.convert(image_embeds) if residual else None
        edited = edited_states(states[:1], int(eos[0]), states[1:], int(eos[1]), f_cnvrt, alpha, residual)
        return edited.to(converter.empty_states.dtype), converter.empty_states
