"""Read a Hugging Face checkpoint directory: config.json, *.safetensors (sharded or not), tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tinytitan.config import ModelConfig
from tinytitan.errors import ModelLoadError

# HF architecture names (config.json "architectures" / "model_type") -> our arch.
HF_ARCHS = {
    "Gemma3ForCausalLM": "gemma3",
    "gemma3_text": "gemma3",
    "LlamaForCausalLM": "llama",
    "llama": "llama",
}
# Gemma's RMSNorm multiplies by (1 + w); our RMSNorm takes the final multiplier, so these get + 1.
_GEMMA_NORMS = ("layernorm.weight", "q_norm.weight", "k_norm.weight", "norm.weight")


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"{path} is not a checkpoint directory: no config.json")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ModelLoadError(f"{cfg_path} is nested too deeply") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{cfg_path} must hold a JSON object")
    return raw


def _arch(raw: dict[str, Any], path: Path) -> str:
    archs = raw.get("architectures", [])
    names = [*(archs if isinstance(archs, list) else []), raw.get("model_type", "")]
    for n in names:
        if isinstance(n, str) and n in HF_ARCHS:
            return HF_ARCHS[n]
    raise ModelLoadError(
        f"{path}: architecture {names} is not supported; supported: {', '.join(sorted(HF_ARCHS))}"
    )


def _rope(raw: dict[str, Any], kind: str | None) -> tuple[float | None, float]:
    """(theta, linear factor) from either transformers 4 keys or transformers 5 `rope_parameters`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and kind is not None and isinstance(params.get(kind), dict):
        params = params[kind]
    if isinstance(params, dict) and "rope_theta" in params:
        factor = float(params.get("factor", 1.0)) if params.get("rope_type") == "linear" else 1.0
        return float(params["rope_theta"]), factor
    scaling = raw.get("rope_scaling") or {}
    factor = 1.0
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "linear":
        factor = float(scaling.get("factor", 1.0))
    theta = raw.get("rope_theta")
    return (float(theta) if theta is not None else None), factor


def config_from_hf(raw: dict[str, Any], path: Path) -> ModelConfig:
    """The config.json's fields as a ModelConfig, each checked (a wrong type names the file)."""
    try:
        cfg = _config_from_hf(raw, path)
    except (TypeError, ValueError, OverflowError, AttributeError) as e:  # int("x"), float([1]), int(inf)...
        raise ModelLoadError(f"{path}/config.json has a malformed value: {e}") from None
    cfg.validate()
    return cfg


def _config_from_hf(raw: dict[str, Any], path: Path) -> ModelConfig:
    arch = _arch(raw, path)
    try:
        n_heads = int(raw["num_attention_heads"])
        dim = int(raw["hidden_size"])
        cfg = ModelConfig(
            arch=arch,
            vocab_size=int(raw["vocab_size"]),
            dim=dim,
            n_layers=int(raw["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=int(raw.get("head_dim") or dim // n_heads),
            ffn_dim=int(raw["intermediate_size"]),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            context_length=int(raw.get("max_position_embeddings", 2048)),
            rope_base=10_000.0,
            tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
            bos_id=raw.get("bos_token_id"),
        )
    except KeyError as e:
        raise ModelLoadError(f"{path}/config.json lacks {e.args[0]!r}") from None
    if arch == "gemma3":
        theta, factor = _rope(raw, "full_attention")
        cfg.rope_base, cfg.rope_scaling_factor = theta or 1_000_000.0, factor
        local_theta, _ = _rope(raw, "sliding_attention")
        cfg.rope_base_local = float(raw.get("rope_local_base_freq") or local_theta or 10_000.0)
        cfg.sliding_window = int(raw.get("sliding_window") or 512)
        cfg.query_pre_attn_scalar = float(raw.get("query_pre_attn_scalar") or cfg.head_dim)
        layer_types = raw.get("layer_types")
        if isinstance(layer_types, list) and len(layer_types) == cfg.n_layers:
            cfg.global_layers = tuple(i for i, t in enumerate(layer_types) if t == "full_attention")
        elif raw.get("sliding_window_pattern"):
            cfg.sliding_window_pattern = int(raw["sliding_window_pattern"])
    else:
        theta, factor = _rope(raw, None)
        cfg.rope_base, cfg.rope_scaling_factor = theta or 10_000.0, factor
    return cfg


def read_state_dict(
    path: Path, cfg: ModelConfig, dtype: torch.dtype = torch.float32, keep_half: bool = False
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names, in `dtype`; with keep_half, bf16 and float16 matrices stay
    as stored (the caller runs them in their dtype)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (
            json.JSONDecodeError,
            UnicodeDecodeError,
            KeyError,
            AttributeError,
            TypeError,
            RecursionError,
        ) as e:
            raise ModelLoadError(f"{index} is malformed: {e}") from None
        bad = [f for f in files if not isinstance(f, str) or Path(f).name != f]
        if bad:  # a shard is a file beside the index, never a path elsewhere
            raise ModelLoadError(f"{index} names invalid shard files: {bad[:3]}")
    else:
        files = sorted(p.name for p in path.glob("model*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are never loaded)")
    raw: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            raw.update(load_file(str(path / name)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{path / name}: cannot read safetensors: {e}") from None
    out: dict[str, torch.Tensor] = {}
    for key, w in raw.items():
        ours = key.removeprefix("model.")
        if ours.startswith("rotary_emb"):
            continue
        if keep_half and w.dtype in (torch.bfloat16, torch.float16) and w.dim() == 2:
            out[ours] = w
            continue
        w = w.to(torch.float32)
        if cfg.arch == "gemma3" and ours.endswith(_GEMMA_NORMS):
            w = w + 1.0
        out[ours] = w.to(dtype)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out
