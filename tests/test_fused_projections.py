"""Quantized q/k/v and gate/up projections fused into one matmul each: same outputs as one by one, no
extra memory, undone when an adapter wraps them, and the same tokens when the decode step is compiled."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tinytitan.config import preset
from tinytitan.decode_step import DecodeStep, compile_available
from tinytitan.finetune.lora import LoraConfig, attach
from tinytitan.models import build_model
from tinytitan.quant.api import quantize
from tinytitan.quant.modules import FusedLinear, fuse_projections, unfuse_projections
from tinytitan.quant.schemes import parse_variant
from tinytitan.runtime import Model, Source


def random_model(arch: str) -> Model:
    """A tiny random model whose projections have multiples of 64 rows (the int4 packing's row blocks)."""
    cfg = dataclasses.replace(
        preset(f"tiny-{arch}"), dim=128, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256
    )
    torch.manual_seed(0)
    module = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    source = Source(path=Path("random"), kind="random", name=f"random-{arch}")
    return Model(cfg, None, module, source, torch.device("cpu"), torch.float32)  # type: ignore[arg-type]


def fused_groups(model: Model) -> int:
    return sum(isinstance(m, FusedLinear) for m in model.module.modules())


IDS = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("arch,variant", [("gemma3", "w4g32"), ("llama", "w4g32"), ("llama", "w8")])
def test_projections_fuse_with_identical_logits_and_memory(arch: str, variant: str) -> None:
    base = random_model(arch)
    fused, separate = (quantize(base, parse_variant(variant)) for _ in range(2))
    unfuse_projections(separate.module)
    assert fused_groups(fused) == 2 * base.config.n_layers and fused_groups(separate) == 0
    # 300 positions: prefill chunks above the kernels' row limits (bf16 GEMM) and single rows (kernels)
    assert torch.equal(fused.logits(IDS), separate.logits(IDS))
    assert torch.equal(fused.logits(IDS[:7]), separate.logits(IDS[:7]))
    assert fused.weight_bytes() == separate.weight_bytes()  # the parts are views of the fused rows


def test_mixed_kinds_stay_separate() -> None:
    """A plan that gives q and k different kernels cannot share one call: that group runs one by one."""
    from tinytitan.quant.int_quant import quantize_int
    from tinytitan.quant.modules import build_matrix

    q = quantize(random_model("llama"), parse_variant("w4g32"))
    unfuse_projections(q.module)
    attn = q.module.layers[0].self_attn
    w = torch.randn(attn.k_proj.out_features, attn.k_proj.in_features)
    attn.k_proj.matrix = build_matrix(quantize_int(w, 8, 0, True), None, torch.device("cpu"))
    assert fuse_projections(q.module) == 2 * q.config.n_layers - 1  # every group but that q/k/v
    assert attn.qkv is None and q.module.layers[0].mlp.gate_up is not None


def test_an_adapter_unfuses_the_projections_it_wraps() -> None:
    q = quantize(random_model("llama"), parse_variant("w4g32"))
    before = q.logits(IDS[:40])
    attach(q.module, LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    assert fused_groups(q) == 0
    assert all(getattr(m, "qkv", None) is None for m in q.module.modules())
    torch.testing.assert_close(q.logits(IDS[:40]), before)  # a fresh adapter (B = 0) changes nothing


@pytest.mark.skipif(not compile_available(), reason="torch.compile needs a C++ compiler (g++ or clang++)")
@pytest.mark.parametrize("variant", ["w4g32", "w8"])
def test_compiled_quantized_step_matches_eager(variant: str) -> None:
    """The compiled decode step on quantized weights: fused int4 projections, and int8 matmuls written
    as multiply-and-sum for inductor (another summation order than the eager kernel's)."""
    q = quantize(random_model("gemma3"), parse_variant(variant))
    eager, compiled = DecodeStep(q.module), DecodeStep(q.module, compiled=True)
    ids = torch.tensor([IDS[:40]])
    outs = []
    for step in (eager, compiled):
        cache = q.new_cache(40, static=True)
        with torch.inference_mode():
            q.module(ids[:, :1], cache=cache, start=0)
            outs.append(torch.stack([step(ids[:, i : i + 1], cache, i)[0] for i in range(1, 40)]))
    assert compiled.fallback_reason is None, compiled.fallback_reason
    # bf16 roundings inside the fused kernels differ from eager's: compare at the logits' own scale
    # (this random model's logits reach ~140, where one bf16 step is 1.0)
    scale = float(outs[0].abs().max())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0.01 * scale)
    assert float((outs[1].argmax(-1) == outs[0].argmax(-1)).float().mean()) > 0.9
