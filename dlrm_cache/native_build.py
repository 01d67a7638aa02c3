"""Building and loading the project's small C++ libraries (``*.cpp`` next to the code that uses them).

Each is plain C++17 with a C interface and no torch headers, so it builds in about a second with the
system compiler (``$CXX``, else ``c++``) on first use, and is loaded with ctypes. The library is kept in
``$DLRM_CACHE_BUILD_DIR`` (default ``$XDG_CACHE_HOME/dlrm_cache``, i.e. ``~/.cache/dlrm_cache``) under a
name made from a hash of the source, the compiler and the flags; it is written to a temporary file and
renamed, so processes building at once never load each other's half-written file. Callers keep a pure
Python path for machines without a compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC"]
# For sources with OpenMP loops: the libgomp they link by its soname is torch's own where torch is
# already loaded (one thread pool, not two). Without OpenMP the same source builds serial.
OPENMP = ["-fopenmp"]


class NativeUnavailable(RuntimeError):
    """A C++ library could not be built or loaded; the message says why."""


_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL | str] = {}  # the library, or why it failed
_warned: set[str] = set()  # settings whose fallback was announced
log = logging.getLogger(__name__)


def build_dir() -> Path:
    if os.environ.get("DLRM_CACHE_BUILD_DIR"):
        return Path(os.environ["DLRM_CACHE_BUILD_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlrm_cache"


def _build(source: Path, flags: list[str]) -> Path:
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise NativeUnavailable(f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} not found)")
    digest = hashlib.sha256(source.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = build_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeUnavailable(f"{compiler} failed on {source}:\n{done.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, declare: Callable[[ctypes.CDLL], None], openmp: bool = False) -> ctypes.CDLL:
    """The library built from ``source`` (once per process; ``declare`` sets its functions' types), or
    ``NativeUnavailable`` saying why not (remembered: a failed build is not retried). ``openmp``: build
    with OpenMP where the compiler has it, else serial (the source must give the same results both ways)."""
    with _lock:
        if source not in _loaded:
            for flags in ([FLAGS + OPENMP] if openmp else []) + [FLAGS]:
                try:
                    lib = ctypes.CDLL(str(_build(source, flags)))
                    declare(lib)
                    _loaded[source] = lib
                    break
                except (NativeUnavailable, OSError) as e:
                    _loaded[source] = str(e)
        lib = _loaded[source]
        if isinstance(lib, str):
            raise NativeUnavailable(lib)
        return lib


def choose(choice: str, setting: str, library: Callable[[], ctypes.CDLL], what: str, fallback: str):
    """For a setting of ``native``, ``auto`` or the fallback's name: the library to use, or None to use
    the fallback. ``native`` raises ``NativeUnavailable`` naming the setting where the library cannot
    be built; ``auto`` then falls back, with a warning once per setting."""
    if choice not in ("auto", "native"):
        return None
    try:
        return library()
    except NativeUnavailable as e:
        if choice == "native":
            raise NativeUnavailable(f"{setting}=native: {e}") from None
        if setting not in _warned:
            _warned.add(setting)
            log.warning("the C++ %s is unavailable (%s); %s (slower)", what, e, fallback)
        return None


def forget() -> None:
    """Drop what was loaded or failed, and the warnings given (for tests that change the compiler)."""
    with _lock:
        _loaded.clear()
        _warned.clear()
