"""Everything before the first step: data (checked, split, encoded once) and the model (+ adapter)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from vlmtune.config import Config
from vlmtune.data.checks import answer_distribution, describe_distribution, label_notes
from vlmtune.data.conversation import Conversation, Problem
from vlmtune.data.encode import IGNORE_INDEX, EncodedSample
from vlmtune.data.loader import load_splits, refuse_or_skip
from vlmtune.errors import VlmtuneError
from vlmtune.labels import answers_outside, normalize_answer, resolve_label_set
from vlmtune.train.selection import check_selection


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


def prepare_data(cfg: Config, processor, log, ranks=None) -> PreparedData:
    """Checked, split and encoded data: the encoded records come from the on-disk store (`data.store`),
    built by the node's ranks together on the first run and reused by the next ones. Rank 0 alone reads and
    checks the data and hands the splits to the others; each node's leader alone finds (and verifies) or plans
    the store (`ranks`: `launch.Ranks`, every rank calls this)."""
    from vlmtune.data.store import StoredSamples, open_or_build
    from vlmtune.launch import Ranks

    ranks = ranks or Ranks()
    train_part, val_part, label_set, skipped = ranks.from_first(lambda: checked_splits(cfg, processor, log,
                                                                                       ranks.world))
    workers = worker_count(cfg.data.preprocessing_num_workers, ranks.local_world)
    started = time.perf_counter()
    store, reused = open_or_build(train_part + val_part, processor, cfg.data.cutoff_len, cfg.data.default_system,
                                  ranks, workers, rebuild=cfg.data.overwrite_cache, log=log)
    problems = store.problems
    if problems:
        for problem in problems:
            log(f"  {problem}")
        if not cfg.data.skip_bad_records:
            raise VlmtuneError(f"{len(problems)} record(s) could not be encoded (listed above); fix them or set "
                               f"skip_bad_records: true")
        log(f"skipping {len(problems)} record(s) that could not be encoded")
    train = StoredSamples(store, [c for c in train_part if c in store])
    val = StoredSamples(store, [c for c in val_part if c in store])
    if not train:
        raise VlmtuneError(f"{cfg.data.dataset}: no usable training records")
    how = ("reused the encoded-data store" if reused else
           f"encoded into the store by {ranks.local_world} rank(s) × {workers} thread(s), each image decoded once")
    log(f"{len(train)} training and {len(val)} validation samples: {how} ({store.directory}, "
        f"{store.disk_bytes() / 2**20:,.1f} MiB, {time.perf_counter() - started:.1f} s)")
    return PreparedData(train, val, label_set, skipped + problems)


def checked_splits(cfg: Config, processor, log, world_size: int) -> tuple[list, list, list[str] | None, list]:
    """The training and validation conversations, checked (rank 0's part of `prepare_data`): (train, val, label
    set, problems of the records left out)."""
    splits = load_splits(cfg.data, cfg.train.seed, processor)
    refuse_or_skip(splits, cfg.data.skip_bad_records, log)
    log(f"Loaded {splits.n_records} records from {cfg.data.dataset}"
        + (f" and {cfg.data.eval_dataset}" if cfg.data.eval_dataset else "")
        + f": train {len(splits.train)}, val {len(splits.val)}")
    log(f"answers (train): {describe_distribution(answer_distribution(splits.train))}")
    label_set, _ = resolve_label_set(cfg.data.labels, [c.answer for c in splits.train + splits.val],
                                     cfg.data.positive_label)
    check_label_set(label_set, splits.train + splits.val, cfg.data.labels, processor, log)
    check_before_encoding(cfg, splits.train, splits.val, label_set, world_size, log)
    return splits.train, splits.val, label_set, splits.problems


def check_label_set(label_set: list[str] | None, conversations: list[Conversation], given: list[str] | None,
                    processor, log) -> None:
    """Before any step: the label set must be scorable (distinct after tokenisation, each at a token boundary —
    what the first evaluation needs), and what makes it suspicious is said in one line each (`data.checks.label_notes`:
    every answer one label, too many answers for a label set, a third label in a few records)."""
    for line in label_notes(conversations, given):
        log(f"note: {line}")
    if label_set is None or processor is None:
        return
    from vlmtune.infer.scoring import label_token_ids

    try:
        label_token_ids(label_set, processor)
    except ValueError as exc:
        raise VlmtuneError(f"labels {label_set} cannot be scored: {exc}") from None


def check_before_encoding(cfg: Config, train: list[Conversation], val: list[Conversation],
                          label_set: list[str] | None, world_size: int, log) -> None:
    """What the split records already refuse, before the encoding (minutes on a large dataset): a micro-batch
    larger than the training split, given labels that are not the answers, a best-model selection that could
    not select (`train.selection`)."""
    batch = cfg.train.per_device_train_batch_size
    if batch * world_size > len(train):
        ranks = f" × {world_size} ranks" if world_size > 1 else ""
        raise VlmtuneError(f"per_device_train_batch_size: {batch}{ranks} is more than the {len(train)} training "
                           f"records, so every micro-batch would repeat records; use at most "
                           f"{max(1, len(train) // world_size)}")
    if cfg.data.labels:
        records = train + val
        wrong = set(answers_outside(cfg.data.labels, [c.answer for c in records]))
        outside = [c for c in records if normalize_answer(c.answer or "") in wrong]
        if outside:
            first = outside[0]
            scope = ("none of the answers is" if len(outside) == len(records) else
                     f"{len(outside)} of {len(records)} answers are not")
            raise VlmtuneError(f"{first.source}: record {first.index}: answer {normalize_answer(first.answer or '')!r} is "
                               f"not one of labels {cfg.data.labels} ({scope} one of them); fix the labels setting "
                               f"or the answers")
    check_selection(cfg, label_set, [c.answer for c in val], log)


def data_digest(train: Sequence[Conversation], val: Sequence[Conversation]) -> str:
    """What a run trains and validates on, as a checkpoint records it (`loop.run_shape`): every record of each
    split in its order — messages, image paths relative to the dataset file, image sizes. Unlike the store's key
    it ignores where the data lies and the files' times, so a dataset moved or copied elsewhere resumes."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for split, conversations in (("train", train), ("val", val)):
        for conv in conversations:
            folder = os.path.dirname(conv.source)
            images = [[os.path.relpath(path, folder), file_size(path)] for path in conv.images]
            record = [split, os.path.basename(conv.source), conv.index, [[m.role, m.content] for m in conv.messages],
                      images]
            digest.update(json.dumps(record, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def describe_example(sample: EncodedSample, processor) -> str:
    """One rendered training example, image pads collapsed, and what the labels keep."""
    tokenizer, image_pad = processor.tokenizer, processor.template.tokens.image_pad
    text = tokenizer.decode(sample.input_ids, skip_special_tokens=False)
    n_pad = int((sample.input_ids == processor.image_token_id).sum())
    text = text.replace(image_pad * n_pad, f"{image_pad}×{n_pad}") if n_pad else text
    labels = tokenizer.decode(sample.input_ids[sample.labels != IGNORE_INDEX], skip_special_tokens=False)
    return f"training example ({len(sample)} tokens, {sample.num_label_tokens} labelled):\n{text}\nlabels:\n{labels}"
