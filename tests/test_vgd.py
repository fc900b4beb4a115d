"""Visually guided decoding: the step score, the beam search's rules, targets, distillation and the three tools.

The decoder tests run on both LLM backends (a tiny random transformers Llama, SmolLM2 through llama.cpp) with
the tiny CLIP, and on a scripted LM whose preferences are set by hand where a rule needs a forced situation.
Small beams and lengths keep them fast; the paper's defaults are checked as defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from lab.recomputed import RecomputedLlm
from pictoprompt.configs import VgdConfig
from pictoprompt.errors import InvalidInputError, JobCancelledError
from pictoprompt.methods import vgd
from pictoprompt.methods.vgd import (
    ClipVocabulary,
    Limits,
    clip_log_probs,
    clip_token_count,
    clip_vocabulary,
    copied_from,
    distill,
    distillation_length,
    fuse,
    guided_decode,
    image_targets,
    invert,
    joined_prompts,
    length_penalty,
    repeating_tokens,
    step_scores,
    style_target,
    text_perplexities,
    text_target,
    vgd_prompt,
)
from pictoprompt.models.clip import ClipModel, TransformersClip
from pictoprompt.models.llm import Beams, LanguageModel, Message
from pictoprompt.models.profiles import Profile, get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.progress import Progress
from pictoprompt.server.images import PreResolvedImages
from pictoprompt.tools import TOOLS
from pictoprompt.tools.base import SavedImage, ToolContext
from pictoprompt.tools.distill_prompt import DistillPromptRequest, distill_prompt
from pictoprompt.tools.fuse_concepts import FuseConceptsRequest, fuse_concepts
from pictoprompt.tools.invert_image import InvertImageRequest, invert_image

SMALL = {"num_beams": 3, "beam_expand_factor": 3}
VARIANT_OPTIONS = {"vgd": {}, "llm_only": {"clip_alpha": 0.0}, "clip_only": {"llm_alpha": 0.0}}
"""The paper's Table 2 ablations as configs."""
LONG_PROMPT = (
    "a small red circle at the top left and a large blue square at the bottom right on a white background, "
    "simple flat digital art, bright colors, minimal poster style"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_vocabulary(clip: ClipModel) -> ClipVocabulary:
    """The vocabulary of the first 2,000 CLIP tokens, so tests do not embed all 49,408 (memoised per model)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TransformersClip, "vocab_size", property(lambda self: 2000))
        return clip_vocabulary(clip)


def solid(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (32, 32), colour)


@pytest.fixture(scope="module")
def clip(tiny_runtime: Runtime) -> ClipModel:
    model = tiny_runtime.clip()
    small_vocabulary(model)
    return model


@pytest.fixture(scope="module")
def targets(clip: ClipModel) -> torch.Tensor:
    return image_targets(clip, [solid((220, 30, 30)), solid((30, 60, 220)), solid((240, 220, 40))])


# --- a scripted LM for the rules that need a forced situation ------------------------------------------------------


class ScriptedLM(LanguageModel):
    """Words as tokens; `preferences(tokens so far)` gives the next-token logits."""

    words = ("</s>", "\n", "<|user|>", "red", "blue", "circle", "square", "big", "small", "star")

    def __init__(self, preferences: Callable[[list[int]], list[float]]) -> None:
        self.preferences = preferences
        self.model_id = "scripted"
        self.vocab_size = len(self.words)
        self.stop_tokens = torch.tensor([i < 2 for i in range(self.vocab_size)])
        self.banned_tokens = torch.tensor([i == 2 for i in range(self.vocab_size)])
        self.wordless_tokens = torch.zeros(self.vocab_size, dtype=torch.bool)

    def _render_chat(self, messages: list[Message]) -> str:
        return " ".join(m["content"] for m in messages)

    def _tokenize_prompt(self, text: str) -> list[int]:
        return [2]

    def tokenize(self, text: str) -> list[int]:
        return [self.words.index(word) for word in text.split()]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return " ".join(self.words[t] for t in token_ids if t > 2)

    def start(
        self, prompt_ids: Sequence[int], use_cache: bool = True, max_beams: int = 16, max_new_tokens: int = 128
    ) -> Beams:
        return ScriptedBeams(self, prompt_ids)

    def log_likelihoods(self, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        raise NotImplementedError


class ScriptedBeams(Beams):
    def __init__(self, llm: ScriptedLM, prompt_ids: Sequence[int]) -> None:
        self.llm = llm
        super().__init__(prompt_ids, torch.tensor([llm.preferences([])]))

    def _advance(self, parents: list[int], tokens: list[int]) -> torch.Tensor:
        return torch.tensor([self.llm.preferences([*self.tokens[p], t]) for p, t in zip(parents, tokens, strict=True)])

    def close(self) -> None:
        pass


def prefer(stop_at: int | None, stop_token: int = 0) -> Callable[[list[int]], list[float]]:
    """Content words with distinct preferences; after `stop_at` tokens the stop token dominates."""

    def preferences(tokens: list[int]) -> list[float]:
        logits = [-8.0, -8.0, 5.0] + [1.0 - 0.3 * i + 0.05 * len(tokens) * (i % 2) for i in range(7)]
        if stop_at is not None and len(tokens) >= stop_at:
            logits[stop_token] = 6.0
        return logits

    return preferences


# --- the score -------------------------------------------------------------------------------------------------


def test_step_score_matches_the_formula_on_a_hand_computed_case() -> None:
    # CLIP logits 10 * cos: the texts point at 0, 90 and 45 degrees from the (unnormalised) target.
    target = torch.tensor([[2.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    clip_scores = clip_log_probs(texts, target, logit_scale=10.0)
    # log-softmax of [10, 0, 7.0711]: the log-sum-exp is 10.052117.
    assert clip_scores.tolist() == pytest.approx([-0.052117, -10.052117, -2.981050], abs=1e-5)
    scores = step_scores(torch.tensor([-1.0, -0.5, -2.0]), clip_scores)
    assert scores.tolist() == pytest.approx([-1.078176, -15.578176, -6.471574], abs=1e-5)
    # Two targets: each row's log-softmax, averaged.
    both = clip_log_probs(texts, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), logit_scale=10.0)
    assert both.tolist() == pytest.approx([-5.052117, -5.052117, -2.981050], abs=1e-5)
    assert [length_penalty(n) for n in (1, 6, 32)] == pytest.approx([1.0, 2.069616, 8.872797], abs=1e-6)


def test_the_paper_defaults() -> None:
    paper = VgdConfig()
    assert paper.num_beams == 10 and paper.beam_expand_factor == 10
    assert paper.llm_alpha == 1.0 and paper.clip_alpha == 1.5
    assert Limits().max_length == 32 and paper.distillation_ratio == 0.3
    assert paper.length_penalty_alpha == 1.2 and paper.length_penalty_offset == 5


def test_each_step_keeps_the_best_candidates_by_the_formula(clip: ClipModel, targets: torch.Tensor) -> None:
    llm = ScriptedLM(prefer(stop_at=None))
    result = guided_decode(llm, clip, targets, [2], Limits(max_length=2), VgdConfig(num_beams=2, beam_expand_factor=2))
    # Step 1 by hand: the 4 most likely tokens, their texts scored by CLIP, the best 2 kept.
    log_probs = torch.log_softmax(torch.tensor(prefer(None)([])), dim=-1)
    log_probs[2] = -math.inf
    candidates = log_probs.topk(4)
    texts = [llm.words[t] for t in candidates.indices.tolist()]
    scores = 1.0 * candidates.values + 1.5 * clip_log_probs(clip.encode_text(texts), targets, clip.logit_scale)
    expected = [[candidates.indices[i].item()] for i in scores.topk(2).indices.tolist()]
    assert result.beams[0] == expected
    assert result.steps == 2 and all(len(beam) == 2 for beam in result.beams[1])


# --- the search's rules, on both backends ------------------------------------------------------------------------


def decode(
    llm: LanguageModel,
    clip: ClipModel,
    targets: torch.Tensor,
    limits: Limits = Limits(6),
    progress: Progress | None = None,
    **options: object,
) -> vgd.VgdResult:
    prompt = vgd_prompt(llm, "inversion", 6, condition="circle")
    config = VgdConfig(**{**SMALL, **options})  # type: ignore[arg-type]
    return guided_decode(llm, clip, targets, prompt, limits, config, progress)


def test_cached_and_recomputed_decoders_choose_the_same_beams(
    language_model: LanguageModel, clip: ClipModel, targets: torch.Tensor
) -> None:
    # Recomputing costs a full forward pass per beam and step: fewer beams and steps keep this quick.
    cached = decode(language_model, clip, targets, Limits(4), num_beams=2)
    recomputed = decode(RecomputedLlm(language_model), clip, targets, Limits(4), num_beams=2)  # type: ignore[arg-type]
    assert cached.beams == recomputed.beams
    assert [(h.text, h.token_ids) for h in cached.hypotheses] == [(h.text, h.token_ids) for h in recomputed.hypotheses]
    assert [h.final_score for h in cached.hypotheses] == pytest.approx([h.final_score for h in recomputed.hypotheses])


def test_length_limit_and_stop_rules(language_model: LanguageModel, clip: ClipModel, targets: torch.Tensor) -> None:
    result = decode(language_model, clip, targets, Limits(5, min_length=2))
    assert 1 <= result.steps <= 5 and len(result.beams) == result.steps
    assert [len(beam) for step in result.beams for beam in step] == [
        i + 1 for i, step in enumerate(result.beams) for _ in step
    ]
    assert result.hypotheses, "a decode returns prompts"
    for hypothesis in result.hypotheses:
        ids = torch.tensor(hypothesis.token_ids, dtype=torch.long)
        assert 2 <= len(ids) <= 5
        assert not language_model.stop_tokens[ids].any() and not language_model.banned_tokens[ids].any()
        assert hypothesis.text == language_model.detokenize(hypothesis.token_ids).strip()
        penalty = length_penalty(len(ids))
        assert hypothesis.final_score == pytest.approx(hypothesis.score / penalty)
    finals = [h.final_score for h in result.hypotheses]
    assert finals == sorted(finals, reverse=True)
    assert len({h.text for h in result.hypotheses}) == len(result.hypotheses)


def test_several_targets_each_move_the_result(
    language_model: LanguageModel, clip: ClipModel, targets: torch.Tensor
) -> None:
    fused = decode(language_model, clip, targets, Limits(4)).best
    for left_out in range(targets.shape[0]):
        rest = torch.cat([targets[:left_out], targets[left_out + 1 :]])
        partial = decode(language_model, clip, rest, Limits(4)).best
        assert partial.text != fused.text or abs(partial.score - fused.score) > 1e-6


def test_distillation_respects_its_length(language_model: LanguageModel, clip: ClipModel) -> None:
    tokens = clip_token_count(clip, [LONG_PROMPT])[0]
    assert distillation_length(clip, LONG_PROMPT, 0.3) == math.floor(0.3 * tokens)
    for budget in (3, None):
        result = distill(language_model, clip, LONG_PROMPT, max_length=budget, config=VgdConfig(**SMALL))
        limit = budget or math.floor(0.3 * tokens)
        assert result.hypotheses and result.steps <= limit
        assert max(clip_token_count(clip, [h.text for h in result.hypotheses])) <= limit


def test_variants_drop_one_term(
    clip: ClipModel, targets: torch.Tensor, monkeypatch: pytest.MonkeyPatch, load_llm: Callable[[str], LanguageModel]
) -> None:
    llm = load_llm("transformers")
    results = {
        v: invert(llm, clip, targets, max_length=5, config=VgdConfig(**VARIANT_OPTIONS[v], **SMALL))
        for v in ("vgd", "clip_only")
    }
    assert results["vgd"].beams != results["clip_only"].beams
    calls = []
    monkeypatch.setattr(clip, "encode_text", lambda texts: calls.append(texts))
    llm_only = invert(llm, clip, targets, max_length=5, config=VgdConfig(**VARIANT_OPTIONS["llm_only"], **SMALL))
    assert not calls, "llm_only never asks CLIP"
    # Without CLIP a score is the LLM log-probability alone, so the search is the LLM's own beam search.
    assert all(h.score == pytest.approx(h.llm_log_prob) for h in llm_only.hypotheses)


def test_progress_per_step_and_cancellation(
    clip: ClipModel, targets: torch.Tensor, load_llm: Callable[[str], LanguageModel]
) -> None:
    llm = load_llm("transformers")
    reports: list[tuple[float, float | None]] = []
    decode(llm, clip, targets, progress=Progress(lambda done, total, _: reports.append((done, total))))
    assert reports == [(step, 6) for step in range(1, len(reports) + 1)]

    progress = Progress(lambda done, total, _: progress.cancel() if done == 2 else None)
    with pytest.raises(JobCancelledError):
        decode(llm, clip, targets, progress=progress)


def test_a_target_must_be_a_matrix(clip: ClipModel) -> None:
    with pytest.raises(InvalidInputError):
        guided_decode(ScriptedLM(prefer(None)), clip, torch.zeros(0, 32), [2])


# --- stop rules with a forced stop -------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_token", [0, 1], ids=["eos", "newline"])
def test_a_stop_token_ends_hypotheses_and_the_search(clip: ClipModel, targets: torch.Tensor, stop_token: int) -> None:
    llm = ScriptedLM(prefer(stop_at=2, stop_token=stop_token))
    result = guided_decode(llm, clip, targets, [2], Limits(max_length=12), VgdConfig(**SMALL))
    # Every beam wants to stop after two words: enough hypotheses end and no live beam beats them.
    assert result.steps < 12
    assert result.best.finished and len(result.best.token_ids) == 2
    assert all(0 not in h.token_ids and 1 not in h.token_ids for h in result.hypotheses)


def test_min_length_holds_stop_tokens_back(clip: ClipModel, targets: torch.Tensor) -> None:
    llm = ScriptedLM(prefer(stop_at=0))
    result = guided_decode(llm, clip, targets, [2], Limits(max_length=8, min_length=3), VgdConfig(**SMALL))
    assert result.hypotheses and min(len(h.token_ids) for h in result.hypotheses) >= 3
    assert result.best.finished and len(result.best.token_ids) == 3


# --- targets and beam initialisation -----------------------------------------------------------------------------


def test_targets(clip: ClipModel) -> None:
    images = [solid((220, 30, 30)), solid((30, 60, 220))]
    rows = image_targets(clip, images)
    assert rows.shape == (2, clip.embed_dim)
    style = style_target(clip, images)
    expected = torch.nn.functional.normalize(rows, dim=-1).mean(0, keepdim=True)
    torch.testing.assert_close(style, expected)
    torch.testing.assert_close(text_target(clip, "a red circle"), clip.encode_text(["a red circle"]).float())


def test_the_vocabulary_is_embedded_once_and_cached_on_disk(
    clip: ClipModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TransformersClip, "vocab_size", property(lambda self: 1500))
    monkeypatch.setattr(vgd, "_vocabularies", type(vgd._vocabularies)())
    vocabulary = clip_vocabulary(clip, tmp_path)
    assert len(set(vocabulary.words)) == len(vocabulary.words) > 100
    assert all(any(c.isalpha() for c in word) for word in vocabulary.words)
    assert list(tmp_path.glob("clip-vocabulary-*.pt"))
    assert clip_vocabulary(clip, tmp_path) is vocabulary

    monkeypatch.setattr(vgd, "_vocabularies", type(vgd._vocabularies)())

    def no_encoding(*args: object) -> None:
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(vgd, "_embed_vocabulary", no_encoding)
    reloaded = clip_vocabulary(clip, tmp_path)
    assert reloaded.words == vocabulary.words
    torch.testing.assert_close(reloaded.embeddings, vocabulary.embeddings)

    target = clip.encode_text(["circle"])
    similarity = torch.nn.functional.cosine_similarity(clip.encode_text(vocabulary.words), target)
    assert vocabulary.closest(target) == vocabulary.words[int(similarity.argmax())]


def test_inversion_starts_from_the_closest_word(
    clip: ClipModel, targets: torch.Tensor, load_llm: Callable[[str], LanguageModel]
) -> None:
    llm = load_llm("transformers")
    vocabulary = small_vocabulary(clip)
    result = invert(llm, clip, targets[:1], vocabulary=vocabulary, max_length=4, config=VgdConfig(**SMALL))
    assert result.initial_condition == vocabulary.closest(targets[:1])
    assert invert(llm, clip, targets[:1], max_length=4, config=VgdConfig(**SMALL)).initial_condition is None


# --- the tools ---------------------------------------------------------------------------------------------------


class FolderAssets:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.saved: list[dict[str, str]] = []

    def save(self, image: Image.Image, metadata: dict[str, str]) -> SavedImage:
        path = self.directory / f"{len(self.saved)}.png"
        image.save(path)
        self.saved.append(metadata)
        return SavedImage(uri=path.as_uri(), path=str(path))


@pytest.fixture(scope="module")
def vgd_runtime(tiny_lm_dir: Path) -> Runtime:
    """The tiny set with the tiny transformers LM as its LLM."""
    tiny = get_profile("tiny")
    profile = Profile(**{**tiny.model_dump(), "llm": {"backend": "transformers", "source": str(tiny_lm_dir)}})
    runtime = Runtime(profile)
    small_vocabulary(runtime.clip())
    return runtime


@pytest.fixture
def context(vgd_runtime: Runtime, tmp_path: Path) -> Iterator[ToolContext]:
    images = {"red.png": solid((220, 30, 30)), "blue.png": solid((30, 60, 220)), "star.png": solid((240, 220, 40))}
    yield ToolContext(runtime=vgd_runtime, assets=FolderAssets(tmp_path), images=PreResolvedImages(images))


def test_the_tools_are_registered() -> None:
    names = [spec.name for spec in TOOLS]
    assert {"invert_image", "fuse_concepts", "distill_prompt"} <= set(names)
    hints = {spec.name: spec.hints for spec in TOOLS}
    # EDITOR stores each prompt's preview, so inverting is not read-only; the same call gives the same prompts.
    assert not hints["invert_image"].read_only and hints["invert_image"].idempotent
    assert not hints["fuse_concepts"].read_only


@pytest.mark.parametrize("focus", ["content", "style"])
def test_invert_image(context: ToolContext, focus: str) -> None:
    request = InvertImageRequest(images=["red.png", "blue.png"], focus=focus, max_tokens=6, num_results=2)
    assert request.image_refs() == ["red.png", "blue.png"]
    response = invert_image(request, context)
    assert 1 <= len(response.prompts) <= 2 and response.initial_condition
    clip = context.runtime.clip()
    references = clip.encode_image([solid((220, 30, 30)), solid((30, 60, 220))])
    llm = context.runtime.llm()
    for item in response.prompts:
        assert item.prompt
        assert item.perplexity == pytest.approx(text_perplexities(llm, [item.prompt])[0], rel=1e-5)
        expected = clip.similarity(clip.encode_text([item.prompt]), references).mean()
        assert item.clip_similarity == pytest.approx(float(expected), abs=1e-5)
        if focus == "style":
            assert item.apply_style_as == f"{{subject}} in the style of {item.prompt}"
        else:
            assert item.apply_style_as is None
    scores = [item.score for item in response.prompts]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("strategy", ["merge", "joint", "concat"])
def test_fuse_concepts(context: ToolContext, strategy: str) -> None:
    request = FuseConceptsRequest(
        images=["red.png", "blue.png", "star.png"], strategy=strategy, max_tokens=9, num_images=1, steps=2, seed=3
    )
    response = fuse_concepts(request, context)
    assert response.prompt and len(response.clip_similarity) == 3
    if strategy == "joint":
        assert response.parts == []
    else:
        first, second, third = response.parts
    if strategy == "concat":
        assert response.prompt == f"{first}, {second} and {third}"
    if strategy == "merge":
        assert clip_token_count(context.runtime.clip(), [response.prompt])[0] <= 9
    assert [image.seed for image in response.images] == [3]
    assert context.assets.saved[0]["prompt"] == response.prompt  # type: ignore[attr-defined]


@pytest.mark.slow  # three more decodings (about 10 s of CPU); test_fuse_concepts[merge] stays in `make test`
def test_merge_writes_one_prompt_from_the_per_image_prompts(tiny_runtime: Runtime, targets: torch.Tensor) -> None:
    """merge = a prompt per image (at least MERGE_PART_TOKENS long), then VGD distillation of their list."""
    llm, clip = tiny_runtime.llm(), tiny_runtime.clip()
    vocabulary = small_vocabulary(clip)
    fusion = fuse(llm, clip, targets[:2], strategy="merge", vocabulary=vocabulary, max_length=8)
    alone = [invert(llm, clip, targets[i : i + 1], vocabulary=vocabulary, max_length=16).best.text for i in range(2)]
    assert fusion.parts == alone
    assert fusion.prompt == distill(llm, clip, joined_prompts(alone), max_length=8).best.text
    assert clip_token_count(clip, [fusion.prompt])[0] <= 8


def test_fusing_one_image_is_refused(tiny_runtime: Runtime, targets: torch.Tensor) -> None:
    with pytest.raises(InvalidInputError, match="at least two images"):
        fuse(tiny_runtime.llm(), tiny_runtime.clip(), targets[:1])


def test_distill_prompt(context: ToolContext) -> None:
    response = distill_prompt(DistillPromptRequest(prompt=LONG_PROMPT, generate_preview=True, steps=2, seed=5), context)
    assert response.tokens_after <= response.max_tokens == math.floor(0.3 * response.tokens_before)
    assert response.original_prompt == LONG_PROMPT
    clip = context.runtime.clip()
    expected = clip.similarity(clip.encode_text([response.prompt]), clip.encode_text([LONG_PROMPT]))
    assert response.clip_similarity == pytest.approx(float(expected), abs=1e-5)
    assert response.perplexity == pytest.approx(text_perplexities(context.runtime.llm(), [response.prompt])[0])
    assert response.preview_original and response.preview_distilled
    assert response.preview_original.seed == response.preview_distilled.seed == 5
    with pytest.raises(InvalidInputError, match="already within"):
        distill_prompt(DistillPromptRequest(prompt="a red circle", max_tokens=10), context)


@pytest.mark.parametrize("command", ["invert", "fuse", "distill"])
def test_cli_commands_document_their_options(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pictoprompt.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0 and "--max-tokens" in capsys.readouterr().out


def test_an_answer_never_starts_with_a_wordless_token(clip: ClipModel, targets: torch.Tensor) -> None:
    def fence_first(tokens: list[int]) -> list[float]:
        # "red" stands in for a code fence: the LM wants it first, then a newline.
        if not tokens:
            return [-8.0, -8.0, -8.0, 9.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.2]
        return [-8.0, 9.0 if tokens == [3] else -8.0, -8.0, *[1.0 - 0.1 * i for i in range(7)]]

    lm = ScriptedLM(fence_first)
    fenced = guided_decode(lm, clip, targets, [2], Limits(max_length=4), VgdConfig(**SMALL))
    assert fenced.hypotheses[0].token_ids[0] == 3, "without the mask the fence wins"
    lm.wordless_tokens[3] = True
    result = guided_decode(lm, clip, targets, [2], Limits(max_length=4), VgdConfig(**SMALL))
    assert result.hypotheses and all(h.token_ids[0] != 3 for h in result.hypotheses)


def test_repeating_tokens() -> None:
    assert repeating_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert repeating_tokens([1, 2, 1, 2, 1, 2], 3) == [1, 1]
    assert repeating_tokens([1, 2], 3) == [] and repeating_tokens([1, 2, 1, 2], 0) == []
    assert sorted(repeating_tokens([4, 5], 1)) == [4, 5]


def test_no_beam_repeats_a_run_of_three_tokens(clip: ClipModel, targets: torch.Tensor) -> None:
    def alternate(tokens: list[int]) -> list[float]:
        logits = [-8.0, -8.0, -8.0, *[0.0] * 7]
        logits[3 if len(tokens) % 2 == 0 else 5] = 9.0
        return logits

    lm = ScriptedLM(alternate)
    looping = guided_decode(lm, clip, targets, [2], Limits(max_length=6), VgdConfig(no_repeat_ngram_size=0, **SMALL))
    assert any(h.token_ids[:4] == [3, 5, 3, 5] for h in looping.hypotheses)
    for hypothesis in guided_decode(lm, clip, targets, [2], Limits(max_length=6), VgdConfig(**SMALL)).hypotheses:
        ids = hypothesis.token_ids
        runs = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
        assert len(set(runs)) == len(runs), ids


def test_joined_prompts_read_as_a_list() -> None:
    assert joined_prompts(["a red circle"]) == "a red circle"
    assert joined_prompts(["a red circle.", " a blue star "]) == "a red circle and a blue star"
    assert joined_prompts(["a", "b,", "", "c"]) == "a, b and c"


def test_copied_from_allows_only_the_sources_words_in_order() -> None:
    source = "a highly detailed picture of a large red circle on a white background, 4k".replace(",", "").split()
    assert copied_from("a red circle on a white background", source, complete=True)
    assert copied_from("a large red circle on a wh", source, complete=False)  # "wh" still growing into "white"
    assert not copied_from("a red circle and a white circle", source, complete=True)  # "and" is not in the source
    assert not copied_from("a white circle", source, complete=True)  # the source has no circle after "white"
    assert not copied_from("a red circle on a wh", source, complete=True)  # a finished word must be whole
    assert not copied_from("a red square", source, complete=False)


def test_distillation_keeping_words_invents_none(language_model: LanguageModel, clip: ClipModel) -> None:
    source = [word.strip(",").lower() for word in LONG_PROMPT.split()]
    result = distill(language_model, clip, LONG_PROMPT, max_length=6, keep_words=True, config=VgdConfig(**SMALL))
    assert result.hypotheses
    assert all(copied_from(h.text, source, complete=True) for h in result.hypotheses if h.finished)
    assert all(copied_from(h.text, source, complete=False) for h in result.hypotheses)
