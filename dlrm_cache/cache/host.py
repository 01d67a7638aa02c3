"""The host tier: every row of a group of tables, weight and optimizer state side by side."""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile
import threading
import weakref
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch

from dlrm_cache.config import GB
from dlrm_cache.files import remove_dead

if TYPE_CHECKING:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

log = logging.getLogger(__name__)
_INIT_CHUNK_ROWS = 1 << 18  # initialise huge tables a chunk at a time (bounded extra memory)
_ADVISE_ROWS = 256  # readahead hints given per measured() window
_TEMP_PREFIX = "dlrm_cache_host_"  # a mapped table's temporary folder: dlrm_cache_host_<pid>-*
CHUNK_BYTES = 64 << 20  # rows streamed to and from files this many bytes at a time
PROGRESS_BYTES = 1 << 30  # initialising or streaming more than this shows a progress bar


@dataclass(frozen=True)
class TableShard:
    """Where a table held by a cache sits in the full table: its first row and column, and the full
    table's size (a whole table: offsets 0, its own size)."""

    row_offset: int
    col_offset: int
    full_rows: int
    full_dim: int

    @classmethod
    def whole(cls, cfg: EmbeddingBagConfig) -> TableShard:
        return cls(0, 0, cfg.num_embeddings, cfg.embedding_dim)


class HostTable:
    """A (rows, width) float32 array in RAM (pageable: see ``transfer.py``) or in a file-backed memory map.

    A memory-mapped table is scratch space (checkpoints hold the real copy). Its file is allocated
    whole when made (a file system without room refuses it then, not with a crash mid-training) and
    mapped with random-access advice, so a missed row reads its own page or two, not the kernel's
    readahead window around it; ``will_need`` has the pages of rows a batch will miss read ahead.
    Loads and checkpoints go through the file, not the mapping (see ``write_rows``). The file, and
    the temporary folder made for it when no ``mmap_dir`` is given, go when the table is closed or
    garbage-collected, or at interpreter exit.

    For a mapped table, ``read_bytes`` / ``write_bytes`` add up the disk I/O of the calls made under
    ``measured()`` (the calling thread's ``/proc/thread-self/io`` before and after; windows on several
    threads at once neither wait for each other nor count each other's I/O)."""

    def __init__(self, rows: int, width: int, kind: str, mmap_dir: str | None, name: str):
        self.path: Path | None = None
        self.name = name
        self.row_bytes = width * 4
        self.read_bytes = self.write_bytes = 0
        self._advisor: ThreadPoolExecutor | None = None  # the readahead thread (will_need)
        if kind != "mmap":
            self.data = torch.zeros(rows, width, dtype=torch.float32)
            self._cleanup = None
            return
        if mmap_dir:
            folder = Path(mmap_dir)
            folder.mkdir(parents=True, exist_ok=True)
            remove_dead(folder.glob("*.pid-*.f32"), r"\.pid-(\d+)\.f32$", "host table file")
        else:
            remove_dead(
                Path(tempfile.gettempdir()).glob(f"{_TEMP_PREFIX}*"), rf"^{_TEMP_PREFIX}(\d+)-", "host table"
            )
            folder = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-"))
        # the process's id in the name: what a killed run leaves is found and removed by the next
        self.path = folder / f"{name}.pid-{os.getpid()}.f32"
        self._io_lock = threading.Lock()  # the counters, added to from several threads
        size = rows * self.row_bytes
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._cleanup = weakref.finalize(self, _remove, self._fd, self.path, None if mmap_dir else folder)
        try:
            _allocate(self._fd, size, folder)
        except BaseException:
            self._cleanup()
            raise
        self._map = mmap.mmap(self._fd, size)
        self._map.madvise(mmap.MADV_RANDOM)
        self.data = torch.frombuffer(self._map, dtype=torch.float32).view(rows, width)

    @property
    def mapped(self) -> bool:
        return self.path is not None

    @property
    def nbytes(self) -> int:
        return self.data.shape[0] * self.row_bytes

    def initialize(
        self,
        configs: list[EmbeddingBagConfig],
        row_offsets: list[int],
        dim: int,
        seed: int,
        shards: list[TableShard] | None = None,
    ) -> None:
        """Each table's ``init_fn`` (TorchRec's default: uniform in ``[-sqrt(1/n), sqrt(1/n)]``, also used
        for configs without one); optimizer state starts at 0.

        Values depend only on ``seed``, the table's name and the row: the full table is drawn a chunk of
        rows at a time, each chunk from a seed of its own, so a shard of a table (``shards[t]``: which
        rows and columns of the full table this one is) gets exactly the values those rows and columns
        have in the whole table, whatever the sharding."""
        width = self.data.shape[1]
        with self._progress("initialising") as bar:
            for t, cfg in enumerate(configs):
                shard = shards[t] if shards else TableShard.whole(cfg)
                rows = row_offsets[t + 1] - row_offsets[t]
                table_seed = seed * 1_000_003 + zlib.crc32(cfg.name.encode())
                first, last = shard.row_offset, shard.row_offset + rows
                for chunk in range(first // _INIT_CHUNK_ROWS, -(-last // _INIT_CHUNK_ROWS)):
                    lo, hi = chunk * _INIT_CHUNK_ROWS, min((chunk + 1) * _INIT_CHUNK_ROWS, shard.full_rows)
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(table_seed * 65_537 + chunk)
                        w = torch.empty(hi - lo, shard.full_dim)
                        if getattr(cfg, "init_fn", None) is not None:
                            cfg.init_fn(w)
                        else:  # TorchRec's default bounds
                            bound = (1 / shard.full_rows) ** 0.5
                            w.uniform_(-bound, bound)
                    a, b = max(lo, first), min(hi, last)
                    block = torch.zeros(b - a, width)
                    block[:, :dim] = w[a - lo : b - lo, shard.col_offset : shard.col_offset + dim]
                    # through the mapping: a new file's pages are not read first, and each page
                    # stays a page of its own in the page cache (see write_rows)
                    self.data[row_offsets[t] + a - first : row_offsets[t] + b - first] = block
                    bar.update((b - a) * self.row_bytes)

    def write_rows(self, first: int, rows: torch.Tensor) -> None:
        """Rows ``[first, first + len(rows))`` become ``rows``. A mapped table writes them through the
        file (whole pages are not read first) and then drops them from the page cache: the kernel
        caches what ``pwrite`` and ``read`` bring in as large folios, and a row written later through
        the mapping would dirty, and send to the disk, a whole folio (hundreds of KB) instead of its
        page."""
        if not self.mapped:
            self.data[first : first + len(rows)] = rows
            return
        offset = first * self.row_bytes
        _pwrite(self._fd, memoryview(rows.contiguous().numpy()).cast("B"), offset)
        os.fdatasync(self._fd)
        os.posix_fadvise(self._fd, offset, len(rows) * self.row_bytes, os.POSIX_FADV_DONTNEED)

    def save_rows(self, first: int, count: int, out: BinaryIO) -> None:
        """Stream rows ``[first, first + count)`` into the open file ``out`` in bounded memory."""
        out.flush()
        if self.mapped:
            offset, size = first * self.row_bytes, count * self.row_bytes
            _copy_file_range(self._fd, offset, size, out.fileno())
            # what the copy read in is not left as large folios for the mapping (see write_rows);
            # the pages the mapping holds stay
            os.posix_fadvise(self._fd, offset, size, os.POSIX_FADV_DONTNEED)
            return
        stream_rows(self.data, first, count, out)

    def will_need(self, rows: torch.Tensor) -> None:
        """Have the kernel read these rows' pages now, in the background (a mapped table): the rows of a
        batch enqueued ahead are then in the page cache when its step copies them, read side by side
        (a queue of requests) instead of one page fault at a time."""
        if not self.mapped or not len(rows):
            return
        if self._advisor is None:
            self._advisor = ThreadPoolExecutor(1, thread_name_prefix="dlrm-cache-readahead")
        self._advisor.submit(self._advise, (rows * self.row_bytes).tolist())

    def _advise(self, offsets: list[int]) -> None:
        for i in range(0, len(offsets), _ADVISE_ROWS):
            with self.measured():
                for offset in offsets[i : i + _ADVISE_ROWS]:
                    os.posix_fadvise(self._fd, offset, self.row_bytes, os.POSIX_FADV_WILLNEED)

    @contextmanager
    def measured(self) -> Iterator[None]:
        """Add the disk I/O done inside the block to ``read_bytes`` / ``write_bytes`` (mapped tables)."""
        if not self.mapped:
            yield
            return
        # This thread's own I/O (/proc/thread-self/io): windows on several threads at once (a plan on
        # the bookkeeping thread, a backward reading host rows) neither count each other's nor wait.
        before = thread_io()
        try:
            yield
        finally:
            after = thread_io()
            with self._io_lock:
                self.read_bytes += after[0] - before[0]
                self.write_bytes += after[1] - before[1]

    @contextmanager
    def _progress(self, what: str) -> Iterator:
        """A progress bar in bytes for work on a table of a GB or more (a no-op bar below that)."""
        if self.nbytes < PROGRESS_BYTES:
            yield _NoBar()
            return
        from tqdm import tqdm  # only here: the core itself needs nothing but torch

        log.info("%s host table %s (%.1f GB)", what, self.name, self.nbytes / GB)
        with tqdm(total=self.nbytes, desc=f"{what} {self.name[:30]}", unit="B", unit_scale=True) as bar:
            yield bar

    def close(self) -> None:
        if self._advisor is not None:
            self._advisor.shutdown(wait=True, cancel_futures=True)
        if self._cleanup is not None:
            del self.data
            with suppress(BufferError):  # a view of the rows is still alive: the mapping goes with it
                self._map.close()
            self._cleanup()


class _NoBar:
    def update(self, n: int) -> None:
        pass


def stream_rows(data: torch.Tensor, first: int, count: int, out: BinaryIO) -> None:
    """Write rows ``[first, first + count)`` of ``data`` (any device) to ``out``, a chunk at a time."""
    step = max(1, CHUNK_BYTES // (data.shape[1] * 4))
    for a in range(first, first + count, step):
        out.write(memoryview(data[a : min(a + step, first + count)].cpu().numpy()).cast("B"))


def thread_io() -> tuple[int, int]:
    """This thread's disk bytes read and written so far (``/proc/thread-self/io``; zeros where absent)."""
    try:
        text = Path("/proc/thread-self/io").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(": ") for line in text.splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def _allocate(fd: int, size: int, folder: Path) -> None:
    """Reserve the file's blocks now, or refuse with how much room is needed and free."""
    free = shutil.disk_usage(folder).free
    message = (
        f"cache.mmap_dir={folder}: the host table needs {size / GB:.2f} GB, "
        f"the file system has {free / GB:.2f} GB free"
    )
    if size > free:
        raise OSError(28, message)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno != 28:  # ENOSPC
            raise
        raise OSError(28, message) from None


def _pread(fd: int, count: int, offset: int) -> bytes:
    parts = []
    while count:
        part = os.pread(fd, min(count, CHUNK_BYTES), offset)
        if not part:
            raise OSError(5, f"unexpected end of file at byte {offset}")
        parts.append(part)
        count, offset = count - len(part), offset + len(part)
    return b"".join(parts)


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _copy_file_range(src: int, offset: int, count: int, dst: int) -> None:
    """Copy ``count`` bytes of ``src`` from ``offset`` to the end of ``dst``, in the kernel where it
    can (no user memory), else a chunk at a time."""
    start = os.lseek(dst, 0, os.SEEK_END)
    try:
        while count:
            n = os.copy_file_range(src, dst, min(count, CHUNK_BYTES), offset, start)
            if n == 0:
                raise OSError(5, f"unexpected end of file at byte {offset}")
            count, offset, start = count - n, offset + n, start + n
    except OSError as e:
        if e.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: copy by hand
            raise
        while count:
            part = _pread(src, min(count, CHUNK_BYTES), offset)
            _pwrite(dst, memoryview(part), start)
            count, offset, start = count - len(part), offset + len(part), start + len(part)
    os.lseek(dst, start, os.SEEK_SET)


def _remove(fd: int, path: Path, folder: Path | None) -> None:
    os.close(fd)
    path.unlink(missing_ok=True)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
