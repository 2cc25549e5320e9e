"""The ranks and the accelerator: accelerate's Accelerator (DDP, DeepSpeed ZeRO-2/3 through its plugin, mixed
precision, trackers), what every rank must agree on at start-up (decided once, on rank 0; the shared output_dir),
and the placement choices that depend on the ranks (where weights load, whether every rank runs the vision tower).
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import torch

from vlmtune.config import Config
from vlmtune.errors import VlmtuneError
from vlmtune.model.load import resolve_model_dir
from vlmtune.train.checkpoint import uses_deepspeed
from vlmtune.train.trackers import chosen_trackers

T = TypeVar("T")


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.ddp_timeout))]
    if cfg.train.ddp_find_unused_parameters is not None:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=cfg.train.ddp_find_unused_parameters))
    has_cuda = torch.cuda.is_available()
    precision = "bf16" if cfg.train.bf16 else ("fp16" if cfg.train.fp16 and has_cuda else "no")
    plugin = deepspeed_plugin(cfg) if cfg.train.deepspeed else None
    cpu = not has_cuda
    if plugin is not None and not has_cuda:
        # DeepSpeed's CPU accelerator over gloo (tests, and CPU-only machines): accelerate sets up DeepSpeed's
        # communication only for a non-CPU Accelerator, and with no GPU backend only when told gloo.
        handlers[0] = InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=cfg.train.ddp_timeout))
        cpu = False
    trackers = chosen_trackers(cfg.train.report_to)  # one line naming the extra when one is not installed
    return Accelerator(mixed_precision=precision, kwargs_handlers=handlers, cpu=cpu, deepspeed_plugin=plugin,
                       log_with=trackers or None,
                       project_dir=str(cfg.train.logging_dir or Path(cfg.train.output_dir) / "runs"))


def deepspeed_plugin(cfg: Config):
    """accelerate's DeepSpeedPlugin for the `deepspeed:` JSON (LLaMA-Factory's ds_z2_config.json /
    ds_z3_config.json work as they are), its "auto" values filled from our config: batch sizes, accumulation
    and clipping here; the bucket sizes from the language model's hidden size (accelerate reads
    `model.config.hidden_size`, which a vision-language config has only in its text_config); bf16 / fp16
    by accelerate from the mixed precision. Our AdamW is DeepSpeed's client optimizer
    (`zero_allow_untested_optimizer`).

    DeepSpeed owns the optimiser step: it divides the loss by its gradient_accumulation_steps, steps at
    the accumulation boundary and clips by its gradient_clipping (see `backward` below). Without CUDA it
    runs on DeepSpeed's CPU accelerator (gloo), as the tests do.
    """
    from accelerate.utils import is_deepspeed_available

    path = Path(cfg.train.deepspeed)
    if not is_deepspeed_available():
        raise VlmtuneError(f"deepspeed: {path}: DeepSpeed is not installed; pip install 'vlmtune[deepspeed]' "
                           f"(or remove the deepspeed key: LoRA on a 7B model fits one GPU per rank with plain DDP)")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    try:
        ds_config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise VlmtuneError(f"deepspeed: {path}: cannot read the DeepSpeed config ({exc.__class__.__name__}: "
                           f"{str(exc)[:200]})") from None
    if not isinstance(ds_config, dict):
        raise VlmtuneError(f"deepspeed: {path}: a DeepSpeed config is a JSON object")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch, accum = cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps
    filled = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": accum,
              "train_batch_size": batch * accum * world,
              "gradient_clipping": cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else 0.0}
    for key, value in filled.items():
        if ds_config.get(key, "auto") == "auto":
            ds_config[key] = value
        elif ds_config[key] != value:
            raise VlmtuneError(f"deepspeed: {path}: {key} is {ds_config[key]} there but {value} from this config; "
                               f"set it to \"auto\"")
    zero = ds_config.get("zero_optimization")
    if isinstance(zero, dict) and any(zero.get(k) == "auto" for k in HIDDEN_SIZE_KEYS):
        hidden = text_hidden_size(cfg)
        sizes = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                 "stage3_param_persistence_threshold": 10 * hidden}  # accelerate's own formulas
        for key in HIDDEN_SIZE_KEYS:
            if zero.get(key) == "auto":
                zero[key] = sizes[key]
    ds_config.setdefault("zero_allow_untested_optimizer", True)
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=ds_config, gradient_accumulation_steps=accum,
                           gradient_clipping=filled["gradient_clipping"])


HIDDEN_SIZE_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def text_hidden_size(cfg: Config) -> int:
    """The language model's hidden size, from config.json (its text_config for a vision-language model)."""
    from vlmtune.files import read_json_object

    path = resolve_model_dir(cfg.model.model_name_or_path, cfg.model.cache_dir, cfg.model.model_revision) / "config.json"
    config = read_json_object(path)
    hidden = (config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size")
    if not isinstance(hidden, int):
        raise VlmtuneError(f"{path}: no hidden_size (text_config.hidden_size) to fill the DeepSpeed config's "
                           f"\"auto\" bucket sizes; give them as numbers")
    return hidden


def zero_stage(accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage if uses_deepspeed(accelerator) else 0


def mark_zero3_leaves(model, log) -> int:
    """Under ZeRO-3, the family's mixture-of-experts blocks become DeepSpeed leaf modules (gathered whole, as
    LLaMA-Factory does), before the engine wraps the model. Returns how many were marked."""
    from deepspeed.utils import set_z3_leaf_modules

    from vlmtune.families import family_of_model

    family = family_of_model(model)
    names = set(family.zero3_leaf_modules if family is not None else ())
    classes = list({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        return 0
    marked = set_z3_leaf_modules(model, classes)
    log(f"ZeRO-3: {len(marked)} mixture-of-experts blocks ({', '.join(c.__name__ for c in classes)}) gathered whole")
    return len(marked)


def decided_by_rank_zero(accelerator, decide: Callable[[], T]) -> T:
    """`decide()` on global rank 0 only, its answer (or its one-line refusal) for every rank. For what ranks could
    otherwise see differently: output_dir, listed while the other ranks probe it, can show a probe file for a moment
    (named, on NFS) — one rank refusing alone, the others waiting for it."""
    if accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    answer: list = [None]
    if accelerator.is_main_process:
        try:
            answer = [("decided", decide())]
        except VlmtuneError as exc:
            answer = [("refused", str(exc))]
    broadcast_object_list(answer, from_process=0)
    kind, value = answer[0]
    if kind == "refused":
        raise VlmtuneError(value)
    return value


def check_every_rank_sees(output_dir: Path, accelerator, wait_s: float = 15.0) -> None:
    """Every rank writes its checkpoint files into output_dir, so every node must see the same directory: rank 0
    writes a token there and each rank looks for it (for up to `wait_s`: a network file system may show a new
    file late). A rank that does not see it stops the run on every rank in one line, at start-up — not at the first
    save, where rank 0 would then wait for the others for ddp_timeout."""
    if accelerator.num_processes == 1:
        return
    import uuid

    from accelerate.utils import broadcast_object_list, gather_object

    name = [f".vlmtune-shared-{uuid.uuid4().hex}" if accelerator.is_main_process else None]
    broadcast_object_list(name, from_process=0)
    token = output_dir / name[0]
    if accelerator.is_main_process:
        token.write_text(str(os.getpid()))
    accelerator.wait_for_everyone()
    deadline = time.time() + wait_s
    sees = output_dir.is_dir() and name[0] in os.listdir(output_dir)
    while not sees and time.time() < deadline:
        time.sleep(0.5)  # listing the directory asks the server again
        sees = output_dir.is_dir() and name[0] in os.listdir(output_dir)
    seen = gather_object([sees])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        token.unlink(missing_ok=True)
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise VlmtuneError(f"output_dir {output_dir}: rank(s) {', '.join(map(str, blind))} do not see the files rank 0 "
                           f"writes there; every rank writes its part of each checkpoint into output_dir, so it must "
                           f"be on a file system all nodes share (keep VLMTUNE_CACHE node-local)")


def vision_every_batch(model, accelerator) -> bool:
    """Whether every rank must run the vision tower in every forward, images or not (`data.encode.Collator`): under
    ZeRO-3 (its forwards gather the tower's weights from all ranks), and on several ranks when a part of the vision
    path trains (DDP's synchronised backward needs its gradients from every rank)."""
    if zero_stage(accelerator) == 3:
        return True
    if accelerator.num_processes == 1:
        return False
    from vlmtune.families import parts_of
    from vlmtune.model.compat import unwrap

    parts = parts_of(unwrap(accelerator.unwrap_model(model)))
    return any(p.requires_grad for part in (parts.vision_tower, parts.projector) if part is not None
               for p in part.parameters())


def load_device(accelerator, quantization) -> torch.device | None:
    """Where the weights load: straight onto this rank's GPU (a host copy per rank first would need 8 × a 32B
    model's 66 GB of host RAM on 8 ranks), and for QLoRA onto its device wherever it is; under ZeRO-3 nowhere yet
    (DeepSpeed partitions the weights as they load); on a CPU in place."""
    if quantization is not None:
        return accelerator.device
    if accelerator.device.type == "cpu" or zero_stage(accelerator) == 3:
        return None
    return accelerator.device
