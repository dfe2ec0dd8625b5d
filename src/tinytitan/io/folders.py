"""Durable writes: files and folders written whole or not at all (artifacts, adapters, variants, caches).

Everything is written under a temporary name beside its target, fsynced (the files, then the folder that
holds them), and published by one rename; the parent folder is fsynced after the rename so that the rename
itself survives a power cut. A crash at any step leaves the previous output in place, complete:

- a file: `atomic_path` / `atomic_write_bytes` / `atomic_write_text` (os.replace is atomic);
- a folder: `staged_folder` / `publish_folder`. An existing folder is swapped with the new one in a single
  step (Linux renameat2 RENAME_EXCHANGE), so it is never absent. Where that call is missing (another system,
  a file system without it) the old folder is first renamed to `.name.old`; a crash before the new one is
  renamed in leaves only `.name.old`, which `recover_folder` (run by every save and by the loaders) renames
  back. `.name.old` is deleted only while `name` exists.

New files get mode 0o666 and folders 0o777, less the umask, like any file the process opens (mkstemp and
mkdtemp would make them private to the owner). A kill during a write can leave a dot-named temporary beside
the target (`.name.XXXX`); it is never the only copy of anything.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # <linux/fs.h>: swap the two paths atomically (both must exist)
_umask_lock = threading.Lock()


# -- modes ----------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask. Read from /proc where it can be (setting it, even for an instant, would give a
    file another thread creates meanwhile the wrong mode); elsewhere set and restored under a lock."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass  # no /proc (or a kernel before 4.7): the fallback below
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Give a file that its writer made private (safetensors 0.8 writes 0600) the mode the umask gives."""
    executable = os.stat(path).st_mode & 0o111
    os.chmod(path, dir_mode() if executable else file_mode())


def save_tensors(tensors: dict, path: str | os.PathLike[str]) -> None:
    """safetensors' save_file into a folder being staged, with the umask's mode (it writes 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    follow_umask(path)


# -- fsync ----------------------------------------------------------------------------------------------
def fsync_path(path: str | os.PathLike[str], directory: bool = False) -> None:
    """fsync a file, or a folder (which makes the names in it, renames included, durable)."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise  # some file systems cannot fsync a folder; they have nothing to sync there
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fsync_path(path, directory=True)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file under `root`, then every folder, deepest first (a folder after its contents)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_path(p)
        fsync_dir(dirpath)


# -- files ----------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside `path` for a writer that takes a file name (safetensors, GGUF, numpy).
    When the block ends normally the file is given the umask's mode, fsynced and renamed onto `path`, and
    the folder is fsynced; on an error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        follow_umask(tmp)  # mkstemp made it 0600
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace file `path` with `data` durably: readers see the old file or the new one, never a part."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


# -- folders --------------------------------------------------------------------------------------------
def old_copy(out: Path) -> Path:
    """Where the fallback replace parks the previous `out` between its two renames."""
    return out.with_name(f".{out.name}.old")


def recover_folder(out: str | os.PathLike[str]) -> bool:
    """Put `.out.old` back where a crash between the two renames of a fallback replace left `out` absent;
    True if it did. Run before every save and load of a folder written by `staged_folder`."""
    out = Path(os.path.abspath(out))
    if os.path.lexists(out) or not out.name:
        return False
    old = old_copy(out)
    if not old.is_dir():
        return False
    try:
        os.rename(old, out)
    except OSError:
        if os.path.lexists(out):
            return False  # another process published (or recovered) it meanwhile
        raise
    fsync_dir(out.parent)
    return True


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)  # glibc 2.28+; absent from some other C libraries
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two existing paths in one atomic step; False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # an old kernel or a file system without exchange (EPERM: seccomp filters)
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def _working_folder_in(out: Path) -> Path | None:
    """Where the working folder is inside `out` (relative), or None when it is not inside it."""
    try:
        return Path(os.getcwd()).relative_to(Path(os.path.realpath(out.parent)) / out.name)
    except (OSError, ValueError):
        return None


def _follow(out: Path, inside: Path | None) -> None:
    """After `out` was replaced: a working folder that was inside the old copy moves to the new one."""
    if inside is not None:
        try:
            os.chdir(out / inside)
        except OSError:
            os.chdir(out)  # the new copy lacks that subfolder


def publish_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` (a sibling of `out`) in `out`'s place, durably: its files and folders
    are fsynced before the rename that publishes them, and the parent after it; an existing `out` is
    replaced without a moment in which it is absent (see the module notes for the fallback)."""
    tmp, out = Path(os.path.abspath(tmp)), Path(os.path.abspath(out))
    os.chmod(tmp, dir_mode())  # mkdtemp made it 0700
    fsync_tree(tmp)
    recover_folder(out)
    if not os.path.lexists(out):
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    inside = _working_folder_in(out)  # `-o .`: the process works in the folder it replaces
    old = old_copy(out)
    _remove(old)  # left by an earlier crash after the fallback's second rename: `out` is there
    if exchange(tmp, out):
        fsync_dir(out.parent)
        _follow(out, inside)
        _remove(tmp)  # now the previous `out`
        return
    os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    _follow(out, inside)
    _remove(old)


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `out` to fill. When the block ends normally it takes `out`'s
    place (`publish_folder`); on an error it is deleted, so a crash never leaves a half-written `out`."""
    out = Path(os.path.abspath(out))  # "." has no name to stage beside
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        publish_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same bytes: a hard link costs no space (every writer here replaces, never edits)
    except OSError:
        shutil.copy2(src, dst)


def carry_over(src: Path, dst: Path, skip: Iterable[str] = ()) -> None:
    """Put `src`'s entries (but `skip`) into the staged folder `dst`: files as hard links (copies where the
    file system has none), folders recursively, symbolic links as links."""
    skipped = set(skip)
    for entry in Path(src).iterdir():
        if entry.name in skipped:
            continue
        target = Path(dst) / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))
