"""Export a quantized model to GGUF, so llama.cpp and Ollama run it.

GGML block formats are written as they are. Our integer groups convert losslessly where a GGML type
holds them: int4/int3/int2 asymmetric groups of >= 32 -> Q4_1 (f16 scale and minimum per 32 weights),
symmetric ones -> Q4_0; int8 per-row weights are requantized to Q8_0 (per 32). Sizes can therefore grow
on export for 3- and 2-bit schemes (llama.cpp has no 3/2-bit type for 640-wide rows); the export says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from tinytitan.errors import TinyTitanError
from tinytitan.quant.int_quant import IntWeight
from tinytitan.quant.stored import StoredTensor


def int_to_q4(qw: IntWeight) -> tuple[str, np.ndarray]:
    """IntWeight (bits <= 4, group multiple of 32) -> exact Q4_1 (asymmetric) or Q4_0 (symmetric) blocks."""
    n, k = qw.q.shape
    if qw.group % 32:
        raise TinyTitanError(f"group {qw.group} is not a multiple of 32")
    reps = qw.group // 32
    scale = qw.scale.repeat_interleave(reps, dim=1).numpy().astype(np.float16)  # [n, k/32]
    q = qw.q.numpy().astype(np.uint8).reshape(n, k // 32, 32)
    if qw.symmetric:
        q = q + (8 - qw.offset)  # Q4_0: value = (q - 8) * d
    nib = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)  # weight j in the low nibble, j+16 high
    parts = [scale.view(np.uint8).reshape(n, k // 32, 2)]
    if not qw.symmetric:
        zero = qw.zero.repeat_interleave(reps, dim=1).numpy().astype(np.float16)
        parts.append(zero.view(np.uint8).reshape(n, k // 32, 2))
    blocks = np.concatenate([*parts, nib], axis=-1)
    return ("Q4_0" if qw.symmetric else "Q4_1"), np.ascontiguousarray(blocks.reshape(n, -1))


def stored_to_gguf(st: StoredTensor, weight: torch.Tensor) -> tuple[str, np.ndarray | torch.Tensor, str]:
    """(GGML type, raw blocks or float weight, note) for one tensor."""
    if st.parts is not None:  # a GGUF tensor has one type: rows of every tier in the widest one
        if all(p.int_weight is not None and p.int_weight.bits <= 4 for p in st.parts):
            return "Q4_1", st.dequantize(), f"{st.scheme.label()} -> Q4_1 (one type per GGUF tensor)"
        return "Q8_0", st.dequantize(), f"{st.scheme.label()} -> Q8_0 (one type per GGUF tensor; larger file)"
    if st.ggml_raw is not None:
        return str(st.scheme.ggml_type), st.ggml_raw, ""
    if st.int_weight is not None:
        qw = st.int_weight
        if qw.bits <= 4 and qw.group % 32 == 0:
            t, raw = int_to_q4(qw)
            note = f"{st.scheme.label()} -> {t} (exact, {'4.5' if t == 'Q4_0' else '5.0'} bits/weight)"
            return t, raw, note if qw.bits < 4 or qw.group != 32 else ""
        return "Q8_0", qw.dequantize(), f"{st.scheme.label()} -> Q8_0 (requantized per 32 weights)"
    return "F16", weight.float(), f"{st.scheme.label()} -> F16"


def export_gguf(model, out: str | os.PathLike[str], force: bool = False) -> Path:
    from tinytitan.io.gguf import GGUFFile
    from tinytitan.io.gguf_write import export_state

    info = model.quant
    if model.source.kind not in ("gguf", "artifact"):
        raise TinyTitanError("GGUF export needs a model that came from a GGUF file (its metadata is copied)")
    src_path = (
        Path(model.artifact["source"]["path"]) if model.source.kind == "artifact" else model.source.path
    )
    if not src_path.exists():
        raise TinyTitanError(f"the source GGUF {src_path} is needed for its metadata and is missing")
    source = GGUFFile(src_path)
    state: dict[str, tuple] = {}
    notes: list[str] = []
    for pname, p in model.module.named_parameters():
        if p.dim() == 1:
            state[pname] = ("F32", p.detach().float())
    if info is None:
        for pname, p in model.module.named_parameters():
            if p.dim() == 2 and pname != "lm_head.weight":
                state[pname] = ("F16", p.detach().float())
    else:
        for pname, st in info.tensors.items():
            weight = st.dequantize() if (st.int_weight is not None or st.ggml_raw is not None) else None
            if weight is None:
                from tinytitan.quant.artifact import float_weight

                weight = float_weight(model.module, pname)
            t, data, note = stored_to_gguf(st, weight)
            state[pname] = (t, data)
            if note and note not in notes:
                notes.append(note)
    path = export_state(out, state, model.config, source, force=force)
    if info is not None:
        info.notes.extend(f"gguf: {n}" for n in notes)
    return path
