"""The encoded dataset on disk: written once, read per batch, reused by the next run on the same data.

What encoding makes of a record — token ids, labels, each image resized (uint8) — goes into flat files
that are read by offset (`os.pread` into a fresh buffer: nothing stays mapped, so the process's memory
does not grow with the dataset; the kernel's page cache keeps what is hot). Per shard:

    ids.bin      int32 token ids of every record, one after another
    labels.bin   int32 labels (-100 outside the answers), aligned with ids.bin
    images.bin   uint8 resized images (3 × H × W each), one after another
    records.npy  per record: ids start, length, first image, image count, and its (source, index) key row
    images.npy   per image: start in images.bin, height, width

The store's name is a hash of everything that changes what is in it: the records themselves (every
message and image path of every conversation), each image file's size and modification time, the chat
template, the default system prompt, the tokenizer, the image settings and cutoff_len (`store_key`).
`overwrite_cache: true` rebuilds it. Records that cannot be encoded are listed in the store too, so a
reused store reports the same problems.

Building: with several ranks on a node, rank r encodes records r, r+W, … into shard r of a temporary
directory; when all are done, rank 0 writes `meta.json` and renames the directory into place. A store
is trusted only with its `meta.json` (the last file written): a crash while building leaves a temporary
directory that is never read, and removed by a later build once its process is gone. Several jobs (or the
nodes of one job, on a shared cache directory) may build the same store at once: each builds its own, the
first complete one stays. A rebuild (`overwrite_cache`) renames the old store away before removing it, so
a run still training on it keeps reading its open files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from vlmtune.data.conversation import Conversation, Problem
from vlmtune.data.encode import EncodedSample, EncodeError, encode
from vlmtune.errors import VlmtuneError
from vlmtune.files import read_json_object, write_atomic

STORE_VERSION = 2  # 2: images as viewed (EXIF orientation, transparency on white)
CACHE_ENV = "VLMTUNE_CACHE"  # where stores live (default ~/.cache/vlmtune)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vlmtune") / "encoded"


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def out_of_sight(store: Path) -> Path:
    """Rename a store away (atomically) before removing it: no run finds half a store, and a run reading it
    keeps its open files (on a local disk). Returns the new path."""
    aside = store.with_name(f".{store.name}.replaced-{socket.gethostname()}-{os.getpid()}")
    store.rename(aside)
    return aside


def _file_stamp(path: str) -> list:
    try:
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [None, None]


def store_key(conversations: Sequence[Conversation], processor, cutoff_len: int | None,
              default_system: str | None) -> str:
    """A hash of everything that changes the encoded data (see the module docstring)."""
    digest = hashlib.sha256()
    tokenizer = getattr(processor.tokenizer, "backend_tokenizer", None)
    settings = {"version": STORE_VERSION, "template": [processor.template.name, processor.template.enable_thinking],
                "default_system": default_system, "cutoff_len": cutoff_len,
                "image": processor.image_processor.to_dict(),
                "tokenizer": hashlib.sha256((tokenizer.to_str() if tokenizer is not None else
                                             repr(processor.tokenizer.get_vocab())).encode()).hexdigest()}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for conv in conversations:
        record = [conv.source, conv.index, [[m.role, m.content] for m in conv.messages],
                  [[path, *_file_stamp(path)] for path in conv.images]]
        digest.update(json.dumps(record, ensure_ascii=False).encode())
    return digest.hexdigest()[:24]


class Shard:
    """One rank's part of a store. Its files are opened once: a run keeps reading the store it started with
    even when another run rebuilds it meanwhile (the old files are unlinked, not overwritten)."""

    FILES = ("ids.bin", "labels.bin", "images.bin")

    def __init__(self, directory: Path):
        self.directory = directory
        self.records = np.load(directory / "records.npy")  # (n, 4) int64: ids start, length, first image, count
        self.images = np.load(directory / "images.npy")  # (m, 3) int64: start, height, width
        self._open()

    def _open(self) -> None:
        self.files = {name: os.open(self.directory / name, os.O_RDONLY) for name in self.FILES}

    def __getstate__(self):  # DataLoader workers started by spawn open the files again
        return {k: v for k, v in self.__dict__.items() if k != "files"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __del__(self):
        for fd in getattr(self, "files", {}).values():
            os.close(fd)

    def read(self, name: str, start: int, count: int, dtype) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        raw = os.pread(self.files[name], count * itemsize, start * itemsize)  # pread: no shared file offset
        return np.frombuffer(raw, dtype=dtype).copy() if raw else np.zeros(0, dtype=dtype)


class EncodedStore:
    """An opened store: `sample(position, conversation)` reads one record back as an EncodedSample."""

    def __init__(self, directory: Path):
        self.directory = directory
        meta = read_json_object(directory / "meta.json")
        self.meta = meta
        self.shards = [Shard(directory / name) for name in meta["shards"]]
        # (source, index) → (shard, row)
        self.where = {tuple(key): tuple(place) for key, place in meta["where"]}
        self.problems = [Problem(p["file"], p["record"], p["field"], p["message"]) for p in meta["problems"]]

    def __contains__(self, conv: Conversation) -> bool:
        return (conv.source, conv.index) in self.where

    def disk_bytes(self) -> int:
        return directory_bytes(self.directory)

    def sample(self, conv: Conversation) -> EncodedSample:
        shard_index, row = self.where[(conv.source, conv.index)]
        shard = self.shards[shard_index]
        start, length, first, count = (int(v) for v in shard.records[row])
        ids = torch.from_numpy(shard.read("ids.bin", start, length, np.int32).astype(np.int64))
        labels = torch.from_numpy(shard.read("labels.bin", start, length, np.int32).astype(np.int64))
        images = []
        for image_start, height, width in shard.images[first:first + count]:
            pixels = shard.read("images.bin", int(image_start), 3 * int(height) * int(width), np.uint8)
            images.append(torch.from_numpy(pixels.reshape(3, int(height), int(width))))
        return EncodedSample(ids, labels, images, conv)


class StoredSamples(Sequence):
    """A split's samples, read from the store when indexed (nothing of them kept in memory)."""

    def __init__(self, store: EncodedStore, conversations: list[Conversation]):
        self.store = store
        self.conversations = conversations

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.store.sample(c) for c in self.conversations[index]]
        sample = self.store.sample(self.conversations[index])
        sample.position = index
        return sample


def _encode_shard(conversations: list[Conversation], processor, cutoff_len, default_system, directory: Path,
                  workers: int) -> None:
    """Encode `conversations` into a shard directory, streaming: one record's arrays in memory at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    records, images, keys, problems = [], [], [], []
    ids_at = image_at = 0

    def one(conv: Conversation):
        try:
            return encode(conv, processor, cutoff_len, default_system)
        except EncodeError as exc:
            return Problem(conv.source, conv.index, exc.field, str(exc))

    with open(directory / "ids.bin", "wb") as ids_file, open(directory / "labels.bin", "wb") as labels_file, \
            open(directory / "images.bin", "wb") as images_file, ThreadPoolExecutor(max_workers=workers) as pool:
        for conv, result in zip(conversations, pool.map(one, conversations)):  # pool.map keeps the order
            if isinstance(result, Problem):
                problems.append({"file": result.file, "record": result.record, "field": result.field,
                                 "message": result.message})
                continue
            ids_file.write(result.input_ids.to(torch.int32).numpy().tobytes())
            labels_file.write(result.labels.to(torch.int32).numpy().tobytes())
            records.append([ids_at, len(result), len(images), len(result.images)])
            ids_at += len(result)
            for image in result.images:
                images_file.write(image.contiguous().numpy().tobytes())
                images.append([image_at, image.shape[1], image.shape[2]])
                image_at += image.numel()
            keys.append([conv.source, conv.index])
    np.save(directory / "records.npy", np.array(records, dtype=np.int64).reshape(-1, 4))
    np.save(directory / "images.npy", np.array(images, dtype=np.int64).reshape(-1, 3))
    write_atomic(directory / "keys.json", json.dumps({"keys": keys, "problems": problems}, ensure_ascii=False))


def open_or_build(conversations: list[Conversation], processor, cutoff_len: int | None, default_system: str | None,
                  rank: int, world: int, barrier: Callable[[], None], workers: int,
                  rebuild: bool = False) -> tuple[EncodedStore, bool]:
    """The store of these conversations: reused when a complete one exists (unless `rebuild`), else built by
    the `world` local ranks together (each calls this; `barrier` waits for all). Returns (store, reused)."""
    conversations = sorted(conversations, key=lambda c: (c.source, c.index))  # a split's change keeps the store
    key = store_key(conversations, processor, cutoff_len, default_system)
    final = cache_root() / key
    if (final / "meta.json").is_file() and not rebuild:
        mark_used(final)
        return EncodedStore(final), True
    started = time.time()
    # One temporary directory per build: this node's ranks of a torchrun job share MASTER_PORT, a lone process
    # has its pid; the host name keeps the nodes of one job apart when the cache is on a shared filesystem.
    build = f"{socket.gethostname()}-{os.environ.get('MASTER_PORT') if world > 1 else os.getpid()}"
    tmp = cache_root() / f".{key}.building-{build}"
    try:
        if rank == 0:
            remove_abandoned_builds()
            shutil.rmtree(tmp, ignore_errors=True)  # this job's own earlier attempt
            tmp.mkdir(parents=True)
            write_atomic(tmp / "builder.json", json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        barrier()
        _encode_shard(conversations[rank::world], processor, cutoff_len, default_system, tmp / f"shard-{rank}",
                      workers)
    except OSError as exc:  # a full disk, a quota, a cache that is not a writable directory
        shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{Path(exc.filename).name}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        raise VlmtuneError(f"{cache_root()}: writing the encoded-data store failed ({reason}); free some space or "
                           f"point {CACHE_ENV} at a writable disk with room") from None
    barrier()
    if rank == 0:
        where, problems = [], []
        for shard in range(world):
            record = read_json_object(tmp / f"shard-{shard}" / "keys.json")
            where += [[key_row, [shard, row]] for row, key_row in enumerate(record["keys"])]
            problems += record["problems"]
        meta = {"version": STORE_VERSION, "key": key, "shards": [f"shard-{s}" for s in range(world)],
                "where": where, "problems": problems, "records": len(conversations),
                "built_at": time.time(), "built_seconds": round(time.time() - started, 3)}
        write_atomic(tmp / "meta.json", json.dumps(meta, ensure_ascii=False))  # last: it marks the store complete
        install(tmp, final, started if rebuild else None)
    barrier()
    return EncodedStore(final), False


def install(built: Path, final: Path, rebuilt_since: float | None) -> None:
    """Put a complete build in place. A complete store already there stays when it will do — another node of
    this job (shared cache) or another job built it, and it is not older than a rebuild asked for
    (`rebuilt_since`) —; otherwise it replaces that store (`out_of_sight` first, as the `datasets` cache
    replaces its files)."""
    try:
        existing = read_json_object(final / "meta.json")
    except (OSError, VlmtuneError):
        existing = None
    if existing is not None and (rebuilt_since is None or existing.get("built_at", 0) >= rebuilt_since):
        shutil.rmtree(built, ignore_errors=True)
        return
    replaced = out_of_sight(final) if final.exists() else None
    try:
        built.rename(final)
    except OSError:  # another builder put its (equal) store in place meanwhile
        shutil.rmtree(built, ignore_errors=True)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


ABANDONED_AFTER_S = 24 * 3600


def remove_abandoned_builds() -> None:
    """Temporary directories of builds that died (killed, crashed): their process is gone (this host), or
    nothing was written in them for a day (any host)."""
    for directory in cache_root().glob(".*.building-*"):
        try:
            builder = json.loads((directory / "builder.json").read_text())
            here = builder.get("host") == socket.gethostname()
            alive = here and _process_alive(int(builder["pid"]))
            newest = max((f.stat().st_mtime for f in directory.rglob("*")), default=directory.stat().st_mtime)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being created or removed right now
        if (here and not alive) or time.time() - newest > ABANDONED_AFTER_S:
            shutil.rmtree(directory, ignore_errors=True)
    for directory in cache_root().glob(".*.replaced-*"):  # a replacement that died before removing the old store
        try:
            if time.time() - directory.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(directory, ignore_errors=True)
        except OSError:
            continue


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def mark_used(store: Path) -> None:
    """The directory's modification time says when a run last used the store (`vlmtune data cache`)."""
    try:
        os.utime(store)
    except OSError:  # a read-only cache is still usable
        pass


@dataclass
class StoreInfo:
    directory: Path
    records: int
    bytes: int
    built_at: float
    used_at: float


def list_stores() -> list[StoreInfo]:
    """The complete stores in the cache, most recently used first."""
    found = []
    for directory in cache_root().glob("[!.]*"):
        try:
            meta = read_json_object(directory / "meta.json")
            store = StoreInfo(directory, int(meta.get("records", 0)), directory_bytes(directory),
                              float(meta.get("built_at", 0)), directory.stat().st_mtime)
        except (OSError, VlmtuneError, ValueError, TypeError):
            continue  # not a store, or being replaced right now
        found.append(store)
    return sorted(found, key=lambda s: -s.used_at)


def remove_stores(unused_for_s: float = 0.0) -> list[StoreInfo]:
    """Remove the stores no run has used for `unused_for_s` seconds (0: all), and the directories of dead
    builds; returns the stores removed. A run training on a removed store keeps reading its open files."""
    if not cache_root().is_dir():
        return []
    remove_abandoned_builds()
    removed = []
    for store in list_stores():
        if time.time() - store.used_at >= unused_for_s:
            shutil.rmtree(out_of_sight(store.directory), ignore_errors=True)
            removed.append(store)
    return removed
