"""The llama.cpp backend: a GGUF model through llama-cpp-python's low-level API, each beam a sequence of one context,
forked by copying its parent's cache (`llama_memory_seq_cp`: a memory copy, nothing recomputed).
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pictoprompt.errors import InvalidInputError, ModelNotFoundError, PictopromptError
from pictoprompt.models.llm import Beams, LanguageModel, Message, plain_chat, wordless


class LlamaCppModel(LanguageModel):
    n_batch = 512
    n_ubatch = 64
    """Tokens per forward pass. llama.cpp's CPU kernels give a token the same logits in any pass of up to 64
    tokens but switch to other sums in larger ones; at 64 a beam's logits do not depend on how it was batched
    (cached or recomputed), and long prompts lose little speed."""

    def __init__(
        self, model_path: Path, n_threads: int | None = None, n_gpu_layers: int = 0, adapter: Path | None = None
    ) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.model_id = str(model_path)
        self.adapter_id = str(adapter) if adapter else None
        # The wrapper loads the weights, the tokenizer and the metadata; its own context stays idle (the smallest
        # llama.cpp allows): the beams get contexts sized for them.
        self._llama = llama_cpp.Llama(
            model_path=str(model_path), n_ctx=256, n_threads=n_threads, n_gpu_layers=n_gpu_layers, verbose=False
        )
        # Closed while llama_cpp is still importable (its own __del__ fails at interpreter exit); finalizers run
        # newest first, so the contexts made later are freed before the model.
        weakref.finalize(self, self._llama.close)
        # The adapter belongs to the model (llama.cpp frees it with the model) and is set on every beam context.
        self._adapters = None
        if adapter is not None:
            handle = llama_cpp.llama_adapter_lora_init(self._llama.model, str(adapter).encode("utf-8"))
            if not handle:
                raise ModelNotFoundError(
                    f"llama.cpp could not load the LLM adapter '{adapter}' for {model_path.name}; it must be a GGUF "
                    "LoRA adapter made for this model."
                )
            self._adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
        vocab = llama_cpp.llama_model_get_vocab(self._llama.model)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(vocab)
        self._pieces = [self._piece(vocab, token) for token in range(self.vocab_size)]
        eog = [llama_cpp.llama_vocab_is_eog(vocab, t) for t in range(self.vocab_size)]
        control = [llama_cpp.llama_vocab_is_control(vocab, t) for t in range(self.vocab_size)]
        self.stop_tokens = torch.tensor(
            [e or b"\n" in piece for e, piece in zip(eog, self._pieces, strict=True)], dtype=torch.bool
        )
        self.banned_tokens = torch.tensor(control, dtype=torch.bool) & ~self.stop_tokens
        self.wordless_tokens = wordless([piece.decode("utf-8", "ignore") for piece in self._pieces])
        self._bos_text = self._llama.detokenize([self._llama.token_bos()], special=True).decode("utf-8", "ignore")
        self._adds_bos = llama_cpp.llama_vocab_get_add_bos(vocab)
        self._template = self._llama.metadata.get("tokenizer.chat_template")
        self._ctx: object | None = None
        self._n_seq_max = 0
        self._n_ctx_seq = 0
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        self._session = 0

    def _piece(self, vocab: object, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(256)
        length = self._lib.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[: max(length, 0)]

    def _render_chat(self, messages: list[Message]) -> str:
        if not self._template:
            return plain_chat(messages)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        eos_text = self._llama.detokenize([self._llama.token_eos()], special=True).decode("utf-8", "ignore")
        formatter = Jinja2ChatFormatter(self._template, eos_text, self._bos_text, add_generation_prompt=True)
        return formatter(messages=messages).prompt

    def _tokenize_prompt(self, text: str) -> list[int]:
        # llama.cpp adds BOS itself when the model wants one; a template that writes it too would double it.
        if self._adds_bos and self._bos_text and text.startswith(self._bos_text):
            text = text[len(self._bos_text) :]
        return self._llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def tokenize(self, text: str) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return b"".join(self._pieces[t] for t in token_ids).decode("utf-8", "ignore")

    def start(self, prompt_ids: Sequence[int], max_beams: int = 16, max_new_tokens: int = 128) -> Beams:
        return _LlamaCppBeams(self, prompt_ids, max_beams, max_new_tokens)

    def log_likelihoods(self, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        prompt = list(prompt_ids)
        self._new_session(2, len(prompt) + max(map(len, continuations), default=0))
        memory = self._lib.llama_get_memory(self._ctx)
        # The prompt runs once (sequence 0); each continuation runs on a copy of it (sequence 1).
        last_prompt_logits = self._decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        totals = []
        for continuation in continuations:
            tokens = list(continuation)
            if not tokens:
                totals.append(0.0)
                continue
            self._lib.llama_memory_seq_rm(memory, 1, -1, -1)
            self._lib.llama_memory_seq_cp(memory, 0, 1, -1, -1)
            logits = [last_prompt_logits]
            if len(tokens) > 1:
                logits.append(self._decode([(t, len(prompt) + i, 1, True) for i, t in enumerate(tokens[:-1])]))
            log_probs = torch.log_softmax(torch.cat(logits), dim=-1)
            totals.append(float(log_probs[torch.arange(len(tokens)), torch.tensor(tokens)].sum()))
        self._session += 1
        return totals

    def _new_session(self, n_seq_max: int, n_ctx_seq: int) -> int:
        """Make the context hold `n_seq_max` sequences of `n_ctx_seq` cells, empty; a new session ends the last."""
        lib = self._lib
        if n_seq_max > lib.llama_max_parallel_sequences():
            raise InvalidInputError(
                f"llama.cpp holds at most {lib.llama_max_parallel_sequences() // 2} beams; ask for fewer."
            )
        if self._ctx is None or n_seq_max > self._n_seq_max or n_ctx_seq > self._n_ctx_seq:
            if self._ctx is not None:
                self._finalizer()  # frees the old context once
                self._ctx = None
            # Grow in steps so a session a little larger than the last does not rebuild the context.
            n_seq_max, n_ctx_seq = max(n_seq_max, self._n_seq_max), -(-max(n_ctx_seq, self._n_ctx_seq) // 256) * 256
            params = lib.llama_context_default_params()
            params.n_ctx = n_seq_max * n_ctx_seq
            params.n_batch = self.n_batch
            params.n_ubatch = self.n_ubatch
            params.n_seq_max = n_seq_max
            # One cache stream per sequence. (A unified cache, where a fork would only tag the parent's cells,
            # gives beams that no longer match a fresh run once cells are freed, in llama.cpp 0.3.36.)
            params.kv_unified = False
            params.n_threads = params.n_threads_batch = self._llama.context_params.n_threads
            self._ctx = lib.llama_init_from_model(self._llama.model, params)
            if self._ctx is None:
                raise PictopromptError(
                    f"llama.cpp could not allocate {n_seq_max} sequences of {n_ctx_seq} tokens for {self.model_id}."
                )
            self._finalizer = weakref.finalize(self, lib.llama_free, self._ctx)
            if self._adapters is not None and lib.llama_set_adapters_lora(
                self._ctx, self._adapters, 1, (ctypes.c_float * 1)(1.0)
            ):
                raise PictopromptError(f"llama.cpp could not apply the LLM adapter '{self.adapter_id}'.")
            self._n_seq_max, self._n_ctx_seq = n_seq_max, n_ctx_seq
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        self._session += 1
        return self._session

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        """Decode (token, position, sequence, wants_logits) entries in batches; the wanted logits in order."""
        rows = []
        for begin in range(0, len(entries), self.n_batch):
            chunk = entries[begin : begin + self.n_batch]
            self._batch.n_tokens = len(chunk)
            for i, (token, position, sequence, wants_logits) in enumerate(chunk):
                self._batch.token[i] = token
                self._batch.pos[i] = position
                self._batch.n_seq_id[i] = 1
                self._batch.seq_id[i][0] = sequence
                self._batch.logits[i] = wants_logits
            status = self._lib.llama_decode(self._ctx, self._batch)
            if status != 0:
                raise PictopromptError(f"llama.cpp failed to decode a batch (status {status}).")
            wanted = sum(1 for entry in chunk if entry[3])
            if wanted:
                logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self._ctx), shape=(wanted, self.vocab_size))
                rows.append(torch.from_numpy(logits.copy()))
        return torch.cat(rows)


class _LlamaCppBeams(Beams):
    def __init__(self, model: LlamaCppModel, prompt_ids: Sequence[int], max_beams: int, max_new_tokens: int) -> None:
        prompt = list(prompt_ids)
        self._model = model
        # Children take ids their parents do not hold, so two sets of ids alternate: 2 x max_beams sequences.
        self._session = model._new_session(2 * max_beams, len(prompt) + max_new_tokens + 1)
        self._memory = model._lib.llama_get_memory(model._ctx)
        logits = model._decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        self._sequences = [0]
        super().__init__(prompt, logits)

    def _advance(self, parents: list[int], tokens: list[int]) -> torch.Tensor:
        model, lib = self._model, self._model._lib
        if model._session != self._session:
            raise RuntimeError("this beam session was ended by a later `start` on the same model")
        held = set(self._sequences)
        free = [s for s in range(model._n_seq_max) if s not in held][: len(parents)]
        if len(free) < len(parents):
            raise ValueError(f"this session was started for at most {model._n_seq_max // 2} beams")
        for child, parent in zip(free, parents, strict=True):
            lib.llama_memory_seq_cp(self._memory, self._sequences[parent], child, -1, -1)
        for sequence in held:
            lib.llama_memory_seq_rm(self._memory, sequence, -1, -1)
        self._sequences = free
        prompt_length = len(self.prompt_ids)
        return model._decode(
            [
                (token, prompt_length + len(self.tokens[parent]), child, True)
                for child, parent, token in zip(free, parents, tokens, strict=True)
            ]
        )

    def close(self) -> None:
        if self._model._session == self._session:
            self._model._lib.llama_memory_clear(self._memory, True)
            self._model._session += 1
