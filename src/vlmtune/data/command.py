"""`vlmtune data check [CONFIG.yaml] [--dataset NAMES --dataset_dir DIR --model_name_or_path M] [key=value]`

Prints the counts per split, the answer distribution, token counts per sample (with a model) and
every problem found as `file: record N: field 'x': what is wrong`. Exit code 0 when clean, 1 when not.

`vlmtune data cache [--clear] [--unused_days N]` lists the encoded-data stores (`$VLMTUNE_CACHE`): records,
size on disk, when built and last used; `--clear` removes them (with `--unused_days`, only those no run has
used for N days).
"""

from __future__ import annotations

import argparse

from vlmtune.config import load_config
from vlmtune.data.checks import answer_distribution, describe_distribution, describe_tokens
from vlmtune.data.loader import load_splits

FLAG_KEYS = ("dataset", "eval_dataset", "dataset_dir", "model_name_or_path", "cutoff_len", "val_size",
             "max_samples", "image_max_pixels", "image_min_pixels", "template")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune data", description="dataset checks and the encoded-data stores")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help=__doc__.splitlines()[0])
    check.add_argument("config", nargs="?", help="a training YAML (its data and model keys are used)")
    check.add_argument("overrides", nargs="*", help="key=value settings")
    for key in FLAG_KEYS:
        check.add_argument(f"--{key}")
    cache = sub.add_parser("cache", help="list or remove the encoded-data stores")
    cache.add_argument("--clear", action="store_true", help="remove them")
    cache.add_argument("--unused_days", type=float, default=0.0, help="with --clear: only those unused this long")
    args = parser.parse_args(argv)
    if args.action == "cache":
        return run_cache(args.clear, args.unused_days)
    config_path = args.config
    overrides = list(args.overrides)
    if config_path and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        overrides.insert(0, config_path)
        config_path = None
    overrides += [f"{k}={getattr(args, k)}" for k in FLAG_KEYS if getattr(args, k) is not None]
    cfg = load_config(config_path, overrides)
    return run_check(cfg)


def run_cache(clear: bool, unused_days: float) -> int:
    import time

    from vlmtune.data.store import cache_root, list_stores, remove_stores

    stores = remove_stores(unused_days * 86400) if clear else list_stores()
    day = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
    for store in stores:
        print(f"{'removed ' if clear else ''}{store.directory.name}: {store.records} records, "
              f"{store.bytes / 2**20:,.1f} MiB, built {day(store.built_at)}, last used {day(store.used_at)}")
    total = sum(s.bytes for s in stores) / 2**20
    print(f"{cache_root()}: {len(stores)} store(s) {'removed' if clear else 'kept'}, {total:,.1f} MiB")
    return 0


def run_check(cfg) -> int:
    processor = None
    if cfg.model.model_name_or_path:
        from vlmtune.data.processor import load_processor
        from vlmtune.model.load import resolve_model_dir

        processor = load_processor(resolve_model_dir(cfg.model.model_name_or_path, cfg.model.cache_dir),
                                   cfg.model.image_max_pixels, cfg.model.image_min_pixels, cfg.data.template,
                                   cfg.data.enable_thinking)
    splits = load_splits(cfg.data, cfg.train.seed, processor, decode_images=True)
    train, val, problems = splits.train, splits.val, splits.problems
    bad_records = len({(p.file, p.record) for p in problems})

    print(f"datasets: {cfg.data.dataset}" + (f" (eval: {cfg.data.eval_dataset})" if cfg.data.eval_dataset else "")
          + f" in {cfg.data.dataset_dir}")
    print(f"records: {splits.n_records} read, {bad_records} with problems; train {len(train)}, val {len(val)}")
    print(f"answers (train): {describe_distribution(answer_distribution(train))}")
    if val:
        print(f"answers (val):   {describe_distribution(answer_distribution(val))}")
    if processor is not None:
        stats = [splits.stats[c.id] for c in train + val if c.id in splits.stats]
        ip = processor.image_processor
        print(f"model: {processor.family.name}, template {processor.template.label}; one image token per "
              f"{ip.factor}×{ip.factor} pixels, image pixels {ip.min_pixels}..{ip.max_pixels}")
        print(f"image tokens per sample: {describe_tokens([s.image_tokens for s in stats])}")
        print(f"total tokens per sample: {describe_tokens([s.total_tokens for s in stats])} "
              f"(cutoff_len {cfg.data.cutoff_len})")
    else:
        print("token counts: pass --model_name_or_path (or set it in the YAML) to count tokens per sample")
    print("images: every image decoded in full (a truncated file has a good header)")
    if not problems:
        print("no problems found")
        return 0
    print(f"{len(problems)} problem(s):")
    for problem in problems:
        print(f"  {problem}")
    return 1
