"""Writes that survive a kill at any moment: the atomic folder swap, the output lock and its cleanup
of what killed runs left, full disks, and atomic file writes."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections import namedtuple

import pytest

from runtime import files
from runtime.errors import BusyError, DiskFullError
from runtime.files import atomic_folder, exchange, output_lock

Usage = namedtuple("Usage", "total used free")


def _write(folder, text):
    (folder / "manifest.json").write_text(text)


def test_replacing_a_folder_never_leaves_the_path_empty(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if not exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this system cannot exchange two paths atomically (renameat2); kiln falls back to two renames")
    os.rmdir(tmp_path / "a")
    os.rmdir(tmp_path / "b")
    target = tmp_path / "art"
    with atomic_folder(target) as tmp:
        _write(tmp, "old")
    seen = []
    real_rename = os.rename

    def watching_rename(a, b):  # the fallback swap would be seen here with the path gone
        seen.append((a, b))
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", watching_rename)
    with atomic_folder(target) as tmp:
        _write(tmp, "new")
        assert (target / "manifest.json").read_text() == "old"  # the old one stays until the swap
    assert (target / "manifest.json").read_text() == "new"
    assert seen == []  # one exchange, no rename through an empty path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_stale_temporary_folders_of_killed_runs_are_removed(tmp_path):
    for kind in ("partial", "export", "old"):
        (tmp_path / f".art.{kind}-dead1234").mkdir()
    (tmp_path / ".other.partial-keep").mkdir()  # another output's: not ours to remove
    with atomic_folder(tmp_path / "art") as tmp:
        _write(tmp, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-keep", "art"]


def test_an_output_being_written_by_another_process_is_busy(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from runtime.files import output_lock
        with output_lock({str(tmp_path / 'art')!r}):
            print('held', flush=True)
            time.sleep(30)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(files.__file__)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match="another kiln process is writing"), output_lock(tmp_path / "art"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(tmp_path / "art"):  # a killed holder's lock is free again
        assert (tmp_path / ".art.lock").exists()
        with output_lock(tmp_path / "art"):  # and re-entrant within a thread
            pass
    assert not (tmp_path / ".art.lock").exists()  # removed when released


def test_another_thread_writing_the_same_output_is_busy(tmp_path):
    import threading

    errors = []
    with output_lock(tmp_path / "art"):
        def other():
            try:
                with output_lock(tmp_path / "art"):
                    pass
            except BusyError as exc:
                errors.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])


def test_a_swap_cut_between_two_renames_is_recovered(tmp_path):
    """Where a file system cannot exchange, a kill between the two renames leaves no output and its
    old copy aside: the next holder puts the old copy back before cleaning up."""
    old = tmp_path / ".art.old-12345678"
    old.mkdir()
    _write(old, "old complete")
    (tmp_path / ".art.partial-87654321").mkdir()
    with output_lock(tmp_path / "art"):
        assert (tmp_path / "art" / "manifest.json").read_text() == "old complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_a_full_disk_is_refused_before_work_and_named_after_it(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: Usage(10 * 2**30, 0, 5 * 2**20))
    with pytest.raises(DiskFullError, match=r"no space left for .*art: it needs about 100 MiB and 5 MiB are free"):
        with atomic_folder(tmp_path / "art", needed_bytes=100 * 2**20):
            raise AssertionError("no work should start")
    with pytest.raises(DiskFullError) as err, atomic_folder(tmp_path / "art", needed_bytes=2**20) as tmp:
        _write(tmp, "part")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert err.value.folder == (tmp_path / "art").resolve() and err.value.free == 5 * 2**20
    assert list(tmp_path.iterdir()) == []


def test_every_file_and_folder_is_on_disk_before_the_swap(tmp_path, monkeypatch):
    synced, order = [], []
    real_fsync, real_replace = os.fsync, files.replace_folder
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(files, "replace_folder", lambda new, target: order.append(len(synced)) or real_replace(new, target))
    with atomic_folder(tmp_path / "art") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    before_swap = {os.path.relpath(p, tmp) for p in synced[:order[0]]}
    assert {"a.bin", "sub/b.bin", "sub", "."} <= before_swap
    assert str(tmp_path.resolve()) in synced[order[0]:]  # and the parent folder after it
