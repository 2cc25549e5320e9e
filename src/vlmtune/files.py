"""Write a file so that readers see the old content or the new one, never half of it; read text and JSON
or say in one line why the file cannot be read; refuse an output that is one of the command's inputs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from vlmtune.errors import VlmtuneError


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory and a rename.

    The rename is atomic on POSIX when both names are on one file system, which a sibling temp
    file guarantees; on any error the temp file is removed and an existing ``path`` is untouched.
    An OS error (no permission, a directory in the way) becomes a one-line VlmtuneError.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        _replace(path, payload)
    except OSError as exc:
        raise VlmtuneError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def _replace(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report or metrics file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def decode_text(raw: bytes, path: str | Path) -> str:
    """UTF-8 bytes → text, a leading BOM (Windows editors write one) dropped; else a one-line error."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise VlmtuneError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                           f"save the file as UTF-8") from None


def read_bytes(path: str | Path) -> bytes:
    """The bytes of a file, or a one-line VlmtuneError naming it (not found, a directory, no permission)."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise VlmtuneError(f"{path}: file not found") from None
    except OSError as exc:
        raise VlmtuneError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file (BOM dropped), or a one-line VlmtuneError naming it."""
    return decode_text(read_bytes(path), path)


def file_url_path(url: str) -> str:
    """The path a `file://` URL names, as RFC 8089 reads it: percent-decoded (a space is %20), `file://localhost/x`
    being /x."""
    import urllib.request

    rest = url[len("file://"):]
    return urllib.request.url2pathname(rest[len("localhost"):] if rest.startswith("localhost/") else rest)


def parse_json(text: str, where: str | Path) -> Any:
    """json.loads with one-line errors: where the syntax breaks, or that the nesting is too deep
    (Python's parser recurses, so a body of 100,000 '[' would otherwise end in a RecursionError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise VlmtuneError(f"{where}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    except RecursionError:
        raise VlmtuneError(f"{where}: JSON nested too deeply") from None


def read_json(path: str | Path) -> Any:
    """The JSON value in `path` (UTF-8, BOM allowed), or a one-line VlmtuneError naming the file."""
    return parse_json(read_text(path), path)


def read_json_object(path: str | Path) -> dict:
    """The JSON object in `path`, or a one-line VlmtuneError naming the file (unreadable, not JSON, not an object)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise VlmtuneError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (after symlinks; hard links too, when both exist)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte in a name, a symlink loop: not a file we write
        return False


def refuse_input_as_output(output: str | Path, inputs: Iterable[str | Path], setting: str) -> None:
    """No command writes over one of its own inputs: a one-line error when `output` is one of `inputs`."""
    for source in inputs:
        if source is not None and same_file(output, source):
            raise VlmtuneError(f"{setting} {output}: is one of this command's inputs ({source}); it would be "
                               f"overwritten — choose another output path")


def ensure_writable_dir(path: str | Path, setting: str) -> Path:
    """Create directory `path` if needed and prove a file can be written in it, or a one-line error that
    names the setting: a file in the way (the path or a parent), a read-only or full file system."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == path else f"is under {parent}, which is a file"
                raise VlmtuneError(f"{setting} {path}: {where}, not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise VlmtuneError(f"{setting} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def describe_write_error(exc: BaseException) -> str:
    """A failed write or read in a few words: the file and the OS's reason (a full disk), else the first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{Path(exc.filename).name}: {exc.strerror}" if exc.filename else exc.strerror
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else exc.__class__.__name__


class DirectoryLock:
    """An exclusive lock on a directory (named by `setting` in the refusal) for this process's lifetime or until
    `release`: `fcntl.flock` on `directory/NAME`, a file that holds the holder's pid and host. The kernel drops
    the lock when the holder's process ends, however it ends (kill -9 included), so no stale lock is ever left
    behind; the file itself stays (removing it would let two processes lock two different files)."""

    NAME = ".vlmtune.lock"

    def __init__(self, directory: str | Path, what: str, setting: str):
        import errno
        import fcntl
        import socket

        self.path = Path(directory) / self.NAME
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise VlmtuneError(f"{self.path}: cannot create the lock file ({exc.strerror or exc})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return  # a file system without locks (some network mounts): the run goes on unguarded
            holder = self._holder()
            os.close(self._fd)
            raise VlmtuneError(f"{setting} {directory}: {what} ({holder}) is writing into it; wait for it to end, or "
                               f"use another {setting}") from None
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, a refused run then names no pid
            pass

    def _holder(self) -> str:
        """'pid N' (on host H when another host wrote it), read from the lock file; the holder writes it just
        after taking the lock, so an empty file is read again for a moment."""
        import socket
        import time

        for _ in range(50):
            fields = os.pread(self._fd, 200, 0).decode(errors="replace").split()
            if len(fields) == 2 and fields[0].isdigit():
                here = fields[1] == socket.gethostname()
                return f"pid {fields[0]}" + ("" if here else f" on {fields[1]}")
            time.sleep(0.02)
        return "pid unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
