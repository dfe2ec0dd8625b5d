"""The model an evaluation measures: the float32 reference, or a variant quantized from it."""

from __future__ import annotations

from typing import Any


def load_model(
    name: str,
    variant: Any = None,
    dtype: str = "float32",
    device: str | None = None,
    ctx: int | None = None,
    adapter: str | None = None,
):
    """tt.load from the reference weights (what the figures compare against), with `variant` quantized
    from them and a LoRA `adapter` applied on top when given."""
    from tinytitan.loader import load  # torch, only when a model is wanted

    return load(name, dtype=dtype, device=device, ctx=ctx, reference=True, variant=variant, adapter=adapter)
