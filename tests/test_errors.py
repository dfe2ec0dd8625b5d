"""Bad input gets one clear line, no traceback, and nothing on disk changes."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import loaded_model, model_path
from tinytitan.errors import ContextLengthError, ModelLoadError, UnknownModelError
from tinytitan.io.gguf import GGUFFile
from tinytitan.loader import load


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def write_gguf(path: Path, arch: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load(tmp_path / "nope.gguf")


def test_wrong_magic(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        GGUFFile(bad)


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    write_gguf(path, "mamba")
    with pytest.raises(ModelLoadError, match=r"'mamba' is not supported; supported: gemma3, llama"):
        GGUFFile(path)


@pytest.mark.parametrize("keep", [30, 4096, 3_000_000])
def test_truncated_real_file(tmp_path: Path, keep: int) -> None:
    src = model_path("smollm2-135m-instruct")
    cut = tmp_path / "cut.gguf"
    with src.open("rb") as f:
        cut.write_bytes(f.read(keep))
    with pytest.raises(ModelLoadError, match=r"truncated|corrupt"):
        GGUFFile(cut)


@pytest.mark.parametrize("n_tensors,n_kv", [(2**62, 1), (1, 2**40)])
def test_hostile_header_counts(tmp_path: Path, n_tensors: int, n_kv: int) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="implausible"):
        GGUFFile(path)


def test_hostile_array_length(tmp_path: Path) -> None:
    key = b"general.architecture"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 4, 2**50)  # array of 2^50 uint32
    path = tmp_path / "hostile.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    with pytest.raises(ModelLoadError, match=r"corrupt|truncated"):
        GGUFFile(path)


def test_unknown_model_name_lists_known_ones() -> None:
    with pytest.raises(UnknownModelError, match="gemma-3-270m, smollm2-135m-instruct"):
        load("gpt-17-ultra")


def test_prompt_longer_than_context() -> None:
    model = loaded_model("smollm2-135m-instruct")
    saved = model.ctx
    model.ctx = 16
    try:
        with pytest.raises(ContextLengthError, match="longer than the context of 16 tokens"):
            model.generate("word " * 40, max_tokens=4)
    finally:
        model.ctx = saved


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run(
        [sys.executable, "-m", "tinytitan", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("case", ["missing", "magic", "truncated", "arch", "unknown"])
def test_cli_errors_are_one_line_and_touch_nothing(tmp_path: Path, case: str) -> None:
    if case == "magic":
        (tmp_path / "bad.gguf").write_bytes(b"GGUX" + b"\0" * 64)
        target = "bad.gguf"
    elif case == "truncated":
        with model_path("smollm2-135m-instruct").open("rb") as f:
            (tmp_path / "cut.gguf").write_bytes(f.read(100_000))
        target = "cut.gguf"
    elif case == "arch":
        write_gguf(tmp_path / "m.gguf", "rwkv6")
        target = "m.gguf"
    elif case == "missing":
        target = "absent.gguf"
    else:
        target = "not-a-model"
    before = snapshot(tmp_path)
    proc = run_cli("run", target, "hello", "--max-tokens", "2", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before


def test_cli_prompt_too_long(tmp_path: Path) -> None:
    model_path("smollm2-135m-instruct")
    proc = run_cli("run", "smollm2-135m-instruct", "word " * 100, "--ctx", "32", cwd=tmp_path)
    assert proc.returncode == 2
    assert "longer than the context of 32 tokens" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_run_ends_quickly_with_everything_written(tmp_path: Path) -> None:
    """`tinytitan run` ends its process without tearing objects down (tinytitan.cli.main.entry): what it
    streamed is all there, and the exit status is the command's."""
    from tests.conftest import loaded_model

    model_path("smollm2-135m-instruct")
    proc = run_cli("run", "smollm2-135m-instruct", "The capital of France is", "--max-tokens", "12",
                   "--stats", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    want = loaded_model("smollm2-135m-instruct", shipped=True).complete("The capital of France is", 12).text
    assert proc.stdout == want + "\n"
    assert proc.stderr.strip().endswith("s]")  # the --stats line, printed last
