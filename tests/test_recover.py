"""Recovery by distillation (quant/recover.py): trained scales, zeros and norms on the shipped grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import loaded_model
from tinytitan.loader import load
from tinytitan.quant.api import quantize
from tinytitan.quant.artifact import save_artifact
from tinytitan.quant.calib import self_generated
from tinytitan.quant.recover import RecoverSettings, recover
from tinytitan.quant.schemes import QuantConfig, QuantConfigError, parse_variant

SETTINGS = RecoverSettings(steps=50, tokens=4096, lr=1e-2, norm_lr=1e-3, bf16=False)


def held_out_kl(ref, q, ids: torch.Tensor) -> float:
    """Mean KL(reference || variant) per position, from the runtime forward of each (not the training one)."""
    with torch.inference_mode():
        lp = torch.log_softmax(ref.module(ids).float(), -1)
        lq = torch.log_softmax(q.module(ids).float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def stored_ints(q) -> dict[str, list]:
    out = {}
    for name, st in q.quant.tensors.items():
        parts = st.parts if st.parts is not None else [st]
        out[name] = [p.int_weight for p in parts]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama whose next-token distributions are neither uniform nor one-hot (entropy ~5 of
    6.2 nats): the default initialisation's tied embedding predicts the input token with probability 1."""
    from safetensors.torch import load_file, save_file

    from tests.test_hf_checkpoint import write_checkpoint

    folder = tmp_path_factory.mktemp("peaked_llama")
    write_checkpoint(folder, "llama")
    state = load_file(str(folder / "model.safetensors"))
    for k, v in state.items():
        state[k] = v * 0.2 if "embed" in k else v * 2.0 if v.dim() == 2 else v
    save_file(state, str(folder / "model.safetensors"))
    return load(folder, device="cpu")


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("TINYTITAN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_the_grammar_and_the_manifest_carry_the_recovery() -> None:
    cfg = parse_variant("w3g64-imatrix-kd")
    assert cfg.recover_steps == 200 and cfg.method == "imatrix"
    assert parse_variant("w2g64-kd50").recover_steps == 50
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(QuantConfigError, match="recovery steps"):
        parse_variant("w3g64-kd0")
    plain = parse_variant("w3g64-imatrix")
    assert "recover_steps" not in plain.to_dict()  # a variant without recovery keeps its old digest
    with pytest.raises(QuantConfigError, match="recover_steps"):
        QuantConfig.from_dict({**cfg.to_dict(), "recover_steps": -1})


def test_recovery_lowers_the_held_out_kl_on_the_same_grid(tiny, home: Path, tmp_path: Path) -> None:
    plain = quantize(tiny, parse_variant("w2g32"))
    rec = recover(tiny, plain, SETTINGS)
    ids = torch.tensor(self_generated(tiny, 1024, seed=1))  # held out: text the calibration never saw
    before, after = held_out_kl(tiny, plain, ids), held_out_kl(tiny, rec, ids)
    assert after < 0.95 * before, (before, after)
    assert rec.recovery.held_out_after < rec.recovery.held_out_before
    # the codes are plain rounding's; only the f16 scales and zeros moved; no byte was added
    moved = 0
    for name, parts in stored_ints(rec).items():
        for p, r in zip(stored_ints(plain)[name], parts, strict=True):
            assert torch.equal(p.q, r.q) and r.scale.dtype == torch.float16 and r.zero.dtype == torch.float16
            moved += int((p.scale != r.scale).sum())
    assert moved > 0
    assert rec.quant.file_bytes() == plain.quant.file_bytes()
    assert rec.quant.config.recover_steps == SETTINGS.steps
    # saved and loaded back: the same logits, bit for bit, and the size the manifest states
    path = save_artifact(rec, tmp_path / "rec")
    back = load(path, device="cpu")
    with torch.inference_mode():
        assert torch.equal(back.module(ids), rec.module(ids))
    assert back.quant.file_bytes() == rec.quant.file_bytes()
    assert back.quant.config == rec.quant.config
    # a second call finds the finished run and trains nothing
    again = recover(tiny, plain, SETTINGS)
    assert again.recovery.trained == 0
    with torch.inference_mode():
        assert torch.equal(again.module(ids), rec.module(ids))


def test_an_interrupted_recovery_resumes_to_the_same_result(tiny, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tinytitan.quant.recover.SAVE_SECONDS", 0.0)  # a checkpoint every 10 steps
    plain = quantize(tiny, parse_variant("w3g32"))
    monkeypatch.setenv("TINYTITAN_HOME", str(tmp_path / "whole"))
    whole = recover(tiny, plain, SETTINGS)

    monkeypatch.setenv("TINYTITAN_HOME", str(tmp_path / "cut"))

    def cut(_msg: str, step: int, _total: int) -> None:
        if step == 17:  # after the checkpoint at step 10: steps 11-17 are lost and run again
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(tiny, plain, SETTINGS, progress=cut)
    resumed = recover(tiny, plain, SETTINGS)
    assert resumed.recovery.trained == SETTINGS.steps - 10  # from the checkpoint at step 10
    for name, parts in stored_ints(whole).items():
        for w, r in zip(parts, stored_ints(resumed)[name], strict=True):
            assert torch.equal(w.scale, r.scale) and torch.equal(w.zero, r.zero)
    for (n, a), (_, b) in zip(
        whole.module.named_parameters(), resumed.module.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), n


def test_a_recovered_real_model_exports_its_exact_blocks(home: Path, tmp_path: Path) -> None:
    from tinytitan.io.gguf import GGUFFile
    from tinytitan.quant.export import export_gguf, int_to_q4

    smol = loaded_model("smollm2-135m-instruct")
    plain = quantize(smol, parse_variant("w3g64"))  # 3-bit codes in groups of 64 export as exact Q4_1
    rec = recover(smol, plain, RecoverSettings(steps=8, tokens=4096))  # on the shipped calibration text
    assert not rec.recovery.kept_plain
    a = export_gguf(rec, tmp_path / "a.gguf")
    b = export_gguf(load(save_artifact(rec, tmp_path / "art"), device="cpu"), tmp_path / "b.gguf")
    assert a.read_bytes() == b.read_bytes()
    f = GGUFFile(a)
    st = rec.quant.tensors["layers.3.mlp.down_proj.weight"]
    t, raw = int_to_q4(st.int_weight)
    name = "blk.3.ffn_down.weight"
    assert f.tensors[name].type_name == t == "Q4_1"
    assert (f.blocks(name, rec.config).reshape(raw.shape) == raw).all()
