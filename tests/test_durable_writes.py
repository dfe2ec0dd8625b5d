"""Durable writes (tinytitan.io.folders): files and folders are fsynced before the rename that publishes them,
new files and folders get the umask's modes, and a save killed between any two of its steps leaves the
previous output complete (or the new one), which later loads and saves keep."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinytitan.io import folders
from tinytitan.io.folders import atomic_path, atomic_write_text, old_copy, recover_folder, staged_folder

ROOT = Path(__file__).resolve().parents[1]


def _can_exchange(where: Path) -> bool:
    a, b = where / ".probe-a", where / ".probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return folders.exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


@pytest.fixture
def publish_mode(request, tmp_path: Path, monkeypatch) -> str:
    """Which publish: "exchange", the one-step swap (skipped where it is missing), or "fallback"."""
    if request.param == "exchange" and not _can_exchange(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    if request.param == "fallback":
        monkeypatch.setattr(folders, "exchange", lambda a, b: False)
    return request.param


def _record(monkeypatch) -> list[tuple[str, str, str]]:
    """Every fsync (by the path its descriptor names then), os.replace and folder exchange, in order."""
    events: list[tuple[str, str, str]] = []
    real_fsync, real_replace, real_exchange = os.fsync, os.replace, folders.exchange

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def replace(a, b, **kw) -> None:
        events.append(("rename", os.fspath(a), os.fspath(b)))
        real_replace(a, b, **kw)

    def exchange(a, b) -> bool:
        done = real_exchange(a, b)
        if done:
            events.append(("exchange", os.fspath(a), os.fspath(b)))
        return done

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(folders, "exchange", exchange)
    return events


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# -- order of fsync and rename ----------------------------------------------------------------------
def test_a_file_is_fsynced_before_its_rename_and_the_folder_after(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "cache.json"
    target.write_text("old")
    events = _record(monkeypatch)
    atomic_write_text(target, '{"new": 1}')
    assert target.read_text() == '{"new": 1}'
    (publish,) = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(target)]
    tmp = events[publish][1]
    assert Path(tmp).parent == tmp_path and not Path(tmp).exists()
    assert ("fsync", tmp, "") in events[:publish]  # the data is on disk before the name points at it
    assert ("fsync", str(tmp_path), "") in events[publish + 1 :]  # and the rename itself after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def test_a_failed_file_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


@pytest.mark.parametrize("publish_mode", ["exchange", "fallback"], indirect=True)
def test_a_folder_is_fsynced_whole_before_the_rename_that_publishes_it(
    tmp_path: Path, monkeypatch, publish_mode: str
) -> None:
    out = tmp_path / "art"
    with staged_folder(out) as t:
        (t / "data.txt").write_text("old")
    events = _record(monkeypatch)
    with staged_folder(out) as stage:
        (stage / "data.txt").write_text("new")
        (stage / "sub").mkdir()
        (stage / "sub" / "more.bin").write_bytes(b"\0" * 10)
    assert _tree(out) == {"data.txt": "new", "sub/more.bin": "\0" * 10}
    kind = "exchange" if publish_mode == "exchange" else "rename"
    (publish,) = [i for i, e in enumerate(events) if e[0] == kind and e[1:] == (str(stage), str(out))]
    synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
    made = [stage / "data.txt", stage / "sub" / "more.bin", stage / "sub", stage]
    assert {str(p) for p in made} <= synced
    assert ("fsync", str(tmp_path), "") in events[publish + 1 :]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the previous copy and the stage are gone


@pytest.mark.parametrize("publish_mode", ["exchange", "fallback"], indirect=True)
def test_the_working_folder_can_be_replaced(tmp_path: Path, monkeypatch, publish_mode: str) -> None:
    out = tmp_path / "ad"
    (out / "sub").mkdir(parents=True)
    (out / "data.txt").write_text("old")
    monkeypatch.chdir(out / "sub")
    with staged_folder(Path("..")) as stage:  # `-o ..`: the folder the process works in is replaced
        (stage / "data.txt").write_text("new")
        (stage / "sub").mkdir()
    assert Path.cwd() == out.resolve() / "sub" and Path("../data.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


# -- modes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_and_folders_get_the_umask_modes(tmp_path: Path, umask: int) -> None:
    before = os.umask(umask)
    try:
        assert folders.current_umask() == umask
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "b.bin") as tmp:  # made by mkstemp (0600) and written by name
            tmp.write_bytes(b"y")
        with staged_folder(tmp_path / "folder") as stage:  # made by mkdtemp (0700)
            (stage / "f.json").write_text("{}")
    finally:
        os.umask(before)
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "b.bin") == 0o666 & ~umask
    assert _mode(tmp_path / "folder") == 0o777 & ~umask
    assert _mode(tmp_path / "folder" / "f.json") == 0o666 & ~umask


def _adapted(base: Path, rank: int, seed: int):
    from tinytitan.finetune.lora import LoraConfig, LoraLinear, attach
    from tinytitan.loader import load

    model = load(base, device="cpu")
    config = LoraConfig(rank=rank, alpha=2 * rank, targets=("q_proj", "o_proj"))
    attach(model.module, config, seed=seed)
    with torch.no_grad():
        for m in model.module.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.normal_(0, 0.05)
    return model, config


def test_an_artifact_and_an_adapter_get_the_umask_modes(tiny_dir: Path, tmp_path: Path) -> None:
    from tinytitan.finetune.adapter import save_adapter
    from tinytitan.loader import load
    from tinytitan.quant.artifact import save_artifact

    q = load(tiny_dir, device="cpu", variant="w8")
    model, config = _adapted(tiny_dir, 2, 0)
    before = os.umask(0o027)
    try:
        art = save_artifact(q, tmp_path / "art")
        ad = save_adapter(model, config, tmp_path / "ad")
    finally:
        os.umask(before)
    for folder in (art, ad):
        assert _mode(folder) == 0o750
        files = list(folder.iterdir())
        assert files and all(_mode(f) == 0o640 for f in files), {f.name: oct(_mode(f)) for f in files}
    assert {"tinytitan.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in art.iterdir()}


# -- crashes --------------------------------------------------------------------------------------
# A save in a process of its own, killed (SIGKILL: no cleanup runs) just before its step `kill_at`: each
# fsync, rename, exchange and removal of the previous copy is a step. kill_at -1 runs it whole and prints
# the number of steps.
_KILLER = """
import os, signal
from tinytitan.io import folders
steps = [0]
def _step(fn):
    def wrapped(*a, **k):
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        steps[0] += 1
        return fn(*a, **k)
    return wrapped
def arm(fallback):
    if fallback:
        folders.exchange = lambda a, b: False
    os.fsync, os.replace, os.rename = _step(os.fsync), _step(os.replace), _step(os.rename)
    folders.exchange, folders._remove = _step(folders.exchange), _step(folders._remove)
"""

_FOLDER_SAVE = (
    "import sys\nfrom pathlib import Path\nkill_at = int(sys.argv[2])\n"
    + _KILLER
    + """
arm(sys.argv[3] == "fallback")
with folders.staged_folder(Path(sys.argv[1])) as tmp:
    (tmp / "data.txt").write_text("new " * 1000)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "more.txt").write_text("new")
print(steps[0])
"""
)
OLD = {"data.txt": "old"}
NEW = {"data.txt": "new " * 1000, "sub/more.txt": "new"}


def _run(script: str, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize("publish_mode", ["exchange", "fallback"], indirect=True)
def test_a_folder_save_killed_at_any_step_leaves_the_old_or_the_new_folder(
    tmp_path: Path, publish_mode: str
) -> None:
    def old_folder(out: Path) -> Path:
        with staged_folder(out) as t:
            (t / "data.txt").write_text("old")
        return out

    whole = _run(_FOLDER_SAVE, old_folder(tmp_path / "whole" / "out"), -1, publish_mode)
    assert whole.returncode == 0, whole.stderr
    n_steps = int(whole.stdout)
    assert n_steps >= 6  # four fsyncs of the stage, the publish, the parent's fsync, ...
    seen, absent = [], []
    for k in range(n_steps):
        out = old_folder(tmp_path / f"k{k}" / "out")
        killed = _run(_FOLDER_SAVE, out, k, publish_mode)
        assert killed.returncode == -signal.SIGKILL, (k, killed.stderr)
        if not out.exists():  # between the fallback's two renames: the old folder waits at .out.old
            assert publish_mode == "fallback" and _tree(old_copy(out)) == OLD
            absent.append(k)
        # the next save puts it back even when it fails itself (never deleting the only good copy);
        # loads do the same (recover_folder: the adapter and artifact tests below)
        with pytest.raises(RuntimeError), staged_folder(out) as t:
            (t / "data.txt").write_text("half")
            raise RuntimeError("the next save fails")
        now = _tree(out)
        assert now in (OLD, NEW), k
        seen.append(now == NEW)
        assert recover_folder(out) is False
        with staged_folder(out) as t:
            (t / "data.txt").write_text("third")
        assert _tree(out) == {"data.txt": "third"}
        assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".out.")) == ["out"]
        assert not old_copy(out).exists()
    assert seen[0] is False and seen[-1] is True  # the kills span the publish
    assert seen == sorted(seen)  # old until the publishing step, new from then on
    assert (publish_mode == "fallback") == bool(absent)


def test_an_artifact_left_at_dot_old_by_a_crash_is_loaded_and_not_overwritten(tiny_dir, tmp_path) -> None:
    import tinytitan as tt
    from tinytitan.errors import TinyTitanError
    from tinytitan.quant.artifact import save_artifact

    q = tt.load(tiny_dir, device="cpu", variant="w8")
    out = save_artifact(q, tmp_path / "art")
    os.replace(out, old_copy(out))  # what a kill between the fallback's two renames leaves
    again = tt.load(out)
    assert out.is_dir() and not old_copy(out).exists()
    ids = list(range(3, 20))
    assert torch.equal(again.logits(ids), q.logits(ids))
    os.replace(out, old_copy(out))
    with pytest.raises(TinyTitanError, match="exists"):  # the recovered copy still needs --force
        save_artifact(q, out)
    assert (out / "tinytitan.json").is_file()


def test_an_adapter_is_saved_in_one_publish(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from tinytitan.finetune.adapter import save_adapter

    model, config = _adapted(tiny_dir, 2, 0)
    out = tmp_path / "ad"
    save_adapter(model, config, out)
    (out / "train_log.jsonl").write_text("{}\n")
    events = _record(monkeypatch)
    save_adapter(model, config, out)
    renames = [e for e in events if e[0] != "fsync"]
    assert len(renames) == 1 and renames[0][2] == str(out)  # the folder, never its files one by one
    assert sorted(p.name for p in out.iterdir()) == ["adapter.json", "adapter.safetensors", "train_log.jsonl"]


# The adapter save killed at each step: one process loads the model once and forks a save per kill point.
_ADAPTER_SAVE = (
    "import sys\nkill_at = -1\n"
    + _KILLER
    + """
import json
from pathlib import Path
import torch
torch.set_num_threads(1)  # no thread pool to inherit across fork
from tests.test_durable_writes import _adapted
from tinytitan.finetune.adapter import save_adapter
base, root, fallback = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "fallback"
old, new = _adapted(base, 2, 1), _adapted(base, 3, 2)
save_adapter(*old, root / "ref-old", training={"tag": "old"})
save_adapter(*new, root / "ref-new", training={"tag": "new"})

def save_new(out, k):
    pid = os.fork()
    if pid == 0:
        global kill_at
        kill_at = k
        arm(fallback)
        save_adapter(*new, out, training={"tag": "new"})
        (root / "steps").write_text(str(steps[0]))
        os._exit(0)
    return os.waitpid(pid, 0)[1]

def prepared(out):
    save_adapter(*old, out, training={"tag": "old"})
    (out / "notes.txt").write_text("kept")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.json").write_text("{}")
    return out

assert save_new(prepared(root / "whole"), -1) == 0
n = int((root / "steps").read_text())
status = {k: save_new(prepared(root / f"k{k}"), k) for k in range(n)}
print(json.dumps({"n": n, "killed": all(os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGKILL
                                         for s in status.values())}))
"""
)


@pytest.mark.parametrize("publish_mode", ["exchange", "fallback"], indirect=True)
def test_an_adapter_save_killed_at_any_step_leaves_one_adapter_whole(
    tiny_dir: Path, tmp_path: Path, publish_mode: str
) -> None:
    from tinytitan.finetune.adapter import read_adapter

    run = _run(_ADAPTER_SAVE, tiny_dir, tmp_path, publish_mode)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["killed"] and report["n"] >= 6
    refs = {tag: read_adapter(tmp_path / f"ref-{tag}") for tag in ("old", "new")}
    tags = []
    for k in range(report["n"]):
        out = tmp_path / f"k{k}"
        config, state, manifest = read_adapter(out)  # puts back a folder left at .k.old
        tag = manifest["training"]["tag"]
        ref_config, ref_state, _ = refs[tag]
        # never the weights of one with the manifest of the other
        assert config == ref_config and state.keys() == ref_state.keys(), k
        assert all(torch.equal(state[n], ref_state[n]) for n in state), k
        assert (out / "notes.txt").read_text() == "kept" and (out / "checkpoint" / "state.json").is_file()
        tags.append(tag)
    assert tags[0] == "old" and tags[-1] == "new" and tags == sorted(tags, key=["old", "new"].index)
