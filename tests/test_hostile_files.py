"""Each hostile file the fuzz review found, by name: one clear line naming the field, quickly, and nothing
allocated for what the file only claims (the fuzz suite, tests/test_fuzz.py, covers the rest at random)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from tests import fuzzing as fz
from tinytitan.errors import DataError, ModelLoadError, TinyTitanError, TokenizerError
from tinytitan.loader import load
from tinytitan.quant.artifact import MANIFEST


def _load_gguf(tmp_path: Path, spec: fz.GgufSpec) -> TinyTitanError:
    path = tmp_path / "case.gguf"
    path.write_bytes(spec.to_bytes())
    t0 = time.perf_counter()
    with pytest.raises(TinyTitanError) as info:
        load(path, compile=False)
    assert time.perf_counter() - t0 < 5
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return info.value


A = "llama"


@pytest.mark.parametrize(
    ("key", "vtype", "value", "expect"),
    [
        (f"{A}.block_count", fz.U32, 200_000, "block_count"),
        (f"{A}.block_count", fz.U64, 2**40, "block_count"),
        (f"{A}.embedding_length", fz.U64, 2**40, "embedding_length"),
        (f"{A}.attention.head_count", fz.U32, 0, "head_count"),
        (f"{A}.attention.head_count", None, None, "head_count"),
        (f"{A}.attention.head_count", fz.STR, "4", "head_count"),
        (f"{A}.attention.head_count_kv", fz.U32, 3, "head"),
        (f"{A}.attention.layer_norm_rms_epsilon", fz.F32, math.nan, "epsilon"),
        (f"{A}.rope.freq_base", fz.F32, -1.0, "rope"),
        ("general.alignment", fz.STR, "32", "alignment"),
        ("general.alignment", fz.ARR, (fz.U32, [32, 32]), "alignment"),
        ("general.alignment", fz.F32, math.inf, "alignment"),
        ("general.alignment", fz.U32, 3, "alignment"),
        ("general.architecture", fz.U32, 5, "architecture"),
        ("general.name", fz.ARR, ("nested", 5000), "nested"),
    ],
)
def test_hostile_gguf_metadata(tmp_path: Path, key: str, vtype: int, value, expect: str) -> None:
    e = _load_gguf(tmp_path, fz.base_gguf(A).set(key, vtype, value))
    assert isinstance(e, ModelLoadError)
    assert expect in str(e), str(e)


def test_tensor_dims_whose_product_wraps_around(tmp_path: Path) -> None:
    spec = fz.base_gguf(A)
    spec.tensor("blk.0.attn_q.weight").dims = [2**32, 2**32]  # np.prod: 2^64 wraps to 0 in int64
    e = _load_gguf(tmp_path, spec)
    assert "attn_q" in str(e)


@pytest.mark.parametrize("dims", [[], [1] * 9, [2**40, 64]])
def test_tensor_dims_out_of_bounds(tmp_path: Path, dims: list[int]) -> None:
    spec = fz.base_gguf(A)
    spec.tensor("blk.1.ffn_up.weight").dims = dims
    assert "ffn_up" in str(_load_gguf(tmp_path, spec))


def test_block_indices_past_the_layer_count(tmp_path: Path) -> None:
    spec = fz.base_gguf(A)
    spec.tensor("blk.1.ffn_up.weight").name = "blk.1999999.ffn_up.weight"
    assert "blk.1999999" in str(_load_gguf(tmp_path, spec))


@pytest.mark.parametrize(
    ("key", "vtype", "value"),
    [
        ("tokenizer.ggml.tokens", fz.ARR, (fz.U32, list(range(300)))),  # tokens that are not strings
        ("tokenizer.ggml.token_type", fz.ARR, (fz.STR, ["1"] * 300)),  # token types as strings
        ("tokenizer.ggml.scores", fz.ARR, (fz.STR, ["0"] * 300)),
        ("tokenizer.ggml.bos_token_id", fz.STR, "1"),  # a BOS id as a string
        ("tokenizer.ggml.merges", fz.ARR, (fz.U32, [1, 2, 3])),  # merges as ints
        ("tokenizer.ggml.tokens", fz.ARR, (fz.STR, [])),
        ("tokenizer.ggml.model", fz.U32, 3),
    ],
)
def test_hostile_tokenizer_fields(tmp_path: Path, key: str, vtype: int, value) -> None:
    e = _load_gguf(tmp_path, fz.base_gguf(A).set(key, vtype, value))
    assert isinstance(e, TokenizerError | ModelLoadError)
    assert key.rsplit(".", 1)[-1] in str(e), str(e)


# -- artifacts ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fz.make_artifacts(tmp_path_factory.mktemp("artifacts"))[0]


def _edit(manifest: dict, path: str, value) -> dict:
    """A copy with the value at 'a/b/c' replaced (value ... drops it)."""
    doc = json.loads(json.dumps(manifest))
    *parents, last = path.split("/")
    node = doc
    for k in parents:
        node = node[k]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return doc


EMB = "tensors/embed_tokens.weight"


@pytest.mark.parametrize(
    ("path", "value", "expect"),
    [
        ("version", "abc", "version"),
        ("model_config", ..., "model_config"),
        ("tensors", ..., "tensors"),
        ("model_config/n_layers", 200_000, "n_layers"),
        ("model_config/n_kv_heads", 0, "n_kv_heads"),
        ("model_config/dim", "64", "dim"),
        ("model_config/unknown_field", 1, "unknown_field"),
        ("n_params", "x", "n_params"),
        ("quant_config", "w4", "quant_config"),
        ("quant_config/blocks/bits", 0, "bits"),
        ("quant_config/kv_cache", [[[]]], "kv_cache"),
        ("quant_config/method", 5, "method"),
        (f"{EMB}/bits", 0, "bits"),
        (f"{EMB}/shape", [2**32, 2**32], "embed_tokens"),
        (f"{EMB}/shape", [301, 64], "embed_tokens"),
        (f"{EMB}/kind", "pickle", "embed_tokens"),
        ("tokenizer", ..., "tokenizer"),
        ("source", 5, "source"),
    ],
)
def test_hostile_manifest(tmp_path: Path, artifact: Path, path: str, value, expect: str) -> None:
    case = fz.copy_folder(artifact, tmp_path / "art")
    manifest = json.loads((artifact / MANIFEST).read_text())
    (case / MANIFEST).unlink()  # the copy's files are hard links: never write through one
    (case / MANIFEST).write_text(json.dumps(_edit(manifest, path, value)))
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load(case, compile=False)
    assert time.perf_counter() - t0 < 5
    assert "\n" not in str(info.value) and expect in str(info.value), str(info.value)
    assert (artifact / MANIFEST).read_text() == json.dumps(manifest) or json.loads(
        (artifact / MANIFEST).read_text()
    ) == manifest  # the base is untouched


def test_manifest_not_utf8(tmp_path: Path, artifact: Path) -> None:
    case = fz.copy_folder(artifact, tmp_path / "art")
    raw = (artifact / MANIFEST).read_bytes()
    (case / MANIFEST).unlink()
    (case / MANIFEST).write_bytes(raw[:40] + b"\xff\xfe" + raw[40:])
    with pytest.raises(ModelLoadError, match=r"tinytitan\.json: not valid UTF-8"):
        load(case, compile=False)


def test_finetune_line_nested_deep(tmp_path: Path) -> None:
    from tinytitan.finetune.data import read_examples

    path = tmp_path / "train.jsonl"
    path.write_text("\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: JSON nested too deeply"):
        read_examples(path, tokenizer=None, max_len=64)


def test_eval_line_nested_deep(tmp_path: Path) -> None:
    from tinytitan.eval.data import read_jsonl

    path = tmp_path / "items.jsonl"
    path.write_text('{"a": ' * 100_000 + "1" + "}" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"items.jsonl:1: JSON nested too deeply"):
        read_jsonl(path)


def test_cli_hostile_file_exit_2_one_line(tmp_path: Path) -> None:
    from tests.test_errors import run_cli, snapshot

    (tmp_path / "m.gguf").write_bytes(fz.base_gguf(A).set(f"{A}.block_count", fz.U32, 200_000).to_bytes())
    before = snapshot(tmp_path)
    proc = run_cli("run", "m.gguf", "hello", "--max-tokens", "2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "block_count" in lines[0], proc.stderr
    assert snapshot(tmp_path) == before
