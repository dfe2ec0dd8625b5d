"""AWQ: folding the scales into norms and up-projection rows changes nothing in float arithmetic; the
calibrated variant loses less than plain rounding at 3 bits; artifacts keep the folded norms."""

from __future__ import annotations

import copy

import torch

from tests.conftest import loaded_model, model_path
from tinytitan.quant.awq import ScaleGroup, scale_groups, scaled_weights

SMOL = "smollm2-135m-instruct"
TEXT = (
    "The committee met on Tuesday to review the budget for the coming year. Members raised questions about "
    "the cost of repairs to the old bridge, the library's opening hours and a plan to plant trees along the "
    "river. After a long discussion the chair proposed to postpone the vote until the engineers report. "
) * 12


def _kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    a, b = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


def test_folded_scales_leave_the_float_model_unchanged() -> None:
    model_path(SMOL)
    m = loaded_model(SMOL)
    ids = m.tokenizer.encode("Folding scales into the norms is exact in real arithmetic.")
    ref = m.logits(ids)
    groups = scale_groups(m.module)
    assert len(groups) == 3 * m.config.n_layers
    gen = torch.Generator().manual_seed(0)
    for g in groups:
        k = m.module.get_submodule(g.linears[0]).weight.shape[1]
        g.scale = torch.exp(torch.randn(k, generator=gen) * 0.5)
    weights, norms = scaled_weights(m.module, groups)
    assert len(norms) == 2 * m.config.n_layers and len(weights) == 6 * m.config.n_layers
    module = copy.deepcopy(m.module)
    with torch.no_grad():
        for name, w in {**weights, **norms}.items():
            module.get_submodule(name).weight.copy_(w)
    m2 = copy.copy(m)
    m2.module = module
    out = m2.logits(ids)
    assert torch.allclose(out, ref, atol=2e-3, rtol=1e-4), float((out - ref).abs().max())
    assert not torch.equal(module.layers[0].mlp.up_proj.weight, m.module.layers[0].mlp.up_proj.weight)


def test_awq_beats_plain_rounding_and_survives_an_artifact(tmp_path) -> None:
    from tinytitan.quant.api import quantize
    from tinytitan.quant.artifact import load_artifact, save_artifact
    from tinytitan.quant.schemes import parse_variant

    model_path(SMOL)
    m = loaded_model(SMOL)
    ids = m.tokenizer.encode(TEXT)[:384]
    ref = m.logits(ids)
    rtn = quantize(m, parse_variant("w3g32"))
    awq = quantize(m, parse_variant("w3g32-awq"), calib_text=TEXT)
    k_rtn, k_awq = _kl(ref, rtn.logits(ids)), _kl(ref, awq.logits(ids))
    assert k_awq < k_rtn, (k_awq, k_rtn)
    assert any(n.startswith("awq:") for n in awq.quant.notes)
    # the base model is untouched (its norms are not the folded ones)
    assert torch.equal(m.logits(ids), ref)
    save_artifact(awq, tmp_path / "awq")
    again = load_artifact(tmp_path / "awq")
    assert torch.equal(again.logits(ids), awq.logits(ids))


def test_groups_cover_the_shared_inputs() -> None:
    model_path(SMOL)
    m = loaded_model(SMOL)
    g0 = scale_groups(m.module)[:3]
    assert [g.fold_into for g in g0] == [
        "layers.0.input_layernorm",
        "layers.0.post_attention_layernorm",
        "layers.0.mlp.up_proj",
    ]
    assert isinstance(g0[0], ScaleGroup) and g0[2].fold_kind == "rows"
