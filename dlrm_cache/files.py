"""What every command does with the file system: files that appear whole or not at all, folders
written beside their destination and swapped in, refusing to replace what another program wrote, and
finding what killed runs left behind.

Used by ``dlrm-preprocess`` (its output folder), checkpoints, ``dlrm-predict`` and ``dlrm-export``.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file that appears under ``path`` whole (written as ``path.tmp``, synced, renamed) or not at
    all (the temporary file is removed on any failure)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # not kept in the page cache
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An error writing ``path`` that does not name it (pyarrow's "Error writing bytes to file. Detail:
    [errno 28] ...", a bare ``write``'s) re-raised naming it, with what the system said."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        found = re.search(r"\[errno (\d+)\]", str(e))
        number = int(found[1]) if found else e.errno
        raise OSError(number, os.strerror(number) if number else str(e), str(path)) from e


def file_crc32(path: Path, chunk: int = 4 << 20) -> int:
    """The CRC-32 of a file's bytes, read into one buffer of ``chunk`` bytes (bounded memory)."""
    crc, buffer = 0, bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


def folder_beside(out: Path) -> Path:
    """A new, empty folder next to ``out`` to build it in (``.NAME.tmp-PID-*``: ``remove_leftovers``
    knows it for this process's)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    return as_umask_allows(folder)


def as_umask_allows(path: Path) -> Path:
    """``path`` (made private by ``tempfile``: 0700, 0600) given the mode any file the user makes gets
    (0777 for a folder, 0666 for a file, less the umask), as it will be an output."""
    mask = os.umask(0o022)  # read by setting it: set back at once
    os.umask(mask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    return path


def swap_in(new: Path, out: Path, aside: Path | None = None) -> None:
    """The finished folder ``new`` becomes ``out``; what ``out`` held is moved to ``aside`` (default
    ``.NAME.old-PID``) first and removed once ``new`` is in place, so that ``out`` is whole at any moment
    but between the two renames."""
    aside = aside or out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    if out.exists():
        if any(out.iterdir()):
            os.replace(out, aside)
        else:
            out.rmdir()
    os.replace(new, out)
    shutil.rmtree(aside, ignore_errors=True)


def refuse_foreign(out: Path, ours: Iterable[str], what: str, command: str, then: str) -> None:
    """Refuse an ``out`` folder holding names that are not in ``ours``: ``what`` names the folder (its
    key), ``command`` the program whose names ``ours`` are, ``then`` what to do (punctuation first)."""
    allowed = set(ours)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in allowed)
    if foreign:
        raise FileExistsError(f"{what} holds what {command} did not write ({', '.join(foreign[:5])}){then}")


@contextmanager
def held(folder: Path, key: str) -> Iterator[None]:
    """This process owns ``folder`` for the block: an exclusive lock on ``folder/.lock`` (released by the
    kernel however the process ends), which holds its pid. A second owner is refused at once, naming
    the first (``key``: the setting that chose the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FileExistsError(
            f"{key}={folder} is in use by another run (pid {other}): wait for it, or choose another {key}"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def remove_dead(paths: Iterable[Path], pid: str, what: str) -> None:
    """Remove the files or folders among ``paths`` whose name holds, as the group of the regular
    expression ``pid``, the id of a process that is gone; say what each held."""
    for path in paths:
        match = re.search(pid, path.name)
        if match is None or alive(int(match[1])):
            continue
        size = _gigabytes(path)
        _remove(path)
        log.warning("removed %s (%.2f GB), a %s left by a run that was killed (pid %s)", path, size, what,
                    match[1])  # fmt: skip


def remove_leftovers(out: Path) -> None:
    """Remove the temporary folders that runs for ``out`` killed before they could clean up left
    beside it (their process is gone); name those that cannot be told to be such."""
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        if not path.is_dir():
            continue
        match = re.fullmatch(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)(?:-.*)?", path.name)
        size = _gigabytes(path)
        if match is None:
            log.warning(
                "%s (%.2f GB) looks left by an interrupted run: remove it if none is running", path, size
            )
            continue
        pid = int(match[1])
        if alive(pid):
            log.warning("%s (%.2f GB) belongs to a running process (pid %d): left alone", path, size, pid)
            continue
        _remove(path)
        log.warning("removed %s (%.2f GB), left by an interrupted run (pid %d)", path, size, pid)


def _gigabytes(path: Path) -> float:
    """What a file, or a folder's files, take (GB, 1e9 bytes)."""
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e9


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
