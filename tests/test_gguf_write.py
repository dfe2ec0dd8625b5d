"""Writing GGUF files: metadata with its value types, quantized tensors, atomic replacement, and a whole
SmolLM2 exported, re-read (ours and gguf-py), reloaded, and (when llama-cpp-python is present) run by
llama.cpp."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tinytitan.config import ModelConfig
from tinytitan.errors import TinyTitanError
from tinytitan.io.gguf import NAME_MAPS, GGUFFile
from tinytitan.io.gguf_write import (
    ExportError,
    expected_names,
    export_state,
    gguf_name,
    guess_file_type,
    infer_field_type,
    read_field_types,
    write_gguf,
)
from tinytitan.quant.ggml_formats import FORMATS

VT = gguf.GGUFValueType
SMOL = "smollm2-135m-instruct"
PROMPT = (
    "The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is Rome. "
    "Water boils at a temperature of one hundred degrees"
)


def roundtrip(type_name: str, w: np.ndarray) -> np.ndarray:
    f = FORMATS[type_name]
    return f.dequantize_blocks(f.quantize_blocks(w))


def small_file(path: Path, **kwargs) -> Path:
    rng = np.random.default_rng(0)
    fields = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.block_count": 1,
        "llama.rope.freq_base": 10000.0,
        "llama.some_offset": -3,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.tokens": ["<s>", "a", "b"],
        "tokenizer.ggml.token_type": [3, 1, 1],
        "tokenizer.ggml.scores": [0.0, -1.5, -2.0],
        "general.file_type": 1,  # stale: replaced
    }
    w = rng.standard_normal((8, 256)).astype(np.float32)  # numpy order: 8 rows of 256
    tensors = [
        ("blk.0.attn_q.weight", w, "Q4_K", (256, 8)),
        ("blk.0.attn_k.weight", w, "Q8_0", (256, 8)),
        ("blk.0.attn_v.weight", FORMATS["Q4_0"].quantize_blocks(w), "Q4_0", (256, 8)),  # pre-encoded
        ("blk.0.attn_norm.weight", np.linspace(0.5, 1.5, 256, dtype=np.float32), "F32", (256,)),
        ("token_embd.weight", torch.from_numpy(w), "F16", (256, 8)),
        ("blk.0.ffn_up.weight", w.reshape(2, 4, 256), "Q5_0", (256, 4, 2)),
    ]
    return write_gguf(path, fields, tensors, **kwargs)


# ---------------------------------------------------------------------------------------------------
# write_gguf on a small synthetic file
# ---------------------------------------------------------------------------------------------------


def test_small_file_reads_back_with_types_shapes_and_values(tmp_path):
    path = small_file(tmp_path / "tiny.gguf", field_types={"general.name": (VT.STRING, None)})
    r = gguf.GGUFReader(path)
    types = {k: [t.name for t in f.types] for k, f in r.fields.items()}
    assert types["llama.block_count"] == ["UINT32"]
    assert types["llama.rope.freq_base"] == ["FLOAT32"]
    assert types["llama.some_offset"] == ["INT32"]
    assert types["tokenizer.ggml.add_bos_token"] == ["BOOL"]
    assert types["tokenizer.ggml.tokens"] == ["ARRAY", "STRING"]
    assert types["tokenizer.ggml.token_type"] == ["ARRAY", "INT32"]
    assert types["tokenizer.ggml.scores"] == ["ARRAY", "FLOAT32"]
    assert types == {k: [v[0].name] + ([v[1].name] if v[1] else []) for k, v in _with_header(path).items()}
    meta = GGUFFile(path).fields
    assert meta["general.quantization_version"] == 2
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M  # smallest block type
    assert meta["tokenizer.ggml.tokens"] == ["<s>", "a", "b"]
    assert meta["llama.some_offset"] == -3
    got = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in r.tensors}
    assert got == {
        "blk.0.attn_q.weight": ("Q4_K", (256, 8)),
        "blk.0.attn_k.weight": ("Q8_0", (256, 8)),
        "blk.0.attn_v.weight": ("Q4_0", (256, 8)),
        "blk.0.attn_norm.weight": ("F32", (256,)),
        "token_embd.weight": ("F16", (256, 8)),
        "blk.0.ffn_up.weight": ("Q5_0", (256, 4, 2)),
    }
    f = GGUFFile(path)
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    for name, type_name in [("blk.0.attn_q.weight", "Q4_K"), ("blk.0.attn_k.weight", "Q8_0")]:
        assert np.array_equal(f.dequantize(name).numpy(), roundtrip(type_name, w))
    assert np.array_equal(f.dequantize("blk.0.attn_v.weight").numpy(), roundtrip("Q4_0", w))
    assert np.array_equal(f.dequantize("token_embd.weight").numpy(), w.astype(np.float16).astype(np.float32))
    assert np.array_equal(
        f.dequantize("blk.0.ffn_up.weight").numpy(), roundtrip("Q5_0", w).reshape(2, 4, 256)
    )


def _with_header(path: Path) -> dict:
    """read_field_types plus the three header pseudo-keys gguf.GGUFReader reports."""
    return {
        "GGUF.version": (VT.UINT32, None),
        "GGUF.tensor_count": (VT.UINT64, None),
        "GGUF.kv_count": (VT.UINT64, None),
        **read_field_types(path),
    }


def test_explicit_types_and_file_type_win(tmp_path):
    path = small_file(tmp_path / "t.gguf", field_types={"llama.block_count": (VT.UINT64, None)}, file_type=7)
    assert read_field_types(path)["llama.block_count"] == (VT.UINT64, None)
    assert GGUFFile(path).fields["general.file_type"] == 7


def test_refuses_to_overwrite_unless_forced(tmp_path):
    path = small_file(tmp_path / "t.gguf")
    before = path.read_bytes()
    with pytest.raises(ExportError, match="force") as e:
        small_file(path)
    assert isinstance(e.value, TinyTitanError)
    assert path.read_bytes() == before
    small_file(path, force=True, file_type=2)
    assert GGUFFile(path).fields["general.file_type"] == 2


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = small_file(tmp_path / "t.gguf")
    before = path.read_bytes()
    bad = [("token_embd.weight", np.zeros((3, 5), np.float32), "F32", (4, 4))]
    with pytest.raises(ExportError, match="values given"):
        write_gguf(path, {"general.architecture": "llama"}, bad, force=True)

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        small_file(path, force=True)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["t.gguf"]


def test_bad_requests_are_refused(tmp_path):
    w = np.ones((2, 64), np.float32)
    meta = {"general.architecture": "llama"}
    with pytest.raises(ExportError, match="architecture"):
        write_gguf(tmp_path / "a.gguf", {}, [("x", w, "F32", (64, 2))])
    with pytest.raises(ExportError, match="unknown tensor type"):
        write_gguf(tmp_path / "a.gguf", meta, [("x", w, "Q4_KM", (64, 2))])
    with pytest.raises(ExportError, match="blocks of 256"):
        write_gguf(tmp_path / "a.gguf", meta, [("x", w, "Q4_K", (64, 2))])
    with pytest.raises(ExportError, match="twice"):
        write_gguf(tmp_path / "a.gguf", meta, [("x", w, "F32", (64, 2))] * 2)
    with pytest.raises(ExportError, match="bytes given"):
        write_gguf(tmp_path / "a.gguf", meta, [("x", np.zeros(10, np.uint8), "Q8_0", (64, 2))])
    with pytest.raises(ExportError, match="directory"):
        write_gguf(tmp_path, meta, [("x", w, "F32", (64, 2))])
    assert os.listdir(tmp_path) == []


def test_value_type_inference_follows_llama_cpp_converters():
    assert infer_field_type(3) == (VT.UINT32, None)
    assert infer_field_type(-1) == (VT.INT32, None)
    assert infer_field_type(1 << 40) == (VT.UINT64, None)
    assert infer_field_type(0.5) == (VT.FLOAT32, None)
    assert infer_field_type(True) == (VT.BOOL, None)
    assert infer_field_type("x") == (VT.STRING, None)
    assert infer_field_type(["a"]) == (VT.ARRAY, VT.STRING)
    assert infer_field_type([1, 2]) == (VT.ARRAY, VT.INT32)
    assert infer_field_type([1, 2.5]) == (VT.ARRAY, VT.FLOAT32)
    with pytest.raises(ExportError):
        infer_field_type({"a": 1})


def test_file_type_guess():
    q4km = {"token_embd.weight": ("Q8_0", 10**8), "blk.0.attn_q.weight": ("Q5_0", 10**6)}
    q4km |= {"blk.0.ffn_down.weight": ("Q6_K", 10**6), "blk.0.attn_output.weight": ("Q4_K", 10**5)}
    q4km |= {"blk.0.attn_norm.weight": ("F32", 640)}
    assert guess_file_type(q4km) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert guess_file_type({"blk.0.a": ("F16", 100), "blk.0.n": ("F32", 10)}) == gguf.LlamaFileType.MOSTLY_F16
    assert guess_file_type({"blk.0.n": ("F32", 10)}) == gguf.LlamaFileType.ALL_F32


def test_names_map_back_for_every_architecture():
    for arch, mapping in NAME_MAPS.items():
        for g, ours in mapping.items():
            assert gguf_name(ours.format(7), arch) == g.format(7)
    with pytest.raises(ExportError, match="no GGUF name"):
        gguf_name("layers.0.mlp.nonsense.weight", "llama")


def tiny_llama() -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = ModelConfig(
        arch="llama", vocab_size=32, dim=256, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=128,
        ffn_dim=256, norm_eps=1e-5, context_length=64, rope_base=10000.0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    state = {}
    for gname in expected_names(cfg):
        ours = _our_name(gname)
        rows = {"attn_q": 256, "attn_k": 128, "attn_v": 128}.get(gname.split(".")[-2], 256)
        shape = (256,) if "norm" in gname else (32 if "token_embd" in gname else rows, 256)
        state[ours] = torch.randn(shape, generator=g)
    return cfg, state


def _our_name(gname: str) -> str:
    from tinytitan.io.gguf import _map_name

    ours = _map_name(gname, NAME_MAPS["llama"])
    assert ours is not None
    return ours


def test_export_state_without_a_source_file(tmp_path):
    """Names mapped back, Q/K rows re-interleaved (importance with them), types inferred, re-readable."""
    cfg, state = tiny_llama()
    imp = torch.rand(256, 256, generator=torch.Generator().manual_seed(1)) + 0.05
    plan = {k: ("F32" if w.ndim == 1 else "Q4_K", w) for k, w in state.items()}
    plan["layers.1.self_attn.q_proj.weight"] = ("Q4_K", state["layers.1.self_attn.q_proj.weight"], imp)
    plan["layers.0.self_attn.k_proj.weight"] = ("Q8_0", state["layers.0.self_attn.k_proj.weight"])
    meta = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 256}
    out = export_state(tmp_path / "tiny.gguf", plan, cfg, meta)
    f = GGUFFile(out)
    assert sorted(f.tensors) == sorted(expected_names(cfg))
    assert f.tensors["blk.0.attn_k.weight"].shape == (256, 128)
    assert f.tensors["blk.0.attn_k.weight"].type_name == "Q8_0"
    assert read_field_types(out)["llama.block_count"] == (VT.UINT32, None)
    back = f.state_dict(cfg)
    for k, (type_name, w, *extra) in plan.items():
        fmt = FORMATS[type_name]
        want = fmt.dequantize_blocks(fmt.quantize_blocks(w.numpy(), extra[0].numpy() if extra else None))
        assert torch.equal(back[k], torch.from_numpy(want)), k
    # the importance changed the rounding of that tensor (else the test above proves nothing)
    q = state["layers.1.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(back["layers.1.self_attn.q_proj.weight"].numpy(), roundtrip("Q4_K", q))


# ---------------------------------------------------------------------------------------------------
# a whole model: SmolLM2-135M
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    from tests.conftest import model_path

    f = GGUFFile(model_path(SMOL))
    cfg = f.config()
    return f, cfg, f.state_dict(cfg)


def our_types(f: GGUFFile) -> dict[str, str]:
    from tinytitan.io.gguf import _map_name

    return {_map_name(n, NAME_MAPS[f.arch]): t for n, t in f.tensor_types().items()}


def test_export_with_the_source_types_reproduces_every_tensor_bit_for_bit(smol, tmp_path):
    """Dequantized Q4_1 / Q8_0 blocks quantize back to the very same bytes, and Q/K survive the
    permute_qk round trip: the exported file equals the source tensor for tensor."""
    f, cfg, state = smol
    types = our_types(f)
    out = export_state(tmp_path / "same.gguf", {k: (types[k], w) for k, w in state.items()}, cfg, f)
    g = GGUFFile(out)
    assert list(g.tensors) == list(f.tensors)
    for name in f.tensors:
        assert f.tensors[name].shape == g.tensors[name].shape
        assert np.array_equal(np.asarray(f.raw(name)), np.asarray(g.raw(name))), name
    assert g.fields == f.fields  # file type (Q4_1) and quantization version included
    assert read_field_types(out) == read_field_types(f.path)


def mixed_plan(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    plan = {}
    for k, w in state.items():
        if w.ndim == 1:
            plan[k] = ("F32", w)
        elif k == "embed_tokens.weight":
            plan[k] = ("Q8_0", w)
        elif w.shape[1] % 256 == 0:  # ffn_down (1536 in)
            plan[k] = ("Q4_K", w)
        elif "v_proj" in k:
            plan[k] = ("Q4_0", w)
        else:  # 576 in: k-quants do not fit (llama.cpp would fall back too)
            plan[k] = ("Q4_1", w)
    return plan


@pytest.fixture(scope="module")
def exported(smol, tmp_path_factory):
    f, cfg, state = smol
    plan = mixed_plan(state)
    return export_state(tmp_path_factory.mktemp("export") / "smol-mix.gguf", plan, cfg, f), plan


def test_mixed_export_reads_back(smol, exported):
    f, cfg, _ = smol
    out, plan = exported
    g = GGUFFile(out)
    r = gguf.GGUFReader(out)
    assert {t.name: t.tensor_type.name for t in r.tensors} == g.tensor_types()
    # value types: what gguf-py reads is what we read, and what the source had
    reader_types = {
        k: (VT(v.types[0]), VT(v.types[1]) if len(v.types) > 1 else None) for k, v in r.fields.items()
    }
    assert _with_header(out) == reader_types
    assert read_field_types(out) == read_field_types(f.path)
    for k, (type_name, _) in plan.items():
        name = gguf_name(k, "llama")
        assert g.tensors[name].type_name == type_name
        assert g.tensors[name].shape == f.tensors[name].shape
    assert sorted(g.tensors) == sorted(expected_names(cfg))
    # the smallest block type names the mix (Q4_0 and Q4_K tie at 4.5 bits; Q4_K holds more weights)
    assert g.fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert {k: v for k, v in g.fields.items() if k != "general.file_type"} == {
        k: v for k, v in f.fields.items() if k != "general.file_type"
    }
    assert g.fields["tokenizer.chat_template"] == f.fields["tokenizer.chat_template"]
    # rows quantize independently, so un-permuting after dequantization gives our quantizer's output
    back = g.state_dict(cfg)
    checked = [k for k in plan if not k.startswith("layers.") or k.split(".")[1] in ("0", "29")]
    for k in checked:  # every tensor kind, in the first and last block
        type_name, w = plan[k]
        assert torch.equal(back[k], torch.from_numpy(roundtrip(type_name, w.numpy()))), k


def next_token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> tuple[float, float]:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return float(kl.mean()), float((lp.argmax(-1) == lq.argmax(-1)).double().mean())


@pytest.fixture(scope="module")
def exported_model(exported):
    from tinytitan.loader import load

    return load(exported[0], device="cpu")


def test_exported_model_loads_and_stays_close(exported_model):
    from tests.conftest import loaded_model

    base = loaded_model(SMOL)
    ids = base.tokenizer.encode(PROMPT)
    kl, top1 = next_token_kl(base.logits(ids), exported_model.logits(ids))
    print(f"exported vs original: mean KL {kl:.4f}, top-1 {top1:.3f} over {len(ids)} positions")
    assert kl < 0.15 and top1 >= 0.85  # 4-bit requantization of an already 4-bit model


def test_llama_cpp_runs_the_exported_file_like_we_do(exported, exported_model):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (optional reference)")
    import llama_cpp

    ours = exported_model
    ids = ours.tokenizer.encode(PROMPT)
    llm = llama_cpp.Llama(
        model_path=str(exported[0]), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False
    )
    try:
        llm.eval(ids)
        ref = torch.tensor(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()
    kl, top1 = next_token_kl(ref, ours.logits(ids))
    print(f"llama.cpp vs tinytitan on the exported file: mean KL {kl:.4f}, top-1 {top1:.3f}")
    assert kl < 0.02 and top1 >= 0.9  # llama.cpp rounds activations to 8 bits in its matmuls


def test_export_refuses_incomplete_or_foreign_states(smol, tmp_path):
    f, cfg, state = smol
    plan = {k: ("F32", w) for k, w in state.items() if k != "layers.3.mlp.up_proj.weight"}
    with pytest.raises(ExportError, match=r"lacks 1 tensors.*blk\.3\.ffn_up"):
        export_state(tmp_path / "x.gguf", plan, cfg, f)
    with pytest.raises(ExportError, match="no GGUF name"):
        export_state(tmp_path / "x.gguf", {"layers.0.bogus.weight": ("F32", torch.ones(4))}, cfg, f)
    with pytest.raises(ExportError, match="gemma3"):
        export_state(tmp_path / "x.gguf", {}, cfg, {"general.architecture": "gemma3"})
    assert os.listdir(tmp_path) == []


def test_tied_head_is_written_once(smol, tmp_path):
    f, cfg, state = smol
    assert cfg.tie_embeddings
    plan = {k: ("F16" if w.ndim == 2 else "F32", w) for k, w in state.items()}
    plan["lm_head.weight"] = plan["embed_tokens.weight"]
    out = export_state(tmp_path / "f16.gguf", plan, cfg, dict(f.fields))
    g = GGUFFile(out)
    assert "output.weight" not in g.tensors
    assert g.fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    # without the source file the types are inferred; llama.cpp's uint32 / float32 / bool choices
    types = read_field_types(out)
    assert types["llama.block_count"] == (VT.UINT32, None)
    assert types["tokenizer.ggml.token_type"] == (VT.ARRAY, VT.INT32)
