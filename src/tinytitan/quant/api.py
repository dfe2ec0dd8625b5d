"""`quantize(model, config)`: turn a loaded model into a smaller variant that runs in fewer bits.

Offline quantization (here and in int_quant / ggml_formats) is kept apart from the runtime kernels
(modules.py): each weight is quantized to a stored form (an IntWeight, or raw GGML blocks) that is what
artifacts and GGUF exports save, then a runtime matrix is built from that stored form by module swap.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from tinytitan.quant.calib import ActivationStats, calibration_sequences, collect_stats
from tinytitan.quant.int_quant import gptq, quantize_int
from tinytitan.quant.recover import RecoverSettings, recover
from tinytitan.quant.schemes import QuantConfig, QuantConfigError, TensorScheme
from tinytitan.quant.stored import StoredTensor, assemble_quantized, float_weight

K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def effective_group(scheme: TensorScheme, cols: int) -> int:
    """Group sizes must divide the row length (SmolLM2's 576 is not a multiple of 128)."""
    if scheme.kind != "int" or scheme.group == 0 or scheme.bits == 8:
        return cols if scheme.bits == 8 or scheme.group == 0 else scheme.group
    g = scheme.group
    while cols % g and g > 16:
        g //= 2
    return g


def source_blocks(model, param: str) -> tuple[str, np.ndarray] | None:
    """The source GGUF's own blocks for one of our parameters (rows in our order), if it has them."""
    if model.source.kind != "gguf":
        return None
    from tinytitan.io.gguf import GGUFFile, gguf_name

    f = model.gguf
    if f is None:
        f = model.gguf = GGUFFile(model.source.path)
    name = gguf_name(f.arch, param)
    if name is None or name not in f.tensors:
        return None
    return f.tensors[name].type_name, np.ascontiguousarray(f.blocks(name, model.config))


def quantize_weight(
    name: str,
    w: torch.Tensor,
    scheme: TensorScheme,
    method: str,
    stats: ActivationStats | None,
    model=None,
    importance: torch.Tensor | None = None,
) -> StoredTensor:
    n, k = w.shape
    if scheme.kind == "keep":  # the source file's own blocks: lossless and free
        found = source_blocks(model, "embed_tokens.weight" if name == "lm_head" else f"{name}.weight")
        if found is None:
            return StoredTensor(TensorScheme("float"), (n, k), note="keep: no source blocks, kept as bf16")
        gtype, raw = found
        if gtype in ("F32", "F16", "BF16"):
            return StoredTensor(TensorScheme("float"), (n, k))
        return StoredTensor(TensorScheme("ggml", ggml_type=gtype), (n, k), ggml_raw=raw)
    imp = stats.importance(name) if stats is not None and method in ("imatrix", "gptq", "awq") else None
    if importance is not None:
        imp = importance
    if scheme.kind == "float":
        return StoredTensor(scheme, (n, k))
    if scheme.kind == "rows":
        from tinytitan.quant.row_tiers import row_importance, tier_assignment

        tiers = scheme.tier_schemes()
        row_tier = tier_assignment(row_importance(stats, n), [f for _, f in tiers[:-1]])
        parts = [
            quantize_weight(name, w[row_tier == t], sub, method, stats, model, importance)
            for t, (sub, _) in enumerate(tiers)
        ]
        sizes = ", ".join(f"{p.scheme.label()} {p.shape[0]:,}" for p in parts)
        return StoredTensor(scheme, (n, k), row_tier=row_tier, parts=parts, note=f"row tiers: {sizes} rows")
    if scheme.kind == "int":
        group = effective_group(scheme, k)
        sym = scheme.symmetric or scheme.bits == 8  # the int8 kernel has no zero point
        applied = TensorScheme("int", scheme.bits, 0 if group == k else group, sym)
        note = f"group {scheme.group} -> {group}: {k} columns" if group not in (scheme.group, k) else ""
        if method == "gptq" and name == "lm_head":
            note = "embedding/head: importance-weighted rounding (GPTQ over 262k rows is too slow on a CPU)"
        if method == "gptq" and name != "lm_head" and stats is not None and name in stats.hessian:
            qw = gptq(w, stats.hessian[name], scheme.bits, group, sym)
        else:
            qw = quantize_int(w, scheme.bits, group, sym, imp)
        return StoredTensor(applied, (n, k), int_weight=qw, note=note)
    from tinytitan.quant.ggml_formats import FORMATS, fallback_type

    gtype = str(scheme.ggml_type).upper()
    note = ""
    if gtype in K_QUANTS and k % 256:
        fb = fallback_type(gtype, k)
        note = f"{gtype} -> {fb}: {k} columns are not a multiple of 256 (llama.cpp's fallback)"
        gtype = fb
    fmt = FORMATS[gtype]
    weights = None if imp is None else imp.numpy().astype(np.float32)
    raw = fmt.quantize_blocks(w.float().numpy(), weights)
    return StoredTensor(TensorScheme("ggml", ggml_type=gtype), (n, k), ggml_raw=raw, note=note)


def linear_names(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def quantize(
    model,
    config: QuantConfig,
    calib_text: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    stats: ActivationStats | None = None,
):
    """A new Model whose weights run quantized; `model` itself is left untouched."""
    module = model.module
    if model.packed:
        raise QuantConfigError(
            "this model runs its weights as stored; quantize from the float32 reference: "
            "tinytitan.load(..., reference=True)"
        )
    if not module.cfg.tie_embeddings:  # type: ignore[union-attr]
        raise QuantConfigError("untied output heads are not supported by the quantizer yet")
    if stats is None and config.calibrated:
        stats = gather_stats(model, config, calib_text, progress)
    names = ["embed_tokens", *linear_names(module)]
    scaled: dict[str, torch.Tensor] = {}
    col_scale: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    if config.method == "awq" and stats is not None:
        from tinytitan.quant.awq import scaled_weights, search_scales

        groups = search_scales(module, stats, config, lambda k: effective_group(config.blocks, k), progress)
        scaled, norms = scaled_weights(module, groups)
        col_scale = {n: g.scale for g in groups if g.scale is not None for n in g.linears}
    tensors: dict[str, StoredTensor] = {}
    for i, name in enumerate(names):
        if progress:
            progress(name, i, len(names))
        w = scaled.get(name, float_weight(module, name))
        scheme = config.scheme_for(f"{name}.weight")
        imp = None
        if name in col_scale and stats is not None and stats.importance(name) is not None:
            imp = stats.importance(name) / col_scale[name] ** 2  # the scaled column's input is x / s
        tensors[f"{name}.weight"] = quantize_weight(
            "lm_head" if name == "embed_tokens" else name, w, scheme, config.method, stats, model, imp
        )
    if norms:
        alphas = sorted({f"{g.alpha:g}" for g in groups if g.scale is not None})
        note = (
            f"awq: {len(col_scale)} matrices scaled (alpha in {', '.join(alphas)}); "
            "the scales are folded into the norms and up-projection rows"
        )
    else:
        note = ""
    out = assemble_quantized(model, config, tensors, norms, scaled)
    if note:
        out.quant.notes.append(note)
    if config.recover_steps:
        settings = RecoverSettings(config.recover_steps, config.recover_tokens)
        out = recover(model, out, settings, calib_text, progress, scaled)
    return out


def gather_stats(
    model,
    config: QuantConfig,
    calib_text: str | None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ActivationStats:
    seqs = calibration_sequences(
        model,
        calib_text,
        config.calib_tokens,
        progress=(lambda msg: progress(msg, 0, 1)) if progress else None,
    )
    return collect_stats(
        model.module,
        seqs,
        want_hessian=config.method == "gptq",
        progress=(lambda i, n: progress("calibration statistics", i, n)) if progress else None,
        want_token_mass=config.row_tiered,
    )
