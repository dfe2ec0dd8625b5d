"""ModelConfig: everything the model code needs to know, read from a checkpoint's metadata."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from tinytitan.checks import of_type
from tinytitan.errors import ModelLoadError

SUPPORTED_ARCHS = ("gemma3", "llama")

# Bounds on what a checkpoint may declare, checked before anything is built or allocated: far beyond any
# model this runtime is for (Gemma 3 27B: 62 layers, dim 5376, 262k tokens, 128k context), yet small
# enough that a hostile file cannot make us build 200,000 layers or a 2^40-wide embedding.
MAX_LAYERS = 1024
MAX_DIM = 1 << 16  # dim, ffn_dim's unit and head_dim's bound
MAX_FFN_DIM = 1 << 20
MAX_HEADS = 1024
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 22
_BOUNDS = {
    "vocab_size": MAX_VOCAB,
    "dim": MAX_DIM,
    "n_layers": MAX_LAYERS,
    "n_heads": MAX_HEADS,
    "n_kv_heads": MAX_HEADS,
    "head_dim": MAX_DIM,
    "ffn_dim": MAX_FFN_DIM,
    "context_length": MAX_CONTEXT,
}


class ConfigError(ModelLoadError):
    """A ModelConfig field out of bounds or of the wrong type; `field` names it (a reader that knows where
    the value came from, e.g. a GGUF metadata key, adds that to the message)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if not of_type(value, int):
        raise ConfigError(name, f"{name} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(name, f"{name}={value} is out of range [{lo}, {hi}]")


def _check_positive(name: str, value: object) -> None:
    if not of_type(value, (int, float)) or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        raise ConfigError(name, f"{name} must be a positive finite number, not {value!r}")


@dataclass
class ModelConfig:
    arch: str  # "gemma3" | "llama": picks the nn.Module; comes from general.architecture / config.json
    vocab_size: int  # rows of the token embedding (and of the output head)
    dim: int  # residual stream width (embedding_length / hidden_size)
    n_layers: int  # transformer blocks
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA: n_heads is a multiple of it)
    head_dim: int  # per-head width; Gemma 3 sets it explicitly (256), not dim // n_heads
    ffn_dim: int  # hidden width of the gated MLP
    norm_eps: float  # RMSNorm epsilon
    context_length: int  # the longest context the model was trained for
    rope_base: float  # RoPE theta of global (or all) layers
    rope_base_local: float = 10_000.0  # Gemma 3 only: theta of sliding-window layers (absent from GGUF)
    rope_scaling_factor: float = 1.0  # linear position scaling (Gemma 3 4B+ global layers; some Llamas)
    sliding_window: int | None = None  # Gemma 3: keys a local layer can see, counting the query itself
    sliding_window_pattern: int = 6  # Gemma 3: every 6th layer is global (5 local : 1 global)
    query_pre_attn_scalar: float | None = (
        None  # Gemma 3: scores scaled by this**-0.5 instead of head_dim**-0.5
    )
    global_layers: tuple[int, ...] | None = (
        None  # explicit global layers (HF `layer_types`), else the pattern
    )
    tie_embeddings: bool = True  # the output head reuses the token embedding (both of our models do)
    bos_id: int | None = None  # only for information; the tokenizer decides whether to add it
    extra: dict[str, object] = field(default_factory=dict)  # metadata kept for provenance, never for math

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every field of a plausible model (types and MAX_* bounds), else ModelLoadError naming it."""
        if self.arch not in SUPPORTED_ARCHS:
            raise ConfigError(
                "arch", f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        for name, bound in _BOUNDS.items():
            _check_int(name, getattr(self, name), 1, bound)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                "n_heads", f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError("head_dim", f"head_dim={self.head_dim} is odd (rotary embeddings rotate pairs)")
        for name in ("norm_eps", "rope_base", "rope_base_local", "rope_scaling_factor"):
            _check_positive(name, getattr(self, name))
        if self.query_pre_attn_scalar is not None:
            _check_positive("query_pre_attn_scalar", self.query_pre_attn_scalar)
        if self.sliding_window is not None:
            _check_int("sliding_window", self.sliding_window, 1, MAX_CONTEXT)
        _check_int("sliding_window_pattern", self.sliding_window_pattern, 1, MAX_LAYERS)
        if self.global_layers is not None:
            if not isinstance(self.global_layers, tuple | list):
                raise ConfigError(
                    "global_layers", f"global_layers must be a list of layer indices: {self.global_layers!r}"
                )
            for i in self.global_layers:
                _check_int("global_layers[]", i, 0, self.n_layers - 1)
            self.global_layers = tuple(self.global_layers)
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(
                "tie_embeddings", f"tie_embeddings must be true or false, not {self.tie_embeddings!r}"
            )
        if self.bos_id is not None and not of_type(self.bos_id, int):
            self.bos_id = None  # informational only (the tokenizer decides): a bad value is dropped
        if not isinstance(self.extra, dict):
            raise ConfigError("extra", f"extra must be a mapping, not {type(self.extra).__name__}")

    @classmethod
    def from_dict(cls, raw: object, where: str) -> ModelConfig:
        """A config as saved by to_dict (an artifact's manifest), every field checked; `where` names the
        file in the error."""
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{where}: model_config must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ModelLoadError(f"{where}: model_config has unknown fields {unknown[:4]}")
        try:
            return cls(**raw)
        except TypeError as e:  # a required field missing
            raise ModelLoadError(f"{where}: model_config is incomplete ({e})") from None
        except ConfigError as e:
            raise ModelLoadError(f"{where}: {e}") from None

    def is_global_layer(self, layer: int) -> bool:
        """Gemma 3 interleaves 5 sliding-window layers with 1 global one; Llama layers are all global."""
        if self.arch != "gemma3" or self.sliding_window is None:
            return True
        if self.global_layers is not None:
            return layer in self.global_layers
        return (layer + 1) % self.sliding_window_pattern == 0

    def layer_window(self, layer: int) -> int | None:
        return None if self.is_global_layer(layer) else self.sliding_window

    def kv_bytes_per_token(self, layer: int, bytes_per_elem: int = 4) -> int:
        return 2 * self.n_kv_heads * self.head_dim * bytes_per_elem

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# Small presets for tests and experiments: real architectures, random weights, seconds to build.
PRESETS: dict[str, ModelConfig] = {
    "tiny-gemma3": ModelConfig(
        arch="gemma3",
        vocab_size=512,
        dim=64,
        n_layers=6,
        n_heads=4,
        n_kv_heads=1,
        head_dim=32,
        ffn_dim=128,
        norm_eps=1e-6,
        context_length=2048,
        rope_base=1_000_000.0,
        sliding_window=16,
        query_pre_attn_scalar=32.0,
    ),
    "tiny-llama": ModelConfig(
        arch="llama",
        vocab_size=512,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        norm_eps=1e-5,
        context_length=2048,
        rope_base=100_000.0,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelLoadError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
