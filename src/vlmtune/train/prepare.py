"""Everything before the first step: data (checked, split, encoded once) and the model (+ adapter)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from vlmtune.config import Config
from vlmtune.data.checks import answer_distribution, describe_distribution
from vlmtune.data.conversation import Problem
from vlmtune.data.encode import IGNORE_INDEX, EncodedSample
from vlmtune.data.loader import load_splits, refuse_or_skip
from vlmtune.errors import VlmtuneError
from vlmtune.labels import resolve_label_set


@dataclass
class PreparedData:
    train: Sequence[EncodedSample]  # data.store.StoredSamples: read from the encoded store when indexed
    val: Sequence[EncodedSample]
    label_set: list[str] | None = None
    skipped: list[Problem] = field(default_factory=list)


class Background:
    """`fn(*args, **kwargs)` in a daemon thread; `result()` waits for it and re-raises its error.

    A daemon thread, so an error on the main thread (bad data) ends the process at once instead of
    waiting for, say, a 7B model to finish loading. With in_thread=False it simply runs here and now.
    """

    def __init__(self, fn, *args, in_thread: bool = True, **kwargs):
        self._value, self._error = None, None

        def run():
            try:
                self._value = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 — handed to the caller by result()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"vlmtune-{fn.__name__}", daemon=True)
        if in_thread:
            self._thread.start()
        else:
            run()

    def result(self):
        if self._thread.ident is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def worker_count(requested: int | None, local_world_size: int) -> int:
    """Encoding threads: what was asked, within the cores this process may use."""
    cores = max(1, (os.cpu_count() or 1) // max(local_world_size, 1))
    return max(1, min(requested or cores, cores))


def prepare_data(cfg: Config, processor, log, local_rank: int = 0, local_world_size: int = 1,
                 barrier=lambda: None) -> PreparedData:
    """Checked, split and encoded data: the encoded records come from the on-disk store (`data.store`),
    built by the node's ranks together on the first run and reused by the next ones."""
    from vlmtune.data.store import StoredSamples, open_or_build

    splits = load_splits(cfg.data, cfg.train.seed, processor)
    refuse_or_skip(splits, cfg.data.skip_bad_records, log)
    log(f"Loaded {splits.n_records} records from {cfg.data.dataset}"
        + (f" and {cfg.data.eval_dataset}" if cfg.data.eval_dataset else "")
        + f": train {len(splits.train)}, val {len(splits.val)}")
    log(f"answers (train): {describe_distribution(answer_distribution(splits.train))}")
    workers = worker_count(cfg.data.preprocessing_num_workers, local_world_size)
    started = time.perf_counter()
    store, reused = open_or_build(splits.train + splits.val, processor, cfg.data.cutoff_len, cfg.data.default_system,
                                  local_rank, local_world_size, barrier, workers, rebuild=cfg.data.overwrite_cache)
    problems = store.problems
    if problems:
        for problem in problems:
            log(f"  {problem}")
        if not cfg.data.skip_bad_records:
            raise VlmtuneError(f"{len(problems)} record(s) could not be encoded (listed above); fix them or set "
                               f"skip_bad_records: true")
        log(f"skipping {len(problems)} record(s) that could not be encoded")
    train = StoredSamples(store, [c for c in splits.train if c in store])
    val = StoredSamples(store, [c for c in splits.val if c in store])
    if not train:
        raise VlmtuneError(f"{cfg.data.dataset}: no usable training records")
    label_set, _ = resolve_label_set(cfg.data.labels, [c.answer for c in splits.train + splits.val],
                                     cfg.data.positive_label)
    how = ("reused the encoded-data store" if reused else
           f"encoded into the store by {local_world_size} rank(s) × {workers} thread(s), each image decoded once")
    log(f"{len(train)} training and {len(val)} validation samples: {how} ({store.directory}, "
        f"{store.disk_bytes() / 2**20:,.1f} MiB, {time.perf_counter() - started:.1f} s)")
    return PreparedData(train, val, label_set, splits.problems + problems)


def describe_example(sample: EncodedSample, processor) -> str:
    """One rendered training example, image pads collapsed, and what the labels keep."""
    tokenizer, image_pad = processor.tokenizer, processor.template.tokens.image_pad
    text = tokenizer.decode(sample.input_ids, skip_special_tokens=False)
    n_pad = int((sample.input_ids == processor.image_token_id).sum())
    text = text.replace(image_pad * n_pad, f"{image_pad}×{n_pad}") if n_pad else text
    labels = tokenizer.decode(sample.input_ids[sample.labels != IGNORE_INDEX], skip_special_tokens=False)
    return f"training example ({len(sample)} tokens, {sample.num_label_tokens} labelled):\n{text}\nlabels:\n{labels}"
