"""Beams recomputed from the first prompt token at every step, as the VGD authors' code decodes (no key/value
cache): what the product's cached beams are checked against (tests/test_llm.py) and timed against
(`pictoprompt bench vgd`, the speed table). Each backend's recomputation is its own, through its internals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pictoprompt.models.llm import Beams, LanguageModel
from pictoprompt.models.llm_llama_cpp import LlamaCppModel
from pictoprompt.models.llm_transformers import TransformersModel


class RecomputedLlm:
    """An LLM whose beams recompute every token each step; everything else is the wrapped LLM's."""

    def __init__(self, llm: LanguageModel) -> None:
        self.llm = llm

    def __getattr__(self, name: str) -> object:
        return getattr(self.llm, name)

    def start(self, prompt_ids: Sequence[int], max_beams: int = 16, max_new_tokens: int = 128) -> Beams:
        return RecomputedBeams(self.llm, prompt_ids, max_new_tokens)


class RecomputedBeams(Beams):
    def __init__(self, llm: LanguageModel, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        self._llm = llm
        if isinstance(llm, LlamaCppModel):
            llm._new_session(1, len(prompt_ids) + max_new_tokens + 1)
        super().__init__(prompt_ids, self._last_logits([list(prompt_ids)]))

    def _advance(self, parents: list[int], tokens: list[int]) -> torch.Tensor:
        sequences = [[*self.prompt_ids, *self.tokens[p], t] for p, t in zip(parents, tokens, strict=True)]
        return self._last_logits(sequences)

    def _last_logits(self, sequences: list[list[int]]) -> torch.Tensor:
        """Each sequence run from its first token: its last token's logits (B, V)."""
        llm = self._llm
        if isinstance(llm, TransformersModel):
            with torch.inference_mode():
                input_ids = torch.tensor(sequences, device=llm.device)
                return llm.model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        assert isinstance(llm, LlamaCppModel)
        rows = []
        for sequence in sequences:
            # One sequence per call: llama.cpp's sums depend on the batch layout, and a beam run alone
            # reproduces the cached beam's logits bit for bit.
            llm._lib.llama_memory_clear(llm._lib.llama_get_memory(llm._ctx), True)
            rows.append(llm._decode([(t, i, 0, i == len(sequence) - 1) for i, t in enumerate(sequence)]))
        return torch.cat(rows)

    def close(self) -> None:
        pass
