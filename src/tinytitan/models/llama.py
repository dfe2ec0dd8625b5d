"""Llama family (SmolLM2, TinyLlama, ...): GQA, RoPE, SwiGLU, pre-norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tinytitan.config import ModelConfig
from tinytitan.models.cache import KVCache
from tinytitan.models.layers import RMSNorm, Rotary, attend, cache_update, projections


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # q/k/v as one matmul, set by the quantized runtime (tinytitan.quant.modules.FusedLinear)
        self.qkv: nn.Module | None = None
        self.rotary = rotary  # one table shared by all layers (per layer: 30 x 17 MB at 8K positions)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int, start: int | torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = projections(x, self.qkv, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q, start), self.rotary(k, start)
        layer_cache = cache.layers[layer]
        keys, vals, kpos, padded = cache_update(layer_cache, k, v, start)
        out = attend(q, keys, vals, start, kpos, None, self.scale, padded)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.gate_up: nn.Module | None = None  # gate and up as one matmul (as qkv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = projections(x, self.gate_up, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: Rotary) -> None:
        super().__init__()
        self.layer = layer
        self.self_attn = Attention(cfg, rotary)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cache: KVCache, start: int | torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache, self.layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # list[float] from GGUF rope_freqs (Llama 3 scaling), if the file has them
        freq_factors: list[float] | None = cfg.extra.get("rope_freq_factors")  # type: ignore[assignment]
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim)
        )
        if not self.embed_tokens.weight.is_meta:  # on meta (load), torch's normal_ imports dynamo: +1.7 s
            nn.init.normal_(self.embed_tokens.weight)
        rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.rope_scaling_factor, freq_factors)
        self.layers = nn.ModuleList(Block(cfg, i, rotary) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        ids: torch.Tensor,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """ids [B, T] at positions start.. -> float32 logits [B, T, V] (or [B, 1, V] with last_only).
        start may be a device tensor holding the position (one token, a fixed-shape cache: a CUDA graph)."""
        x = self.embed_tokens(ids)
        if cache is None:
            cache = KVCache.for_model(self.cfg, start + ids.shape[1], ids.shape[0], x.dtype, ids.device)
        for block in self.layers:
            x = block(x, cache, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()
