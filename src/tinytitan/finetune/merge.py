"""Merge an adapter into its base: W' = W + (alpha / r) * B @ A, then save the result as a tinytitan
artifact (bf16 by default, or any quantized variant) or as a GGUF file that llama.cpp and Ollama run."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tinytitan.errors import TinyTitanError
from tinytitan.finetune.lora import FrozenQuantLinear, LoraLinear
from tinytitan.quant.modules import QuantLinear


def merge_adapter(model):
    """Fold every LoRA update of `model.module` into a plain float nn.Linear, in place; returns the model.

    A quantized base weight is dequantized first (the merged layer is float; quantize the result again
    to ship it small)."""
    module = model.module
    merged = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLinear):
            base = child.base
            if isinstance(base, QuantLinear):
                m = base.matrix
                w = m.rows(torch.arange(m.n, device=model.device)).float()
            else:
                w = base.weight.detach().float()  # type: ignore[union-attr]
            layer = nn.Linear(child.in_features, child.out_features, bias=False, device=w.device)
            layer.weight = nn.Parameter((w + child.delta().to(w.device)).to(model.dtype), requires_grad=False)
            _replace(module, name, layer)
            merged += 1
        elif isinstance(child, FrozenQuantLinear):
            _replace(module, name, child.base)
    if not merged:
        raise TinyTitanError("the model carries no adapter to merge")
    module.eval()
    return model.module_changed()


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def save_merged(model, out: str | os.PathLike[str], variant: str | None = None, force: bool = False) -> Path:
    """A merged model -> OUT.gguf (GGUF; F16 unless a variant is given) or OUT/ (a tinytitan artifact,
    bf16 unless a variant is given). Both load with tinytitan.load(OUT)."""
    from tinytitan.quant.api import quantize
    from tinytitan.quant.schemes import parse_variant

    out = Path(out)
    if out.suffix == ".gguf":
        from tinytitan.quant.export import export_gguf

        q = quantize(model, parse_variant(variant)) if variant else model
        return export_gguf(q, out, force=force)
    from tinytitan.quant.artifact import save_artifact

    q = quantize(model, parse_variant(variant or "bf16"))
    return save_artifact(q, out, force=force)
