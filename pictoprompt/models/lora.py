"""LoRA adapters for Llama-architecture LLMs, in llama.cpp's GGUF adapter format.

One file serves both LLM backends: llama.cpp applies it natively (`llama_adapter_lora_init`), and the transformers
backend merges it into the linear weights (`merge_gguf_adapter`). The bundled adapter's training is the lab's
(`lab.shapes.lora`).

The GGUF layout follows llama.cpp's own `convert_lora_to_gguf.py`: `general.type = "adapter"`, `adapter.type =
"lora"`, `adapter.lora.alpha`, and per adapted weight two tensors, `<gguf weight name>.lora_a` (r, in) and
`.lora_b` (out, r). llama.cpp stores the query and key projections with their rows permuted for its rotary
embedding (`convert_hf_to_gguf.py`, `LlamaModel.permute`), and transformers undoes that when it loads a GGUF; the
rows of B follow the same permutation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pictoprompt.errors import InvalidInputError

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama block, as LoRA is usually applied to small models."""

GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def linear_layers(model: nn.Module, targets: Sequence[str]) -> Iterator[tuple[int, str, nn.Linear]]:
    """(block index, projection name, layer) of every targeted linear layer of a transformers Llama model."""
    for index, block in enumerate(model.model.layers):  # type: ignore[union-attr]
        for name in targets:
            parent = block.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
            yield index, name, getattr(parent, name)


def rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp stores a query/key projection in: within each head, the two rotary halves
    interleaved (`LlamaModel.permute` of `convert_hf_to_gguf.py`). `weight[perm]` is the GGUF layout."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def read_gguf_adapter(path: Path) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(alpha, {gguf weight name: (A (r, in), B (out, r))}) of a GGUF LoRA adapter, B in llama.cpp's row order."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"The LLM adapter '{path}' is not a readable GGUF file ({error}).") from error
    kinds = [reader.fields.get(name) for name in ("general.type", "adapter.type")]
    kinds_text = [bytes(field.parts[-1]).decode() if field else None for field in kinds]
    alpha_field = reader.fields.get("adapter.lora.alpha")
    if kinds_text != ["adapter", "lora"] or alpha_field is None:
        raise InvalidInputError(
            f"The LLM adapter '{path}' is a GGUF file but not a LoRA adapter (type {kinds_text[0] or 'unknown'}); "
            "point `llm.adapter` at a LoRA adapter file, or drop it."
        )
    alpha = float(alpha_field.parts[-1][0])
    tensors = {tensor.name: np.array(tensor.data, dtype=np.float32) for tensor in reader.tensors}
    pairs = {
        name.removesuffix(".lora_a"): (tensors[name], tensors[name.removesuffix(".lora_a") + ".lora_b"])
        for name in tensors
        if name.endswith(".lora_a")
    }
    return alpha, pairs


def merge_gguf_adapter(model: nn.Module, path: Path) -> int:
    """Add a GGUF LoRA adapter's updates into a transformers Llama model's weights; the number of layers changed."""
    alpha, pairs = read_gguf_adapter(path)
    config = model.config  # type: ignore[union-attr]
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    merged = 0
    with torch.no_grad():
        for index, name, layer in linear_layers(model, TARGET_MODULES):
            pair = pairs.get(f"blk.{index}.{GGUF_NAMES[name]}.weight")
            if pair is None:
                continue
            a, b = (torch.from_numpy(m) for m in pair)
            if b.shape[0] != layer.out_features or a.shape[1] != layer.in_features:
                raise InvalidInputError(
                    f"The LLM adapter '{path}' does not fit this model (block {index} {name}: adapter "
                    f"{tuple(b.shape[:1]) + tuple(a.shape[1:])}, model {tuple(layer.weight.shape)})."
                )
            if name in heads:
                b = b[torch.argsort(rope_permutation(b.shape[0], heads[name]))]
            layer.weight += ((alpha / a.shape[0]) * b @ a).to(layer.weight.dtype)
            merged += 1
    if merged != len(pairs):
        raise InvalidInputError(f"The LLM adapter '{path}' names layers this model does not have.")
    return merged
