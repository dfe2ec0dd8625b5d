"""LoRA adapters on a frozen base: y = base(x) + (dropout(x) @ A^T @ B^T) * alpha / r.

The base is never modified: every base parameter is frozen and stays in the form it was loaded in. A base
that is quantized (a `QuantLinear` over int8 / int4 codes, QLoRA-style) has no autograd in torch's packed
kernels, so its matmul runs through `QuantMatmul`, whose backward multiplies the incoming gradient by the
weight dequantized on the fly, a slice of rows at a time: no float copy of the base is ever kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinytitan.errors import TinyTitanError
from tinytitan.quant.modules import PackedMatrix, QuantLinear, unfuse_projections

ADAPTER_FORMAT = "tinytitan-lora"
ADAPTER_VERSION = 1
# the projections of both architectures (models/llama.py, models/gemma3.py) that can carry an adapter
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BACKWARD_ROWS = 8192  # rows of a quantized weight dequantized at once in a backward pass (bounded memory)


class AdapterError(TinyTitanError):
    """An adapter that cannot be built, read, or applied to this model."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8  # r: the inner dimension of the update B @ A; parameters grow linearly with it
    alpha: float = 16.0  # the update is scaled by alpha / r, so changing r keeps the step size comparable
    dropout: float = 0.05  # dropout on the adapter's input only (the frozen path sees the clean input)
    targets: tuple[str, ...] = ALL_TARGETS  # module names (last path component) that get an adapter
    version: int = ADAPTER_VERSION

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise AdapterError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown or not self.targets:
            raise AdapterError(
                f"unknown LoRA target(s) {unknown or '(none)'}; known: {', '.join(ALL_TARGETS)}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        return cls(
            rank=int(d["rank"]),
            alpha=float(d["alpha"]),
            dropout=float(d.get("dropout", 0.0)),
            targets=tuple(d["targets"]),
            version=int(d.get("version", ADAPTER_VERSION)),
        )


def parse_targets(text: str) -> tuple[str, ...]:
    """ "all" | "attn" | "mlp" | a comma-separated list of projection names."""
    groups = {"all": ALL_TARGETS, "attn": ALL_TARGETS[:4], "mlp": ALL_TARGETS[4:]}
    if text in groups:
        return groups[text]
    return tuple(t.strip() for t in text.split(",") if t.strip())


class QuantMatmul(torch.autograd.Function):
    """x @ W^T for a frozen quantized W: forward on the packed kernel, backward on W dequantized per slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, matrix: PackedMatrix) -> torch.Tensor:  # type: ignore[override]
        ctx.matrix = matrix
        return matrix.matmul(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        m: PackedMatrix = ctx.matrix
        g = grad.reshape(-1, m.n).to(torch.bfloat16)
        out = torch.zeros(g.shape[0], m.k, dtype=torch.float32, device=grad.device)
        for s in range(0, m.n, BACKWARD_ROWS):
            rows = torch.arange(s, min(s + BACKWARD_ROWS, m.n), device=grad.device)
            w = m.rows(rows).to(torch.bfloat16)  # [rows, K], dequantized now and dropped after
            out += (g[:, s : s + len(rows)] @ w).float()
        return out.view(*grad.shape[:-1], m.k).to(grad.dtype), None


class FrozenQuantLinear(nn.Module):
    """A QuantLinear that passes gradients to its input (its own weights stay frozen and packed)."""

    def __init__(self, base: QuantLinear) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return QuantMatmul.apply(x, self.base.matrix)
        return self.base(x)


def frozen_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(base, QuantLinear) and torch.is_grad_enabled() and x.requires_grad:
        return QuantMatmul.apply(x, base.matrix)
    return base(x)


class LoraLinear(nn.Module):
    """A frozen linear (float or quantized) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, config: LoraConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features  # type: ignore[assignment]
        self.out_features: int = base.out_features  # type: ignore[assignment]
        self.scaling = config.scaling
        self.dropout_p = config.dropout
        device = _device_of(base)
        # A: Kaiming-uniform like nn.Linear's default; B: zeros, so a fresh adapter changes nothing.
        a = torch.empty(config.rank, self.in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(self.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_forward(self.base, x)
        h = F.dropout(x, self.dropout_p, self.training) if self.dropout_p else x
        update = F.linear(F.linear(h.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (update * self.scaling).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """The dense update this adapter adds to the weight, [out, in] float32."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


@dataclass
class Attached:
    """What `attach` did: which modules carry adapters, and how many parameters they add."""

    names: list[str] = field(default_factory=list)
    n_params: int = 0


def attach(module: nn.Module, config: LoraConfig, seed: int = 0) -> Attached:
    """Freeze `module` and wrap its target projections in LoraLinear, in place (in a fixed order, so the
    same seed gives the same initial A). Quantized linears elsewhere (the output head) pass gradients."""
    if any(isinstance(m, LoraLinear) for m in module.modules()):
        raise AdapterError("this model already carries an adapter")
    for p in module.parameters():
        p.requires_grad_(False)
    unfuse_projections(module)  # the projections are wrapped one by one below
    gen = torch.Generator().manual_seed(seed)
    out = Attached()
    for name, child in list(module.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in config.targets and isinstance(child, nn.Linear | QuantLinear):
            lora = LoraLinear(child, config, gen)
            _set(module, name, lora)
            out.names.append(name)
            out.n_params += lora.lora_A.numel() + lora.lora_B.numel()
    if not out.names:
        raise AdapterError(f"no module of this model matches the LoRA targets {list(config.targets)}")
    for name, child in list(module.named_modules()):
        if isinstance(child, QuantLinear) and not _inside_lora(module, name):
            _set(module, name, FrozenQuantLinear(child))
    return out


def _inside_lora(root: nn.Module, name: str) -> bool:
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return isinstance(root.get_submodule(parent), LoraLinear) if parent else False


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def lora_modules(module: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, LoraLinear)}


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """{"layers.0.self_attn.q_proj.lora_A": tensor, ...}: the trainable part only."""
    out = {}
    for name, m in lora_modules(module).items():
        out[f"{name}.lora_A"] = m.lora_A.detach().contiguous()
        out[f"{name}.lora_B"] = m.lora_B.detach().contiguous()
    return out


def load_adapter_state(module: nn.Module, state: dict[str, torch.Tensor], origin: str = "adapter") -> None:
    mods = lora_modules(module)
    want = {f"{n}.lora_{ab}" for n in mods for ab in "AB"}
    missing, unexpected = want - state.keys(), state.keys() - want
    if missing or unexpected:
        raise AdapterError(
            f"{origin} does not fit this model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    for name, m in mods.items():
        for ab in "AB":
            p: nn.Parameter = getattr(m, f"lora_{ab}")
            t = state[f"{name}.lora_{ab}"]
            if t.shape != p.shape:
                raise AdapterError(
                    f"{origin}: {name}.lora_{ab} has shape {list(t.shape)}, the model needs "
                    f"{list(p.shape)} (an adapter for a different model or rank?)"
                )
            with torch.no_grad():
                p.copy_(t.to(p.dtype))


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
