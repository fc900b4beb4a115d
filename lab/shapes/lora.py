"""Training a LoRA adapter for the bundled LLM, written in llama.cpp's GGUF adapter format
(`pictoprompt.models.lora` reads and merges it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pictoprompt.models.lora import GGUF_NAMES, TARGET_MODULES, linear_layers, rope_permutation


class LoraAdapter(nn.Module):
    """Trainable low-rank updates `W x + (alpha / rank) * B A x` on a frozen model's linear layers.

    B starts at zero, so a new adapter leaves the model unchanged. `attach` hooks it into the model; the hooks stay
    until `detach`.
    """

    def __init__(
        self, model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = TARGET_MODULES
    ) -> None:
        super().__init__()
        self.rank, self.alpha, self.targets = rank, alpha, tuple(targets)
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        generator = torch.Generator().manual_seed(0)
        for index, name, layer in linear_layers(model, self.targets):
            key = f"{index}_{name}"
            a = torch.empty(rank, layer.in_features)
            # Kaiming-uniform A as in the LoRA paper's reference code; B = 0.
            bound = 1 / layer.in_features**0.5
            self.lora_a[key] = nn.Parameter(a.uniform_(-bound, bound, generator=generator))
            self.lora_b[key] = nn.Parameter(torch.zeros(layer.out_features, rank))
        self._model = [model]  # not a submodule: its weights are not the adapter's
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _hook(self, key: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
        def add_update(_: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            a, b = self.lora_a[key], self.lora_b[key]
            return output + self.scale * (inputs[0].to(a.dtype) @ a.T @ b.T).to(output.dtype)

        return add_update

    def attach(self) -> LoraAdapter:
        for index, name, layer in linear_layers(self._model[0], self.targets):
            self._hooks.append(layer.register_forward_hook(self._hook(f"{index}_{name}")))
        return self

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def save_gguf(self, path: Path, heads: int, kv_heads: int) -> None:
        """Write the adapter in llama.cpp's GGUF adapter format (float16 tensors), atomically."""
        import gguf

        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        writer = gguf.GGUFWriter(str(partial), arch="llama")
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(self.alpha))
        for key in self.lora_a:
            index, name = key.split("_", 1)
            a = self.lora_a[key].detach().float()
            b = self.lora_b[key].detach().float()
            if name in ("q_proj", "k_proj"):
                b = b[rope_permutation(b.shape[0], heads if name == "q_proj" else kv_heads)]
            base = f"blk.{index}.{GGUF_NAMES[name]}.weight"
            writer.add_tensor(f"{base}.lora_a", a.numpy().astype(np.float16))
            writer.add_tensor(f"{base}.lora_b", b.numpy().astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(path)
