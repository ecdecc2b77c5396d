"""File helpers shared by every layer: content hashes, atomic writes that survive a kill at any
moment, and locks on outputs and shared caches."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import os
import platform
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from runtime.errors import BusyError, DiskFullError, ForeignOutputError

# temporary siblings of an output NAME: being written (.partial), an export on its way (.export),
# the old copy of a two-rename swap (.old); any of them found while holding NAME's lock is stale
TEMP_KINDS = ("partial", "export", "old")


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


def path_problem(folder: Path, rel: str) -> str | None:
    """Why `rel` is not a plain relative path that stays inside `folder` once symlinks are
    resolved, or None when it is one."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or ":" in rel \
            or any(p in ("", ".", "..") for p in rel.split("/")):
        return "not a plain relative path inside the folder"
    target = (Path(folder) / rel).resolve()
    if not target.is_relative_to(Path(folder).resolve()):
        return f"resolves outside the folder (to {target})"
    return None


def refuse_foreign(target: Path, marker: str, what: str) -> list[str]:
    """An existing `target` may be replaced only when kiln made it: a folder whose `marker` JSON
    file has kiln's format_version (a manifest, an export.json), or an empty folder. Anything else,
    a user's folder or a file, is refused, naming what is there. Returns the files inside a kiln
    folder that it does not list (a user's own, `make engines`' sample.png): the replacement keeps
    them (atomic_folder's `keep`)."""
    import json

    target = Path(target)
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise ForeignOutputError(f"{target} cannot be written: {parent} is a file, not a folder; choose another path")
    if not target.exists() and not target.is_symlink():
        return []
    if target.is_dir() and not target.is_symlink():
        entries = sorted(p.name for p in target.iterdir())
        if not entries:
            return []
        try:
            data = json.loads((target / marker).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("format_version"), int):
            listed = _listed(data) | {marker}
            return sorted(rel for rel in (p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
                          if rel not in listed)
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        found = f"a folder that is not a kiln {what} (it has no kiln {marker}; it holds {shown})"
    else:
        found = "a symbolic link" if target.is_symlink() else "a file"
    raise ForeignOutputError(f"{target} exists and is {found}. kiln replaces only its own {what}s: "
                             f"choose another --out, or move it away yourself")


def _listed(data: dict) -> set[str]:
    """The files a manifest or export.json describes (the files table; an export's per-component files)."""
    listed = set(data.get("files") or {})
    for name, c in (data.get("components") or {}).items():
        files = c.get("files") if isinstance(c, dict) else None
        if isinstance(files, dict):  # export.json: relative to the component's folder
            listed |= {f"{name}/{f}" for f in files}
        elif isinstance(files, list):
            listed |= set(files)
    return listed


def temp_sibling(target: Path, kind: str) -> Path:
    """A new temporary folder beside `target` (same file system, so renames are atomic)."""
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    path.chmod(0o755)
    return path


class _OutputLocks:
    """Which outputs this process is writing, and from which thread (re-entrant per thread)."""

    def __init__(self):
        self._guard = threading.Lock()
        self._held: dict[Path, tuple[int, int]] = {}  # path -> (thread id, depth)

    def enter(self, target: Path) -> bool:
        """True when this thread holds `target` already (re-entry); BusyError for another thread."""
        with self._guard:
            owner, depth = self._held.get(target, (None, 0))
            if owner is None:
                return False
            if owner != threading.get_ident():
                raise BusyError(f"another thread of this process is writing {target}")
            self._held[target] = (owner, depth + 1)
            return True

    def hold(self, target: Path) -> None:
        with self._guard:
            self._held[target] = (threading.get_ident(), 1)

    def leave(self, target: Path) -> bool:
        """True when this was the outermost hold."""
        with self._guard:
            owner, depth = self._held[target]
            if depth > 1:
                self._held[target] = (owner, depth - 1)
                return False
            del self._held[target]
            return True


_LOCKS = _OutputLocks()


def _lock_file(path: Path) -> int:
    """An exclusive flock on `path` (created), or BusyError at once. The lock file is removed when
    released, so a holder checks it locked the file that is still at `path` (not one just removed)."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BusyError(f"another kiln process is writing {path.name[1:-5]} in {path.parent} right now; "
                            "wait for it, or write elsewhere") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed it while we waited for it: lock the new one


def _unlock_file(path: Path, fd: int) -> None:
    import fcntl

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # before unlocking: whoever gets the old file next sees it is gone
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _recover(target: Path) -> None:
    """Remove what killed runs left beside `target`. Where a two-rename swap was cut between its
    renames (no target, an .old copy), the old copy is put back first: it is complete."""
    pattern = f".{glob.escape(target.name)}.{{}}-*"
    olds = sorted(target.parent.glob(pattern.format("old")), key=lambda p: p.stat().st_mtime)
    if not target.exists() and not target.is_symlink() and olds:
        olds.pop().rename(target)
    for kind in TEMP_KINDS:
        for stale in target.parent.glob(pattern.format(kind)):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold the lock of output `target` (`.NAME.lock` beside it, removed when released) while it is
    made. The first holder removes temporary siblings that killed runs left behind: with the lock
    held, nobody else can be writing them. Re-entrant within a thread; another process or thread
    gets BusyError at once."""
    target = Path(target).resolve()
    if _LOCKS.enter(target):
        try:
            yield
        finally:
            _LOCKS.leave(target)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.with_name(f".{target.name}.lock")
    fd = _lock_file(path) if os.name == "posix" else None
    _LOCKS.hold(target)
    try:
        _recover(target)
        yield
    finally:
        _LOCKS.leave(target)
        if fd is not None:
            _unlock_file(path, fd)


@contextlib.contextmanager
def atomic_folder(target: Path, needed_bytes: int | None = None, keep=()) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill; on success it replaces `target` in one atomic
    exchange (the path holds the old complete folder or the new one, never a part), after every
    file and folder in it was fsynced. `keep`: files of the old `target` (relative paths) copied into
    the new one first, where it has no file of that name. On any failure (KeyboardInterrupt included)
    the temporary folder is removed and `target` is left as it was. A full disk is a DiskFullError
    naming the folder and the bytes."""
    target = Path(target).resolve()
    with output_lock(target):
        free = shutil.disk_usage(target.parent).free
        if needed_bytes and free < needed_bytes:
            raise DiskFullError(target, needed_bytes, free)
        tmp = temp_sibling(target, "partial")
        try:
            try:
                yield tmp
                for rel in keep:
                    if (target / rel).is_file() and not (tmp / rel).exists():
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(target / rel, tmp / rel)
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
    if os.name != "posix":  # a folder cannot be opened for fsync there; its entries are flushed with it
        return
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
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):  # EPERM: a seccomp filter
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
