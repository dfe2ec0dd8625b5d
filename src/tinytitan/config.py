"""ModelConfig: everything the model code needs to know, read from a checkpoint's metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tinytitan.errors import ModelLoadError

SUPPORTED_ARCHS = ("gemma3", "llama")


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
        if self.arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ModelLoadError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

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
