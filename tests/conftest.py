"""Shared fixtures: the two real models (skipped with a reason when their packages are absent)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors.torch import load_file

# Loaded models decode eagerly in tests unless a test asks for the compiled step: the default ("auto")
# would leave background builds of the real models running beside the suite (tests/test_aot_step.py
# tests that path in processes of its own)
os.environ.setdefault("TINYTITAN_COMPILE", "0")

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_MODELS = ["gemma-3-270m", "smollm2-135m-instruct"]


def model_path(name: str) -> Path:
    from tinytitan import zoo

    e = zoo.entry(name)
    if not e.installed():
        pytest.skip(f"{name}: package {e.package} is not installed")
    return zoo.resolve(name)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA}")
    return SHARED_DATA


_loaded: dict[str, object] = {}


def loaded_model(name: str, shipped: bool = False):
    """Each real model is loaded once per test session (a few seconds each): the float32 reference (what
    quantizing and the quality figures start from), or with `shipped` the file as it runs by default (its
    GGML blocks, tinytitan.quant.ggml_matrix)."""
    key = f"{name}:{'shipped' if shipped else 'reference'}"
    if key not in _loaded:
        from tinytitan.loader import load

        model_path(name)
        _loaded[key] = load(name, device="cpu", reference=not shipped)
    return _loaded[key]


@pytest.fixture(scope="session", params=REAL_MODELS)
def real_model(request):
    return loaded_model(request.param)


@pytest.fixture(scope="session")
def gemma():
    return loaded_model("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm():
    return loaded_model("smollm2-135m-instruct")


def runtime_fixture(name: str) -> tuple[dict, dict]:
    meta_path = FIXTURES / f"runtime_{name}.json"
    if not meta_path.exists():
        pytest.skip(f"golden fixture {meta_path.name} missing (run tests/fixtures/make_runtime_fixtures.py)")
    return json.loads(meta_path.read_text()), load_file(str(FIXTURES / f"runtime_{name}.safetensors"))


NEAR_TIE = 0.5  # logits: two greedy outputs may part only where the two best logits are this close


def same_or_near_tie(model, prompt: list[int], batched: list[int], lone: list[int]) -> None:
    """Token for token equal, except that the first divergence may be at a near-tie (after it, the two
    continuations are different texts and are not compared)."""
    if batched == lone:
        return
    n = min(len(batched), len(lone))
    i = next((k for k in range(n) if batched[k] != lone[k]), n)
    assert i < n, f"one output is a prefix of the other: {batched} vs {lone}"
    logits = model.logits(prompt + lone[:i])[-1]
    margin = abs(float(logits[lone[i]] - logits[batched[i]]))
    assert margin < NEAR_TIE, f"diverged at token {i} without a near-tie (margin {margin:.3f})"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint folder (Hugging Face layout) with the fixture's tokenizer."""
    if not (FIXTURES / "hf_tiny_llama" / "tokenizer.json").exists():
        pytest.skip("tokenizer fixture missing")
    from tests.test_hf_checkpoint import write_checkpoint

    folder = tmp_path_factory.mktemp("tiny_llama")
    write_checkpoint(folder, "llama")
    return folder


@contextmanager
def serving(app, log_level: str = "warning") -> Iterator[str]:
    """The app on a real uvicorn server in a thread, on a free loopback port held from the start (no race
    with other processes); yields its URL and stops the server afterwards."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    try:
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            assert thread.is_alive(), "server thread died"
            time.sleep(0.02)
        host, port = sock.getsockname()
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
