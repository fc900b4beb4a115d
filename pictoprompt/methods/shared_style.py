"""Style that names the shared look: VGD's style task, without the words only some of the pictures' prompts have.

Ours, an extension of VGD's style path (paper 002, section 4: one style prompt for several pictures, decoded against
the mean of their embeddings, `vgd.style_target`). On its own that path names one picture's colour, shape or
background as often as what the pictures share ("outlined pink shapes on a white background" for an outlined pink
cross on white and an outlined purple square on yellow): the mean of two embeddings is close to each picture's own
caption, and CLIP's guidance cannot tell a word that fits every picture from one that fits only one.

Here each picture first gets its own prompt (VGD's inversion of that picture alone). A word that some but not all of
those prompts have belongs to some pictures only (their object, its colour, its place; "pink", "cross", "left"), and
the style is decoded with those words left out: the decoder may neither start from one (beam initialisation) nor
write one (`Limits.excluded_words`). A word every own prompt has ("gray" of two pictures on gray) stays
available. On a real profile the same holds: two pictures' prompts "a watercolor painting of a cat" and "a
watercolor painting of a house" leave out "cat" and "house", not "watercolor".

It costs one inversion per picture on top of the style decode. `lab/results/style.md` has what it does on the
`shapes` style pairs, what it costs, and what it does not fix (the fill, which neither CLIP nor these prompts read).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from pictoprompt.configs import VgdConfig
from pictoprompt.methods.vgd import (
    ClipVocabulary,
    Limits,
    VgdResult,
    guided_decode,
    image_targets,
    invert,
    style_target,
    vgd_prompt,
)
from pictoprompt.models.clip import ClipModel
from pictoprompt.models.llm import LanguageModel
from pictoprompt.progress import Progress

_WORD = re.compile(r"[a-z]+")
"""A word as `vgd.uses_any` reads one."""


@dataclass(frozen=True)
class SharedStyle:
    result: VgdResult
    """The style decode without the left-out words."""
    own_prompts: list[str]
    """Each picture's own prompt (VGD's inversion of it alone)."""
    left_out: list[str]
    """The words some but not all own prompts have, sorted."""


def own_words(prompts: Sequence[str]) -> set[str]:
    """The words (lower-cased) some but not all of the prompts have."""
    words = [set(_WORD.findall(prompt.lower())) for prompt in prompts]
    return set.union(*words) - set.intersection(*words)


def without_words(vocabulary: ClipVocabulary, words: set[str]) -> ClipVocabulary:
    """The start words and the dictionary less `words` (all of them when that would leave no start word)."""
    keep = [index for index, word in enumerate(vocabulary.words) if word.lower() not in words]
    if not keep:
        keep = list(range(len(vocabulary.words)))
    dictionary = vocabulary.dictionary - words if vocabulary.dictionary is not None else None
    return ClipVocabulary([vocabulary.words[i] for i in keep], vocabulary.embeddings[keep], dictionary)


def shared_style(
    llm: LanguageModel,
    clip: ClipModel,
    images: Sequence[Image.Image],
    vocabulary: ClipVocabulary | None,
    max_length: int = 32,
    config: VgdConfig = VgdConfig(),
    progress: Progress | None = None,
) -> SharedStyle:
    """The style prompt of two or more `images` that leaves out what only some of them show (see the module)."""
    progress = progress or Progress()
    steps = len(images) + 1
    own_prompts = [
        invert(
            llm,
            clip,
            image_targets(clip, [image]),
            vocabulary=vocabulary,
            max_length=max_length,
            config=config,
            progress=progress.scaled(index / steps, 1 / steps, 1.0),
        ).best.text
        for index, image in enumerate(images)
    ]
    left_out = own_words(own_prompts)
    kept = without_words(vocabulary, left_out) if vocabulary is not None else None
    target = style_target(clip, images)
    # `invert`'s steps, with the left-out words excluded from the start word and from the text.
    condition = kept.closest(target) if kept is not None else ""
    limits = Limits(
        max_length,
        dictionary=kept.dictionary if kept is not None else None,
        excluded_words=frozenset(left_out),
    )
    prompt_ids = vgd_prompt(llm, "style", max_length, condition=condition)
    result = guided_decode(
        llm, clip, target, prompt_ids, limits, config, progress.scaled(len(images) / steps, 1 / steps, 1.0)
    )
    result.initial_condition = condition or None
    return SharedStyle(result, own_prompts, sorted(left_out))
