"""Hugging Face checkpoint directories: tiny random ones, against transformers' logits and round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import FIXTURES
from tinytitan.config import preset
from tinytitan.errors import ModelLoadError
from tinytitan.loader import load
from tinytitan.models import build_model


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_matches_transformers_on_tiny_random_checkpoint(arch: str) -> None:
    folder = FIXTURES / f"hf_tiny_{arch}"
    if not folder.exists():
        pytest.skip("run tests/fixtures/make_hf_fixtures.py")
    expected = load_file(str(FIXTURES / f"hf_tiny_{arch}.expected.safetensors"))
    model = load(folder, device="cpu")
    assert model.config.arch == arch
    logits = model.logits(expected["ids"].tolist())
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)


def write_checkpoint(folder: Path, arch: str) -> torch.nn.Module:
    """Our own random model saved the way transformers lays a checkpoint out."""
    cfg = preset(f"tiny-{arch}")
    torch.manual_seed(3)
    module = build_model(cfg).eval()
    state = {}
    for k, v in module.state_dict().items():
        if k == "lm_head.weight":
            continue
        v = v.clone()
        if arch == "gemma3" and k.endswith(
            ("layernorm.weight", "q_norm.weight", "k_norm.weight", "norm.weight")
        ):
            v = v - 1.0  # transformers stores Gemma norms as w, applied as (1 + w)
        state[f"model.{k}"] = v
    save_file(state, str(folder / "model.safetensors"))
    hf_cfg = {
        "architectures": ["Gemma3ForCausalLM" if arch == "gemma3" else "LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.context_length,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": True,
    }
    if arch == "gemma3":
        hf_cfg.update(
            sliding_window=cfg.sliding_window,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar,
            rope_local_base_freq=cfg.rope_base_local,
            layer_types=[
                "full_attention" if cfg.is_global_layer(i) else "sliding_attention"
                for i in range(cfg.n_layers)
            ],
        )
    (folder / "config.json").write_text(json.dumps(hf_cfg))
    src = FIXTURES / "hf_tiny_llama"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, folder / name)
    return module


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_round_trip_of_a_checkpoint_the_test_builds(tmp_path: Path, arch: str) -> None:
    if not (FIXTURES / "hf_tiny_llama" / "tokenizer.json").exists():
        pytest.skip("tokenizer fixture missing")
    module = write_checkpoint(tmp_path, arch)
    model = load(tmp_path, device="cpu")
    ids = list(range(3, 60))
    with torch.inference_mode():
        expected = module(torch.tensor([ids]))[0]
    torch.testing.assert_close(model.logits(ids), expected)
    assert model.tokenizer.decode(model.tokenizer.encode("the cat sat", add_bos=False)) == "the cat sat"


def test_refuses_pickles_and_unknown_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 8,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
            }
        )
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelLoadError, match=r"pickled .bin checkpoints are never loaded"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="not supported; supported"):
        load(tmp_path)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_a_half_checkpoint_runs_in_its_dtype_and_its_reference_in_float32(
    tmp_path: Path, arch: str, half: torch.dtype
) -> None:
    if not (FIXTURES / "hf_tiny_llama" / "tokenizer.json").exists():
        pytest.skip("tokenizer fixture missing")
    from tinytitan.quant.modules import Bf16Matrix, QuantLinear

    write_checkpoint(tmp_path, arch)
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v.to(half) for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    model, ref = load(tmp_path, device="cpu"), load(tmp_path, device="cpu", reference=True)
    params = model.module.named_parameters()
    assert [n for n, p in params if p.dim() > 1] == []  # no float32 copy of a matrix
    linears = [m for m in model.module.modules() if isinstance(m, QuantLinear)]
    assert linears and all(isinstance(m.matrix, Bf16Matrix) and m.matrix.w.dtype == half for m in linears)
    assert model.module.lm_head.matrix is model.module.embed_tokens.matrix
    assert all(p.dtype == torch.float32 for p in ref.module.parameters())
    ids = list(range(3, 40))
    lp, lr = model.logits(ids).log_softmax(-1), ref.logits(ids).log_softmax(-1)
    kl = float((lr.exp() * (lr - lp)).sum(-1).mean())
    assert kl < 1e-3, kl  # the same bf16 weights; only the activations' rounding into bf16 differs
