"""Quantized weights as stored (StoredTensor, QuantInfo) and a Model assembled from them.

What an artifact or a GGUF export saves for each weight is a StoredTensor; the runtime matrix that
multiplies it is built from that stored form (`runtime_matrix`), and `assemble_quantized` swaps those
matrices into a shallow copy of the float model. quant/api.py rounds weights into this form.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from tinytitan.quant.int_quant import IntWeight
from tinytitan.quant.modules import INT4_GROUPS, QuantEmbedding, QuantLinear, build_matrix, fuse_projections
from tinytitan.quant.schemes import QuantConfig, TensorScheme


@dataclass
class StoredTensor:
    """What an artifact / GGUF export saves for one weight."""

    scheme: TensorScheme  # the scheme actually applied (after any fallback)
    shape: tuple[int, int]
    int_weight: IntWeight | None = None
    ggml_raw: np.ndarray | None = None  # uint8 blocks
    note: str = ""  # e.g. "Q4_K -> Q5_0: 640 columns are not a multiple of 256"
    row_tier: torch.Tensor | None = None  # rows: uint8 tier id per row (row_tiers.py)
    parts: list[StoredTensor] | None = None  # rows: one stored matrix per tier, rows in ascending order

    def nbytes(self) -> int:
        if self.parts is not None:
            return sum(p.nbytes() for p in self.parts) + int(self.row_tier.numel())  # type: ignore[union-attr]
        if self.int_weight is not None:
            return self.int_weight.nbytes()
        if self.ggml_raw is not None:
            return int(self.ggml_raw.nbytes)
        return self.shape[0] * self.shape[1] * 2

    def dequantize(self) -> torch.Tensor:
        if self.parts is not None:
            w = torch.empty(self.shape)
            for t, part in enumerate(self.parts):
                w[self.row_tier == t] = part.dequantize()
            return w
        if self.int_weight is not None:
            return self.int_weight.dequantize()
        if self.ggml_raw is not None:
            from tinytitan.quant.ggml_formats import FORMATS

            return torch.from_numpy(FORMATS[str(self.scheme.ggml_type)].dequantize_blocks(self.ggml_raw))
        raise ValueError("float tensor has no stored quantized form")


@dataclass
class QuantInfo:
    config: QuantConfig
    tensors: dict[str, StoredTensor]
    float_bytes: int  # norms etc. kept in float32
    n_params: int
    notes: list[str] = field(default_factory=list)

    def file_bytes(self) -> int:
        return sum(t.nbytes() for t in self.tensors.values()) + self.float_bytes

    def bits_per_weight(self) -> float:
        return 8 * self.file_bytes() / self.n_params


def runtime_matrix(stored: StoredTensor, w: torch.Tensor | None, device: torch.device):
    if stored.parts is not None:
        from tinytitan.quant.row_tiers import TieredMatrix

        parts = [runtime_matrix(p, None, device) for p in stored.parts]
        return TieredMatrix(parts, stored.row_tier.to(device))  # type: ignore[union-attr]
    if stored.int_weight is not None:
        return build_matrix(stored.int_weight, None, device)
    if stored.ggml_raw is not None:
        from tinytitan.quant.ggml_formats import to_int4_groups

        gtype = str(stored.scheme.ggml_type)
        if gtype in ("Q4_0", "Q4_1", "Q4_K") and device.type == "cpu":
            q, scale, zero, group = to_int4_groups(gtype, stored.ggml_raw)
            qw = _int4_from_groups(q, scale, zero, group)
            if qw is not None:
                return build_matrix(qw, None, device)
        return build_matrix(None, stored.dequantize(), device)
    return build_matrix(None, w, device)


def _int4_from_groups(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> IntWeight | None:
    """GGML 4-bit blocks as an IntWeight (w = (q - 8) * scale + zero) for the int4 kernel, exactly."""
    if group not in INT4_GROUPS:
        return None
    s = torch.from_numpy(np.asarray(scale, dtype=np.float32))
    z = torch.from_numpy(np.asarray(zero, dtype=np.float32)) - 8 * s  # as w = q * s + z (offset 0)
    return IntWeight(torch.from_numpy(np.asarray(q, dtype=np.uint8)), s, z, 4, group, False)


def param_counts(module: nn.Module) -> tuple[int, int]:
    """(parameters, a tied head counted once; bytes of the 1-D ones, which stay float32 in a variant)."""
    n_params = sum(p.numel() for n, p in module.named_parameters() if n != "lm_head.weight")
    return n_params, sum(p.numel() * 4 for p in module.parameters() if p.dim() == 1)


def float_weight(module: nn.Module, name: str) -> torch.Tensor:
    return module.get_submodule(name).weight.detach()  # type: ignore[union-attr]


def assemble_quantized(
    model,
    config: QuantConfig,
    tensors: dict[str, StoredTensor],
    norms: dict[str, torch.Tensor] | None = None,
    floats: dict[str, torch.Tensor] | None = None,
):
    """A new Model sharing `model`'s float parts, with every quantized tensor swapped in.

    norms: RMSNorm weights to replace ({module name: weight}, e.g. AWQ's folded scales); floats: the
    float weights the tensors were made from where they are not the model's own."""
    from tinytitan.runtime import Model

    module, device = model.module, model.device
    new = copy.copy(module)  # shallow copies along the swapped paths; the original is never modified
    new._modules = dict(module._modules)
    new.layers = nn.ModuleList(copy.copy(b) for b in module.layers)  # type: ignore[union-attr]
    for block in new.layers:  # type: ignore[union-attr]
        block._modules = dict(block._modules)
        for sub in ("self_attn", "mlp"):
            child = copy.copy(getattr(block, sub))
            child._modules = dict(child._modules)
            setattr(block, sub, child)
    for name, weight in (norms or {}).items():
        parent_name, _, attr = name.rpartition(".")
        norm = copy.copy(module.get_submodule(name))
        norm._parameters = {"weight": nn.Parameter(weight.to(norm.weight.dtype), requires_grad=False)}
        setattr(new.get_submodule(parent_name), attr, norm)
    for pname, stored in tensors.items():
        name = pname.rsplit(".", 1)[0]
        w = (floats or {}).get(name)
        if w is None:
            w = float_weight(module, name)
        matrix = runtime_matrix(stored, w, device)
        label = stored.scheme.label()
        if name == "embed_tokens":
            new.embed_tokens = QuantEmbedding(matrix, label, torch.float32)
            new.lm_head = QuantLinear(matrix, label)
        else:
            parent_name, _, attr = name.rpartition(".")
            setattr(new.get_submodule(parent_name), attr, QuantLinear(matrix, label))
    fuse_projections(new)
    notes = list(dict.fromkeys(t.note for t in tensors.values() if t.note))
    n_params, float_bytes = param_counts(module)
    out = Model(model.config, model.tokenizer, new, model.source, device, model.dtype, model.ctx)
    out.quant = QuantInfo(config, tensors, float_bytes, n_params, notes)
    return out
