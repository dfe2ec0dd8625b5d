"""Activation-aware scaling (AWQ, Lin et al. 2023) for group-wise integer schemes.

Input channels that carry large activations matter more. For a group of matrices that read the same
input x (q/k/v after the attention norm; gate/up after the MLP norm; down alone), AWQ multiplies column j
of every weight by s_j and divides x_j by s_j, which changes nothing in exact arithmetic but gives the
salient columns a finer quantization grid. Here the division is folded into what produces x, so the
runtime executes no extra operation and GGUF export stays a plain llama.cpp file:
- q/k/v and gate/up: the preceding RMSNorm's weight (its final multiplier) is divided by s;
- down: the up projection's rows are divided by s (GeGLU/SwiGLU: act(gate) * up is linear in up).
o_proj is left unscaled (its input mixes heads that share a KV head; the scale cannot be folded exactly).

s = mean|x|^alpha (normalised so that max*min = 1), with alpha chosen per group from a grid by the output
error on calibration activations: || x W^T - (x / s) Q(W diag(s))^T ||^2, each candidate quantized with
the importance-weighted rounding (importance of a scaled column: E[x_j^2] / s_j^2). The search scores up
to 256 evenly spread output rows per matrix with one refit pass; the final quantization uses all rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tinytitan.quant.calib import ActivationStats
from tinytitan.quant.int_quant import quantize_int
from tinytitan.quant.schemes import QuantConfig

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
SEARCH_ROWS = 256


def _rows(w: torch.Tensor) -> torch.Tensor:
    if w.shape[0] <= SEARCH_ROWS:
        return w
    return w[torch.linspace(0, w.shape[0] - 1, SEARCH_ROWS).long()]


@dataclass
class ScaleGroup:
    linears: list[str]  # the matrices that read the same input (their columns are multiplied by s)
    fold_into: str  # the norm whose weight, or the linear whose rows, are divided by s
    fold_kind: str  # "norm" | "rows"
    scale: torch.Tensor | None = None
    alpha: float = 0.0


def scale_groups(module: nn.Module) -> list[ScaleGroup]:
    groups = []
    for i, block in enumerate(module.layers):  # type: ignore[union-attr]
        p = f"layers.{i}"
        groups.append(
            ScaleGroup(
                [f"{p}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")], f"{p}.input_layernorm", "norm"
            )
        )
        mlp_norm = (
            "pre_feedforward_layernorm"
            if hasattr(block, "pre_feedforward_layernorm")
            else "post_attention_layernorm"
        )
        groups.append(ScaleGroup([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.{mlp_norm}", "norm"))
        groups.append(ScaleGroup([f"{p}.mlp.down_proj"], f"{p}.mlp.up_proj", "rows"))
    return groups


def _error(
    ws: list[torch.Tensor], x: torch.Tensor, s: torch.Tensor, scheme, group_of, imp: torch.Tensor
) -> float:
    err = 0.0
    xs = x / s
    for w in ws:
        k = w.shape[1]
        qw = quantize_int(w * s, scheme.bits, group_of(k), scheme.symmetric, imp / (s * s), iters=1)
        err += float(((x @ w.T - xs @ qw.dequantize().T) ** 2).sum())
    return err


@torch.inference_mode()
def search_scales(
    module: nn.Module,
    stats: ActivationStats,
    config: QuantConfig,
    group_of: Callable[[int], int],
    progress: Callable[[str, int, int], None] | None = None,
) -> list[ScaleGroup]:
    """Per group, the scale (or None where AWQ does not apply: non-integer schemes, no statistics)."""
    groups = scale_groups(module)
    for gi, g in enumerate(groups):
        if progress:
            progress(f"awq scales {g.linears[0].rsplit('.', 1)[0]}", gi, len(groups))
        schemes = {config.scheme_for(f"{n}.weight") for n in g.linears}
        first = g.linears[0]
        if len(schemes) != 1 or next(iter(schemes)).kind != "int" or first not in stats.samples:
            continue
        scheme = next(iter(schemes))
        if scheme.bits == 8:
            continue  # int8 rows lose almost nothing; scaling would only move error around
        x = stats.samples[first].float()
        absmean = (stats.absmean[first] / max(stats.tokens, 1)).clamp_min(1e-6)
        imp = stats.sq[first] / max(stats.tokens, 1)
        # the search estimates the error on at most SEARCH_ROWS output rows of each matrix (evenly spread)
        ws = [_rows(module.get_submodule(n).weight.detach().float()) for n in g.linears]
        best = (float("inf"), 0.0, torch.ones_like(absmean))
        for a in ALPHAS:
            s = absmean**a
            s = s / (s.max() * s.min()).sqrt()
            e = _error(ws, x, s, scheme, group_of, imp)
            if e < best[0]:
                best = (e, a, s)
        if best[1] > 0:
            g.scale, g.alpha = best[2], best[1]
    return groups


def scaled_weights(
    module: nn.Module, groups: list[ScaleGroup]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The float weights to quantize ({linear: W'}) and the new norm weights ({norm: w / s})."""
    weights: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}

    def current(name: str) -> torch.Tensor:
        return weights.get(name, module.get_submodule(name).weight.detach().float())

    for g in groups:  # down's fold into up's rows composes with up's own column scale
        if g.scale is None:
            continue
        for n in g.linears:
            weights[n] = current(n) * g.scale[None, :]
        if g.fold_kind == "norm":
            norms[g.fold_into] = module.get_submodule(g.fold_into).weight.detach().float() / g.scale
        else:
            weights[g.fold_into] = current(g.fold_into) / g.scale[:, None]
    return weights, norms
