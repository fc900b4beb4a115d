"""Distillation by pruning (`methods/pruning.py`): deletions only, judged by CLIP's reading and the LLM's fluency."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.pruning import (
    WORDLESS_SALIENCE,
    deletions,
    fit_budget,
    joined,
    prompt_pieces,
    prune,
    salience,
    unit_embeddings,
)
from pictoprompt.methods.vgd import clip_token_count
from pictoprompt.models.profiles import Profile, get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.tools.base import ToolContext
from pictoprompt.tools.distill_prompt import DistillPromptRequest, distill_prompt

CONTENT = ("red", "blue", "white", "circle", "square", "background")
"""The fake CLIP's words that carry the picture; every other word barely moves its embedding."""


class BagOfWordsClip:
    """A CLIP stand-in whose text embedding is a sum of word vectors over the empty prompt's: a content word has an
    axis of its own, any other word a small step along a shared axis, so it draws next to nothing by itself."""

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        rows = torch.zeros(len(texts), len(CONTENT) + 2)
        rows[:, -2] = 1.0
        for row, text in enumerate(texts):
            for word in text.replace(",", " ").split():
                if word in CONTENT:
                    rows[row, CONTENT.index(word)] += 1.0
                else:
                    rows[row, -1] += 0.05
        return rows


class ClumsinessLM:
    """An LLM stand-in: each token costs one nat, and a doubled or mismatched article, or an "on"/"of" with nothing
    after it, costs `penalty` more; `disliked` words cost as much (to check that fluency alone deletes nothing the
    picture needs)."""

    def __init__(self, penalty: float = 4.0, disliked: Sequence[str] = ()) -> None:
        self.penalty, self.disliked = penalty, set(disliked)

    def chat_prompt(self, system: str, user: str, answer_prefix: str = "") -> list[int]:
        return [0]

    def tokenize(self, text: str) -> list[str]:  # type: ignore[override]
        return text.replace(",", " ,").split()

    def log_likelihoods(self, prompt_ids: Sequence[int], continuations: Sequence[Sequence[str]]) -> list[float]:
        return [-self._cost(list(words)) for words in continuations]

    def _cost(self, words: list[str]) -> float:
        cost = float(len(words))
        for word, after in zip(words, [*words[1:], None], strict=True):
            clumsy = (word in ("a", "an") and after in ("a", "an")) or (word in ("on", "of") and after in (",", None))
            cost += self.penalty * (clumsy or word in self.disliked)
        return cost


def only_left_out(short: str, long: str) -> bool:
    """Whether the short prompt's words are the long one's, in order, some left out."""
    source = iter(long.replace(",", " ").split())
    return all(word in source for word in short.replace(",", " ").split())


def test_pieces_and_their_joining() -> None:
    pieces = prompt_pieces("a red circle, 8k,  sharp focus.")
    assert pieces == ["a", "red", "circle", ",", "8k", ",", "sharp", "focus."]
    assert joined(pieces) == "a red circle, 8k, sharp focus."
    assert joined([",", "a", ",", ",", "red", ","]) == "a, red"


def test_deletions_cover_single_pieces_and_whole_phrases() -> None:
    pieces = prompt_pieces("a red circle, trending on artstation, 8k")
    found = deletions(pieces, spans=(1,), phrases=True)
    assert "a red circle, 8k" in found  # a whole comma-separated phrase
    assert "a red circle, trending artstation, 8k" in found  # one word
    assert all(only_left_out(text, joined(pieces)) for text in found)
    assert not only_left_out("a circle red", "a red circle")
    assert joined(pieces) not in found and "" not in found
    assert deletions(["red"], spans=(1,), phrases=True) == {}  # never the empty prompt


def test_pruning_repairs_what_fluff_left_and_keeps_the_picture() -> None:
    long = "a stunning a red circle on a white background, trending on artstation, 8k"
    dictionary = frozenset({"a", "an", "red", "circle", "on", "white", "background"})
    result = prune(ClumsinessLM(), BagOfWordsClip(), long, dictionary=dictionary)  # type: ignore[arg-type]
    assert result.text == "a red circle on a white background"
    assert result.removed == ["stunning trending artstation 8k", "a", "on"]


def test_fluency_alone_deletes_nothing_the_picture_needs() -> None:
    """An LLM that finds "red" clumsy still cannot have it deleted: "red" alone draws something."""
    clip = BagOfWordsClip()
    saliences = salience(clip, ["red", "a", "on"])  # type: ignore[arg-type]
    assert saliences["red"] > WORDLESS_SALIENCE >= max(saliences["a"], saliences["on"])
    llm = ClumsinessLM(disliked=["red"])
    assert prune(llm, clip, "a red circle, on", dictionary=None).text == "a red circle"  # type: ignore[arg-type]


def test_a_fluent_prompt_without_fluff_comes_back_whole() -> None:
    text = "a red circle on a white background"
    assert prune(ClumsinessLM(), BagOfWordsClip(), text).text == text  # type: ignore[arg-type]


def test_a_prompt_the_clip_cannot_read_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="no word this CLIP learnt"):
        prune(ClumsinessLM(), BagOfWordsClip(), "8k, bokeh", dictionary=frozenset({"red"}))  # type: ignore[arg-type]


# --- on the tiny set: the budget, and the tool ----------------------------------------------------------------------

LONG_PROMPT = "a small red circle at the top left and a large blue square on a white background, simple flat art"


@pytest.fixture(scope="module")
def prune_runtime(tiny_lm_dir: Path) -> Runtime:
    """The tiny set with the tiny transformers LM, distilling by pruning."""
    tiny = get_profile("tiny")
    llm = {"backend": "transformers", "source": str(tiny_lm_dir)}
    return Runtime(Profile(**{**tiny.model_dump(), "llm": llm, "distillation": "prune"}))


class NoAssets:
    """The tool is called without previews, so nothing is saved."""

    def save(self, image: object, metadata: dict[str, str]) -> None:
        raise AssertionError("no preview was asked for")


@pytest.fixture
def context(prune_runtime: Runtime) -> Iterator[ToolContext]:
    yield ToolContext(runtime=prune_runtime, assets=NoAssets(), images=PreResolvedImages({}))


def test_a_budget_is_kept_by_deleting_what_least_moves_clips_reading(prune_runtime: Runtime) -> None:
    clip = prune_runtime.clip()
    target = unit_embeddings(clip, [LONG_PROMPT])
    pieces, removed = fit_budget(clip, target, prompt_pieces(LONG_PROMPT), max_tokens=6)
    assert clip_token_count(clip, [joined(pieces)])[0] <= 6 and removed
    assert only_left_out(joined(pieces), LONG_PROMPT)
    # The first deletion was the candidate closest to the long prompt's reading.
    first = deletions(prompt_pieces(LONG_PROMPT), spans=(1, 2, 3), phrases=False)
    similarities = (unit_embeddings(clip, list(first)) @ target.T).squeeze(1)
    assert " ".join(removed[0].split()) in LONG_PROMPT
    best = list(first)[int(similarities.argmax())]
    assert only_left_out(joined(pieces), best)


def test_distill_prompt_prunes_on_a_pruning_profile(context: ToolContext) -> None:
    response = distill_prompt(DistillPromptRequest(prompt=LONG_PROMPT), context)
    assert only_left_out(response.prompt, LONG_PROMPT)
    assert response.max_tokens == response.tokens_after <= response.tokens_before  # the content's own length
    bounded = distill_prompt(DistillPromptRequest(prompt=LONG_PROMPT, max_tokens=5), context)
    assert bounded.tokens_after <= bounded.max_tokens == 5


@pytest.mark.slow
def test_pruning_gives_back_fluffed_captions_on_the_shapes_set() -> None:
    """Captions of training scenes (not the benchmark's) wrapped in fluff come back exactly."""
    from lab.benchmarks.vgd import FILLER
    from lab.shapes.world import caption_scene, random_scene

    runtime = Runtime(get_profile("shapes"))
    dictionary = frozenset(runtime.dictionary_words() or ())
    rng = random.Random("pruning-test")
    for _ in range(3):
        caption = caption_scene(random_scene(rng), rng, detail=0.6)
        long = f"a beautiful {caption}, {', '.join(rng.sample(FILLER, 4))}"
        assert prune(runtime.llm(), runtime.clip(), long, dictionary=dictionary).text == caption
