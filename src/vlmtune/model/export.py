"""`vlmtune export`: merge a LoRA adapter into its base model and write a standard checkpoint.

    vlmtune export --model_name_or_path /data/Qwen2.5-VL-7B-Instruct --adapter_name_or_path /output/my_task \\
        --export_dir /output/my_task-merged [--export_dtype bfloat16] [--export_size 5] [--overwrite]
    vllm serve /output/my_task-merged          # an ordinary Qwen2.5-VL: no --enable-lora needed

The result is what a release directory of the base model's family (`vlmtune.families`) holds: `config.json`,
`generation_config.json`, `model*.safetensors` (sharded at `--export_size` GB, with an index), the tokenizer
files, the chat template (`chat_template.jinja` and `chat_template.json`) and `preprocessor_config.json` — the one
saved with the adapter, so the merged model resizes images with the pixel limits it was trained with (and
`vlmtune_template.json`, the chat template vlmtune rendered with, for vlmtune's own commands).
`AutoModelForImageTextToText.from_pretrained` and vlmtune itself load it with no adapter (tested); vLLM reads the
same files (not tested on CPU-only machines). `vlmtune_export.json` records the base model, adapter and dtype.

The chat template is the base model's own — for a family whose checkpoints think by default (Qwen3.5) with its
generation prompt set as training rendered it (`Family.served_chat_template`), so that
`apply_chat_template(..., add_generation_prompt=True)`, and so `vllm serve`, asks the question the model learned.

What transformers drops or narrows on the way is put back from the base checkpoint: tensors the model class
ignores on load (`_keys_to_ignore_on_load_unexpected`: Qwen3.5's multi-token-prediction layer `mtp.*`, which vLLM's
speculative decoding needs) are copied into the export as they are, and a tensor the base stores in a wider dtype
than its other tensors and the export's (Qwen3.5's float32 `linear_attn.A_log` and `linear_attn.norm.weight` in a
bfloat16 export) keeps the base's dtype — with the base's own bytes where the adapter did not change it.

How: the base model is loaded in the export dtype (`auto`: the dtype in its config.json, bfloat16 for
the Qwen releases), the adapter attached with peft, and `merge_and_unload()` folds each LoRA pair into
its linear layer, W + (alpha/r)·B·A (the product in float32 on a CPU, the sum in the export dtype).
Modules trained in full next to the adapter (`additional_target`, the projector) replace the base
ones. Merging a 7B model in bfloat16 on the CPU needs about 17 GB of memory.

A QLoRA adapter (trained on a 4- or 8-bit base, `model/quantize.py`) is merged the same way, onto the
full-precision base — never onto dequantized 4-bit weights, whose rounding would stay in the export; a start-up
line says so, and `vlmtune_export.json` records how the adapter's base was quantized in training. A quantized base
checkpoint is refused.

An export directory that is not empty is refused unless `--overwrite`, which replaces the files an
export writes (and stale weight shards) and leaves other files alone. The new export is written beside it, in
`.NAME.export.tmp`, and swapped in once every file is written (`swap_in`), as `predict --overwrite` replaces its
file: killed at any moment (kill -9 included), an export leaves the directory complete — the earlier export or the
new one — or absent, never half written; the next export removes what a killed one left beside it (`clean_stale`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

from vlmtune.errors import VlmtuneError
from vlmtune.files import ensure_writable_dir

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Files of a model release that the export copies from the base model when the adapter has none.
AUXILIARY_FILES = ("vocab.json", "merges.txt", "video_preprocessor_config.json")
WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")


def base_dtype(model_dir: Path) -> str:
    """The dtype a checkpoint was saved in (`dtype` / `torch_dtype` in config.json); float32 when absent."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "float32"
    value = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype") \
        or (config.get("text_config") or {}).get("torch_dtype") or "float32"
    value = str(value).replace("torch.", "")
    return value if value in DTYPES else "float32"


def check_export_dir(export_dir: Path, overwrite: bool, *protected: Path | None) -> None:
    """Refuse a file (or a path under one), a non-empty directory (without overwrite) and the model's or
    adapter's own directory."""
    if export_dir.exists() and not export_dir.is_dir():
        raise VlmtuneError(f"--export_dir {export_dir}: exists and is not a directory")
    blocker = next((p for p in export_dir.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise VlmtuneError(f"--export_dir {export_dir}: is under {blocker}, which is a file, not a directory")
    target = export_dir.resolve()
    for path in protected:
        if path is not None and Path(path).resolve() == target:
            raise VlmtuneError(f"--export_dir {export_dir}: is the model or adapter directory itself; "
                               f"choose another directory")
    if export_dir.is_dir() and any(export_dir.iterdir()) and not overwrite:
        raise VlmtuneError(f"--export_dir {export_dir}: directory is not empty; choose an empty or new "
                           f"directory, or pass --overwrite to replace an earlier export there")


def beside(export_dir: Path) -> tuple[Path, Path]:
    """(where the new export is written, where the earlier one is moved while the new one takes its place)."""
    export_dir = export_dir.absolute()  # `.` has no name to put beside
    return (export_dir.with_name(f".{export_dir.name}.export.tmp"),
            export_dir.with_name(f".{export_dir.name}.replaced.tmp"))


def clean_stale(export_dir: Path, log=print) -> None:
    """What a killed export left beside export_dir: its unfinished new export (removed) and, when it was killed
    between `swap_in`'s two renames, the earlier export moved aside (put back: it is complete)."""
    staging, aside = beside(export_dir)
    if aside.is_dir() and not export_dir.exists():
        os.rename(aside, export_dir)
        log(f"{export_dir}: put back the earlier export (an export was stopped while replacing it)")
    for path in (staging, aside):
        if path.exists() or path.is_symlink():
            remove(path)
            log(f"removed {path}, left by an export that did not finish")


def swap_in(staging: Path, export_dir: Path) -> None:
    """The finished export in `staging` in place of export_dir: the earlier directory's own files (not an export's
    and not stale weight shards) kept as hard links, the earlier directory renamed aside, the new one renamed in, the
    earlier one removed."""
    _, aside = beside(export_dir)
    if export_dir.exists():
        stale = {path.name for pattern in WEIGHT_PATTERNS for path in export_dir.glob(pattern)}
        for path in export_dir.iterdir():
            if path.name not in stale and not (staging / path.name).exists():
                copy = shutil.copytree if path.is_dir() else shutil.copy2
                copy(path, staging / path.name, **({"copy_function": link_or_copy} if path.is_dir() else {}))
        os.rename(export_dir, aside)
    try:
        os.rename(staging, export_dir)
    except OSError:
        if aside.exists() or aside.is_symlink():
            os.rename(aside, export_dir)
        raise
    remove(aside)


def remove(path: Path) -> None:
    """A directory and what it holds; a link (an export_dir that was a link to a directory) only as a link."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def merge_device(device: str) -> str | None:
    """`--export_device` checked: cpu, cuda (or cuda:N) where there is such a GPU, or auto (None: a GPU when
    there is one)."""
    if device == "auto":
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise VlmtuneError(f"--export_device must be cpu, cuda (cuda:N) or auto, got {device!r}")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise VlmtuneError(f"--export_device {device}: there is no such CUDA device here; use cpu or auto")
    return device


def merge_adapter(model):
    """peft model → plain transformers model with every LoRA layer folded in (and none left)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = model.merge_and_unload(progressbar=False, safe_merge=True)
    leftovers = [name for name, module in merged.named_modules() if isinstance(module, BaseTunerLayer)]
    if leftovers:
        raise VlmtuneError(f"merging left {len(leftovers)} adapter layer(s) in the model (e.g. {leftovers[0]})")
    return merged


def refuse_quantized_base(model_dir: Path) -> None:
    """A base checkpoint that is itself quantized (`quantization_config` in its config.json) is refused: merging
    into it would fold the adapter into rounded weights."""
    from vlmtune.files import read_json_object

    config = read_json_object(model_dir / "config.json")
    quantized = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise VlmtuneError(f"{model_dir}: a quantized checkpoint ({method}); export merges onto the full-precision "
                           f"base: pass its directory with --model_name_or_path")


def export(model_name_or_path: str | None, adapter_name_or_path: str, export_dir: str | Path,
           export_dtype: str = "auto", export_size: int = 5, overwrite: bool = False, device: str = "cpu",
           log=print, legacy_format: bool = False) -> Path:
    """Merge `adapter_name_or_path` into its base and write the checkpoint into `export_dir` (`legacy_format`:
    PyTorch .bin weight files instead of .safetensors). `device` auto: a GPU when there is one."""
    if export_dtype not in DTYPES:
        raise VlmtuneError(f"--export_dtype must be one of {', '.join(DTYPES)}, got {export_dtype!r}")
    if export_size < 1:
        raise VlmtuneError(f"--export_size must be at least 1 (GB), got {export_size}")
    export_dir = Path(export_dir).expanduser()
    adapter_dir = Path(adapter_name_or_path).expanduser()
    clean_stale(export_dir, log)  # first: an earlier export put back is refused below like any other
    # Refuse a busy export_dir in a second, before torch is even imported.
    check_export_dir(export_dir, overwrite, adapter_dir, Path(model_name_or_path) if model_name_or_path else None)
    device = merge_device(device)

    import torch

    from vlmtune.infer.engine import load_engine
    from vlmtune.model.adapter_files import adapter_files
    from vlmtune.model.load import resolve_model_dir

    adapter = adapter_files(adapter_dir)
    if adapter.peft_type != "LORA":
        raise VlmtuneError(f"{adapter_dir}: peft_type {adapter.peft_type} cannot be merged (only LoRA adapters)")
    model_name_or_path = model_name_or_path or adapter.base_model
    model_dir = resolve_model_dir(model_name_or_path)
    check_export_dir(export_dir, overwrite, model_dir, adapter_dir)
    refuse_quantized_base(model_dir)  # a QLoRA adapter merges onto the full-precision base (the engine says so)
    if export_dir.is_dir():  # a read-only place fails now, not after the merge
        ensure_writable_dir(export_dir, "--export_dir")
    ensure_writable_dir(export_dir.parent, f"--export_dir {export_dir.name}: its parent")  # the new one goes beside
    dtype_name = base_dtype(model_dir) if export_dtype == "auto" else export_dtype
    start = time.perf_counter()
    with warnings.catch_warnings():  # peft calls transformers APIs that 5.x deprecates: not the user's concern
        warnings.filterwarnings("ignore", category=FutureWarning)
        # In the export's dtype wherever it runs (a GPU would otherwise pick bf16 and add float32 deltas in bf16).
        engine = load_engine(str(model_dir), str(adapter_dir), dtype=getattr(torch, dtype_name), device=device,
                             log=log)
        merged = merge_adapter(engine.model)
    merged = merged.to(getattr(torch, dtype_name))
    merged.config.use_cache = True
    log(f"merged {adapter_dir} into {model_dir} ({dtype_name}) in {time.perf_counter() - start:.1f} s")

    staging = beside(export_dir)[0]
    try:
        staging.mkdir()
        write_export(merged, engine, model_dir, adapter_dir, staging, dtype_name, export_size, log)
        if legacy_format:
            to_legacy_format(staging, log)
        swap_in(staging, export_dir)
    except (OSError, RuntimeError) as exc:  # a full disk: one line (the base and the adapter are untouched)
        from vlmtune.files import describe_write_error

        shutil.rmtree(staging, ignore_errors=True)
        raise VlmtuneError(f"--export_dir {export_dir}: writing the merged model failed ({describe_write_error(exc)}); "
                           f"{'the earlier export there is unchanged' if export_dir.exists() else 'nothing written'}"
                           ) from None
    kind = "pytorch_model*.bin" if legacy_format else "*.safetensors"
    size = sum(p.stat().st_size for p in export_dir.glob(kind))
    log(f"exported to {export_dir}: {size / 2**20:.1f} MiB of {'.bin' if legacy_format else 'safetensors'} weights, "
        f"{len(list(export_dir.iterdir()))} files (load it like any {engine.processor.family.name}, no adapter)")
    return export_dir


def write_export(merged, engine, model_dir: Path, adapter_dir: Path, export_dir: Path, dtype_name: str,
                 export_size: int, log=print) -> None:
    """The merged weights (with what transformers dropped or narrowed put back), processor, chat templates,
    auxiliary files and vlmtune_export.json."""
    from vlmtune import __version__

    merged.save_pretrained(export_dir, max_shard_size=f"{export_size}GB")
    for line in keep_base_tensors(model_dir, export_dir, getattr(merged, "_keys_to_ignore_on_load_unexpected", None)):
        log(line)
    processor = engine.processor
    template = processor.tokenizer.chat_template  # the base model's own (data.processor.own_chat_template)
    if processor.family.served_chat_template is not None:
        template = processor.family.served_chat_template(template, processor.template.spec,
                                                         processor.template.enable_thinking)
    processor.tokenizer.chat_template = template
    processor.save_pretrained(export_dir)
    (export_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    # Older transformers (4.x, as pinned by many vLLM releases) read the processor's template from here.
    (export_dir / "chat_template.json").write_text(json.dumps({"chat_template": template}, ensure_ascii=False,
                                                              indent=2) + "\n", encoding="utf-8")
    for name in AUXILIARY_FILES:
        if (model_dir / name).is_file() and not (export_dir / name).exists():
            shutil.copyfile(model_dir / name, export_dir / name)
    from vlmtune.model.adapter_files import adapter_files

    trained_on = adapter_files(adapter_dir).quantization
    info = {"base_model": str(model_dir), "adapter": str(adapter_dir.resolve()), "dtype": dtype_name,
            **({"adapter_trained_quantized": trained_on.record()} if trained_on is not None else {}),
            "image_pixels": [processor.min_pixels, processor.max_pixels],
            "vlmtune_version": __version__, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (export_dir / "vlmtune_export.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")


INDEX = "model.safetensors.index.json"
KEPT_SHARD = "model-kept-from-base.safetensors"
ITEM_SIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def tensor_files(directory: Path) -> dict[str, tuple[Path, str]]:
    """name → (safetensors file, dtype) of a checkpoint directory's weights, from the headers only."""
    from safetensors import safe_open

    index = directory / INDEX
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        files = sorted(directory.glob("model*.safetensors"))
    found = {}
    for path in files:
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                found[name] = (path, handle.get_slice(name).get_dtype())
    return found


def keep_base_tensors(model_dir: Path, export_dir: Path, ignored_on_load) -> list[str]:
    """Put back into the export what loading the base dropped (tensors matching `ignored_on_load`) or narrowed (a
    tensor the base stores wider than its other tensors, and than the export's); returns the lines that say what
    was kept."""
    import re
    from collections import Counter

    base, out = tensor_files(model_dir), tensor_files(export_dir)
    dropped = [name for name in base if name not in out and any(re.search(p, name) for p in ignored_on_load or ())]
    usual = Counter(dtype for _, dtype in base.values()).most_common(1)[0][0] if base else None
    narrowed = [name for name, (_, dtype) in base.items() if name in out and ITEM_SIZE.get(dtype, 0) >
                max(ITEM_SIZE.get(usual, 0), ITEM_SIZE.get(out[name][1], 0))]
    lines = []
    if narrowed:
        for shard in sorted({out[name][0] for name in narrowed}):
            widen_shard(shard, [n for n in narrowed if out[n][0] == shard], base)
        lines.append(f"kept the base's dtype of {len(narrowed)} tensor(s) stored wider than the export's "
                     f"(e.g. {narrowed[0]}: {base[narrowed[0]][1]})")
    if dropped:
        add_shard(export_dir, KEPT_SHARD, {name: read_tensor(base[name][0], name) for name in dropped}, out)
        lines.append(f"copied {len(dropped)} tensor(s) of the base checkpoint that transformers does not load "
                     f"(e.g. {dropped[0]}) into {KEPT_SHARD}")
    return lines


def read_tensor(path: Path, name: str):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor(name)


def widen_shard(shard: Path, names: list[str], base: dict) -> None:
    """Rewrite an export shard with `names` in the base's dtype: the base's own tensor where the merge left it as
    it was (equal after narrowing), else the merged tensor widened."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shard))
    for name in names:
        original = read_tensor(base[name][0], name)
        merged = tensors[name]
        tensors[name] = original if original.to(merged.dtype).equal(merged) else merged.to(original.dtype)
    tmp = shard.with_name(f".{shard.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, shard)


def add_shard(export_dir: Path, name: str, tensors: dict, existing: dict) -> None:
    """One more weight file, and the index (written or extended) that lists every tensor's file."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(export_dir / name), metadata={"format": "pt"})
    index_path = export_dir / INDEX
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else \
        {"metadata": {}, "weight_map": {k: path.name for k, (path, _) in existing.items()}}
    index["weight_map"].update({k: name for k in tensors})
    index["metadata"]["total_size"] = sum(p.stat().st_size for p in {export_dir / f for f in
                                                                     index["weight_map"].values()})
    index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


LEGACY_INDEX = "pytorch_model.bin.index.json"


def to_legacy_format(export_dir: Path, log=print) -> None:
    """The export's .safetensors shards rewritten as PyTorch .bin files (`export_legacy_format`), with their index.

    transformers 5's `save_pretrained` writes safetensors only (its `safe_serialization=False` is gone), so each
    shard is converted here, one at a time: `model-00001-of-00002.safetensors` → `pytorch_model-00001-of-00002.bin`,
    the index → `pytorch_model.bin.index.json`, the safetensors files removed. transformers and vLLM load either.
    """
    import torch
    from safetensors.torch import load_file

    shards = sorted(export_dir.glob("model*.safetensors"))
    names = {shard.name: "pytorch_model" + shard.name[len("model"):-len(".safetensors")] + ".bin" for shard in shards}
    for shard in shards:
        torch.save(load_file(str(shard)), export_dir / names[shard.name])
    index_path = export_dir / INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["weight_map"] = {k: names.get(v, v) for k, v in index["weight_map"].items()}
        (export_dir / LEGACY_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        index_path.unlink()
    for shard in shards:
        shard.unlink()
    log(f"export_legacy_format: the weights written as {len(shards)} PyTorch .bin file(s) (transformers 5 saves "
        f"safetensors only; converted shard by shard)")
