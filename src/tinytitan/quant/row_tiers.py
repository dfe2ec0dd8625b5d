"""Row tiers for the tied embedding / output head: more bits for the tokens the model actually uses.

Gemma 3's 262k-row vocabulary is 63% of its parameters, but on any one kind of text most rows carry almost
no probability and are almost never read as inputs. A row's error changes its token's logit (and, as an
input, the residual stream), so its cost in KL divergence scales with how much probability that token
gets. Rows are ranked by their measured use on the calibration text: the reference's mean probability of
the token over all positions plus the token's share of the inputs. The most used rows get the first tier's
scheme (e.g. int8), the next share the second, and the long tail the last (e.g. int2 g32).

Each tier is an ordinary quantized matrix over its own rows; the runtime matrix runs every tier's kernel
and scatters the logits back into vocabulary order, and looks rows up in the tier that holds them.
The ranking depends on the calibration text: a variant tuned on English text keeps other languages' rows
at the low tier.
"""

from __future__ import annotations

import torch
from torch import nn

from tinytitan.quant.calib import ActivationStats
from tinytitan.quant.modules import PackedMatrix

ROW_ALIGN = 64  # tier sizes are multiples of this (the int4 kernel packs rows in blocks)


def row_importance(stats: ActivationStats | None, n_rows: int) -> torch.Tensor:
    """Mean reference probability per token plus its share of the input tokens (both sum to 1)."""
    if stats is None or stats.token_mass is None or stats.positions == 0:
        raise ValueError("row tiers need calibration statistics with the reference's token probabilities")
    mass = stats.token_mass[:n_rows] / stats.positions
    count = stats.token_count[:n_rows] / max(float(stats.token_count.sum()), 1.0)
    return mass + count


def tier_assignment(importance: torch.Tensor, shares: list[float]) -> torch.Tensor:
    """uint8 tier id per row: the first share (percent) of rows by importance -> 0, the next -> 1, ...;
    the last tier takes the rest. Sizes are rounded to multiples of ROW_ALIGN (on a vocabulary too small
    for that, to whole rows); every tier keeps at least one row."""
    n = importance.numel()
    align = ROW_ALIGN if n >= 16 * ROW_ALIGN else 1
    order = torch.argsort(importance, descending=True, stable=True)
    tier = torch.full((n,), len(shares), dtype=torch.uint8)
    start = 0
    for t, share in enumerate(shares):
        left_for_others = len(shares) - t  # rows the later tiers still need
        size = max(align, round(n * share / 100 / align) * align)
        size = max(1, min(size, n - start - left_for_others))
        tier[order[start : start + size]] = t
        start += size
    return tier


class TieredMatrix(PackedMatrix):
    """A [N, K] matrix whose rows live in several quantized matrices (one per tier)."""

    kind = "tiers"

    def __init__(self, parts: list[PackedMatrix], tier_of: torch.Tensor) -> None:
        super().__init__(int(tier_of.numel()), parts[0].k)
        self.parts = nn.ModuleList(parts)
        tier_of = tier_of.long()
        order = torch.argsort(tier_of, stable=True)  # concatenated part outputs -> vocabulary rows
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        sizes = torch.bincount(tier_of, minlength=len(parts))
        offsets = torch.cumsum(sizes, 0) - sizes
        self.register_buffer("inv", inv)  # vocabulary row -> position among the concatenated outputs
        self.register_buffer("tier_of", tier_of.to(torch.uint8))
        self.register_buffer("local", inv - offsets[tier_of])  # vocabulary row -> row inside its part

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p.matmul(x) for p in self.parts], dim=-1)
        return y.index_select(-1, self.inv)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        tier, local = self.tier_of[ids].long(), self.local[ids]
        out = torch.empty(*ids.shape, self.k, dtype=torch.float32, device=ids.device)
        for t, part in enumerate(self.parts):
            mask = tier == t
            if bool(mask.any()):
                out[mask] = part.rows(local[mask]).float()
        return out
