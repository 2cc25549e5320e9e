"""Write a file so that readers see the old content or the new one, never half of it; read a JSON object
or say in one line why the file is not one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

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


def read_json_object(path: str | Path) -> dict:
    """The JSON object in `path`, or a one-line VlmtuneError naming the file (unreadable, not JSON, not an object)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise VlmtuneError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise VlmtuneError(f"{path}: expected a JSON object")
    return value
