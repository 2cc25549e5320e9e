"""The prediction JSONL, written as it goes and resumable after a crash.

One JSON object per line, in dataset order; each batch is appended, flushed and fsynced, so after a
crash the file holds complete rows plus at most one torn last line. `<save_name>.meta.json` records
what produced the rows (datasets and their content hashes, model, adapter weights hash, mode,
labels, generation and image settings). Rerunning the same command:

* repairs a torn last line (cut back to the last newline),
* checks that the rows are exactly the first rows of the dataset, id by id,
* and continues with the next sample — no duplicate, no missing row.

A file written by a different run (another dataset, model, adapter, mode, ...) is refused with the
setting that differs instead of being silently mixed; `--overwrite` starts over, in a temporary file
that replaces the old one only once every row is written (a failed run leaves the old rows).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from vlmtune.errors import VlmtuneError
from vlmtune.files import read_json_object, write_atomic

META_VERSION = 1
# Settings that change the rows; a rerun must match them all. (batch_size and max_samples may change:
# rows are checked id by id.)
FINGERPRINT = ("datasets", "model", "adapter", "adapter_weights", "backend", "mode", "labels",
               "max_new_tokens", "temperature", "seed", "image_max_pixels", "image_min_pixels", "dtype",
               "default_system", "template", "sampling")


def meta_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (short form)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


class PredictionFile:
    """Appends rows to a prediction JSONL; `start` returns how many rows an earlier run already wrote.

    With overwrite, an existing file is not touched until the new one is complete: rows go to a sibling
    temporary file that `commit` renames over it (then the metadata); a run that fails before leaves the
    old predictions (and their metadata) as they were.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any]):
        self.path = Path(path)
        self.meta = {"vlmtune_predict": META_VERSION, **meta}
        self.repaired = False  # a torn last line was cut off by `start`
        self.replacing: Path | None = None  # the temporary file that replaces `path` at commit (overwrite)
        self._fh = None

    # -- opening ------------------------------------------------------------------------------
    def start(self, ids: Sequence[str], overwrite: bool = False) -> int:
        """Prepare the file for the samples `ids` (dataset order); returns the rows already done."""
        if self.path.is_dir():
            raise VlmtuneError(f"{self.path}: is a directory (save_name must be a file path)")
        meta_file = meta_path(self.path)
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists and not overwrite:
            self._check_meta(meta_file)
            done = self._resume(ids)
            self._open(self.path, "ab")
            return done
        if exists:  # overwrite: the old rows stay until commit
            self.replacing = self.path.with_name(f".{self.path.name}.overwrite.tmp")
            self._open(self.replacing, "wb")
            return 0
        self._mkdir()
        write_atomic(meta_file, json.dumps(self.meta, ensure_ascii=False, indent=2) + "\n")
        self._open(self.path, "wb")
        return 0

    def complete(self, ids: Sequence[str]) -> bool:
        """True when the file already holds every row of `ids` for this run; reads only, changes nothing."""
        if not (self.path.is_file() and meta_path(self.path).is_file()):
            return False
        try:
            self._check_meta(meta_path(self.path))
        except VlmtuneError:
            return False  # a different run's file: `start` says so
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            return False
        try:
            return [str(json.loads(line)["id"]) for line in raw.split(b"\n")[:-1]] == list(ids)
        except (ValueError, TypeError, KeyError, RecursionError):
            return False

    def _mkdir(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VlmtuneError(f"{self.path}: cannot create its directory ({exc.strerror or exc})") from None

    def _open(self, path: Path, mode: str) -> None:
        try:
            self._fh = open(path, mode)
        except OSError as exc:
            raise VlmtuneError(f"{path}: cannot write ({exc.strerror or exc})") from None

    def _check_meta(self, meta_file: Path) -> None:
        if not meta_file.is_file():
            raise VlmtuneError(f"{self.path}: exists but was not written by `vlmtune predict` (no {meta_file.name}); "
                               f"pass --overwrite to replace it or choose another --save_name")
        try:
            old = read_json_object(meta_file)
        except VlmtuneError as exc:
            raise VlmtuneError(f"{exc}; pass --overwrite to start over") from None
        for key in FINGERPRINT:
            if key == "datasets" and old.get(key) != self.meta.get(key):
                listed = old.get(key) if isinstance(old.get(key), list) else []
                before = {str(d.get("file")): d.get("sha256") for d in listed if isinstance(d, dict)}
                now = {d["file"]: d["sha256"] for d in self.meta[key]}
                changed = [f for f in now if f in before and before[f] != now[f]]
                what = (f"the dataset file {changed[0]} changed since" if changed else
                        f"the datasets were {sorted(before)}, now {sorted(now)}")
                raise VlmtuneError(f"{self.path}: holds predictions of a different run ({what}); pass --overwrite "
                                   f"to replace it or choose another --save_name")
            if old.get(key) != self.meta.get(key):
                raise VlmtuneError(
                    f"{self.path}: holds predictions of a different run ({key} was {_describe(old.get(key))}, "
                    f"now {_describe(self.meta.get(key))}); pass --overwrite to replace it or choose another "
                    f"--save_name")

    def _resume(self, ids: Sequence[str]) -> int:
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a crash in the middle of a write: drop the torn line
            keep = raw.rfind(b"\n") + 1
            with open(self.path, "r+b") as fh:
                fh.truncate(keep)
            raw = raw[:keep]
            self.repaired = True
        done = 0
        for line_no, line in enumerate(raw.split(b"\n")[:-1], start=1):
            try:
                row = json.loads(line)
                row_id = row["id"]
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, RecursionError):
                raise VlmtuneError(f"{self.path}: line {line_no}: not a prediction row; pass --overwrite to "
                                   f"start over") from None
            if done >= len(ids):
                raise VlmtuneError(f"{self.path}: has more rows than the dataset's {len(ids)} samples; "
                                   f"pass --overwrite to start over")
            if str(row_id) != ids[done]:
                raise VlmtuneError(f"{self.path}: line {line_no}: field 'id': {row_id!r} but sample {done} of the "
                                   f"dataset is {ids[done]!r}; pass --overwrite to start over")
            done += 1
        return done

    # -- writing ------------------------------------------------------------------------------
    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append rows and push them to disk (a crash loses at most the batch being written)."""
        payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        try:
            self._fh.write(payload)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:  # a full disk: the rows before stay, and a rerun continues after them
            kept = "the old file is unchanged" if self.replacing else "the rows written before are kept"
            raise VlmtuneError(f"{self._fh.name}: cannot write ({exc.strerror or exc}); {kept}") from None

    def commit(self) -> None:
        """Every row is written: with overwrite, the new file (then its metadata) replaces the old one."""
        self._close_file()
        if self.replacing is not None:
            new, self.replacing = self.replacing, None  # from here on, close() leaves it alone
            try:
                os.replace(new, self.path)
            except OSError as exc:
                raise VlmtuneError(f"{self.path}: cannot replace it with {new} ({exc.strerror or exc}); "
                                   f"the new predictions are in {new}") from None
            write_atomic(meta_path(self.path), json.dumps(self.meta, ensure_ascii=False, indent=2) + "\n")

    def close(self) -> None:
        """Close the file; an overwrite that was not committed is dropped (the old file stays)."""
        self._close_file()
        if self.replacing is not None:
            self.replacing.unlink(missing_ok=True)

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "PredictionFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
