"""The on-disk cache and atomic writes: a reader never sees a half-written file or folder, an
unreadable entry is rebuilt, concurrent processes wait for each other, and the leftovers of
killed runs are swept away."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import shutil
import socket
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import psutil
from filelock import FileLock, Timeout
from safetensors import SafetensorError

from quantdiag.errors import first_line

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Bump when a change to quantdiag changes what any cached entry or stage holds.
CACHE_SCHEMA = 1
#: Libraries whose version can change cached numbers (conversion, quantization, forwards).
NUMERIC_LIBRARIES = ("quantdiag", "torch", "transformers", "gptqmodel", "gguf", "numpy")
#: What reading a truncated or garbled cache file raises (zip-based .npz / .pt, safetensors, JSON):
#: such an entry is rebuilt. Other OS errors (permissions, an I/O error, too many open files) are
#: not the entry's fault and propagate, so a valid entry is never deleted for them.
UNREADABLE = (FileNotFoundError, NotADirectoryError, IsADirectoryError, EOFError, ValueError, RuntimeError, KeyError)
UNREADABLE += (zipfile.BadZipFile, zlib.error, pickle.UnpicklingError, SafetensorError)
_HOST = re.sub(r"[^\w-]", "_", socket.gethostname())
#: Temporary names carry their process: ``.{name}.{pid}@{host}.{token}.tmp``.
_TEMPORARY = re.compile(r"^\..*\.(?P<pid>\d+)@(?P<host>[\w-]+)\.[0-9a-f]+\.tmp$")
_MANIFEST = "quantdiag-manifest.json"
#: Free bytes under which a failed write is taken for a full disk.
_NEARLY_FULL = 1 << 20


def cache_root() -> Path:
    """Where quantized weights, converted models and calibration live: ``$QUANTDIAG_CACHE``
    (when set and not empty) or ``~/.cache/quantdiag``."""
    return Path(os.environ.get("QUANTDIAG_CACHE") or Path.home() / ".cache" / "quantdiag")


def content_hash(*parts: Any, length: int = 16) -> str:
    """Stable short hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@cache
def code_versions() -> dict[str, str | int]:
    """The cache schema and the versions of the libraries that change numbers."""
    return {"cache_schema": CACHE_SCHEMA, **{name: metadata.version(name) for name in NUMERIC_LIBRARIES}}


def cache_key(*parts: Any, length: int = 16) -> str:
    """``content_hash`` of ``parts`` and the code versions: a new version never reuses old numbers."""
    return content_hash(code_versions(), *parts, length=length)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, cached per file version (inode, size, modification and change
    times): a file is read once, and any write to it (which moves its ctime) hashes it again."""
    stat = path.stat()
    version = content_hash(os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)

    def build(tmp: Path) -> str:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        tmp.write_text(digest)
        return digest

    return load_or_build(cache_root() / "hashes" / version, _read_digest, build)


def _read_digest(path: Path) -> str:
    digest = path.read_text()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError("not a SHA-256 digest")
    return digest


def load_or_build(path: Path, read: Callable[[Path], T], build: Callable[[Path], T], folder: bool = False) -> T:
    """``read(path)``; if the entry is missing or unreadable, ``build(tmp)`` writes it to a
    temporary file (``folder``: a folder) that then becomes ``path``, under the entry's lock so
    that a concurrent process waits and reads it instead of computing it again."""
    if path.exists():
        with suppress(*UNREADABLE):
            return read(path)
    with entry_lock(path):
        value = read_entry(path, read)
        if value is None:
            with (atomic_dir if folder else atomic_file)(path) as tmp:
                value = build(tmp)
        return value


def read_entry(path: Path, read: Callable[[Path], T]) -> T | None:
    """``read(path)``; ``None`` if there is no entry or it is unreadable (a truncated file of a
    killed run or a full disk): then it is removed, with a warning. Call it holding the lock."""
    if not path.exists():
        return None
    try:
        return read(path)
    except UNREADABLE as error:
        log.warning("cache entry %s is unreadable (%s): rebuilding it", path, first_line(error))
        remove(path)
        return None


@contextmanager
def entry_lock(path: Path) -> Iterator[None]:
    """Hold the inter-process lock of cache entry ``path`` (a file in ``$QUANTDIAG_CACHE/locks``),
    saying so when another process holds it."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(locks / f"{content_hash(os.path.realpath(path))}.lock", mode=0o666)  # shared caches
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another quantdiag process to finish %s", path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds,
    readable by all (umask permitting) and flushed to disk before and after the rename (a power
    loss leaves the old file or the new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        with _os_errors_named(path):
            yield tmp
            _publishable(tmp)
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _os_errors_named(path: Path) -> Iterator[None]:
    """A write's OS error names ``path`` (a failed write() names no file), and a writer's own
    exception with an OS error behind it is raised as that OS error."""
    try:
        yield
    except OSError as error:
        error.filename = error.filename or str(path)
        raise
    except (SafetensorError, RuntimeError) as error:
        behind = _os_error(error, path)
        if behind is None:
            raise
        raise behind from error


def _os_error(error: Exception, path: Path) -> OSError | None:
    """The OS error behind a writer's own exception (safetensors names it ``(os error N)``;
    torch's zip writer names none, so a full disk is read off the disk), or ``None``."""
    named = re.search(r"\(os error (\d+)\)", str(error))
    code = int(named[1]) if named else errno.ENOSPC if shutil.disk_usage(path.parent).free < _NEARLY_FULL else None
    return None if code is None else OSError(code, os.strerror(code), str(path))


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds,
    with a manifest of its files' sizes (``check_manifest``), everything flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.mkdir()
    try:
        with _os_errors_named(path):
            yield tmp
            (tmp / _MANIFEST).write_text(json.dumps(_sizes(tmp), indent=1, sort_keys=True))
            for file in tmp.rglob("*"):
                _publishable(file)
                _fsync(file)
            _fsync(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_manifest(folder: Path) -> Path:
    """``folder`` if every file written by ``atomic_dir`` is there at its size; else ValueError."""
    expected = json.loads((folder / _MANIFEST).read_text())
    found = _sizes(folder)
    if found != expected:
        wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        raise ValueError(f"files missing or of the wrong size: {', '.join(wrong)}")
    return folder


def _sizes(folder: Path) -> dict[str, int]:
    files = [file for file in folder.rglob("*") if file.is_file() and file.name != _MANIFEST]
    return {str(file.relative_to(folder)): file.stat().st_size for file in files}


@contextmanager
def scratch_dir(parent: Path) -> Iterator[Path]:
    """A temporary folder in ``parent`` named after this process (swept if it is killed)."""
    parent.mkdir(parents=True, exist_ok=True)
    folder = _temporary(parent / "scratch")
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep_leftovers(root: Path) -> int:
    """Remove the temporary files and folders under ``root`` that processes of this host which
    are no longer alive left behind (a killed run's partial weights, spills); returns bytes freed."""
    freed = 0
    for folder, subfolders, files in os.walk(root):
        for name in [*files, *subfolders]:
            match = _TEMPORARY.match(name)
            if match and match["host"] == _HOST and not psutil.pid_exists(int(match["pid"])):
                with suppress(OSError):  # another user's, or swept by a run starting beside this one
                    freed += _size(Path(folder) / name)
                    remove(Path(folder) / name)
        subfolders[:] = [name for name in subfolders if not _TEMPORARY.match(name)]
    if freed:
        log.info("removed %.1f MB left behind by killed runs under %s", freed / 2**20, root)
    return freed


def remove(path: Path) -> None:
    """Delete a file or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, indented for people."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _temporary(path: Path) -> Path:
    """A fresh temporary name beside ``path`` that says which process owns it."""
    return path.with_name(f".{path.name}.{os.getpid()}@{_HOST}.{secrets.token_hex(4)}.tmp")


def _publishable(path: Path) -> None:
    """Mode 0666 for files and 0777 for folders less the umask (writers such as safetensors
    create 0600 files), so a shared cache or a report is readable by others."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


@cache
def _umask() -> int:
    """The process's umask (read once: setting it to read it is not thread-safe)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(path: Path) -> int:
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(file.stat().st_size for file in files if file.is_file())


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays into plain JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
