"""C++ kernels built at run time with torch's extension tooling, once per machine, in $TINYTITAN_HOME/kernels.

A build is named by its source, its flags, torch's version and this CPU's instruction-set flags, so a build
for -march=native is only loaded on a CPU like the one it was made on, and never after an upgrade. It needs a
C++ compiler and ninja (the `ninja` package provides it).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path

from tinytitan.zoo import home


@functools.cache
def cpu_flags() -> str:
    """This CPU's instruction-set flags line (/proc/cpuinfo), "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build_name(stem: str, source: Path, flags: list[str]) -> str:
    import torch

    cpu = platform.machine() + cpu_flags()
    key = source.read_bytes() + " ".join([*flags, torch.__version__, cpu]).encode()
    return f"{stem}_{hashlib.sha256(key).hexdigest()[:12]}"


def ninja_on_path() -> None:
    """torch looks for `ninja` on PATH; the ninja package's binary sits in the environment's bin folder,
    which is not on PATH unless the environment is activated."""
    try:
        import ninja
    except ImportError:
        return  # a system ninja may still be on PATH
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + (os.pathsep + path if path else "")


def load_kernel(stem: str, source: Path, flags: list[str], build: bool = True) -> bool:
    """Load the kernel library of `source` into torch (its ops register themselves), building it first when
    `build` and no build exists. False without `build` when there is no build yet; build errors raise."""
    import torch

    name = build_name(stem, source, flags)
    folder = home() / "kernels" / name
    library = folder / f"{name}.so"
    if library.is_file():
        torch.ops.load_library(str(library))
        return True
    if not build:
        return False
    ninja_on_path()
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(source)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )
    return True


def failure_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"


def try_load(stem: str, source: Path, flags: list[str], build: bool, register) -> str | None:
    """load_kernel, then `register()` (its fake shapes); None when loaded, else why not ("" when there is
    no build yet and `build` is False). TINYTITAN_NO_KERNELS=1 turns every kernel off."""
    if os.environ.get("TINYTITAN_NO_KERNELS"):
        return "TINYTITAN_NO_KERNELS is set"
    try:
        if not load_kernel(stem, source, flags, build=build):
            return ""
        register()
    except Exception as e:  # no compiler, no ninja, a failed build: the caller's fallback serves
        return failure_line(e)
    return None
