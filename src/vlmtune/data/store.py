"""The encoded dataset on disk: written once, read per batch, reused by the next run on the same data.

What encoding makes of a record — token ids, labels, each image resized (uint8) — goes into flat files
that are read by offset (`os.pread` into a fresh buffer: nothing stays mapped, so the process's memory
does not grow with the dataset; the kernel's page cache keeps what is hot). Per shard:

    ids.bin      int32 token ids of every record, one after another
    labels.bin   int32 labels (-100 outside the answers), aligned with ids.bin
    images.bin   uint8 resized images (3 × H × W each), one after another
    records.npy  per record: ids start, length, first image, image count, and its (source, index) key row
    images.npy   per image: start in images.bin, height, width

The store's key is a hash of everything that changes what is in it: the records themselves (every
message and image path of every conversation), each image file's size, modification and change times and
inode (a file replaced by another of the same size and mtime is another file), the chat template, the default
system prompt, the tokenizer, the image settings and cutoff_len (`store_key`). Records that cannot be encoded
are listed in the store too, so a reused store reports the same problems.

Each build is a directory of its own, `KEY.WHEN-ID`; a build's files are never changed once it is in place, so
a run reading one (DataLoader workers included: they get the very files their job opened, `Shard`) never sees
them change. `overwrite_cache: true` makes a new build beside the old; a build that a newer one replaced is
removed once no run has used it for `SUPERSEDED_AFTER_S` (a run reading a store marks it used, `mark_used`), or
by `vlmtune data cache --clear`.

Building: the node's ranks (`launch.Ranks`: the processes say which of them share a node) build together —
its leader decides (reuse or build, for all of them), rank r encodes records r, r+W, … into shard r of a
temporary directory, and the leader writes `meta.json` (with each file's size and checksum) and renames the
directory into place. Every rank makes the same collectives whatever the leader decided. A store is trusted
only with its `meta.json` (the last file written) and only while every file still has the size and checksum
it was written with (`damage`): a damaged store is set aside and built again, saying so in one line. A crash
while building leaves a temporary directory that is never read, and removed by a later build once its process
is gone (or, with no builder recorded, a day later).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vlmtune.data.conversation import Conversation, Problem
from vlmtune.data.encode import EncodedSample, EncodeError, encode
from vlmtune.errors import VlmtuneError
from vlmtune.files import read_json_object, write_atomic

STORE_VERSION = 3  # 2: images as viewed (EXIF orientation, transparency on white); 3: checksums, builds
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
    """What says an image file is the one encoded: a file replaced by another of the same size and mtime has
    another inode (renamed into place) or change time (written over: ctime cannot be set back)."""
    try:
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    except OSError:
        return [None, None, None, None]


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

    def __getstate__(self):
        """DataLoader workers started by spawn or forkserver get these very files (their descriptors, passed
        as multiprocessing passes sockets), never the path again: a store removed or rebuilt meanwhile cannot
        make them read other files."""
        from multiprocessing.reduction import DupFd

        return {**self.__dict__, "files": {name: DupFd(fd) for name, fd in self.files.items()}}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.files = {name: passed.detach() for name, passed in state["files"].items()}

    def __del__(self):
        for fd in getattr(self, "files", {}).values():
            if isinstance(fd, int):
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
        self.key = meta["key"]  # `store_key`: the same for every build of the same data
        self.used_at = time.time()
        self.shards = [Shard(directory / name) for name in meta["shards"]]
        # (source, index) → (shard, row)
        self.where = {tuple(key): tuple(place) for key, place in meta["where"]}
        self.problems = [Problem(p["file"], p["record"], p["field"], p["message"]) for p in meta["problems"]]

    def __contains__(self, conv: Conversation) -> bool:
        return (conv.source, conv.index) in self.where

    def disk_bytes(self) -> int:
        return directory_bytes(self.directory)

    def sample(self, conv: Conversation) -> EncodedSample:
        if time.time() - self.used_at > SUPERSEDED_AFTER_S / 10:  # still in use: not removed as superseded
            mark_used(self.directory)
            self.used_at = time.time()
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


class _Checksummed:
    """A file being written, with its size and CRC-32 kept as it goes (`damage` checks them on every reuse)."""

    def __init__(self, path: Path):
        self.file, self.size, self.crc = open(path, "wb"), 0, 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size, self.crc = self.size + len(data), zlib.crc32(data, self.crc)


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

    out = {name: _Checksummed(directory / name) for name in Shard.FILES}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for conv, result in zip(conversations, pool.map(one, conversations)):  # pool.map keeps the order
            if isinstance(result, Problem):
                problems.append({"file": result.file, "record": result.record, "field": result.field,
                                 "message": result.message})
                continue
            out["ids.bin"].write(result.input_ids.to(torch.int32).numpy().tobytes())
            out["labels.bin"].write(result.labels.to(torch.int32).numpy().tobytes())
            records.append([ids_at, len(result), len(images), len(result.images)])
            ids_at += len(result)
            for image in result.images:
                out["images.bin"].write(image.contiguous().numpy().tobytes())
                images.append([image_at, image.shape[1], image.shape[2]])
                image_at += image.numel()
            keys.append([conv.source, conv.index])
    for written in out.values():
        written.file.close()
    np.save(directory / "records.npy", np.array(records, dtype=np.int64).reshape(-1, 4))
    np.save(directory / "images.npy", np.array(images, dtype=np.int64).reshape(-1, 3))
    files = {name: [f.size, f.crc] for name, f in out.items()}
    files.update({name: _size_and_crc(directory / name) for name in ("records.npy", "images.npy")})
    write_atomic(directory / "keys.json", json.dumps({"keys": keys, "problems": problems, "files": files},
                                                     ensure_ascii=False))


def _size_and_crc(path: Path) -> list[int]:
    size, crc = 0, 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            size, crc = size + len(chunk), zlib.crc32(chunk, crc)
    return [size, crc]


def _meta_checksum(meta: dict) -> int:
    return zlib.crc32(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True,
                                 ensure_ascii=False).encode())


def damage(directory: Path, workers: int = 4) -> str | None:
    """What is wrong with a complete store (None: nothing) — its meta.json unreadable or altered, a file missing,
    of another size or content than written (CRC-32, read at a few GB/s)."""
    try:
        meta = read_json_object(directory / "meta.json")
    except VlmtuneError:
        return "its meta.json cannot be read"
    files = meta.get("files")
    if meta.get("version") != STORE_VERSION or meta.get("checksum") != _meta_checksum(meta) or \
            not isinstance(files, dict):
        return "its meta.json is damaged"
    for name, (size, _) in files.items():
        try:
            found = (directory / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if found != size:
            return f"{name} has {found} bytes, not the {size} written"
    with ThreadPoolExecutor(max_workers=workers) as pool:  # zlib releases the GIL
        crcs = dict(zip(files, pool.map(lambda name: _size_and_crc(directory / name)[1], files)))
    changed = [name for name, (_, crc) in files.items() if crcs[name] != crc]
    return f"{changed[0]} is not what was written (checksum)" if changed else None


@dataclass
class Plan:
    """What the node's leader decided for all its ranks: reuse `reuse`, or build into `build`."""
    key: str
    reuse: Path | None = None
    build: Path | None = None


def open_or_build(conversations: list[Conversation], processor, cutoff_len: int | None, default_system: str | None,
                  ranks, workers: int, rebuild: bool = False, log=print) -> tuple[EncodedStore, bool]:
    """The store of these conversations: a complete, undamaged one reused (unless `rebuild`), else built by the
    node's ranks together (`ranks`: `launch.Ranks`; every rank calls this, the same collectives on every path).
    Returns (store, reused)."""
    conversations = sorted(conversations, key=lambda c: (c.source, c.index))  # a split's change keeps the store
    started = time.time()
    plan = ranks.from_leader(lambda: plan_store(conversations, processor, cutoff_len, default_system, rebuild,
                                                workers, log))
    try:
        if plan.build is not None:
            ranks.everyone(lambda: _writing(_encode_shard, conversations[ranks.local_rank::ranks.local_world],
                                            processor, cutoff_len, default_system,
                                            plan.build / f"shard-{ranks.local_rank}", workers))
        else:
            ranks.everyone(lambda: None)
        final = ranks.from_leader(lambda: plan.reuse or finish_build(plan, ranks.local_world, len(conversations),
                                                                     started, rebuild))
    except VlmtuneError:
        if ranks.leads and plan.build is not None:
            shutil.rmtree(plan.build, ignore_errors=True)
        raise
    return EncodedStore(final), plan.build is None


def plan_store(conversations: list[Conversation], processor, cutoff_len, default_system, rebuild: bool,
               workers: int, log) -> Plan:
    """The leader's decision: the newest undamaged build of this data (a damaged one is set aside, said in one
    line), else a fresh temporary directory to build into."""
    key = store_key(conversations, processor, cutoff_len, default_system)
    for directory in [] if rebuild else sorted(cache_root().glob(f"{key}.*"), reverse=True):  # newest first
        wrong = damage(directory, workers)
        if wrong is None:
            mark_used(directory)
            return Plan(key, reuse=directory)
        log(f"{directory}: {wrong}; encoding the data again")
        _set_aside(directory)
    tmp = cache_root() / f".{key}.building-{socket.gethostname()}-{os.getpid()}"

    def make():
        remove_abandoned_builds()
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own earlier attempt
        tmp.mkdir(parents=True)
        write_atomic(tmp / "builder.json", json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    _writing(make)
    return Plan(key, build=tmp)


def _set_aside(directory: Path) -> None:
    try:
        out_of_sight(directory)  # removed by age (`remove_abandoned_builds`): a run may still read it
    except OSError:
        pass


def _writing(fn, *args):
    """`fn(*args)`, an OS error while writing the store (a full disk, a quota, a cache that is not a writable
    directory) as one line."""
    try:
        return fn(*args)
    except OSError as exc:
        reason = f"{Path(exc.filename).name}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        raise VlmtuneError(f"{cache_root()}: writing the encoded-data store failed ({reason}); free some space or "
                           f"point {CACHE_ENV} at a writable disk with room") from None


def finish_build(plan: Plan, shards: int, records: int, started: float, rebuild: bool) -> Path:
    """The leader, once every shard is written: `meta.json` (each file's size and checksum; last: it marks the
    build complete), then the build put in place (`install`)."""
    tmp, where, problems, files = plan.build, [], [], {}
    for shard in range(shards):
        keys_file = tmp / f"shard-{shard}" / "keys.json"
        record = read_json_object(keys_file)
        where += [[key_row, [shard, row]] for row, key_row in enumerate(record["keys"])]
        problems += record["problems"]
        files.update({f"shard-{shard}/{name}": v for name, v in record["files"].items()})
        files[f"shard-{shard}/keys.json"] = _size_and_crc(keys_file)
    meta = {"version": STORE_VERSION, "key": plan.key, "shards": [f"shard-{s}" for s in range(shards)],
            "where": where, "problems": problems, "records": records, "files": files,
            "built_at": time.time(), "built_seconds": round(time.time() - started, 3)}
    meta["checksum"] = _meta_checksum(meta)
    _writing(write_atomic, tmp / "meta.json", json.dumps(meta, ensure_ascii=False))
    return install(tmp, plan.key, started if rebuild else None)


def install(built: Path, key: str, rebuilt_since: float | None) -> Path:
    """Put a complete build in place as a directory of its own, never over another; returns where the store is.
    A complete store of the same data another builder finished meanwhile (another node of this job on a shared
    cache, another job) is used instead when it will do: it is not older than a rebuild asked for
    (`rebuilt_since`)."""
    for other in sorted(cache_root().glob(f"{key}.*"), reverse=True):
        try:
            built_at = read_json_object(other / "meta.json").get("built_at", 0)
        except VlmtuneError:
            continue
        if rebuilt_since is None or built_at >= rebuilt_since:
            shutil.rmtree(built, ignore_errors=True)
            return other
    now = time.time_ns()  # names sort by build time
    final = cache_root() / f"{key}.{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now // 10**9))}.{now % 10**9:09d}" \
        f"-{secrets.token_hex(3)}"
    _writing(built.rename, final)
    return final


ABANDONED_AFTER_S = 24 * 3600
SUPERSEDED_AFTER_S = 6 * 3600  # a run reading a store marks it used every SUPERSEDED_AFTER_S / 10


def remove_abandoned_builds() -> None:
    """Temporary directories of builds that died (killed, crashed): their process is gone (this host), or
    nothing was written in them for a day (any host, with a builder recorded or not); stores set aside a day
    ago; builds a newer build of the same data replaced, once no run has used them for SUPERSEDED_AFTER_S."""
    for directory in cache_root().glob(".*.building-*"):
        try:
            newest = max((f.stat().st_mtime for f in directory.rglob("*")), default=directory.stat().st_mtime)
        except OSError:
            continue  # being removed right now
        if time.time() - newest > ABANDONED_AFTER_S or _builder_dead(directory):
            shutil.rmtree(directory, ignore_errors=True)
    for directory in cache_root().glob(".*.replaced-*"):  # set aside (replaced, damaged) a day ago
        try:
            if time.time() - directory.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(directory, ignore_errors=True)
        except OSError:
            continue
    for store in _superseded():
        shutil.rmtree(out_of_sight(store), ignore_errors=True)


def _builder_dead(directory: Path) -> bool:
    try:
        builder = json.loads((directory / "builder.json").read_text())
        return builder.get("host") == socket.gethostname() and not _process_alive(int(builder["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False  # being created right now, or no builder recorded: by age only


def _superseded() -> list[Path]:
    """Complete builds with a newer build of the same data, unused for SUPERSEDED_AFTER_S."""
    by_key: dict[str, list[Path]] = {}
    for directory in cache_root().glob("[!.]*.*"):
        if (directory / "meta.json").is_file():
            by_key.setdefault(directory.name.split(".")[0], []).append(directory)
    old = []
    for builds in by_key.values():
        for directory in sorted(builds)[:-1]:  # all but the newest (names sort by build time)
            try:
                if time.time() - directory.stat().st_mtime > SUPERSEDED_AFTER_S:
                    old.append(directory)
            except OSError:
                continue
    return old


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
