"""GGML block formats: bit-exact dequantization against gguf-py, bounded error, weighted search, int4 view.

Dequantization has a reference (gguf.quants.dequantize), so it is compared bit for bit; quantization has
none for k-quants in gguf-py, so its error is bounded (and compared with gguf-py's quantizers where they
exist, and with llama.cpp's own quantizers when llama-cpp-python is installed).
"""

from __future__ import annotations

import ctypes
import importlib.util
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

import tinytitan.quant.ggml_formats as gf
from tinytitan.errors import TinyTitanError
from tinytitan.quant.ggml_formats import (
    FORMATS,
    QuantFormatError,
    fallback_type,
    int4_groups_dequantize,
    int4_groups_exact,
    to_int4_groups,
)

QUANTS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ALL = [*QUANTS, "F16", "BF16", "F32"]
LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # the types gguf-py can also quantize
# relative RMSE (error RMS / weight RMS) ceilings on N(0, 1) data, a few % above what we measure
GAUSS_BOUND = {
    "Q8_0": 0.0055, "Q6_K": 0.018, "Q5_K": 0.036, "Q5_1": 0.035, "Q5_0": 0.042, "Q4_K": 0.073,
    "Q4_1": 0.072, "Q4_0": 0.084, "Q3_K": 0.148, "Q2_K": 0.275, "F16": 3e-4, "BF16": 2.5e-3, "F32": 0.0,
}  # fmt: skip
# the same on real weights (heavier tails): measured + ~15%
REAL_BOUND = {
    "Q8_0": 0.0075, "Q6_K": 0.024, "Q5_K": 0.048, "Q5_1": 0.048, "Q5_0": 0.064, "Q4_K": 0.095,
    "Q4_1": 0.095, "Q4_0": 0.125, "Q3_K": 0.18, "Q2_K": 0.33, "F16": 5e-4, "BF16": 4e-3, "F32": 0.0,
}  # fmt: skip


def rel_rmse(y: np.ndarray, x: np.ndarray, w: np.ndarray | None = None) -> float:
    e = (y.astype(np.float64) - x) ** 2
    s = x.astype(np.float64) ** 2
    if w is not None:
        e, s = e * w, s * w
    return float(np.sqrt(e.mean() / s.mean()))


def cols_for(name: str, cols: int = 512) -> int:
    return cols if FORMATS[name].row_ok(cols) else 1024


def roundtrip(name: str, x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    f = FORMATS[name]
    return f.dequantize_blocks(f.quantize_blocks(x, w))


def assert_same_bits(ours: np.ndarray, ref: np.ndarray) -> None:
    """Bit-for-bit equal; NaNs (only from random bytes) need only to be NaN in both."""
    ref = np.asarray(ref, dtype=np.float32).reshape(ours.shape)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def data_cases(cols: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(cols)
    g = rng.standard_normal((5, cols)).astype(np.float32)
    f32 = np.float32
    return {
        "gauss": g,
        "zeros": np.zeros((2, cols), f32),
        "zero_rows": np.concatenate([np.zeros((1, cols), f32), g[:2], np.zeros((1, cols), f32)]),
        "tiny": g * f32(1e-6),
        "huge": g * f32(1e4),
        "negative_only": -np.abs(g) - f32(0.25),
        "positive_only": np.abs(g) + f32(2.0),
        "offset": g * f32(0.01) + f32(100.0),
        "constant": np.full((2, cols), -1.75, f32),
        "outliers": np.where(rng.random((5, cols)) < 0.01, f32(40.0), f32(0.02) * g).astype(f32),
        "one_row": g[:1],
    }


# ---------------------------------------------------------------------------------------------------
# registry and layout
# ---------------------------------------------------------------------------------------------------


def test_registry_matches_gguf_sizes():
    assert set(ALL) == set(FORMATS)
    for name, f in FORMATS.items():
        qt = gguf.GGMLQuantizationType[name]
        assert f.qtype == qt and f.name == name
        assert (f.block_size, f.type_size) == gguf.GGML_QUANT_SIZES[qt]
        assert f.bits_per_weight == pytest.approx(f.type_size * 8 / f.block_size)
    assert FORMATS["Q4_K"].bits_per_weight == 4.5 and FORMATS["Q6_K"].bits_per_weight == 6.5625


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(3, 256), (2, 1024)])
def test_shapes_and_dtypes(name, shape):
    f = FORMATS[name]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    raw = f.quantize_blocks(x)
    assert raw.dtype == np.uint8 and raw.shape == (shape[0], shape[1] // f.block_size * f.type_size)
    y = f.dequantize_blocks(raw)
    assert y.dtype == np.float32 and y.shape == shape
    # any leading shape: the last axis is the row
    assert f.quantize_blocks(x.reshape(1, *shape)).shape == (1, *raw.shape)
    assert np.array_equal(f.quantize_blocks(x[0]), raw[0])
    assert np.array_equal(f.dequantize_blocks(raw[0]), y[0])
    assert f.quantize_blocks(np.zeros((0, shape[1]), np.float32)).shape == (0, raw.shape[1])


# ---------------------------------------------------------------------------------------------------
# dequantization: bit-exact against gguf-py
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_dequantize_bit_exact_on_our_quantization(name):
    cols = cols_for(name)
    for case, x in data_cases(cols).items():
        raw = FORMATS[name].quantize_blocks(x)
        y = FORMATS[name].dequantize_blocks(raw)
        assert np.isfinite(y).all(), case
        assert_same_bits(y, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", ALL)
def test_dequantize_bit_exact_on_random_bytes(name):
    """Every bit pattern of every field (incl. NaN/inf half-floats) decodes exactly like gguf-py."""
    f = FORMATS[name]
    raw = np.random.default_rng(1).integers(0, 256, (7, 8 * f.type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gguf.quants.dequantize(raw, f.qtype)
        assert_same_bits(f.dequantize_blocks(raw), ref)


@pytest.mark.parametrize("name", ALL)
def test_values_without_loss_come_back_exactly(name):
    """Zero rows stay exactly zero; for float types a dequantized tensor requantizes to the same bytes."""
    f = FORMATS[name]
    cols = cols_for(name)
    z = np.zeros((2, cols), np.float32)
    assert not f.dequantize_blocks(f.quantize_blocks(z)).any()
    x = np.random.default_rng(2).standard_normal((4, cols)).astype(np.float32)
    raw = f.quantize_blocks(x)
    raw2 = f.quantize_blocks(f.dequantize_blocks(raw))
    y, y2 = f.dequantize_blocks(raw), f.dequantize_blocks(raw2)
    # requantizing dequantized values is (nearly) lossless: the search finds the grid again
    assert (y == y2).mean() >= 0.98
    assert rel_rmse(y2, y) <= 0.05 * max(rel_rmse(y, x), 1e-12)
    if name in ("F32", "F16", "BF16", "Q8_0", "Q4_1", "Q4_K"):
        assert np.array_equal(y, y2)


# ---------------------------------------------------------------------------------------------------
# quantization error
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((128, 1024)).astype(np.float32)


@pytest.mark.parametrize("name", ALL)
def test_error_bound_gaussian(name, gauss):
    assert rel_rmse(roundtrip(name, gauss), gauss) <= GAUSS_BOUND[name]


@pytest.mark.parametrize("name", LEGACY)
def test_at_least_as_good_as_gguf_quantize(name, gauss):
    qt = gguf.GGMLQuantizationType[name]
    ref = rel_rmse(gguf.quants.dequantize(gguf.quants.quantize(gauss, qt), qt), gauss)
    assert rel_rmse(roundtrip(name, gauss), gauss) <= 1.02 * ref


def _real_tensors() -> dict[str, np.ndarray]:
    """A few real weight matrices, dequantized from the two models' GGUF files (rows subsampled)."""
    from tinytitan import zoo
    from tinytitan.io.gguf import GGUFFile

    out = {}
    picks = {
        "gemma-3-270m": ["token_embd.weight", "blk.0.ffn_down.weight", "blk.2.attn_v.weight"],
        "smollm2-135m-instruct": ["token_embd.weight", "blk.3.ffn_down.weight"],
    }
    for model, names in picks.items():
        if not zoo.entry(model).installed():
            continue
        f = GGUFFile(zoo.resolve(model))
        for name in names:
            info = f.tensors[name]
            raw = f.raw(name)
            raw = raw[:: max(1, raw.shape[0] // 1024)]
            out[f"{model}:{name}:{info.type_name}"] = gguf.quants.dequantize(raw, info.qtype)
    if not out:
        pytest.skip("neither real model is available")
    return out


@pytest.fixture(scope="module")
def real() -> dict[str, np.ndarray]:
    return _real_tensors()


@pytest.mark.parametrize("name", ALL)
def test_error_bound_real_weights(name, real):
    f = FORMATS[name]
    for key, x in real.items():
        if not f.row_ok(x.shape[1]):
            continue
        err = rel_rmse(roundtrip(name, x), x)
        assert err <= REAL_BOUND[name], (key, err)
        if name in LEGACY:
            qt = f.qtype
            ref = rel_rmse(gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt), x)
            assert err <= 1.02 * ref + 1e-7, (key, err, ref)


def _llama_quantizer():
    """llama.cpp's own quantizers (ggml_quantize_chunk) through llama-cpp-python's bundled libggml."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-cpp-python is not installed (optional reference)")
    lib_path = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libggml-base.so"
    if not lib_path.exists():
        pytest.skip(f"no {lib_path.name} in llama-cpp-python")
    lib = ctypes.CDLL(str(lib_path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3
    lib.ggml_quantize_chunk.argtypes.append(ctypes.c_void_p)
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]

    def quantize(x: np.ndarray, name: str) -> np.ndarray:
        f = FORMATS[name]
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], x.shape[1] // f.block_size * f.type_size), np.uint8)
        lib.ggml_quantize_init(int(f.qtype))
        lib.ggml_quantize_chunk(int(f.qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out

    return quantize


@pytest.mark.parametrize("name", QUANTS)
def test_at_least_as_good_as_llama_cpp(name, gauss, real):
    llama_quantize = _llama_quantizer()
    f = FORMATS[name]
    for key, x in {"gauss": gauss, **real}.items():
        if not f.row_ok(x.shape[1]):
            continue
        ref = rel_rmse(f.dequantize_blocks(llama_quantize(x, name)), x)
        assert rel_rmse(roundtrip(name, x), x) <= 1.01 * ref + 1e-7, key


# ---------------------------------------------------------------------------------------------------
# importance-weighted search
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANTS)
def test_weighted_search_lowers_weighted_error(name, gauss):
    x = gauss[:64]
    w = (np.random.default_rng(4).pareto(1.5, x.shape[1]) + 0.05).astype(np.float32)
    plain = rel_rmse(roundtrip(name, x), x, w)
    weighted = rel_rmse(roundtrip(name, x, w), x, w)
    assert weighted < 0.99 * plain
    # per-element weights of the same values give the same bytes as per-column ones
    f = FORMATS[name]
    assert np.array_equal(f.quantize_blocks(x, np.broadcast_to(w, x.shape).copy()), f.quantize_blocks(x, w))


def test_uniform_weights_are_plain_squared_error(gauss):
    x = gauss[:16]
    for name in QUANTS:
        f = FORMATS[name]
        same = f.quantize_blocks(x, np.full(x.shape[1], 3.0)) == f.quantize_blocks(x)
        assert same.mean() > 0.95, name  # (float rounding of the weighted sums may flip near-ties)
        assert rel_rmse(roundtrip(name, x, np.full(x.shape[1], 3.0)), x) <= 1.001 * rel_rmse(
            roundtrip(name, x), x
        )


def test_zero_weights_are_allowed(gauss):
    w = np.ones(gauss.shape[1], np.float32)
    w[:300] = 0.0
    for name in QUANTS:
        y = roundtrip(name, gauss[:4], w)
        assert np.isfinite(y).all()
        assert rel_rmse(y[:, 300:], gauss[:4, 300:]) <= 1.5 * GAUSS_BOUND[name]


# ---------------------------------------------------------------------------------------------------
# int4 groups
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", gf.INT4_GROUP_TYPES)
def test_int4_groups_exact(name):
    f = FORMATS[name]
    cols = cols_for(name)
    for case, x in data_cases(cols).items():
        raw = f.quantize_blocks(x)
        q, scale, zero, group = to_int4_groups(name, raw)
        assert group == (16 if name in ("Q2_K", "Q3_K") else 32)
        assert q.dtype == np.uint8 and q.shape == x.shape and q.max() <= 15
        assert scale.dtype == zero.dtype == np.float32 and scale.shape == (x.shape[0], cols // group)
        assert zero.shape == scale.shape
        if name in ("Q4_0", "Q3_K"):
            assert not zero.any()
        got, want = int4_groups_dequantize(q, scale, zero, group), f.dequantize_blocks(raw)
        if name in ("Q4_1", "Q4_K") and case in ("offset", "outliers", "positive_only"):
            # zero = 8 * step + min may need more than float32's 24 bits (min ~100 beside a tiny step,
            # or a min near 0 beside an outlier's huge step): no exact zero exists; one ulp of it is lost
            assert np.abs(got - want).max() <= 2.0**-22 * np.abs(zero).max(), case
            continue
        assert np.array_equal(got, want), case


def test_int4_groups_exact_on_real_files():
    from tests.conftest import model_path
    from tinytitan.io.gguf import GGUFFile

    checked = 0
    for model in ("gemma-3-270m", "smollm2-135m-instruct"):
        f = GGUFFile(model_path(model))
        for name, info in f.tensors.items():
            if info.type_name in gf.INT4_GROUP_TYPES:
                assert int4_groups_exact(info.type_name, f.raw(name)), name
                checked += 1
    assert checked > 0


def test_int4_groups_refuses_other_types():
    with pytest.raises(QuantFormatError, match="int4"):
        to_int4_groups("Q5_0", np.zeros((1, 22), np.uint8))


# ---------------------------------------------------------------------------------------------------
# errors, fallbacks, speed
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_refuse_rows_not_multiple_of_256(name):
    with pytest.raises(QuantFormatError, match="multiple of 256") as e:
        FORMATS[name].quantize_blocks(np.zeros((4, 640), np.float32))
    assert isinstance(e.value, TinyTitanError) and isinstance(e.value, ValueError)
    assert fallback_type(name, 640) in str(e.value)


def test_fallback_types_follow_llama_cpp():
    assert fallback_type("Q4_K", 640) == "Q5_0"
    assert fallback_type("Q5_K", 640) == "Q5_1"
    assert fallback_type("Q6_K", 640) == "Q8_0"
    assert fallback_type("Q2_K", 640) == "Q4_0"  # llama.cpp: IQ4_NL, which we do not implement
    assert fallback_type("Q3_K", 576) == "Q4_0"
    assert fallback_type("Q4_K", 2048) == "Q4_K"  # no fallback needed
    assert fallback_type("Q6_K", 100) == "F16"  # not even 32-blocks fit
    assert fallback_type("Q4_0", 48) == "F16"
    assert fallback_type("F32", 7) == "F32"
    with pytest.raises(QuantFormatError, match="Q4_K"):
        fallback_type("Q4_KM", 256)


def test_bad_inputs_are_refused():
    f = FORMATS["Q4_0"]
    x = np.ones((2, 64), np.float32)
    with pytest.raises(QuantFormatError, match="blocks of 32"):
        f.quantize_blocks(np.ones((2, 48), np.float32))
    with pytest.raises(QuantFormatError, match="NaN"):
        f.quantize_blocks(np.where(np.eye(2, 64) > 0, np.nan, x))
    with pytest.raises(QuantFormatError, match="broadcast"):
        f.quantize_blocks(x, np.ones(32))
    with pytest.raises(QuantFormatError, match=">= 0"):
        f.quantize_blocks(x, -np.ones(64))
    with pytest.raises(QuantFormatError, match="float16"):
        FORMATS["Q4_1"].quantize_blocks(x * 1e6)
    with pytest.raises(QuantFormatError, match="float16"):
        FORMATS["F16"].quantize_blocks(x * 1e5)
    with pytest.raises(QuantFormatError, match="whole blocks"):
        f.dequantize_blocks(np.zeros((2, 17), np.uint8))


@pytest.mark.parametrize("name", QUANTS)
def test_a_rows_bytes_do_not_depend_on_its_batch(name):
    """Quantizing rows one at a time, in small batches or all at once gives the same bytes."""
    rng = np.random.default_rng(7)
    for cols in sorted({cols_for(name), FORMATS[name].block_size}):
        x = rng.standard_normal((11, cols)).astype(np.float32)
        w = (rng.random(cols) + 0.1).astype(np.float32)
        for weights in (None, w):
            whole = FORMATS[name].quantize_blocks(x, weights)
            one_by_one = np.stack([FORMATS[name].quantize_blocks(row, weights) for row in x])
            by_three = np.concatenate(
                [FORMATS[name].quantize_blocks(x[i : i + 3], weights) for i in (0, 3, 6, 9)]
            )
            assert np.array_equal(whole, one_by_one) and np.array_equal(whole, by_three)


def test_threaded_chunks_give_the_same_bytes(monkeypatch):
    x = np.random.default_rng(5).standard_normal((700, 512)).astype(np.float32)  # > 4 work chunks
    threaded = {n: FORMATS[n].quantize_blocks(x) for n in ("Q4_0", "Q4_K", "Q6_K")}
    monkeypatch.setattr(gf, "_THREADS", 1)
    for n, raw in threaded.items():
        assert np.array_equal(FORMATS[n].quantize_blocks(x), raw), n


@pytest.mark.parametrize("name", QUANTS)
def test_quantizes_a_2048x640_matrix_well_under_a_second(name):
    shape = (2048, 640) if FORMATS[name].row_ok(640) else (640, 2048)
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    t = time.perf_counter()
    FORMATS[name].quantize_blocks(x)
    assert time.perf_counter() - t < 1.0
