"""The transformers backend: any causal LM with its tokenizer; beams are rows of one batch, forked by reordering
`past_key_values` by parent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pictoprompt.models.llm import Beams, LanguageModel, Message, plain_chat, wordless
from pictoprompt.models.lora import merge_gguf_adapter


class TransformersModel(LanguageModel):
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
            return bos + plain_chat(messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]

    def _tokenize_prompt(self, text: str) -> list[int]:
        # The rendered template already holds BOS and the role markers as text.
        return self.tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[operator]

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[operator]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)  # type: ignore[attr-defined]

    def start(self, prompt_ids: Sequence[int], max_beams: int = 16, max_new_tokens: int = 128) -> Beams:
        return _TransformersBeams(self, prompt_ids)

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
    def __init__(self, model: TransformersModel, prompt_ids: Sequence[int]) -> None:
        self._model = model
        input_ids = torch.tensor([list(prompt_ids)], device=model.device)
        with torch.inference_mode():
            output = model.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        self._past = output.past_key_values
        super().__init__(prompt_ids, output.logits[:, -1])

    def _advance(self, parents: list[int], tokens: list[int]) -> torch.Tensor:
        model = self._model
        if self._past is None:
            raise RuntimeError("this beam session is closed")
        with torch.inference_mode():
            self._past.reorder_cache(torch.tensor(parents, device=model.device))
            input_ids = torch.tensor(tokens, device=model.device)[:, None]
            output = model.model(input_ids=input_ids, past_key_values=self._past, use_cache=True, logits_to_keep=1)
            self._past = output.past_key_values
        return output.logits[:, -1]

    def close(self) -> None:
        self._past = None
