"""The encoded-data store: what it reads back equals encoding directly; a second run reuses it; a changed
image setting or data file rebuilds it; a build killed half-way is never trusted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import numpy as np

from helpers import ONE_PER_FAMILY, make_dataset, run_cli, run_inline, truncate, write_config
from vlmtune.data.encode import encode
from vlmtune.data.loader import load_datasets
from vlmtune.data.processor import load_processor
from vlmtune.data.store import CACHE_ENV, StoredSamples, cache_root, open_or_build
from vlmtune.launch import Ranks


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)
def test_stored_samples_equal_direct_encoding(tiny_models, tmp_path, monkeypatch, arch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    processor = load_processor(tiny_models(arch), max_pixels=200 * 200)
    convs = load_datasets("my_dataset", str(make_dataset(tmp_path / "data", n=5)), None).conversations
    store, reused = open_or_build(convs, processor, 4096, None, Ranks(), workers=2)
    assert not reused and (store.directory / "meta.json").is_file()
    samples = StoredSamples(store, convs[::-1])  # any order: found by (file, record)
    for position, conv in enumerate(convs[::-1]):
        want, got = encode(conv, processor, 4096), samples[position]
        assert got.position == position and got.conversation is conv
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
        assert len(got.images) == len(want.images) and all(torch.equal(a, b) for a, b in zip(got.images, want.images))
    again, reused = open_or_build(list(reversed(convs)), processor, 4096, None, Ranks(), workers=1)
    assert reused and again.directory == store.directory  # the order of the records does not matter
    _, reused = open_or_build(convs, processor, 2048, None, Ranks(), workers=1)
    assert not reused  # another cutoff_len is another store


def test_records_drawn_again_by_num_samples_read_back_from_the_store(tiny_model_dir, tmp_path, monkeypatch):
    """num_samples draws a record more than once: every copy (same file, same record) reads back as its encoding."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    data = make_dataset(tmp_path / "data", n=3)
    info = json.loads((data / "dataset_info.json").read_text())
    info["my_dataset"]["num_samples"] = 7
    (data / "dataset_info.json").write_text(json.dumps(info))
    processor = load_processor(tiny_model_dir, max_pixels=200 * 200)
    convs = load_datasets("my_dataset", str(data), None).conversations
    assert len(convs) == 7 and len({(c.source, c.index) for c in convs}) == 3
    store, _ = open_or_build(convs, processor, 4096, None, Ranks(), workers=1)
    assert not store.problems
    samples = StoredSamples(store, convs)
    for position, conv in enumerate(convs):
        assert torch.equal(samples[position].input_ids, encode(conv, processor, 4096).input_ids)
    _, reused = open_or_build(convs, processor, 4096, None, Ranks(), workers=1)
    assert reused


def train_args(model, data, out, *extra):
    return ["train", str(write_config(Path(out).parent / f"{Path(out).name}.yaml", model_name_or_path=str(model),
                                      dataset_dir=str(data), output_dir=str(out), image_max_pixels=50176, max_steps=2,
                                      save_strategy="no", eval_strategy="no", val_size=0, plot_loss=False,
                                      report_to="none", overwrite_cache=False, disable_tqdm=True)), *extra]


@pytest.mark.slow
def test_a_second_run_reuses_the_store_and_a_change_rebuilds_it(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = make_dataset(tmp_path / "data", n=6)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))

    def run(out, *extra):
        result = run_inline(capsys, *train_args(tiny_model_dir, data, tmp_path / out, *extra))
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    assert "encoded into the store" in run("a")
    assert "reused the encoded-data store" in run("b")
    assert "encoded into the store" in run("c", "image_max_pixels=40000")
    records = json.loads((data / "my_dataset.json").read_text())
    records[1]["messages"][-1]["content"] = "不满足要求"  # the data file changed (record 1 was 满足要求)
    (data / "my_dataset.json").write_text(json.dumps(records, ensure_ascii=False))
    assert "encoded into the store" in run("d")
    assert "encoded into the store" in run("e", "overwrite_cache=true")  # LLaMA-Factory's meaning


@pytest.mark.slow
def test_a_build_killed_half_way_is_built_again(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n=60)
    cache = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{CACHE_ENV: str(cache)})
    args = train_args(tiny_model_dir, data, tmp_path / "out", "preprocessing_num_workers=1")
    process = subprocess.Popen([sys.executable, "-m", "vlmtune", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    encoded = cache / "encoded"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        building = list(encoded.glob(".*.building-*/shard-0/images.bin")) if encoded.is_dir() else []
        if building and building[0].stat().st_size > 0:  # half-way through writing the images
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build was not caught half-way"
    assert not list(encoded.glob("*/meta.json"))  # no store a later run would trust
    rerun = run_cli(*args, env={CACHE_ENV: str(cache)})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "encoded into the store" in rerun.stdout and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert len(list(encoded.glob("*/meta.json"))) == 1


def test_a_cache_that_cannot_be_written_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    from vlmtune.errors import VlmtuneError

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache should be")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    processor = load_processor(tiny_model_dir)
    convs = load_datasets("my_dataset", str(make_dataset(tmp_path / "data", n=2)), None).conversations
    with pytest.raises(VlmtuneError, match="writing the encoded-data store failed") as info:
        open_or_build(convs, processor, 4096, None, Ranks(), workers=1)
    assert "\n" not in str(info.value) and str(cache_root()) in str(info.value) and CACHE_ENV in str(info.value)


def build(convs, processor, rebuild=False):
    return open_or_build(convs, processor, 4096, None, Ranks(), workers=1, rebuild=rebuild)


def test_a_rebuild_never_changes_the_files_a_running_job_reads(tiny_model_dir, tmp_path, monkeypatch):
    """overwrite_cache: true in a second job (the seed YAML has it) while a first one trains on the same store: the
    rebuild goes to a directory of its own; the first job's files stay as they are (on NFS too: no ESTALE) until no
    run has used them for a while."""
    from vlmtune.data.store import SUPERSEDED_AFTER_S

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    processor = load_processor(tiny_model_dir, max_pixels=200 * 200)
    convs = load_datasets("my_dataset", str(make_dataset(tmp_path / "data", n=4)), None).conversations
    running, _ = build(convs, processor)
    files = {p: (p.stat().st_ino, p.read_bytes()) for p in running.directory.rglob("*") if p.is_file()}
    rebuilt, reused = build(convs, processor, rebuild=True)
    assert not reused and rebuilt.directory != running.directory
    assert {p: (p.stat().st_ino, p.read_bytes()) for p in running.directory.rglob("*") if p.is_file()} == files
    os.utime(running.directory, (time.time() - SUPERSEDED_AFTER_S - 60,) * 2)  # no run has used it since
    again, reused = build(convs, processor, rebuild=True)
    assert not running.directory.exists() and rebuilt.directory.exists()  # a newer one replaced it, unused: gone
    assert sorted(p.name for p in cache_root().iterdir()) == sorted([rebuilt.directory.name, again.directory.name])


def test_spawned_workers_read_the_files_their_job_opened(tiny_model_dir, tmp_path, monkeypatch):
    """DataLoader workers started by spawn (forkserver: Python 3.14's default) read the store's files the job
    opened, even once the store is gone from the cache (`data cache --clear`, a rebuild) — never a path again."""
    import shutil

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    processor = load_processor(tiny_model_dir, max_pixels=200 * 200)
    convs = load_datasets("my_dataset", str(make_dataset(tmp_path / "data", n=2)), None).conversations
    store, _ = build(convs, processor)
    samples = StoredSamples(store, convs)
    want = [samples[i] for i in range(len(convs))]
    shutil.rmtree(store.directory)
    loader = torch.utils.data.DataLoader(samples, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    got = list(loader)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))


def _flip_a_label(store):
    path = store / "shard-0" / "labels.bin"
    labels = np.frombuffer(path.read_bytes(), dtype=np.int32).copy()
    labels[int(np.flatnonzero(labels != -100)[0])] += 1
    path.write_bytes(labels.tobytes())


def _zero(path):
    path.write_bytes(bytes(path.stat().st_size))


DAMAGE = {  # what can happen to a store between two runs
    "images truncated": lambda store: truncate(store / "shard-0" / "images.bin"),
    "images zeroed": lambda store: _zero(store / "shard-0" / "images.bin"),
    "a label flipped": _flip_a_label,
    "garbage records": lambda store: (store / "shard-0" / "records.npy").write_bytes(
        os.urandom((store / "shard-0" / "records.npy").stat().st_size)),
    "a missing file": lambda store: (store / "shard-0" / "ids.bin").unlink(),
    "garbage meta.json": lambda store: (store / "meta.json").write_text('{"version": 3, "where": '),
}


def test_a_damaged_store_is_built_again_with_one_line(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    processor = load_processor(tiny_model_dir, max_pixels=200 * 200)
    convs = load_datasets("my_dataset", str(make_dataset(tmp_path / "data", n=3)), None).conversations
    store, _ = build(convs, processor)
    for damage, harm in DAMAGE.items():
        harm(store.directory)
        lines = []
        again, reused = open_or_build(convs, processor, 4096, None, Ranks(), 1, log=lines.append)
        assert not reused and len(lines) == 1 and str(store.directory) in lines[0], (damage, lines)
        assert "\n" not in lines[0] and "encoding the data again" in lines[0], (damage, lines)
        for conv in convs:  # never the damaged data
            got, want = again.sample(conv), encode(conv, processor, 4096)
            assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels), damage
            assert all(torch.equal(a, b) for a, b in zip(got.images, want.images)), damage
        store = again


def test_an_image_replaced_by_one_of_the_same_size_and_mtime_rebuilds(tiny_model_dir, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    processor = load_processor(tiny_model_dir, max_pixels=200 * 200)
    convs = load_datasets("my_dataset", str(make_dataset(tmp_path / "data", n=2)), None).conversations
    image = Path(convs[0].images[0])
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image, compress_level=0)
    store, _ = build(convs, processor)
    before = image.stat()
    Image.fromarray(noise[::-1].copy()).save(image, compress_level=0)  # other pixels, the same (stored) size
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again, reused = build(convs, processor)
    assert not reused and again.directory != store.directory
    assert torch.equal(again.sample(convs[0]).images[0], encode(convs[0], processor, 4096).images[0])


def test_builds_without_a_builder_are_removed_a_day_later(tmp_path, monkeypatch):
    """One-rank builds of a launcher whose local world size went unread (DeepSpeed's LOCAL_SIZE) recorded no builder:
    `data cache --clear` (and the next build) removes them once nothing was written in them for a day."""
    from vlmtune.data.store import ABANDONED_AFTER_S, remove_stores

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    builds = {}
    for name, age in (("old", ABANDONED_AFTER_S + 60), ("new", 0)):
        builds[name] = cache_root() / f".{name}.building-otherhost-123"
        (builds[name] / "shard-1").mkdir(parents=True)
        (builds[name] / "shard-1" / "ids.bin").write_bytes(bytes(64))
        for path in (builds[name] / "shard-1" / "ids.bin", builds[name] / "shard-1", builds[name]):
            os.utime(path, (time.time() - age,) * 2)
    remove_stores()
    assert not builds["old"].exists() and builds["new"].exists()


def test_the_directories_of_dead_builds_are_removed(tiny_model_dir, tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    builds = {}
    for name, pid in (("dead", int(dead.stdout)), ("alive", os.getpid())):
        builds[name] = cache_root() / f".{name}.building-{socket.gethostname()}-{pid}"
        (builds[name] / "shard-0").mkdir(parents=True)
        (builds[name] / "builder.json").write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    processor = load_processor(tiny_model_dir, max_pixels=200 * 200)
    convs = load_datasets("my_dataset", str(make_dataset(tmp_path / "data", n=2)), None).conversations
    build(convs, processor)
    assert not builds["dead"].exists() and builds["alive"].exists()  # a build still running is left alone


def test_data_cache_lists_and_removes_the_stores(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from helpers import run_inline

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    processor = load_processor(tiny_model_dir, max_pixels=200 * 200)
    convs = load_datasets("my_dataset", str(make_dataset(tmp_path / "data", n=3)), None).conversations
    old, _ = build(convs[:2], processor)
    recent, _ = build(convs, processor)
    os.utime(old.directory, (time.time() - 3 * 86400,) * 2)  # no run has used it for three days
    listed = run_inline(capsys, "data", "cache")
    assert listed.returncode == 0 and f"{recent.directory.name}: 3 records" in listed.stdout
    assert f"{old.directory.name}: 2 records" in listed.stdout and "2 store(s) kept" in listed.stdout
    pruned = run_inline(capsys, "data", "cache", "--clear", "--unused_days", "2")
    assert f"removed {old.directory.name}" in pruned.stdout and recent.directory.name not in pruned.stdout
    assert not old.directory.exists() and (recent.directory / "meta.json").is_file()
    os.utime(recent.directory, (time.time() - 3 * 86400,) * 2)
    _, reused = build(convs, processor)
    assert reused and time.time() - recent.directory.stat().st_mtime < 60  # reuse marks it used
    assert run_inline(capsys, "data", "cache", "--clear").returncode == 0
    assert not list(cache_root().iterdir())
