"""The LLM backends behind guided decoding: a tiny random transformers Llama and the bundled SmolLM2 GGUF.

Both must give the same answers through the beam interface whether beams reuse their key/value cache or are
recomputed from the first prompt token, and fork and drop beams correctly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lab.recomputed import RecomputedLlm
from pictoprompt.errors import InvalidInputError, ModelNotFoundError
from pictoprompt.models.llm import LanguageModel, perplexity
from pictoprompt.models.llm_llama_cpp import LlamaCppModel
from pictoprompt.models.llm_loading import default_gguf_path, load_language_model
from pictoprompt.models.llm_transformers import TransformersModel
from pictoprompt.models.profiles import LlmSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prompt_for(llm: LanguageModel) -> list[int]:
    return llm.chat_prompt("You write image prompts.", "Describe a red circle:", "Sure, here is a prompt:\n")


def walk(llm: LanguageModel, use_cache: bool, steps: int = 4, width: int = 3) -> list[tuple[list[list[int]], Tensor]]:
    """A fixed pattern of forks and drops: each step every beam's top tokens, parents taken out of order."""
    records = []
    decoding = llm if use_cache else RecomputedLlm(llm)
    with decoding.start(prompt_for(llm), max_beams=width, max_new_tokens=steps) as beams:
        for step in range(steps):
            parents = [(step + j) % len(beams.tokens) for j in range(width)]
            tokens = [int(beams.log_probs[p].topk(width).indices[j]) for j, p in enumerate(parents)]
            beams.extend(parents, tokens)
            records.append(([list(t) for t in beams.tokens], beams.log_probs.clone()))
    return records


def test_the_default_llm_is_the_bundled_smollm2(load_llm: Callable[[str], LanguageModel]) -> None:
    path = default_gguf_path()
    assert path.suffix == ".gguf" and "SmolLM2" in path.name
    assert isinstance(load_llm("llama_cpp"), LlamaCppModel)
    assert isinstance(load_llm("transformers"), TransformersModel)


def test_missing_models_are_reported_with_a_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="GGUF"):
        load_language_model(LlmSpec(source=str(tmp_path / "absent.gguf")), torch.device("cpu"))
    with pytest.raises(InvalidInputError, match=r"llm\.adapter"):
        load_language_model(LlmSpec(adapter=str(tmp_path / "absent-adapter.gguf")), torch.device("cpu"))


def test_chat_prompt_opens_the_answer(language_model: LanguageModel) -> None:
    text = language_model.detokenize(prompt_for(language_model))
    # The answer's opening words come last, ending on the newline that the decoder's stop rule relies on.
    assert "red" in text and text.endswith("\n")
    assert language_model.detokenize(language_model.tokenize("red circle")).strip() == "red circle"


def test_stop_and_banned_tokens(language_model: LanguageModel) -> None:
    stop, banned = language_model.stop_tokens, language_model.banned_tokens
    assert stop.shape == banned.shape == (language_model.vocab_size,)
    assert not (stop & banned).any()
    newline = language_model.tokenize("red\ncircle")
    assert any(stop[t] for t in newline), "a newline token ends a prompt"
    assert not any(stop[t] for t in language_model.tokenize("red circle"))
    wordless = language_model.wordless_tokens
    assert wordless.shape == stop.shape
    assert not any(wordless[t] for t in language_model.tokenize("red circle"))
    for token in range(language_model.vocab_size):
        text = "" if stop[token] or banned[token] else language_model.detokenize([token])
        if text:
            assert bool(wordless[token]) == (not any(c.isalnum() for c in text)), (token, text)


def test_extend_forks_and_drops_beams(language_model: LanguageModel) -> None:
    with language_model.start(prompt_for(language_model), max_beams=3) as beams:
        assert beams.tokens == [[]] and beams.log_probs.shape == (1, language_model.vocab_size)
        beams.extend([0, 0, 0], [5, 6, 7])
        beams.extend([2, 2, 0], [8, 9, 10])
        assert beams.tokens == [[7, 8], [7, 9], [5, 10]]
        assert torch.allclose(beams.log_probs.exp().sum(-1), torch.ones(3), atol=1e-3)
        with pytest.raises(ValueError):
            beams.extend([3], [1])


def test_cached_beams_match_recomputed_beams(language_model: LanguageModel) -> None:
    cached, recomputed = walk(language_model, use_cache=True), walk(language_model, use_cache=False)
    for (tokens_a, log_probs_a), (tokens_b, log_probs_b) in zip(cached, recomputed, strict=True):
        assert tokens_a == tokens_b
        torch.testing.assert_close(log_probs_a, log_probs_b, atol=1e-4, rtol=0)


def test_log_likelihoods_sum_the_next_token_log_probs(language_model: LanguageModel) -> None:
    prompt = prompt_for(language_model)
    texts = [language_model.tokenize("a red circle"), language_model.tokenize("blue"), []]
    expected = []
    for tokens in texts:
        total = 0.0
        with language_model.start(prompt, max_beams=1) as beams:
            for i, token in enumerate(tokens):
                total += float(beams.log_probs[0, token])
                if i + 1 < len(tokens):
                    beams.extend([0], [token])
        expected.append(total)
    assert language_model.log_likelihoods(prompt, texts) == pytest.approx(expected, abs=1e-3)
    assert perplexity(expected[0], len(texts[0])) == pytest.approx(2.718281828 ** (-expected[0] / len(texts[0])))


def test_a_new_llama_session_ends_the_previous_one(load_llm: Callable[[str], LanguageModel]) -> None:
    llm = load_llm("llama_cpp")
    first = llm.start(prompt_for(llm))
    llm.start(prompt_for(llm)).close()
    with pytest.raises(RuntimeError, match="ended"):
        first.extend([0], [5])
