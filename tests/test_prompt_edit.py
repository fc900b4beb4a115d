"""Editing through the picture's readable prompt: where the edit goes and the states drawn (the tool: test_sd_ipc)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from pictoprompt.errors import InvalidInputError
from pictoprompt.methods.prompt_edit import (
    edited_states,
    rewrite_candidates,
    rewrite_prompt,
)
from pictoprompt.models.llm import LanguageModel, Message


class JudgingLM(LanguageModel):
    """Scores a text by a table of known texts (mean log-probability per token); anything else is unlikely."""

    def __init__(self, means: dict[str, float]) -> None:
        self.means = means
        self.model_id = "judge"
        self.vocab_size = 1
        self.stop_tokens = self.banned_tokens = self.wordless_tokens = torch.zeros(1, dtype=torch.bool)
        self.seen: list[str] = []

    def _render_chat(self, messages: list[Message]) -> str:
        return ""

    def _tokenize_prompt(self, text: str) -> list[int]:
        return [0]

    def tokenize(self, text: str) -> list[int]:
        self.seen.append(text)
        return [len(self.seen) - 1] * len(text.split())

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return ""

    def start(self, prompt_ids: Sequence[int], use_cache: bool = True, max_beams: int = 16, max_new_tokens: int = 128):
        raise NotImplementedError

    def log_likelihoods(self, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        texts = [self.seen[ids[0]] for ids in continuations]
        return [self.means.get(text, -9.0) * len(text.split()) for text in texts]


def texts(candidates: list[tuple[str, int, int]]) -> list[str]:
    return [text for text, _, _ in candidates]


def test_candidates_replace_a_word_by_a_word_and_insert_it_but_never_keep_the_source() -> None:
    candidates = rewrite_candidates("a red circle on the left", "blue")
    assert "a blue circle on the left" in texts(candidates)
    assert "a red blue on the left" in texts(candidates)
    assert "a blue red circle on the left" in texts(candidates)
    assert "a red circle on the left, blue" in texts(candidates)
    assert "a red circle on the left blue" in texts(candidates)
    assert "a red circle on the left" not in texts(candidates)
    # A one-word edit replaces one word at most.
    assert "a blue on the left" not in texts(candidates)
    assert ("a blue circle on the left", 1, 1) in candidates and ("a blue red circle on the left", 1, 0) in candidates


def test_longer_edits_replace_longer_runs_and_articles_follow_the_next_word() -> None:
    candidates = texts(rewrite_candidates("a green heart in the bottom left corner", "on the right"))
    assert "a green heart on the right" in candidates
    # A description with no place yet gains one as the prompt reads on, not only as a clause after a comma.
    assert "a striped green heart on the left" in texts(rewrite_candidates("a striped green heart", "on the left"))
    assert "an orange circle" in texts(rewrite_candidates("a red circle", "orange"))
    assert "a red star" in texts(rewrite_candidates("a red circle", "a star"))
    assert "an umbrella" in texts(rewrite_candidates("a dog", "umbrella"))


@pytest.mark.parametrize(("source", "edit"), [("", "blue"), ("a red circle", "  ")])
def test_an_empty_prompt_or_edit_is_refused(source: str, edit: str) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        rewrite_candidates(source, edit)


def test_the_llm_picks_the_rewrite_and_an_earlier_change_wins_a_near_tie() -> None:
    source = "a white triangle on an orange background"
    judge = JudgingLM({"a red triangle on an orange background": -1.05, "a white triangle on a red background": -1.0})
    assert rewrite_prompt(judge, source, "red") == "a red triangle on an orange background"
    judge = JudgingLM({"a red triangle on an orange background": -1.5, "a white triangle on a red background": -1.0})
    assert rewrite_prompt(judge, source, "red") == "a white triangle on a red background"


def test_within_the_margin_the_rewrite_dropping_fewer_words_wins() -> None:
    judge = JudgingLM({"a star on the left": -1.0, "a red star on the left": -1.08})
    assert rewrite_prompt(judge, "a red circle on the left", "a star") == "a red star on the left"
    judge = JudgingLM({"a star on the left": -1.0, "a red star on the left": -1.3})
    assert rewrite_prompt(judge, "a red circle on the left", "a star") == "a star on the left"


def test_edited_states_are_the_targets_at_alpha_one_and_the_sources_eos_at_alpha_zero() -> None:
    torch.manual_seed(0)
    source, target, f_cnvrt = torch.randn(1, 6, 4), torch.randn(1, 6, 4), torch.randn(2, 4)
    full = edited_states(source, 2, target, 3, f_cnvrt, alpha=1.0)
    assert full.shape == (2, 6, 4)
    torch.testing.assert_close(full, target.expand(2, -1, -1))
    none = edited_states(source, 2, target, 3, f_cnvrt, alpha=0.0)
    torch.testing.assert_close(none[:, :3], target[:, :3].expand(2, -1, -1))
    torch.testing.assert_close(none[:, 3:], source[0, 2].expand(2, 3, 4))
    twice = edited_states(source, 2, target, 3, alpha=2.0)
    torch.testing.assert_close(twice[0, 4], source[0, 2] + 2 * (target[0, 4] - source[0, 2]))
    residual = edited_states(source, 2, target, 3, f_cnvrt, alpha=1.0, residual=0.5)
    torch.testing.assert_close(residual[1, 5], target[0, 5] + 0.5 * (f_cnvrt[1] - source[0, 2]))
    with pytest.raises(ValueError, match="converted embedding"):
        edited_states(source, 2, target, 3, None, residual=0.5)
