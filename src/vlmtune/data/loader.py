"""From dataset names to checked train / validation conversations.

The order matters: read every record, check them all (structure, images, token budget), drop the
bad ones, then split — so the validation split is stratified over records that can actually be used,
and `vlmtune data check` shows exactly the split training will use.

A record that `num_samples` drew more than once (`formats.load_entry`) is checked once and split as one
record: all its copies train, or one copy validates — validation never scores a record training saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmtune.config import DataConfig
from vlmtune.data.checks import SampleStats, check_conversations, without_bad
from vlmtune.data.conversation import Conversation, LoadedData, Problem
from vlmtune.data.formats import load_entry
from vlmtune.data.registry import resolve
from vlmtune.data.split import stratified_split
from vlmtune.errors import VlmtuneError


def load_datasets(names: str, dataset_dir: str, max_samples: int | None, media_dir: str | None = None,
                  seed: int = 42) -> LoadedData:
    """Every named dataset, converted; fatal problems (a file that cannot be read) raise. Relative image paths
    resolve against media_dir (LLaMA-Factory's key), else dataset_dir; `seed` draws the entries' num_samples
    (default: the config's default seed)."""
    loaded = LoadedData()
    for entry in resolve(names, dataset_dir, media_dir):
        part = load_entry(entry, max_samples, seed)
        fatal = [p for p in part.problems if p.fatal]
        if fatal:
            raise VlmtuneError(str(fatal[0]))
        loaded.conversations += part.conversations
        loaded.problems += part.problems
    return loaded


@dataclass
class Splits:
    train: list[Conversation]
    val: list[Conversation]
    problems: list[Problem] = field(default_factory=list)  # records with these are not in the splits
    stats: dict[str, SampleStats] = field(default_factory=dict)  # id → token counts (with a processor)
    n_records: int = 0  # records read, good and bad


def load_splits(data: DataConfig, seed: int, processor=None, decode_images: bool = False) -> Splits:
    """Checked training and validation conversations: eval_dataset when given, else a stratified split.

    decode_images: decode every image to check it (`vlmtune data check`); training decodes them anyway.
    """
    if not data.dataset:
        raise VlmtuneError("no dataset given (set `dataset` in the YAML or pass --dataset)")
    train = load_datasets(data.dataset, data.dataset_dir, data.max_samples, data.media_dir, seed)
    val = (load_datasets(data.eval_dataset, data.dataset_dir, data.max_samples, data.media_dir, seed)
           if data.eval_dataset else LoadedData())
    problems = train.problems + val.problems
    # A record drawn again by num_samples is the same Conversation: checked (images decoded, tokens counted) once.
    once = list({id(c): c for c in train.conversations + val.conversations}.values())
    checked = check_conversations(once, processor, data.cutoff_len, data.default_system, decode=decode_images)
    problems = sorted(problems + checked.problems, key=lambda p: (p.file, -1 if p.record is None else p.record))
    n_records = len(train.conversations) + len(val.conversations) + len({(p.file, p.record) for p in
                                                                          train.problems + val.problems})
    good_train = without_bad(train.conversations, problems)
    if data.eval_dataset:
        train_part, val_part = good_train, without_bad(val.conversations, problems)
    else:
        train_part, val_part = split_records(good_train, data.val_size, seed)
        if data.val_size > 0 and len(train_part) <= 1:
            raise VlmtuneError(f"val_size {data.val_size:g}: leaves {len(train_part)} training record(s) of "
                               f"{len(good_train)} usable ones; lower val_size or add records")
    return Splits(train_part, val_part, problems, checked.stats, n_records)


def split_records(conversations: list[Conversation], val_size: float, seed: int
                  ) -> tuple[list[Conversation], list[Conversation]]:
    """`stratified_split` over distinct records (file, index): the copies num_samples drew of a record all go to
    training, or one of them to validation. Without copies, exactly stratified_split."""
    distinct: dict[tuple[str, int], Conversation] = {}
    for conv in conversations:
        distinct.setdefault((conv.source, conv.index), conv)
    train, val = stratified_split(list(distinct.values()), val_size, seed)
    in_val = {(c.source, c.index) for c in val}
    return [c for c in conversations if (c.source, c.index) not in in_val], val


def refuse_or_skip(splits: Splits, skip_bad_records: bool, log=print) -> None:
    """Training's rule: bad records stop the run unless the user opted to skip them."""
    if not splits.problems:
        return
    bad_records = {(p.file, p.record) for p in splits.problems}
    for problem in splits.problems[:50]:
        log(f"  {problem}")
    if len(splits.problems) > 50:
        log(f"  … {len(splits.problems) - 50} more (run `vlmtune data check` for the full list)")
    if not skip_bad_records:
        raise VlmtuneError(f"{len(splits.problems)} data problem(s) in {len(bad_records)} record(s) (listed above); "
                           f"fix them or set skip_bad_records: true to train without those records")
    log(f"skipping {len(bad_records)} bad record(s) of {splits.n_records} (skip_bad_records: true)")
