"""`vlmtune predict`: base model + adapter over a dataset into a prediction JSONL.

    vlmtune predict --model_name_or_path /data/Qwen2.5-VL-7B-Instruct --adapter_name_or_path /output/my_task \\
        --dataset my_test --dataset_dir data --save_name runs/test/predictions.jsonl
    vlmtune predict predict.yaml batch_size=16                        # the same keys in a YAML
    vlmtune predict ... --backend vllm --vllm_config '{"tensor_parallel_size": 4}'

The flags are those of LLaMA-Factory's batch-inference script (`scripts/vllm_infer.py`), with safer
defaults: temperature 0 (greedy, not 0.95), and label scoring (`--mode score`) whenever the answers
form a small closed set or `--labels` is given: P(label) for every candidate label, `predict` = the
most probable label, no invalid answers. `--mode generate` writes the generated text instead.

Each line of the output: `id`, `images`, `prompt` (the rendered prompt, `<image>` not expanded),
`predict`, `label`, and in score mode `scores` {label: probability}. Rows are written as they come;
rerunning the same command after a crash continues where it stopped (see `infer/output.py`).
`--save_name` may not be one of the run's inputs (the dataset, dataset_info.json, an image, a model or
adapter file); `--overwrite` keeps the old file until the new one is complete.
The image pixel limits default to the ones saved with the adapter.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from vlmtune import allocator
from vlmtune.config import Config, build_config, key_sections, parse_override, read_yaml
from vlmtune.errors import VlmtuneError
from vlmtune.launch import (local_rank_and_world, rank_and_world, relaunch_under_torchrun,
                            share_cores_between_local_ranks, torchrun_processes, visible_gpus)

DEFAULT_SAVE_NAME = "generated_predictions.jsonl"  # LLaMA-Factory's default
# Seconds to pause after each batch: lets a person (or a test) watch rows arrive and kill the run.
DELAY_ENV = "VLMTUNE_PREDICT_BATCH_DELAY"


@dataclass
class PredictArgs:
    """Settings only `vlmtune predict` has (the model and data keys are the training YAML's)."""

    save_name: str = field(default=DEFAULT_SAVE_NAME, metadata={"help": "Output JSONL path."})
    batch_size: int = field(default=8, metadata={"help": "Samples per forward pass (vLLM: per request batch)."})
    workers: int = field(default=0, metadata={
        "help": "transformers backend, score mode: batches scored at once, each on its share of the torch "
                "threads. 0 = auto: 2 on a CPU, 1 on a GPU."})
    backend: str = field(default="transformers", metadata={"help": "transformers (CPU or GPU) or vllm (GPU)."})
    mode: str | None = field(default=None, metadata={
        "help": "score (label probabilities) or generate (text). Default: score when the answers form a "
                "small closed set or labels are given, else generate."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generate mode: most tokens per answer."})
    temperature: float = field(default=0.0, metadata={"help": "Generate mode: 0 = greedy; > 0 samples (seeded)."})
    vllm_config: dict = field(default_factory=dict, metadata={
        "help": "Extra vllm.LLM arguments as JSON, e.g. '{\"tensor_parallel_size\": 4}'."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing save_name instead of resuming. The new rows go to a temporary file that "
                "replaces it once every row is written: a run that fails leaves the old predictions."})


PREDICT_KEYS = {f.name: f for f in dataclasses.fields(PredictArgs)}
# Shared keys that are also flags (the rest can go in the YAML or as key=value).
SHARED_FLAGS = ("model_name_or_path", "adapter_name_or_path", "template", "enable_thinking", "dataset", "dataset_dir",
                "max_samples",
                "image_max_pixels", "image_min_pixels", "labels", "positive_label", "default_system", "seed",
                "cutoff_len", "attn_implementation", "cache_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune predict", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    parser.add_argument("config", nargs="?", help="optional YAML with any of these keys")
    parser.add_argument("overrides", nargs="*", help="key=value settings (override the YAML)")
    shared = key_sections()
    own_help = {
        "dataset": "Dataset name(s) from dataset_info.json to predict, comma separated.",
        "image_max_pixels": "Largest image area in pixels (default: the one saved with the adapter).",
        "image_min_pixels": "Smallest image area in pixels (default: the one saved with the adapter).",
        "labels": "Candidate answers for score mode, comma separated (default: the dataset's answers when they "
                  "form a small closed set).",
        "positive_label": "Positive label of the summary metrics (default 满足要求).",
        "seed": "Seed of sampling (temperature > 0).",
        "cutoff_len": "Accepted for training YAMLs; prediction never truncates.",
    }
    for key in SHARED_FLAGS:
        text = shared[key][1].metadata.get("help", "") if key in shared else ""
        text = own_help.get(key) or (text.split(". ")[0].rstrip(".") + "." if text else None)
        parser.add_argument(f"--{key}", default=None, help=text)
    for key in ("save_name", "batch_size", "workers", "backend", "mode", "max_new_tokens", "temperature",
                "vllm_config"):
        parser.add_argument(f"--{key}", default=None, help=PREDICT_KEYS[key].metadata["help"])
    for key, help_text in (("bf16", "load the model in bfloat16"), ("fp16", "load the model in float16"),
                           ("overwrite", PREDICT_KEYS["overwrite"].metadata["help"]),
                           ("skip_bad_records", "predict without records that fail the data checks")):
        parser.add_argument(f"--{key}", action="store_const", const=True, default=None, help=help_text)
    return parser


def _coerce_predict(key: str, value: Any, origin: str) -> Any:
    kinds = {"batch_size": int, "workers": int, "max_new_tokens": int, "temperature": float, "overwrite": bool}
    kind = kinds.get(key, str)
    try:
        if key == "vllm_config":
            parsed = json.loads(value) if isinstance(value, str) else value
            if parsed is None:
                return {}
            if not isinstance(parsed, dict):
                raise ValueError
            return parsed
        if value is None:
            return PredictArgs.__dataclass_fields__[key].default
        if kind is bool:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        return kind(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        what = {int: "an integer", float: "a number", str: "a string"}.get(kind, "a JSON object")
        if key == "vllm_config":
            what = "a JSON object such as '{\"tensor_parallel_size\": 4}'"
        raise VlmtuneError(f"{origin}: '{key}' must be {what}, got {value!r}") from None


def parse_args(argv: list[str]) -> tuple[Config, PredictArgs, set[str]]:
    """(shared config, predict settings, keys the user set explicitly) from YAML + overrides + flags."""
    args = build_parser().parse_args(argv)
    config_path, overrides = args.config, list(args.overrides)
    if config_path and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        overrides.insert(0, config_path)
        config_path = None
    values: dict[str, Any] = read_yaml(config_path) if config_path else {}
    origin = config_path or "command line"
    for item in overrides:
        key, value = parse_override(item)
        values[key] = value
    for key in (*SHARED_FLAGS, "save_name", "batch_size", "workers", "backend", "mode", "max_new_tokens",
                "temperature", "vllm_config", "bf16", "fp16", "overwrite", "skip_bad_records"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if isinstance(values.get("labels"), str):
        values["labels"] = values["labels"].replace("，", ",")  # a full-width comma, as typed with a CJK IME
    shared_keys = key_sections()
    for key in values:
        if key not in shared_keys and key not in PREDICT_KEYS:
            close = difflib.get_close_matches(key, [*shared_keys, *PREDICT_KEYS], n=1, cutoff=0.6)
            raise VlmtuneError(f"{origin}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    predict_values = {k: _coerce_predict(k, v, origin) for k, v in values.items() if k in PREDICT_KEYS}
    cfg = build_config({k: v for k, v in values.items() if k in shared_keys}, origin)
    pargs = PredictArgs(**predict_values)
    if pargs.backend not in ("transformers", "vllm"):
        raise VlmtuneError(f"{origin}: 'backend' must be transformers or vllm, got '{pargs.backend}'")
    if pargs.mode not in (None, "score", "generate"):
        raise VlmtuneError(f"{origin}: 'mode' must be score or generate, got '{pargs.mode}'")
    for key in ("batch_size", "max_new_tokens"):
        if getattr(pargs, key) <= 0:
            raise VlmtuneError(f"{origin}: '{key}' must be > 0, got {getattr(pargs, key)}")
    if pargs.workers < 0:
        raise VlmtuneError(f"{origin}: 'workers' must be >= 0 (0 = auto), got {pargs.workers}")
    if pargs.temperature < 0:
        raise VlmtuneError(f"{origin}: 'temperature' must be >= 0, got {pargs.temperature}")
    return cfg, pargs, set(values)


# ---------------------------------------------------------------------------------------------


def load_test_data(cfg: Config, log=print):
    """The dataset's conversations in order; bad records refuse the run (or are skipped when asked)."""
    from vlmtune.data.checks import check_conversations, without_bad
    from vlmtune.data.loader import load_datasets

    if not cfg.data.dataset:
        raise VlmtuneError("no dataset given (pass --dataset NAME --dataset_dir DIR)")
    loaded = load_datasets(cfg.data.dataset, cfg.data.dataset_dir, cfg.data.max_samples)
    problems = loaded.problems + check_conversations(loaded.conversations).problems
    conversations = without_bad(loaded.conversations, problems)
    if problems:
        bad = len({(p.file, p.record) for p in problems})
        if not cfg.data.skip_bad_records:
            raise VlmtuneError(f"{problems[0]} ({bad} bad record(s) in all; run `vlmtune data check`, or pass "
                               f"--skip_bad_records to predict without them)")
        for problem in problems[:20]:
            log(f"  skipped: {problem}")
        log(f"skipping {bad} bad record(s) (skip_bad_records)")
    if not conversations:
        raise VlmtuneError(f"dataset '{cfg.data.dataset}' in {cfg.data.dataset_dir}: no usable records")
    ids = [c.id for c in conversations]
    if len(set(ids)) != len(ids):
        raise VlmtuneError(f"dataset '{cfg.data.dataset}': the same dataset is named twice (sample ids repeat)")
    return conversations


def prediction_inputs(cfg: Config, conversations) -> list[Path]:
    """Every file this run reads: the registry, the dataset files, the images, the model's and adapter's files."""
    from vlmtune.data.registry import REGISTRY_FILE, resolve

    inputs = [Path(cfg.data.dataset_dir) / REGISTRY_FILE]
    inputs += [entry.path for entry in resolve(cfg.data.dataset, cfg.data.dataset_dir)]
    inputs += [Path(image) for conv in conversations for image in conv.images]
    for directory in (cfg.model.model_name_or_path, cfg.model.adapter_name_or_path):
        if directory and Path(directory).expanduser().is_dir():
            inputs += [p for p in Path(directory).expanduser().iterdir() if p.is_file()]
    return inputs


def refuse_overwriting_inputs(save_name: Path, cfg: Config, conversations) -> None:
    """save_name (and its .meta.json) must not be a file the run reads: `--save_name data/my_test.json`
    would otherwise replace the dataset with its own predictions."""
    from vlmtune.files import refuse_input_as_output
    from vlmtune.infer.output import meta_path

    inputs = prediction_inputs(cfg, conversations)
    for output in (save_name, meta_path(save_name)):
        refuse_input_as_output(output, inputs, "--save_name")


def choose_mode(pargs: PredictArgs, cfg: Config, conversations) -> tuple[str, list[str] | None, str]:
    """(mode, label set or None, why) — score when there is a closed label set, unless told otherwise."""
    from vlmtune.infer.scoring import infer_label_set

    labels = [label.strip() for label in cfg.data.labels] if cfg.data.labels else None
    inferred = labels is None
    if labels is None:
        labels = infer_label_set(conversations)
        positive = cfg.data.positive_label.strip()
        if labels is not None and positive in labels:  # positive first: the order scores are written in
            labels = [positive] + [label for label in labels if label != positive]
    if labels is not None and len(set(labels)) != len(labels):
        raise VlmtuneError(f"labels: {labels} has duplicates")
    if pargs.mode == "score":
        if labels is None:
            distinct = len({(c.answer or "").strip() for c in conversations})
            raise VlmtuneError(f"--mode score needs a closed label set: pass --labels a,b (the dataset's answers "
                               f"have {distinct} distinct values)")
        return "score", labels, "--mode score"
    if pargs.mode == "generate":
        return "generate", labels, "--mode generate"
    if labels is None:
        return "generate", None, "the answers do not form a small closed set (pass --labels to score)"
    why = f"the answers form the label set {labels}" if inferred else "--labels given"
    return "score", labels, why


def fingerprint(cfg: Config, pargs: PredictArgs, mode: str, labels, predictor) -> dict[str, Any]:
    """What produced the rows (compared on resume; see output.FINGERPRINT)."""
    from vlmtune.data.registry import resolve
    from vlmtune.infer.output import file_digest

    datasets = [{"name": e.name, "file": str(e.path.resolve()), "sha256": file_digest(e.path)}
                for e in resolve(cfg.data.dataset, cfg.data.dataset_dir)]
    adapter = predictor.adapter_dir
    weights = None
    if adapter is not None:
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if (adapter / name).is_file():
                weights = file_digest(adapter / name)
                break
    return {
        "datasets": datasets,
        "model": str(Path(predictor.model_dir).resolve()),
        "adapter": str(adapter.resolve()) if adapter is not None else None,
        "adapter_weights": weights,
        "backend": pargs.backend,
        "mode": mode,
        "labels": labels if mode == "score" else None,
        "max_new_tokens": pargs.max_new_tokens if mode == "generate" else None,
        "temperature": pargs.temperature if mode == "generate" else None,
        "seed": cfg.train.seed if mode == "generate" and pargs.temperature > 0 else None,
        "image_max_pixels": predictor.max_pixels,
        "image_min_pixels": predictor.min_pixels,
        "dtype": predictor.dtype_name,
        "default_system": cfg.data.default_system,
        "template": predictor.processor.template.label,
    }


def make_predictor(cfg: Config, pargs: PredictArgs, explicit: set[str], conversations=(), log=print, device=None):
    """The engine for the chosen backend (transformers here; vLLM imported only when asked for)."""
    max_pixels = cfg.model.image_max_pixels if "image_max_pixels" in explicit else None
    min_pixels = cfg.model.image_min_pixels if "image_min_pixels" in explicit else None
    # Unless given, the adapter's template (saved by training), else the model family's default.
    chat = dict(template=cfg.data.template,
                enable_thinking=cfg.data.enable_thinking if "enable_thinking" in explicit else None)
    if pargs.backend == "vllm":
        from vlmtune.infer.vllm_backend import VllmPredictor

        return VllmPredictor.load(cfg.model.model_name_or_path, cfg.model.adapter_name_or_path, max_pixels,
                                  min_pixels, bf16=cfg.train.bf16, fp16=cfg.train.fp16,
                                  vllm_config=pargs.vllm_config, cache_dir=cfg.model.cache_dir,
                                  revision=cfg.model.model_revision,
                                  max_images=max((len(c.images) for c in conversations), default=1),
                                  seed=cfg.train.seed, conversations=conversations,
                                  max_new_tokens=pargs.max_new_tokens, log=log, **chat)
    from vlmtune.infer.engine import load_engine
    from vlmtune.infer.runner import TransformersPredictor

    engine = load_engine(cfg.model.model_name_or_path, cfg.model.adapter_name_or_path, max_pixels, min_pixels,
                         bf16=cfg.train.bf16, fp16=cfg.train.fp16,
                         attn_implementation=cfg.model.attn_implementation, cache_dir=cfg.model.cache_dir,
                         revision=cfg.model.model_revision, merge_adapter=True, device=device, log=log, **chat)
    return TransformersPredictor(engine, workers=pargs.workers)


def print_summary(path: Path, n_new: int, n_done_before: int, seconds: float, labels, positive: str, log=print):
    from vlmtune.evaluate.metrics import load_predictions, metrics_of_file
    from vlmtune.evaluate.table import format_table

    rate = n_new / seconds if seconds > 0 and n_new else 0.0
    resumed = f" (+{n_done_before} from an earlier run)" if n_done_before else ""
    log(f"predicted {n_new} samples in {seconds:.1f} s ({rate:.2f} samples/s){resumed}; wrote {path}")
    records = load_predictions(path)
    if any(not r["label"].strip() for r in records):
        return
    label_set = labels
    if label_set is not None and positive.strip() not in label_set:
        log(f"note: the positive label {positive!r} is not one of {label_set}; metrics use {label_set[0]!r}")
        positive = label_set[0]
    try:
        metrics = metrics_of_file(records, path, positive=positive, label_set=label_set)
    except VlmtuneError as exc:  # e.g. reference answers outside --labels: the predictions are still fine
        log(f"no metrics: {exc}")
        return
    log(format_table(metrics))
    log(f"(`vlmtune eval {path}` saves these metrics; `vlmtune report {path}` makes an HTML report)")


def main(argv: list[str]) -> int:
    cfg, pargs, explicit = parse_args(argv)
    rank, world = rank_and_world()
    if pargs.backend == "transformers" and world == 1:
        processes = torchrun_processes(False, visible_gpus(), os.environ)
        if processes is not None:  # several GPUs: one process per GPU, each its share of the dataset
            relaunch_under_torchrun("predict", argv, processes)
    if world > 1 and pargs.backend == "vllm":
        raise VlmtuneError("--backend vllm runs in one process (spread a large model with vllm_config's "
                           "tensor_parallel_size); start it without torchrun")
    allocator.for_prediction()  # before torch allocates: see vlmtune/allocator.py
    log = print if rank == 0 else (lambda *_: None)
    conversations = load_test_data(cfg, log)
    refuse_overwriting_inputs(Path(pargs.save_name), cfg, conversations)
    if cfg.model.adapter_name_or_path:
        from vlmtune.infer.engine import read_adapter_config

        read_adapter_config(cfg.model.adapter_name_or_path)  # a bad adapter fails before the model loads
    if not cfg.model.model_name_or_path and not cfg.model.adapter_name_or_path:
        raise VlmtuneError("model_name_or_path is not set (pass --model_name_or_path)")
    mode, labels, why = choose_mode(pargs, cfg, conversations)
    log(f"dataset: {cfg.data.dataset} ({len(conversations)} samples); mode: {mode} ({why})"
        + (f"; {world} processes, each its share" if world > 1 else ""))

    device = None
    if world > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local_rank_and_world()[0]}"
        else:
            share_cores_between_local_ranks()
    predictor = make_predictor(cfg, pargs, explicit, conversations, log, device=device)
    if mode == "score":
        from vlmtune.infer.scoring import label_token_ids

        try:
            label_token_ids(labels, predictor.processor)
        except ValueError as exc:
            raise VlmtuneError(f"labels {labels} cannot be scored: {exc}") from None
    from vlmtune.infer.output import PredictionFile

    meta = fingerprint(cfg, pargs, mode, labels, predictor)
    save = Path(pargs.save_name)
    ids = [c.id for c in conversations]
    started = time.perf_counter()
    if world == 1:
        done = predict_into(PredictionFile(save, meta), conversations, ids, predictor, cfg, pargs, mode, labels, log)
    else:
        # Each process predicts a contiguous block into its own part file (resumable on its own); when all
        # are done, rank 0 joins the parts in dataset order into save_name, and removes them.
        final = PredictionFile(save, meta)
        if final.complete(ids) and not pargs.overwrite:
            done = len(conversations)
            log(f"{save}: already holds every row of this run")
        else:
            block = -(-len(conversations) // world)
            mine = conversations[rank * block:(rank + 1) * block]
            part = PredictionFile(part_path(save, rank, world), {**meta, "part": [rank, world]})
            predict_into(part, mine, [c.id for c in mine], predictor, cfg, pargs, mode, labels, log)
            done = 0
            barrier()
            if rank == 0:
                join_parts(final, [part_path(save, r, world) for r in range(world)], ids)
            barrier()
    predictor.close()
    if rank == 0:
        print_summary(save, len(conversations) - done, done, time.perf_counter() - started, labels,
                      cfg.data.positive_label, log)
    return 0


def part_path(save: Path, rank: int, world: int) -> Path:
    return save.with_name(f"{save.name}.part-{rank}-of-{world}")


def barrier() -> None:
    """Wait for every prediction process (gloo: any device), setting up the process group on first use."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def join_parts(final, parts: list[Path], ids: list[str]) -> None:
    """The parts' rows, in order, into the final file (written whole, then the parts removed)."""
    from vlmtune.infer.output import meta_path

    final.start(ids, overwrite=True)
    written = []
    for path in parts:
        if not path.is_file():  # another node's rank wrote it where this node cannot see
            final.close()
            raise VlmtuneError(f"{path}: a rank's part is missing; with ranks on several nodes save_name must be on "
                               f"a filesystem every node sees")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        written += [str(r["id"]) for r in rows]
        final.write(rows)
    if written != ids:
        final.close()
        raise VlmtuneError(f"{final.path}: the parts hold {len(written)} rows, not the dataset's {len(ids)} in order; "
                           f"rerun the same command to complete them")
    final.commit()
    final.close()
    for path in parts:
        path.unlink(missing_ok=True)
        meta_path(path).unlink(missing_ok=True)


def predict_into(out, conversations, ids, predictor, cfg, pargs, mode, labels, log) -> int:
    """Predict the rows `out` does not hold yet (resuming after a crash); returns how many it held."""
    done = out.start(ids, overwrite=pargs.overwrite)
    if out.replacing:
        log(f"--overwrite: new rows go to {out.replacing}, which replaces {out.path} once every row is written")
    if out.repaired:
        log(f"{out.path}: cut a torn last line (the previous run stopped while writing)")
    if done:
        log(f"resuming: {done} of {len(conversations)} rows already in {out.path}")
    todo = conversations[done:]
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    default_system = cfg.data.default_system
    try:
        if todo:
            predictor.check(todo[:4], labels, mode, default_system)
        from tqdm import tqdm

        from vlmtune.infer.runner import predict_batches

        batches = predict_batches(predictor, todo, mode, labels, pargs.batch_size, pargs.max_new_tokens,
                                  pargs.temperature, cfg.train.seed, default_system, first_index=done)
        with tqdm(total=len(conversations), initial=done, unit="sample", disable=None, file=sys.stderr) as bar:
            for chunk, rows in batches:
                out.write(rows)
                bar.update(len(chunk))
                if delay:
                    time.sleep(delay)
        out.commit()
    finally:
        if out.replacing:
            log(f"{out.path}: left as it was (the run stopped before every row was written)")
        out.close()
    return done


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
