"""Reading Criteo TSV (plain or gzip) in bounded-memory chunks, with every field checked.

Labels must be 0/1, integer fields empty or optionally signed integers ('+' or '-', then digits, within
int64), categorical fields empty or 8 hex digits (turned into uint32). A line that breaks the layout
raises ``CriteoFormatError`` with file, line and field, or, with ``on_bad_lines="skip"``, is dropped
and counted.

Two readers apply these rules: ``criteo_parse.cpp`` (built on first use, see
``dlrm_cache.native_build``) reads blocks of whole lines in one pass per block; where it cannot be
built, pyarrow's streaming CSV reader reads every field as a string and vectorized kernels validate
and convert them (no Python loop per value). ``read_chunks`` picks the first.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dlrm_cache.criteo import CAT_COLUMNS, INT_COLUMNS, LABELED_COLUMNS, UNLABELED_COLUMNS
from dlrm_cache.native_build import NativeUnavailable, choose, load

MISSING = -1  # the raw value of an empty categorical field (hashes are 0 .. 2^32 - 1)
_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUE[_c] = 10 + _i


class CriteoFormatError(ValueError):
    """A line that is not Criteo TSV; the message names file, line and field."""


# Why a line was dropped with on_bad_lines=skip, and what each kind of field must hold: one wording
# for both readers.
WRONG_FIELD_COUNT, BAD_VALUE = "wrong number of fields", "bad field value"
_EXPECTED = {"label": "0 or 1", "int": "an integer or nothing", "cat": "8 hex digits or nothing"}


def _field_count(actual: int, expected: int) -> str:
    return f"{actual} fields, expected {expected}"


def _bad_value(path: Path, line: int, name: str, value: str) -> CriteoFormatError:
    what = _EXPECTED[name.split("_")[0]]
    return CriteoFormatError(f"{path}:{line}: field {name} is {value!r}, expected {what}")


def unreadable(path: Path, error: Exception, after_line: int | None = None) -> CriteoFormatError:
    """A file that cannot be read on (a truncated gzip, an I/O error), and after which line."""
    where = "" if after_line is None else f" after line {after_line}"
    return CriteoFormatError(f"{path}: unreadable{where} (truncated or corrupt?): {error}")


@dataclass
class Chunk:
    """The valid rows of one block of lines. ``ints`` and ``cats`` are column-major (Fortran order)
    where the parser can: a column (what is counted, transformed and written) is then contiguous."""

    label: np.ndarray | None  # (n,) int8, None for the unlabeled layout
    ints: np.ndarray  # (n, 13) int64, missing -> 0
    cats: np.ndarray  # (n, 26) int64 raw hashes, missing -> MISSING
    lines: np.ndarray  # (n,) int64 1-based line number of each row in its file


@dataclass
class BadLines:
    """Lines dropped with ``on_bad_lines=skip``: how many, why, and the first few line numbers."""

    count: int = 0
    first: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def extend(self, other: BadLines) -> None:
        self.count += other.count
        for reason, n in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n
        self.first = (self.first + other.first)[:10]

    def add(self, path: Path, line: int, reason: str) -> None:
        self.count += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.first) < 10:
            self.first.append(f"{path}:{line}")


def detect_columns(path: Path) -> list[str]:
    """The layout of ``path`` from its first line: 40 fields (labeled) or 39 (Kaggle's test.txt)."""
    raw, stream = open_input(path)
    try:
        head = stream.read(1 << 16)
    except (OSError, pa.ArrowInvalid) as e:
        raise unreadable(path, e) from None
    finally:
        raw.close()
    if not head:
        raise CriteoFormatError(f"{path}: the file is empty")
    fields = head.split(b"\n", 1)[0].rstrip(b"\r").split(b"\t")
    if len(fields) == 40:
        return LABELED_COLUMNS
    if len(fields) == 39:
        return UNLABELED_COLUMNS
    raise CriteoFormatError(
        f"{path}:1: {len(fields)} tab-separated fields, expected 40 (label, 13 integer, 26 categorical) "
        "or 39 (no label)"
    )


def open_input(path: Path) -> tuple[pa.NativeFile, pa.NativeFile]:
    """(the raw file, the stream to read): ``raw.tell()`` is the progress in file bytes."""
    raw = pa.OSFile(str(path), "rb")
    if path.suffix == ".gz":
        return raw, pa.CompressedInputStream(raw, "gzip")
    return raw, raw


def read_chunks(
    path: Path,
    columns: list[str],
    chunk_bytes: int,
    on_bad_lines: str,
    bad: BadLines,
    on_progress=None,
    parser: str = "auto",
) -> Iterator[Chunk]:
    """Validated chunks of ``path`` in file order; ``on_progress(bytes)`` gets file bytes consumed.
    ``parser``: ``native``, ``arrow`` or ``auto`` (native where it builds, else arrow)."""
    lib = choose(parser, "preprocess.parser", _parser, "Criteo parser", "parsing with pyarrow")
    if lib is None:
        return _read_chunks_arrow(path, columns, chunk_bytes, on_bad_lines, bad, on_progress)
    return _read_chunks_native(lib, path, columns, chunk_bytes, on_bad_lines, bad, on_progress)


class _ParseArgs(ctypes.Structure):
    # the field order of ParseArgs in criteo_parse.cpp
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("len", ctypes.c_int64),
        ("n_fields", ctypes.c_int32),
        ("skip_bad", ctypes.c_int32),
        ("first_line", ctypes.c_int64),
        ("label", ctypes.c_void_p),
        ("ints", ctypes.c_void_p),
        ("cats", ctypes.c_void_p),
        ("lines", ctypes.c_void_p),
        ("stride", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("lines_seen", ctypes.c_int64),
        ("err_line", ctypes.c_int64),
        ("err_field", ctypes.c_int32),
        ("err_fields", ctypes.c_int32),
        ("err_off", ctypes.c_int64),
        ("err_len", ctypes.c_int64),
        ("bad", ctypes.c_int64 * 2),
        ("bad_first", ctypes.c_int64 * 10),
        ("n_bad_first", ctypes.c_int32),
    ]


def _parser() -> ctypes.CDLL:
    def declare(lib: ctypes.CDLL) -> None:
        lib.criteo_parse.argtypes = [ctypes.POINTER(_ParseArgs)]
        lib.criteo_parse.restype = None
        lib.count_newlines.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.count_newlines.restype = ctypes.c_int64

    return load(Path(__file__).with_name("criteo_parse.cpp"), declare)


def count_newlines(data: bytearray, start: int, end: int) -> int:
    """The newlines of ``data[start:end]``: counted in C where the parser builds (memchr, ~4x
    ``bytearray.count``, and other threads run meanwhile: the GIL is released), else by Python."""
    try:
        lib = _parser()
    except NativeUnavailable:
        return data.count(b"\n", start, end)
    return lib.count_newlines(ctypes.addressof(ctypes.c_char.from_buffer(data)) + start, end - start)


def _read_chunks_native(
    lib: ctypes.CDLL,
    path: Path,
    columns: list[str],
    chunk_bytes: int,
    on_bad_lines: str,
    bad: BadLines,
    on_progress,
) -> Iterator[Chunk]:
    """Blocks of ``chunk_bytes`` cut after their last newline (the rest starts the next block), read
    into one reused buffer: no new block of memory to fault in, and no copies, for every block."""
    raw, stream = open_input(path)
    buf = bytearray(chunk_bytes)  # the rest of the last block, then the bytes read after it
    line, kept, seen_rows, dropped_before = 1, 0, False, bad.count
    try:
        while True:
            if len(buf) < kept + chunk_bytes:  # a long line carried over: room for one more read
                buf.extend(bytes(kept + chunk_bytes - len(buf)))
            try:
                got = stream.readinto(memoryview(buf)[kept : kept + chunk_bytes])
            except (OSError, pa.ArrowInvalid) as e:
                raise unreadable(path, e, line - 1) from None
            end, final = kept + got, got == 0
            cut = end if final else buf.rfind(b"\n", 0, end) + 1
            if cut == 0 and not final:  # a line longer than the block: read on, within reason
                if end > _MAX_LINE_BLOCKS * chunk_bytes:
                    raise CriteoFormatError(
                        f"{path}:{line}: no end of line in {end:,} bytes (not Criteo TSV?)"
                    )
                kept = end
                continue
            if cut:
                chunk, seen = _parse_block(lib, buf, cut, path, columns, line, on_bad_lines, bad)
                line += seen
                seen_rows |= len(chunk.lines) > 0
                if on_progress is not None:
                    on_progress(raw.tell())
                yield chunk
            if final:
                break
            kept = end - cut
            buf[:kept] = buf[cut:end]
    finally:
        raw.close()
    if not seen_rows and bad.count == dropped_before:
        raise CriteoFormatError(f"{path}: the file is empty")


_MAX_LINE_BLOCKS = 4  # a line may span this many blocks (Criteo lines are a few hundred bytes)
_PIECE_BYTES = 1 << 20  # a block is parsed in pieces of at least this size, one per core, in threads
_pool: ThreadPoolExecutor | None = None


def _parse_block(
    lib: ctypes.CDLL,
    data: bytearray,
    size: int,
    path: Path,
    columns: list[str],
    line: int,
    on_bad_lines: str,
    bad: BadLines,
) -> tuple[Chunk, int]:
    """The block of whole lines ``data[:size]``, numbered from ``line``: its valid rows, and how many
    lines it held. The block is cut at newlines into one piece per core, parsed at once (the parser
    releases the GIL)."""
    global _pool
    parts = max(1, min(os.cpu_count() or 1, size // _PIECE_BYTES))
    bounds = [0]
    for k in range(1, parts):
        cut = data.find(b"\n", max(bounds[-1], size * k // parts), size) + 1
        if 0 < cut < size:
            bounds.append(cut)
    bounds.append(size)
    address = ctypes.addressof(ctypes.c_char.from_buffer(data))  # (data is not resized meanwhile)
    jobs, first, row = [], line, 0
    for lo, hi in pairwise(bounds):
        newlines = lib.count_newlines(address + lo, hi - lo)  # every piece but the last ends with one
        lines = newlines + (data[hi - 1 : hi] != b"\n")
        jobs.append((address + lo, hi - lo, first, row))
        first += newlines
        row += lines
    # One set of arrays for the block, a row per line (its pieces' rows end to end), column-major.
    out = (
        np.empty(row, dtype=np.int8),
        np.empty((row, len(INT_COLUMNS)), dtype=np.int64, order="F"),
        np.empty((row, len(CAT_COLUMNS)), dtype=np.int64, order="F"),
        np.empty(row, dtype=np.int64),
    )
    if len(jobs) > 1:
        _pool = _pool or ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="dlrm-parse")
        pieces = list(_pool.map(lambda job: _parse_piece(lib, len(columns), on_bad_lines, out, *job), jobs))
    else:
        pieces = [_parse_piece(lib, len(columns), on_bad_lines, out, *jobs[0])]
    for a in pieces:  # the first bad line of the block, in piece order
        if a.err_line:
            if a.err_field < 0:
                raise CriteoFormatError(f"{path}:{a.err_line}: {_field_count(a.err_fields, len(columns))}")
            at = a.buf - address + a.err_off
            value = data[at : at + a.err_len].decode("utf-8", errors="replace")
            raise _bad_value(path, a.err_line, columns[a.err_field], value)
        if a.bad[0] or a.bad[1]:
            dropped = BadLines(
                count=a.bad[0] + a.bad[1],
                first=[f"{path}:{a.bad_first[i]}" for i in range(a.n_bad_first)],
                reasons={r: int(c) for r, c in zip((WRONG_FIELD_COUNT, BAD_VALUE), a.bad, strict=True) if c},
            )
            bad.extend(dropped)
    if sum(a.rows for a in pieces) < row:  # empty or skipped lines left rows unused: close the gaps
        keep = np.concatenate([np.arange(r0, r0 + a.rows) for (*_, r0), a in zip(jobs, pieces, strict=True)])
        out = tuple(np.asfortranarray(x[keep]) for x in out)
    label, ints, cats, lines = out
    labeled = len(columns) == len(LABELED_COLUMNS)
    return Chunk(label if labeled else None, ints, cats, lines), sum(a.lines_seen for a in pieces)


def _parse_piece(
    lib: ctypes.CDLL, fields: int, on_bad_lines: str, out, buf: int, size: int, line: int, row: int
):
    """Parse ``size`` bytes at address ``buf`` (lines numbered from ``line``) into the block's arrays
    ``out`` from row ``row`` on."""
    a = _ParseArgs(buf=buf, len=size, n_fields=fields, skip_bad=on_bad_lines == "skip", first_line=line)
    label, ints, cats, lines = out
    a.label = label.ctypes.data + row
    a.ints, a.cats, a.lines = (x.ctypes.data + 8 * row for x in (ints, cats, lines))
    a.stride = len(lines)
    lib.criteo_parse(ctypes.byref(a))
    return a


def _read_chunks_arrow(
    path: Path, columns: list[str], chunk_bytes: int, on_bad_lines: str, bad: BadLines, on_progress=None
) -> Iterator[Chunk]:
    """``read_chunks`` with pyarrow's CSV reader and vectorized checks (no compiler needed)."""
    parse_skipped: list[int] = []  # physical line numbers the parser dropped (sorted)
    first_bad: list[tuple[int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        reason = _field_count(row.actual_columns, row.expected_columns)
        if on_bad_lines == "error":
            first_bad.append((row.number, reason))
            return "error"
        parse_skipped.append(row.number)
        bad.add(path, row.number, WRONG_FIELD_COUNT)
        return "skip"

    # Parsing in parallel loses the line numbers of bad lines: only worth it when they stop the run
    # (the line is then found again by a plain scan).
    threads = on_bad_lines == "error"

    raw, stream = open_input(path)
    rows_before = 0  # rows the parser accepted before this batch

    def failure(e: Exception) -> CriteoFormatError:
        if first_bad:
            line, reason = first_bad[0]
            line = line or _first_line_with_wrong_field_count(path, len(columns))
            return CriteoFormatError(f"{path}:{line}: {reason}")
        return unreadable(path, e, rows_before + len(parse_skipped))

    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(column_names=columns, block_size=chunk_bytes, use_threads=threads),
            parse_options=pacsv.ParseOptions(
                delimiter="\t", quote_char=False, invalid_row_handler=on_invalid
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in columns}, strings_can_be_null=False
            ),
        )
    except (OSError, pa.ArrowInvalid) as e:
        raw.close()
        raise failure(e) from None
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except (OSError, pa.ArrowInvalid) as e:
            raw.close()
            raise failure(e) from None

        lines = _physical_lines(rows_before + np.arange(1, batch.num_rows + 1), parse_skipped)
        rows_before += batch.num_rows
        if on_progress is not None:
            on_progress(raw.tell())
        yield _convert(batch, path, lines, on_bad_lines, bad)
    raw.close()
    if rows_before == 0 and not parse_skipped:
        raise CriteoFormatError(f"{path}: the file is empty")


def _first_line_with_wrong_field_count(path: Path, fields: int) -> int | str:
    """A plain scan for the first line without ``fields`` fields (only run when a run has failed)."""
    raw, stream = open_input(path)
    number, rest = 0, b""
    try:
        while block := stream.read(1 << 24):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for line in lines:
                number += 1
                if line.count(b"\t") != fields - 1:
                    return number
    finally:
        raw.close()
    return number + 1 if rest and rest.count(b"\t") != fields - 1 else "?"


def _physical_lines(accepted: np.ndarray, skipped: list[int]) -> np.ndarray:
    """Line numbers of the rows the parser accepted, given the lines it dropped (sorted)."""
    if not skipped:
        return accepted
    dropped = np.asarray(skipped)
    lines = accepted
    while True:  # line = accepted + (dropped lines at or before it): a fixed point, found in a few steps
        nxt = accepted + np.searchsorted(dropped, lines, side="right")
        if np.array_equal(nxt, lines):
            return lines
        lines = nxt


_INT_PATTERN = r"^[+-]?[0-9]+$|^$"  # an optional sign and digits (and in int64: _in_int64)
_INT64 = (-(2**63), 2**63 - 1)


def _convert(batch: pa.RecordBatch, path: Path, lines: np.ndarray, on_bad_lines: str, bad: BadLines) -> Chunk:
    """Check and convert one block. The fast path converts directly; a failing integer cast is
    located with a regex, bad hex with a byte table, so errors name the exact row and field."""
    n = batch.num_rows
    ok = np.ones(n, dtype=bool)
    problems: list[tuple[int, str]] = []  # (row, field)

    def check(valid: np.ndarray, name: str) -> None:
        wrong = np.nonzero(~valid & ok)[0]
        if len(wrong):
            problems.append((int(wrong[0]), name))
            ok[wrong] = False

    labeled = "label" in batch.schema.names
    label = None
    if labeled:
        lab = batch.column("label")
        check(pc.is_in(lab, pa.array(["0", "1"])).to_numpy(zero_copy_only=False), "label")
        label = np.asarray(pc.equal(lab, "1")).astype(np.int8)
    ints = np.zeros((n, len(INT_COLUMNS)), dtype=np.int64)
    for j, name in enumerate(INT_COLUMNS):
        col = batch.column(name)
        filled = pc.if_else(pc.equal(col, ""), "0", col)
        try:
            ints[:, j] = pc.cast(filled, pa.int64()).to_numpy()
        except pa.ArrowInvalid:  # a '+' sign (arrow's cast takes none), or a bad value to locate
            valid = pc.match_substring_regex(col, _INT_PATTERN).to_numpy(zero_copy_only=False)
            for r in np.nonzero(valid & (pc.utf8_length(col).to_numpy() > 18))[0]:
                valid[r] = _INT64[0] <= int(col[r].as_py()) <= _INT64[1]
            check(valid, name)
            safe = pc.if_else(pa.array(valid), pc.replace_substring_regex(filled, r"^\+", ""), "0")
            ints[:, j] = pc.cast(safe, pa.int64()).to_numpy()
    cats = np.empty((n, len(CAT_COLUMNS)), dtype=np.int64)
    for j, name in enumerate(CAT_COLUMNS):
        cats[:, j], valid = hex_to_int(batch.column(name))
        check(valid, name)
    if problems:
        row, name = min(problems)
        if on_bad_lines == "error":
            raise _bad_value(path, lines[row], name, batch.column(name)[row].as_py())
        for r in np.nonzero(~ok)[0]:
            bad.add(path, int(lines[r]), BAD_VALUE)
        return Chunk(None if label is None else label[ok], ints[ok], cats[ok], lines[ok])
    return Chunk(label, ints, cats, lines)


_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_LETTER_BITS = np.uint64(0x0101010101010101)


def hex_to_int(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string column of 8-hex-digit values (or empty) -> (int64 values, empty -> MISSING; validity).

    Eight ASCII hex digits are read as one big-endian 64-bit word and turned into their 32-bit value
    with a few word-wide operations (SWAR): no loop per value, no loop per digit. A value is valid if
    it is empty, or 8 characters that are all hex digits."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    out = np.full(len(col), MISSING, dtype=np.int64)
    lengths = pc.utf8_length(col).to_numpy(zero_copy_only=False)
    valid = (lengths == 0) | (lengths == 8)
    present = lengths == 8
    if not present.any():
        return out, valid
    full = col if present.all() else pc.filter(col, pa.array(present))
    offsets = np.frombuffer(full.buffers()[1], dtype=np.int32, count=len(full) + 1, offset=full.offset * 4)
    data = np.frombuffer(full.buffers()[2], dtype=np.uint8)
    if offsets[-1] - offsets[0] == 8 * len(full):  # values back to back: view them in place
        chars = data[offsets[0] : offsets[-1]].reshape(-1, 8)
    else:
        chars = data[offsets[:-1, None] + np.arange(8)]
    hexdigit = (_HEX_VALUE[chars] != 255).all(axis=1)
    if not hexdigit.all():
        valid[np.nonzero(present)[0][~hexdigit]] = False
    words = np.ascontiguousarray(chars).view(">u8").ravel().astype(np.uint64)
    x = (words & _LOW_NIBBLES) + np.uint64(9) * ((words >> np.uint64(6)) & _LETTER_BITS)  # byte -> digit
    x = (x | (x >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    x = (x | (x >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)
    out[present] = x.astype(np.int64)
    return out, valid
