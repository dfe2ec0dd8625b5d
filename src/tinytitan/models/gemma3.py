"""Gemma 3 text model: 5 sliding-window layers for each global one, QK-norm, sandwich norms, GeGLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinytitan.config import ModelConfig
from tinytitan.models.cache import KVCache
from tinytitan.models.layers import RMSNorm, Rotary, attend, cache_update, projections


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: Rotary) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # q/k/v as one matmul, set by the quantized runtime (tinytitan.quant.modules.FusedLinear)
        self.qkv: nn.Module | None = None
        # QK-norm: an RMSNorm over each head's query and key vector, before RoPE.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.window = cfg.layer_window(layer)
        self.rotary = rotary  # shared by every layer of this kind (local or global)
        # Scores are scaled by query_pre_attn_scalar**-0.5 (256 for the 270M model), not head_dim**-0.5.
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int, start: int | torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = projections(x, self.qkv, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = self.rotary(self.q_norm(q), start)
        k = self.rotary(self.k_norm(k), start)
        layer_cache = cache.layers[layer]
        keys, vals, kpos, padded = cache_update(layer_cache, k, v, start)
        out = attend(q, keys, vals, start, kpos, self.window, self.scale, padded)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.gate_up: nn.Module | None = None  # gate and up as one matmul (as qkv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GeGLU with the tanh approximation of GELU.
        gate, up = projections(x, self.gate_up, self.gate_proj, self.up_proj)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: Rotary) -> None:
        super().__init__()
        self.layer = layer
        self.self_attn = Attention(cfg, layer, rotary)
        self.mlp = MLP(cfg)
        # "Sandwich" norms: each sublayer's input and output are normalized.
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cache: KVCache, start: int | torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cache, self.layer, start)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma3(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim)
        )
        if not self.embed_tokens.weight.is_meta:  # on meta (load), torch's normal_ imports dynamo: +1.7 s
            nn.init.normal_(self.embed_tokens.weight)
        # Local layers use RoPE base 10k; global layers the file's base (1M) and its linear scaling. One
        # table per kind, shared: a table per layer would cost 18 x 67 MB at 32K positions.
        rope_local = Rotary(cfg.head_dim, cfg.rope_base_local)
        rope_global = Rotary(cfg.head_dim, cfg.rope_base, cfg.rope_scaling_factor)
        self.layers = nn.ModuleList(
            Block(cfg, i, rope_global if cfg.layer_window(i) is None else rope_local)
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied head: logits = h @ embed_tokens.weight.T (a separate lm_head only if the checkpoint has one).
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Embeddings are scaled by sqrt(dim), rounded to the activation dtype as the reference does.
        self.embed_scale = math.sqrt(cfg.dim)

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
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for block in self.layers:
            x = block(x, cache, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()
