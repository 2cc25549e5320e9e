"""What `vlmtune data check` and `vlmtune data cache` print: the datasets' counts, answers, token counts and every
problem; the encoded-data stores on disk."""

from __future__ import annotations

import time

from vlmtune.config import Config
from vlmtune.data.checks import answer_distribution, describe_distribution, describe_tokens, label_notes
from vlmtune.data.loader import load_splits
from vlmtune.data.registry import looks_like_path, resolve


def check_report(cfg: Config, processor=None, log=print) -> int:
    """Counts per split, the answer distribution, token counts per sample (with a processor) and every problem
    found as `file: record N: field 'x': what is wrong`. Returns the exit code: 0 when clean, 1 when not."""
    splits = load_splits(cfg.data, cfg.train.seed, processor, decode_images=True)
    train, val, problems = splits.train, splits.val, splits.problems
    bad_records = len({(p.file, p.record) for p in problems})

    names = [n.strip() for n in f"{cfg.data.dataset},{cfg.data.eval_dataset or ''}".split(",") if n.strip()]
    registered = [n for n in names if not looks_like_path(n)]  # datasets given by path are not in dataset_dir
    log(f"datasets: {cfg.data.dataset}" + (f" (eval: {cfg.data.eval_dataset})" if cfg.data.eval_dataset else "")
        + (f" in {cfg.data.dataset_dir}" if registered else ""))
    for line in registry_notes(cfg):
        log(f"note: {line}")
    log(f"records: {splits.n_records} read, {bad_records} with problems; train {len(train)}, val {len(val)}")
    log(f"answers (train): {describe_distribution(answer_distribution(train))}")
    if val:
        log(f"answers (val):   {describe_distribution(answer_distribution(val))}")
    for line in label_notes(train + val, cfg.data.labels):
        log(f"note: {line}")
    if processor is not None:
        stats = [splits.stats[c.id] for c in train + val if c.id in splits.stats]
        ip = processor.image_processor
        log(f"model: {processor.family.name}, template {processor.template.label}; one image token per "
            f"{ip.factor}×{ip.factor} pixels, image pixels {ip.min_pixels}..{ip.max_pixels}")
        log(f"image tokens per sample: {describe_tokens([s.image_tokens for s in stats])}")
        log(f"total tokens per sample: {describe_tokens([s.total_tokens for s in stats])} "
            f"(cutoff_len {cfg.data.cutoff_len})")
    else:
        log("token counts: pass --model_name_or_path (or set it in the YAML) to count tokens per sample")
    log("images: every image decoded in full (a truncated file has a good header)")
    if not problems:
        log("no problems found")
        return 0
    log(f"{len(problems)} problem(s):")
    for problem in problems:
        log(f"  {problem}")
    return 1


def registry_notes(cfg: Config) -> list[str]:
    """The registry keys of the named datasets that LLaMA-Factory does not know (`registry.unknown_keys`), once
    each: ignored by training, so a typo would go unseen."""
    names = ",".join(n for n in (cfg.data.dataset, cfg.data.eval_dataset) if n)
    return list(dict.fromkeys(line for entry in resolve(names, cfg.data.dataset_dir) for line in entry.notes))


def cache_report(clear: bool, unused_days: float, log=print) -> int:
    """The encoded-data stores ($VLMTUNE_CACHE): records, size, when built and last used; `clear` removes them
    (with `unused_days`, only those no run has used for that long)."""
    from vlmtune.data.store import cache_root, list_stores, remove_stores

    stores = remove_stores(unused_days * 86400) if clear else list_stores()
    day = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
    for store in stores:
        log(f"{'removed ' if clear else ''}{store.directory.name}: {store.records} records, "
            f"{store.bytes / 2**20:,.1f} MiB, built {day(store.built_at)}, last used {day(store.used_at)}")
    total = sum(s.bytes for s in stores) / 2**20
    log(f"{cache_root()}: {len(stores)} store(s) {'removed' if clear else 'kept'}, {total:,.1f} MiB")
    return 0
