"""Language models for visually guided decoding: one small beam interface, which each backend implements.

`LanguageModel.start` opens a `Beams` session on a chat-formatted prompt; `Beams.extend(parents, tokens)` makes
beam j the old beam `parents[j]` followed by `tokens[j]`, which both extends and forks. Each beam keeps its
key/value cache, so a step costs one new token per beam (the VGD authors' code re-runs every beam from the first
prompt token; `lab.recomputed` does, to check the cache against).

The backends: llama-cpp-python on a GGUF file (`llm_llama_cpp`) and transformers on any causal LM
(`llm_transformers`); which one a profile gets, and where its weights come from, is `llm_loading`'s.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import jinja2
import torch

Message = dict[str, str]


class Beams(ABC):
    """The live beams of one decode: token sequences continuing one prompt, with their next-token log-probs.

    `tokens[j]` holds beam j's generated ids (the prompt excluded) and `log_probs[j]` the log-probabilities of its
    next token over the whole vocabulary, float32 on the CPU. A session starts with one empty beam.
    """

    def __init__(self, prompt_ids: Sequence[int], first_logits: torch.Tensor) -> None:
        self.prompt_ids = list(prompt_ids)
        self.tokens: list[list[int]] = [[]]
        self.log_probs = torch.log_softmax(first_logits.float().cpu(), dim=-1)

    def extend(self, parents: Sequence[int], tokens: Sequence[int]) -> None:
        """Replace the beams: new beam j is old beam `parents[j]` followed by `tokens[j]`."""
        if len(parents) != len(tokens) or not parents:
            raise ValueError("extend needs one parent per token and at least one beam")
        if not all(0 <= p < len(self.tokens) for p in parents):
            raise ValueError(f"parents must index the {len(self.tokens)} live beams")
        logits = self._advance(list(parents), list(tokens))
        self.tokens = [[*self.tokens[p], t] for p, t in zip(parents, tokens, strict=True)]
        self.log_probs = torch.log_softmax(logits.float().cpu(), dim=-1)

    @abstractmethod
    def _advance(self, parents: list[int], tokens: list[int]) -> torch.Tensor:
        """Run the model for the new beams (`self.tokens` still holds the old ones); their last logits (B, V)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the session holds; the beams cannot be extended afterwards."""

    def __enter__(self) -> Beams:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def wordless(texts: Sequence[str]) -> torch.Tensor:
    """(len(texts),) bool: which texts hold no letter or digit."""
    return torch.tensor([not any(c.isalnum() for c in text) for text in texts], dtype=torch.bool)


class LanguageModel(ABC):
    """What guided decoding needs of a causal LM."""

    model_id: str
    adapter_id: str | None = None
    """The LoRA adapter applied on top of the model, if any."""
    fallback_note: str | None = None
    """Set when the bundled SmolLM2 stood in for the profile's LLM (not on this machine): one line saying so."""
    vocab_size: int
    stop_tokens: torch.Tensor
    """(V,) bool: end of generation or a newline inside the token: a prompt is one line, so these end it."""
    banned_tokens: torch.Tensor
    """(V,) bool: control tokens that end nothing and never belong in a prompt (role markers, padding rows)."""
    wordless_tokens: torch.Tensor
    """(V,) bool: tokens with no letter or digit (markup such as a code fence or a quote, spaces, byte pieces);
    an answer may not start with one, or a small LLM answers with a code fence and a newline and stops there."""

    @abstractmethod
    def _render_chat(self, messages: list[Message]) -> str:
        """The model's chat template over `messages`, with the assistant's turn opened."""

    @abstractmethod
    def _tokenize_prompt(self, text: str) -> list[int]:
        """Token ids of rendered chat text, whose special-token strings become special tokens."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text, without special tokens."""

    @abstractmethod
    def detokenize(self, token_ids: Sequence[int]) -> str: ...

    @abstractmethod
    def start(self, prompt_ids: Sequence[int], max_beams: int = 16, max_new_tokens: int = 128) -> Beams:
        """Run the prompt and open a beam session on it, for at most `max_beams` beams of `max_new_tokens`."""

    def chat_prompt(self, system: str, user: str, answer_prefix: str = "") -> list[int]:
        """Token ids of a chat with one system and one user message, the answer already begun with `answer_prefix`."""
        try:
            text = self._render_chat([{"role": "system", "content": system}, {"role": "user", "content": user}])
        except jinja2.TemplateError:
            # Some templates (Gemma, early Mistral) refuse a system role; they expect it inside the user turn.
            text = self._render_chat([{"role": "user", "content": f"{system}\n\n{user}"}])
        return self._tokenize_prompt(text + answer_prefix)

    @abstractmethod
    def log_likelihoods(self, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        """For each continuation, the sum of log P(token | prompt, the continuation's earlier tokens)."""


def plain_chat(messages: list[Message]) -> str:
    """A neutral layout for models that ship no chat template."""
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*turns, "Assistant: "])


def perplexity(log_likelihood: float, num_tokens: int) -> float:
    """exp(-mean log-likelihood per token); 1.0 for an empty text."""
    return math.exp(-log_likelihood / num_tokens) if num_tokens else 1.0
