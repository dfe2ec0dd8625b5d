"""Run a model's output head on chosen positions only (or on none, keeping its inputs for later).

Scoring needs logits at a few positions of a long input, and Gemma 3's head is a 262k x 640 matrix:
computing it everywhere would be most of the work. The model files stay plain modules: a forward
pre-hook on `lm_head` narrows its input.
"""

from __future__ import annotations

import torch


class head_positions:
    """Context manager: the model's output head sees only the flattened positions `index` of its input
    ([B, T, D] -> [1, N, D]), so logits come back as [1, N, V] without computing the others. defer: the
    head sees no position at all and `selected` keeps the N inputs for one later call over many."""

    def __init__(self, module: torch.nn.Module, index: torch.Tensor, defer: bool = False) -> None:
        self.head = getattr(module, "lm_head", None)
        if self.head is None:
            raise TypeError("the model has no `lm_head` module to restrict")
        self.index = index
        self.defer = defer  # keep the selected inputs and give the head none (the caller runs it later)
        self.handle = None
        self.selected = torch.empty(0)  # [N, D]: what the head was given (the KLD cache keeps it)

    def __enter__(self) -> head_positions:
        def select(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0]
            self.selected = x.reshape(-1, x.shape[-1]).index_select(0, self.index)
            return (self.selected[:0][None] if self.defer else self.selected[None], *args[1:])

        self.handle = self.head.register_forward_pre_hook(select)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()
