"""File helpers shared by every layer: content hashes, atomic writes that survive a kill at any
moment, and locks on outputs and shared caches."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import BusyError, DiskFullError

# temporary siblings of an output NAME: being written (.partial), an export on its way (.export),
# the old copy of a two-rename swap (.old); any of them found while holding NAME's lock is stale
TEMP_KINDS = ("partial", "export", "old")
_HELD: dict[Path, int] = {}  # outputs whose lock this process holds (re-entrant, by resolved path)


def kiln_cache_dir() -> Path:
    """kiln's cache (built-in models, TensorRT timing caches): $KILN_CACHE_DIR or ~/.cache/kiln."""
    return Path(os.environ.get("KILN_CACHE_DIR", Path.home() / ".cache" / "kiln"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, keyed by POSIX relative path."""
    return {
        path.relative_to(folder).as_posix(): file_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def temp_sibling(target: Path, kind: str) -> Path:
    """A new temporary folder beside `target` (same file system, so renames are atomic)."""
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    path.chmod(0o755)
    return path


def lock_path(target: Path) -> Path:
    """Where the lock of output `target` lives: in kiln's cache (keyed by the output's path), so that
    nothing is left beside the output; beside it where the cache cannot be written."""
    key = hashlib.sha256(str(Path(target).resolve()).encode()).hexdigest()[:32]
    folder = kiln_cache_dir() / "locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{key}.lock"
    except OSError:
        return Path(target).with_name(f".{Path(target).name}.lock")


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold the lock of output `target` while it is made. The first holder removes temporary
    siblings that killed runs left behind: with the lock held, nobody else can be writing them.
    Re-entrant within a process; another process gets BusyError at once."""
    from filelock import FileLock, Timeout

    target = Path(target).resolve()
    if target in _HELD:
        _HELD[target] += 1
        try:
            yield
        finally:
            _HELD[target] -= 1
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(target)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise BusyError(f"another kiln process is writing {target} right now; wait for it, or write elsewhere") from None
    _HELD[target] = 1
    try:
        for kind in TEMP_KINDS:
            for stale in target.parent.glob(f".{target.name}.{kind}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        del _HELD[target]
        lock.release()


@contextlib.contextmanager
def atomic_folder(target: Path, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill; on success it replaces `target` in one atomic
    exchange (the path holds the old complete folder or the new one, never a part), after every
    file and folder in it was fsynced. On any failure (KeyboardInterrupt included) it is removed and
    `target` is left as it was. A full disk is a DiskFullError naming the folder and the bytes."""
    target = Path(target).resolve()
    with output_lock(target):
        free = shutil.disk_usage(target.parent).free
        if needed_bytes and free < needed_bytes:
            raise DiskFullError(target, needed_bytes, free)
        tmp = temp_sibling(target, "partial")
        try:
            try:
                yield tmp
                fsync_tree(tmp)
                replace_folder(tmp, target)
            except Exception as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left on device" in str(exc):
                    raise DiskFullError(target, needed_bytes, shutil.disk_usage(target.parent).free) from exc
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder below `folder`, and `folder` itself: on disk before it is renamed."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(new: Path, target: Path) -> None:
    """Put `new` at `target`. An existing target is exchanged with `new` in one step (renameat2
    RENAME_EXCHANGE), so the path is never missing; `new` then holds the old copy, which is removed.
    Where the system cannot exchange, two renames are the fallback (a short window without target)."""
    if not target.exists() and not target.is_symlink():
        os.rename(new, target)
    elif exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)
    else:
        old = target.with_name(f".{target.name}.old-{new.name[-8:]}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if hasattr(libc, "renameat2"):
        result = libc.renameat2(ctypes.c_int(args[0]), ctypes.c_char_p(args[1]), ctypes.c_int(args[2]),
                                ctypes.c_char_p(args[3]), ctypes.c_uint(args[4]))
    elif platform.machine() in _SYS_RENAMEAT2:
        result = libc.syscall(_SYS_RENAMEAT2[platform.machine()], *args)
    else:
        return False
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def cache_lock(path: Path, timeout: float = 600.0) -> Iterator[None]:
    """Hold `<path>.lock` (filelock) while a shared cache entry is made, so that concurrent processes
    on one machine make it once (readers of an entry made atomically need no lock)."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock")), timeout=timeout):
        yield
