"""Distillation by pruning (ours, beside the paper's VGD distillation, `vgd.distill`): the short prompt is the long
one with pieces deleted, never a word added, and as long as its content needs rather than a fixed share.

1. **Words the CLIP never learnt go** (profiles with a dictionary only): the generator's text encoder cannot read
   them either (`vgd.written_in`).
2. **Deletions that make the prompt read better and draw the same** (`repair`), one at a time, the most fluent
   first: one word or one comma-separated phrase made only of words that draw nothing by themselves
   (`WORDLESS_SALIENCE`), lowering the LLM's surprisal per token by at least `FLUENCY_GAIN`. So a leftover of fluff
   goes, while an object's size, fill or place, which reads as naturally as the rest, stays.
3. **A budget, when one is asked for** (`fit_budget`): while the prompt has more CLIP tokens than `max_tokens`, the
   deletion of one to three pieces that keeps its CLIP text embedding closest to the long prompt's.

Only CLIP's text tower and the LLM's likelihood of whole candidates are run: no decoding, no image.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.vgd import clip_token_count, written_in
from pictoprompt.models.clip import ClipModel
from pictoprompt.models.llm import LanguageModel
from pictoprompt.prompts import load_prompt

WORDLESS_SALIENCE = 0.08
"""Step 2 deletes only words whose CLIP reading alone is this close to the empty prompt's (cosine distance,
`salience`), calibrated on the `shapes` CLIP's dictionary (lab/results/distill.md). A whole-prompt measure could
not tell these apart: in a three-object caption one colour word moves the embedding less than a stray article."""
FLUENCY_GAIN = 0.1
"""Step 2's least fall of the LLM's mean negative log-likelihood per token (nats): a repair of what fluff left gains
several times this, deleting a colour, a size, a fill or a place loses fluency (lab/results/distill.md)."""
MAX_BUDGET_SPAN = 3
"""Step 3 deletes up to this many pieces at once, so a phrase ("on the left") can go in one step."""

_PIECE = re.compile(r"[^\s,]+|,")


@dataclass(frozen=True)
class Pruning:
    text: str
    removed: list[str]
    """The words each deletion took out, in order (the unlearnt words of step 1 first, as one entry)."""


def prompt_pieces(prompt: str) -> list[str]:
    """The prompt's words (with any full stop they carry) and its commas, each a piece."""
    return _PIECE.findall(prompt)


def joined(pieces: Sequence[str]) -> str:
    """The pieces as a prompt: no comma at either end, never two in a row, none after a space."""
    kept: list[str] = []
    for piece in pieces:
        if piece != "," or (kept and kept[-1] != ","):
            kept.append(piece)
    while kept and kept[-1] == ",":
        kept.pop()
    return " ".join(kept).replace(" ,", ",")


def deletions(pieces: Sequence[str], spans: Sequence[int], phrases: bool) -> dict[str, list[str]]:
    """Each distinct non-empty prompt left by deleting `spans` consecutive pieces (and, with `phrases`, one whole
    comma-separated phrase), mapped to its pieces."""
    cuts = {(start, start + span) for span in spans for start in range(len(pieces) - span + 1)}
    if phrases:
        commas = [-1, *(i for i, piece in enumerate(pieces) if piece == ","), len(pieces)]
        cuts |= {(start + 1, end) for start, end in itertools.pairwise(commas) if end > start + 1}
    current, found = joined(pieces), {}
    for start, end in sorted(cuts):
        left = [*pieces[:start], *pieces[end:]]
        text = joined(left)
        if text and text != current:
            found.setdefault(text, left)
    return found


def unit_embeddings(clip: ClipModel, texts: Sequence[str]) -> Tensor:
    with torch.no_grad():
        return F.normalize(clip.encode_text(list(texts)).float(), dim=-1)


def mean_surprisals(llm: LanguageModel, texts: Sequence[str]) -> list[float]:
    """The LLM's mean negative log-likelihood per token of each text, as its answer to a neutral request for an
    image prompt."""
    context = llm.chat_prompt(load_prompt("vgd_system"), load_prompt("vgd_perplexity"))
    tokens = [llm.tokenize(text) for text in texts]
    return [-total / max(1, len(t)) for total, t in zip(llm.log_likelihoods(context, tokens), tokens, strict=True)]


def salience(clip: ClipModel, words: Sequence[str]) -> dict[str, float]:
    """How much each word alone draws: the cosine distance of its CLIP text embedding from the empty prompt's."""
    embeddings = unit_embeddings(clip, ["", *words])
    return dict(zip(words, (1 - embeddings[1:] @ embeddings[0]).tolist(), strict=True))


def repair(clip: ClipModel, llm: LanguageModel, pieces: list[str]) -> tuple[list[str], list[str]]:
    """Step 2: deletions of words that draw nothing which make the prompt read better, the most fluent first;
    (pieces, what each removed)."""
    removed: list[str] = []
    drawing = {word for word, value in salience(clip, sorted(set(pieces))).items() if value > WORDLESS_SALIENCE}
    surprisal = mean_surprisals(llm, [joined(pieces)])[0]
    while True:
        candidates = {
            text: left
            for text, left in deletions(pieces, spans=(1,), phrases=True).items()
            if not drawing & set(_difference(pieces, left).split())
        }
        if not candidates:
            break
        scores = mean_surprisals(llm, list(candidates))
        best = min(range(len(scores)), key=scores.__getitem__)
        if scores[best] > surprisal - FLUENCY_GAIN:
            break
        left = list(candidates.values())[best]
        removed.append(_difference(pieces, left))
        pieces, surprisal = left, scores[best]
    return pieces, removed


def fit_budget(clip: ClipModel, target: Tensor, pieces: list[str], max_tokens: int) -> tuple[list[str], list[str]]:
    """Step 3: deletions that keep the CLIP text embedding closest to `target` until `max_tokens` CLIP tokens."""
    removed: list[str] = []
    while clip_token_count(clip, [joined(pieces)])[0] > max_tokens:
        candidates = deletions(pieces, spans=range(1, MAX_BUDGET_SPAN + 1), phrases=False)
        if not candidates:
            break
        texts = list(candidates)
        best = int((unit_embeddings(clip, texts) @ target.T).squeeze(1).argmax())
        removed.append(_difference(pieces, candidates[texts[best]]))
        pieces = candidates[texts[best]]
    return pieces, removed


def prune(
    llm: LanguageModel,
    clip: ClipModel,
    prompt: str,
    *,
    max_tokens: int | None = None,
    dictionary: frozenset[str] | None = None,
) -> Pruning:
    """The long prompt with what does not change its picture deleted (module docstring), within `max_tokens` CLIP
    tokens when given."""
    pieces = prompt_pieces(prompt)
    removed = []
    if dictionary is not None:
        learnt = [piece for piece in pieces if piece == "," or written_in(piece, dictionary, complete=True)]
        if not joined(learnt):
            raise InvalidInputError("The prompt has no word this CLIP learnt; nothing in it can be kept.")
        if learnt != pieces:
            removed.append(_difference(pieces, learnt))
        pieces = prompt_pieces(joined(learnt))  # one comma where a phrase between two went, so one deletion drops it
    pieces, repairs = repair(clip, llm, pieces)
    removed += repairs
    if max_tokens is not None:
        pieces, cuts = fit_budget(clip, unit_embeddings(clip, [prompt]), pieces, max_tokens)
        removed += cuts
    return Pruning(joined(pieces), [words for words in removed if words])  # a lone comma's deletion names no word


def _difference(before: Sequence[str], after: Sequence[str]) -> str:
    """The words of `before` that `after` (a subsequence of it) lacks, in order."""
    left, taken = list(after), []
    for piece in before:
        if left and piece == left[0]:
            left.pop(0)
        elif piece != ",":
            taken.append(piece)
    return " ".join(taken)
