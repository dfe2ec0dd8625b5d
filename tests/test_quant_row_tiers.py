"""Row tiers for the tied embedding/head: parsing, ranking, kernels, quality, artifact and GGUF export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import loaded_model
from tests.test_quant import kl
from tinytitan.quant.api import quantize
from tinytitan.quant.artifact import save_artifact
from tinytitan.quant.calib import ActivationStats
from tinytitan.quant.int_quant import quantize_int
from tinytitan.quant.modules import build_matrix
from tinytitan.quant.row_tiers import ROW_ALIGN, TieredMatrix, row_importance, tier_assignment
from tinytitan.quant.schemes import QuantConfigError, parse_variant

TIERED = "keep-e4g32@30+3g32-imatrix"  # the source's own blocks: the embedding alone decides


def test_parse_tiers_and_their_size() -> None:
    cfg = parse_variant("keep-e8@10+4g32@30+2g32-imatrix")
    assert cfg.embedding.kind == "rows" and cfg.blocks.label() == "keep"
    assert cfg.embedding.label() == "8@10+4g32@30+2g32"
    # 10% at 8 + 2/640 bits, 30% at 4 + 32/32 bits, 60% at 2 + 32/32 bits
    assert cfg.embedding.bits_per_weight(640) == pytest.approx(0.1 * 8.025 + 0.3 * 5 + 0.6 * 3)
    assert parse_variant("w4g32-e8@10+2g32").calibrated  # ranking rows needs calibration, even with RTN
    for bad in ("w4g32-e8@10", "w4g32-e8@60+4@50+2", "w4g32-eq4_0@10+2", "w4g32-e8+2"):
        with pytest.raises(QuantConfigError):
            parse_variant(bad)


def test_tier_assignment_ranks_rows_and_aligns_sizes() -> None:
    imp = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    tier = tier_assignment(imp, [10.0, 30.0])
    sizes = torch.bincount(tier.long(), minlength=3).tolist()
    assert sizes[0] % ROW_ALIGN == 0 and sizes[1] % ROW_ALIGN == 0 and sum(sizes) == 4000
    assert sizes[:2] == [384, 1216]  # 400 and 1200 rows, rounded to multiples of 64
    assert imp[tier == 0].min() >= imp[tier == 1].max() >= imp[tier == 2].max()
    small = tier_assignment(torch.rand(10), [10.0, 30.0])  # a tiny vocabulary: every tier has rows
    assert torch.bincount(small.long(), minlength=3).tolist() == [1, 3, 6]
    stats = ActivationStats()
    with pytest.raises(ValueError, match="calibration statistics"):
        row_importance(stats, 4000)


def test_tiered_matrix_matmul_and_lookup_match_the_dequantized_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(512, 128, generator=gen)
    tier = tier_assignment(torch.rand(512, generator=gen), [25.0])
    parts = [quantize_int(w[tier == 0], 8, 128, True), quantize_int(w[tier == 1], 2, 32, False)]
    dense = torch.empty_like(w)
    dense[tier == 0], dense[tier == 1] = parts[0].dequantize(), parts[1].dequantize()
    kernels = [build_matrix(p, None, torch.device("cpu")) for p in parts]
    m = TieredMatrix(kernels, tier)
    x = torch.randn(3, 128, generator=gen)
    want = torch.empty(3, 512)
    for t, k in enumerate(kernels):  # each tier's own kernel, scattered back to its rows
        want[:, tier == t] = k.matmul(x)
    assert torch.equal(m.matmul(x), want)
    torch.testing.assert_close(m.matmul(x), x @ dense.T, rtol=0.05, atol=0.3)  # bf16 activations
    ids = torch.tensor([[0, 5, 511], [7, 7, 300]])
    torch.testing.assert_close(m.rows(ids), dense[ids], rtol=0.01, atol=0.01)


TEXT = (
    "The committee met on Tuesday to discuss the budget for the new library. After a long debate, the "
    "members agreed to fund the project, but only if the city would pay for half of the cost. The mayor "
    "said that she was happy with the result, and that work on the building could begin in the spring. "
    "Some residents were less pleased: they had hoped the money would go to the roads, which are in poor "
    "condition after the winter. A second meeting will be held next month to decide who builds it."
)


@pytest.fixture(scope="module")
def smol():
    return loaded_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def stats(smol):
    from tinytitan.quant.api import gather_stats

    return gather_stats(smol, parse_variant(TIERED), None)  # self-generated calibration text


@pytest.fixture(scope="module")
def tiered(smol, stats):
    return quantize(smol, parse_variant(TIERED), stats=stats)


def test_tiers_beat_a_uniform_embedding_of_about_the_same_size(smol, stats, tiered) -> None:
    """SmolLM2's source embedding is Q4_1: 30% of its rows kept at 4 bits, the rest at 3, is 8% bigger
    than every row at 3 bits and much closer to the reference; and it is the ranking that does it."""
    ids = smol.tokenizer.encode(TEXT)
    ref = smol.logits(ids)
    uniform = quantize(smol, parse_variant("keep-e3g32-imatrix"), stats=stats)
    st, st_u = tiered.quant.tensors["embed_tokens.weight"], uniform.quant.tensors["embed_tokens.weight"]
    assert st.nbytes() <= 1.1 * st_u.nbytes()
    assert isinstance(tiered.module.lm_head.matrix, TieredMatrix)
    assert tiered.module.embed_tokens.matrix is tiered.module.lm_head.matrix  # one matrix, both uses
    kl_tiers = kl(ref, tiered.logits(ids))
    assert kl_tiers < 0.6 * kl(ref, uniform.logits(ids))
    assert "row tiers" in " ".join(tiered.quant.notes)
    # the same tier sizes with the least used rows on top: far worse
    flipped = ActivationStats(**{**stats.__dict__})
    flipped.token_mass = stats.token_mass.max() - stats.token_mass  # type: ignore[union-attr]
    flipped.token_count = torch.zeros_like(stats.token_count)  # type: ignore[arg-type]
    wrong = quantize(smol, parse_variant(TIERED), stats=flipped)
    assert kl(ref, wrong.logits(ids)) > 2 * kl_tiers


def test_tiered_artifact_reloads_to_identical_logits_and_exports(smol, tiered, tmp_path: Path) -> None:
    import tinytitan as tt
    from tinytitan.io.gguf import GGUFFile
    from tinytitan.quant.export import export_gguf

    ids = smol.tokenizer.encode("Once upon a time, in a small town by the sea,")
    again = tt.load(save_artifact(tiered, tmp_path / "art"))
    assert torch.equal(tiered.logits(ids), again.logits(ids))
    assert again.quant.config == tiered.quant.config
    assert again.quant.file_bytes() == tiered.quant.file_bytes()
    path = export_gguf(again, tmp_path / "tiers.gguf")
    assert GGUFFile(path).tensor_types()["token_embd.weight"] == "Q4_1"  # every tier <= 4 bits
    assert any("one type per GGUF tensor" in n for n in again.quant.notes)
    assert kl(tiered.logits(ids), tt.load(path).logits(ids)) < 0.02
