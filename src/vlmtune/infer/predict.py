"""Prediction: base model + adapter over a dataset into a prediction JSONL (`vlmtune predict`, and `vlmtune train`
with do_predict — LLaMA-Factory's predict YAML).

Label scoring (mode score) whenever the answers form a small closed set or labels are given: P(label) for every
candidate label, `predict` = the most probable label, no invalid answers. Generation (mode generate, or
`predict_with_generate: true`) writes the generated text instead, greedy unless asked to sample (the predict
section of `config.py`: LLaMA-Factory's generating keys).

Each line of the output: `id`, `images`, `prompt` (the rendered prompt, `<image>` not expanded), `predict`, `label`
— LLaMA-Factory's `generated_predictions.jsonl` fields, plus vlmtune's — and in score mode `scores`
{label: probability}. Rows are written as they come; rerunning the same prediction after a crash continues where it
stopped (see `infer/output.py`). `save_name` may not be one of the run's inputs (the dataset, dataset_info.json, an
image, a model or adapter file); `overwrite` keeps the old file until the new one is complete. The image pixel
limits and the chat template default to the ones saved with the adapter. A record whose prompt cannot fit the model's
context (max_position_embeddings) is refused in one line naming it before the model runs on it — a long one from its
length alone, before it is tokenised or its images decoded (`data.encode.check_length`).

With several processes (torchrun: `vlmtune predict` starts it itself on a machine with several GPUs) each predicts
its share of the dataset into a part file, and rank 0 joins the parts in dataset order.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from vlmtune.config import Config, prediction_notes
from vlmtune.errors import VlmtuneError
from vlmtune.launch import local_rank_and_world, rank_and_world, share_cores_between_local_ranks

DEFAULT_SAVE_NAME = "generated_predictions.jsonl"  # LLaMA-Factory's default
# Seconds to pause after each batch: lets a person (or a test) watch rows arrive and kill the run.
DELAY_ENV = "VLMTUNE_PREDICT_BATCH_DELAY"
MODES = ("score", "generate")
VLLM_BATCH_SIZE = 256  # vLLM batches hundreds of requests; 8 samples (16 label requests) per call leave it idle
# A rank that finished its share waits for the slowest at the end: never under gloo's 30-minute default, whatever
# the imbalance (mixed image sizes, long generated answers, mixed GPUs).
RANK_WAIT = timedelta(days=7)


@dataclass
class PredictArgs:
    """Settings of a prediction run besides the config's keys (the model, data and predict-section keys)."""

    save_name: str = field(default=DEFAULT_SAVE_NAME, metadata={"help": "Output JSONL path."})
    batch_size: int = field(default=8, metadata={
        "help": f"Samples per forward pass. vLLM: samples per call to the engine, which schedules their requests "
                f"itself; {VLLM_BATCH_SIZE} unless given."})
    workers: int = field(default=0, metadata={
        "help": "transformers backend, score mode: batches scored at once, each on its share of the torch "
                "threads. 0 = auto: 2 on a CPU, 1 on a GPU."})
    mode: str | None = field(default=None, metadata={
        "help": "score (label probabilities) or generate (text). Default: score when the answers form a "
                "small closed set or labels are given, else generate (see predict_with_generate)."})
    vllm_config: dict = field(default_factory=dict, metadata={
        "help": "Extra vllm.LLM arguments as JSON, e.g. '{\"tensor_parallel_size\": 4}'."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing save_name instead of resuming. The new rows go to a temporary file that "
                "replaces it once every row is written: a run that fails leaves the old predictions."})

    def check(self, origin: str) -> None:
        if self.mode not in (None, *MODES):
            raise VlmtuneError(f"{origin}: 'mode' must be score or generate, got '{self.mode}'")
        if self.batch_size <= 0:
            raise VlmtuneError(f"{origin}: 'batch_size' must be > 0, got {self.batch_size}")
        if self.workers < 0:
            raise VlmtuneError(f"{origin}: 'workers' must be >= 0 (0 = auto), got {self.workers}")


def backend_of(cfg: Config) -> str:
    """transformers or vllm, from `infer_backend` (LLaMA-Factory calls transformers huggingface)."""
    return "vllm" if cfg.predict.infer_backend == "vllm" else "transformers"


# ---------------------------------------------------------------------------------------------


def load_test_data(cfg: Config, log=print):
    """The dataset's conversations in order; bad records refuse the run (or are skipped when asked)."""
    from vlmtune.data.checks import check_conversations, without_bad
    from vlmtune.data.loader import load_datasets

    if not cfg.data.dataset:
        raise VlmtuneError("no dataset given (pass --dataset NAME --dataset_dir DIR)")
    loaded = load_datasets(cfg.data.dataset, cfg.data.dataset_dir, cfg.data.max_samples, cfg.data.media_dir,
                           cfg.train.seed)
    # A record an entry's num_samples drew more than once is the same Conversation: predicted once.
    once = list({id(c): c for c in loaded.conversations}.values())
    problems = loaded.problems + check_conversations(once).problems
    conversations = without_bad(once, problems)
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
    inputs += [file for entry in resolve(cfg.data.dataset, cfg.data.dataset_dir) for file in entry.files]
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


def choose_mode(pargs: PredictArgs, cfg: Config, conversations,
                explicit: frozenset[str] | set[str] = frozenset()) -> tuple[str, list[str] | None, str]:
    """(mode, label set or None, why) — score when there is a closed label set, unless told otherwise
    (`mode`, or `predict_with_generate: true`, which asks for generation)."""
    from vlmtune.labels import resolve_label_set

    generate = cfg.predict.predict_with_generate
    if pargs.mode == "score" and generate:
        raise VlmtuneError("--mode score and predict_with_generate: true contradict each other; keep one")
    labels, inferred = resolve_label_set(cfg.data.labels, [c.answer for c in conversations], cfg.data.positive_label)
    if pargs.mode == "score":
        if labels is None:
            distinct = len({(c.answer or "").strip() for c in conversations})
            raise VlmtuneError(f"--mode score needs a closed label set: pass --labels a,b (the dataset's answers "
                               f"have {distinct} distinct values)")
        return "score", labels, "--mode score"
    if pargs.mode == "generate" or generate:
        return "generate", labels, "--mode generate" if pargs.mode else "predict_with_generate: true"
    if labels is None:
        return "generate", None, "the answers do not form a small closed set (pass --labels to score)"
    why = f"the answers form the label set {labels}" if inferred else "--labels given"
    return "score", labels, why + ("; predict_with_generate: false" if "predict_with_generate" in explicit else "")


def fingerprint(cfg: Config, pargs: PredictArgs, mode: str, labels, predictor) -> dict[str, Any]:
    """What produced the rows (compared on resume; see output.FINGERPRINT)."""
    from vlmtune.data.registry import resolve
    from vlmtune.infer.output import file_digest

    temperature = cfg.predict.sampling_temperature()

    datasets = [{"name": e.name, "file": str(file.resolve()), "sha256": file_digest(file)}
                for e in resolve(cfg.data.dataset, cfg.data.dataset_dir) for file in e.files]
    from vlmtune.model.adapter_files import adapter_files

    adapter = predictor.adapter_dir
    weights = file_digest(adapter_files(adapter).weights) if adapter is not None else None
    return {
        "datasets": datasets,
        "model": str(Path(predictor.model_dir).resolve()),
        "adapter": str(adapter.resolve()) if adapter is not None else None,
        "adapter_weights": weights,
        "backend": backend_of(cfg),
        "mode": mode,
        "labels": labels if mode == "score" else None,
        "max_new_tokens": cfg.predict.max_new_tokens if mode == "generate" else None,
        "temperature": temperature if mode == "generate" else None,
        **({"sampling": sampling_of(cfg)} if mode == "generate" and sampling_of(cfg) else {}),
        "seed": cfg.train.seed if mode == "generate" and temperature > 0 else None,
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
    from vlmtune.model.quantize import quantization_of

    quantization = quantization_of(cfg.model)  # QLoRA's quantized base when asked for; the full one by default
    if backend_of(cfg) == "vllm":
        if quantization is not None:
            raise VlmtuneError("quantization_bit: predicting on a bitsandbytes-quantized base needs --backend "
                               "transformers (vLLM applies the adapter to the full-precision base)")
        from vlmtune.infer.vllm_backend import VllmPredictor

        return VllmPredictor.load(cfg.model.model_name_or_path, cfg.model.adapter_name_or_path, max_pixels,
                                  min_pixels, bf16=cfg.train.bf16, fp16=cfg.train.fp16,
                                  vllm_config=pargs.vllm_config, cache_dir=cfg.model.cache_dir,
                                  revision=cfg.model.model_revision,
                                  max_images=max((len(c.images) for c in conversations), default=1),
                                  seed=cfg.train.seed, conversations=conversations,
                                  max_new_tokens=cfg.predict.max_new_tokens,
                                  default_system=cfg.data.default_system, log=log, **chat)
    from vlmtune.infer.engine import load_engine
    from vlmtune.infer.runner import TransformersPredictor

    engine = load_engine(cfg.model.model_name_or_path, cfg.model.adapter_name_or_path, max_pixels, min_pixels,
                         bf16=cfg.train.bf16, fp16=cfg.train.fp16,
                         attn_implementation=cfg.model.attn_implementation, cache_dir=cfg.model.cache_dir,
                         revision=cfg.model.model_revision, merge_adapter=True, device=device,
                         quantization=quantization, log=log, **chat)
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


def sampling_of(cfg: Config) -> dict[str, Any]:
    """The sampling settings (top_p, top_k, repetition_penalty) that differ from plain greedy decoding or sampling
    at a temperature: what the predictors' `generate` takes besides max_new_tokens and temperature."""
    from vlmtune.config import PredictConfig

    p, default = cfg.predict, PredictConfig()
    keys = ("repetition_penalty",) + (("top_p", "top_k") if p.sampling_temperature() > 0 else ())
    return {k: getattr(p, k) for k in keys if getattr(p, k) != getattr(default, k)}


def batch_size_of(pargs: PredictArgs, cfg: Config, explicit: set[str] | frozenset[str]) -> int:
    """The samples per batch: as given, else 8 (transformers) or VLLM_BATCH_SIZE (vLLM)."""
    return VLLM_BATCH_SIZE if backend_of(cfg) == "vllm" and "batch_size" not in explicit else pargs.batch_size


def predict(cfg: Config, pargs: PredictArgs, explicit: set[str] | frozenset[str] = frozenset(), log=print) -> Path:
    """Predict cfg's dataset into `pargs.save_name` (this process's share of it under torchrun); returns the path.

    `explicit`: the keys the user set (pixel limits and enable_thinking given explicitly win over the adapter's)."""
    rank, world = rank_and_world()
    pargs = replace(pargs, batch_size=batch_size_of(pargs, cfg, explicit))
    log = log if rank == 0 else (lambda *_: None)
    conversations = load_test_data(cfg, log)
    refuse_overwriting_inputs(Path(pargs.save_name), cfg, conversations)
    if cfg.model.adapter_name_or_path:
        from vlmtune.model.adapter_files import adapter_files

        adapter_files(cfg.model.adapter_name_or_path)  # a bad adapter fails before the model loads
    if not cfg.model.model_name_or_path and not cfg.model.adapter_name_or_path:
        raise VlmtuneError("model_name_or_path is not set (pass --model_name_or_path)")
    mode, labels, why = choose_mode(pargs, cfg, conversations, explicit)
    log(f"dataset: {cfg.data.dataset} ({len(conversations)} samples); mode: {mode} ({why})"
        + (f"; {world} processes, each its share" if world > 1 else ""))
    from vlmtune.data.checks import label_notes

    for line in [*prediction_notes(cfg.predict, mode), *label_notes(conversations, cfg.data.labels)]:
        log(f"note: {line}")
    device = rank_device(backend_of(cfg), pargs.vllm_config) if world > 1 else None
    predictor = make_predictor(cfg, pargs, explicit, conversations, log, device=device)
    if mode == "score":
        from vlmtune.infer.scoring import label_token_ids

        try:
            label_token_ids(labels, predictor.processor)
        except ValueError as exc:
            raise VlmtuneError(f"labels {labels} cannot be scored: {exc}") from None
    group = rank_group() if world > 1 else None  # after the engine: vLLM's may fork, without it
    started = time.perf_counter()
    save = Path(pargs.save_name)
    done = predict_all(conversations, predictor, cfg, pargs, mode, labels, log, group)
    predictor.close()
    if rank == 0:
        print_summary(save, len(conversations) - done, done, time.perf_counter() - started, labels,
                      cfg.data.positive_label, log)
    return save


def predict_all(conversations, predictor, cfg: Config, pargs: PredictArgs, mode: str, labels, log, group=None) -> int:
    """Every row into save_name; returns how many an earlier run had written. With several processes each predicts
    every world-th row (rank r: rows r, r + world, ...: an unbalanced dataset — small images first, large ones
    last — is shared evenly) into its own part file (resumable on its own); when all are done, rank 0 joins the
    parts in dataset order into save_name, and removes them. `group`: the ranks' process group (`rank_group`)."""
    from vlmtune.infer.output import PredictionFile

    rank, world = rank_and_world()
    meta = fingerprint(cfg, pargs, mode, labels, predictor)
    save = Path(pargs.save_name)
    ids = [c.id for c in conversations]
    if world == 1:
        return predict_into(PredictionFile(save, meta), conversations, ids, predictor, cfg, pargs, mode, labels, log)
    final = PredictionFile(save, meta)
    if final.complete(ids) and not pargs.overwrite:
        log(f"{save}: already holds every row of this run")
        return len(conversations)
    mine = conversations[rank::world]
    part = PredictionFile(part_path(save, rank, world), {**meta, "part": [rank, world, "interleaved"]})
    predict_into(part, mine, [c.id for c in mine], predictor, cfg, pargs, mode, labels, log)
    barrier(group)
    if rank == 0:
        join_parts(final, [part_path(save, r, world) for r in range(world)], ids)
    barrier(group)
    return 0


def part_path(save: Path, rank: int, world: int) -> Path:
    return save.with_name(f"{save.name}.part-{rank}-of-{world}")


def rank_device(backend: str, vllm_config: dict) -> str | None:
    """This rank's device under torchrun, set before anything starts CUDA. transformers: its GPU, made the current
    device too (library calls that use the current one — is_bf16_supported, empty_cache — would all land on GPU 0);
    vLLM: its engine sees only its own GPUs (`vllm_backend.rank_gpus`: one engine per rank). On a CPU the node's
    cores are shared between its ranks."""
    local_rank = local_rank_and_world()[0]
    if backend == "vllm":
        from vlmtune.infer.vllm_backend import rank_gpus

        os.environ["CUDA_VISIBLE_DEVICES"] = rank_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), local_rank,
                                                       int(vllm_config.get("tensor_parallel_size", 1)))
        return None
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    share_cores_between_local_ranks()
    return None


def rank_group():
    """The prediction ranks' process group, set up by every rank together once its engine is loaded: gloo (any
    device), waits up to RANK_WAIT. A run inside training's processes (do_predict) gets a gloo group of its own
    beside training's."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=RANK_WAIT)
        return None  # the default group
    if dist.get_world_size() != rank_and_world()[1]:  # e.g. vLLM's own, made in this process
        raise VlmtuneError(f"a process group of {dist.get_world_size()} process(es) is already set up here, not "
                           f"torchrun's {rank_and_world()[1]} (vLLM without VLLM_ENABLE_V1_MULTIPROCESSING?)")
    return dist.new_group(backend="gloo", timeout=RANK_WAIT)


def barrier(group=None) -> None:
    """Wait for every prediction process (in `rank_group`'s group)."""
    import torch.distributed as dist

    dist.barrier(group=group)


def join_parts(final, parts: list[Path], ids: list[str]) -> None:
    """The parts' rows, interleaved back into dataset order (part r holds rows r, r + world, ...), into the final
    file (written whole, then the parts removed)."""
    from vlmtune.infer.output import meta_path

    final.start(ids, overwrite=True)
    missing = next((path for path in parts if not path.is_file()), None)
    if missing is not None:  # another node's rank wrote it where this node cannot see
        final.close()
        raise VlmtuneError(f"{missing}: a rank's part is missing; with ranks on several nodes save_name must be on "
                           f"a filesystem every node sees")
    handles = [open(path, encoding="utf-8") for path in parts]
    written = []
    try:
        rows = []
        for i in range(len(ids)):
            line = handles[i % len(parts)].readline()
            if not line:
                break
            rows.append(json.loads(line))
            written.append(str(rows[-1]["id"]))
            if len(rows) == 1024:
                final.write(rows)
                rows = []
        final.write(rows)
        extra = any(handle.readline() for handle in handles)
    finally:
        for handle in handles:
            handle.close()
    if written != ids or extra:
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
        from vlmtune.infer.runner import predict_batches
        from vlmtune.progress import Progress

        batches = predict_batches(predictor, todo, mode, labels, pargs.batch_size, cfg.predict.max_new_tokens,
                                  cfg.predict.sampling_temperature(), cfg.train.seed, default_system,
                                  first_index=done, sampling=sampling_of(cfg))
        # a bar on a terminal; in a log file one line per tenth of the rows
        with Progress(len(conversations), done, desc="predict", unit="samples", lines=10) as bar:
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


