"""llama.cpp's own tools, the anchors of every comparison in bench/: built once from the vendored sources
of the pinned llama-cpp-python sdist into a cache folder outside the repository.

    python bench/anchors.py build      # or `make anchors`: download the sdist, CMake, ~10-20 min on 2 cores
    python bench/anchors.py where      # the folder holding the binaries (exit 1 if not built)

Bench scripts call `tool("llama-bench")`. The folder is $TINYTITAN_LLAMA_CPP if set (a folder holding
the binaries, e.g. a llama.cpp build of your own), else $TINYTITAN_HOME/anchors/llama.cpp-<version>/bin.
The build is for this CPU (GGML_NATIVE), on the CPU backend only, with the same threads as our runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python, pinned as in pyproject.toml's `ref` extra
TOOLS = (
    "llama-bench",
    "llama-server",
    "llama-perplexity",
    "llama-imatrix",
    "llama-quantize",
    "llama-batched-bench",
)


class AnchorMissing(RuntimeError):
    """The llama.cpp tools are not built here (`make anchors`)."""


def home() -> Path:
    return Path(os.environ.get("TINYTITAN_HOME", Path.home() / ".cache" / "tinytitan"))


def folder() -> Path:
    env = os.environ.get("TINYTITAN_LLAMA_CPP")
    return Path(env) if env else home() / "anchors" / f"llama.cpp-{VERSION}" / "bin"


def tool(name: str) -> Path:
    """The path of one llama.cpp tool, or AnchorMissing saying how to build it."""
    path = folder() / name
    if not path.is_file() or not os.access(path, os.X_OK):
        raise AnchorMissing(
            f"{name} not found in {folder()}: run `make anchors` (or set TINYTITAN_LLAMA_CPP)"
        )
    return path


def build_info() -> dict:
    """What the build recorded (version, flags, commit of the vendored tree, time it took)."""
    f = folder().parent / "build.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def build(jobs: int, force: bool = False) -> Path:
    out = folder()
    if not force and all((out / t).is_file() for t in TOOLS):
        print(f"llama.cpp tools already built in {out}")
        return out
    if os.environ.get("TINYTITAN_LLAMA_CPP"):
        raise SystemExit("TINYTITAN_LLAMA_CPP points at a build of your own: nothing to build")
    for exe in ("cmake", "c++"):
        if shutil.which(exe) is None:
            raise SystemExit(f"building llama.cpp needs {exe} on PATH")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tinytitan-anchors-") as tmp:
        work = Path(tmp)
        pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q"]
        _run([*pip, "-d", str(work), f"llama-cpp-python=={VERSION}"])
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        b = work / "build"
        _run(
            ["cmake", "-S", str(src), "-B", str(b), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
             "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_OPENSSL=OFF"]
        )  # fmt: skip
        _run(["cmake", "--build", str(b), "--config", "Release", "-j", str(jobs), "--target", *TOOLS])
        staging = out.with_name(out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for t in TOOLS:
            found = next(iter(sorted(b.rglob(t))), None)
            if found is None:
                raise SystemExit(f"the build made no {t}")
            shutil.copy2(found, staging / t)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    info = {
        "llama_cpp_python": VERSION,
        "tools": list(TOOLS),
        "cmake_flags": ["Release", "static", "GGML_NATIVE=ON", "CPU backend"],
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out.parent / "build.json").write_text(json.dumps(info, indent=1))
    print(f"llama.cpp {VERSION} tools built in {info['build_seconds']:.0f} s:")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the tools (once; reused when present)")
    b.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    b.add_argument("--force", action="store_true", help="build again even when the tools are there")
    sub.add_parser("where", help="print the folder of the tools")
    args = ap.parse_args()
    if args.cmd == "build":
        out = build(args.jobs, args.force)
        for t in TOOLS:
            print(f"  {out / t}")
        return 0
    try:
        for t in TOOLS:
            tool(t)
    except AnchorMissing as e:
        print(e, file=sys.stderr)
        return 1
    print(folder())
    return 0


if __name__ == "__main__":
    sys.exit(main())
