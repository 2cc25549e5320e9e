"""Peak memory of loading a model unquantized (fp32, bf16) and as QLoRA loads it (4-bit nf4, 8-bit), each variant
in a fresh process, as `vlmtune.model.load.load_model` loads it for training.

    python benchmarks/load_memory.py [--variants fp32 bf16 4bit 8bit] [--large_hidden 1024 --large_layers 16]

Two random Qwen2.5-VL models are built once in a temporary directory (`vlmtune tiny-model`'s code, re-saved in
bf16 as the releases are): the tiny one of the tests (text hidden 128, 2 layers) and a larger one (text hidden 1024,
16 layers; vision hidden 256, depth 4 — about 160 M parameters). Each line, above the RSS just before loading
(after the imports, which alone peak near 1 GiB): the peak RSS while `load_model` runs (the high-water mark reset
after the imports), the RSS once every weight has been read, and the bytes of the loaded model's tensors. 4-bit and 8-bit quantize the language model's linear layers only (the vision tower,
projector, embeddings and lm_head stay in the compute dtype, fp32 here as on a CPU run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("fp32", "bf16", "4bit", "8bit")


def child(model_dir: str, variant: str) -> None:
    """Load once and print one JSON line (run in a fresh interpreter per variant)."""
    import gc

    import bitsandbytes  # noqa: F401 — imported by every variant, so the baselines are alike
    import torch

    from vlmtune.model.load import build_empty_model, load_model
    from vlmtune.model.quantize import Quantization

    build_empty_model(Path(model_dir))  # imports the modelling code (on the meta device: no weights)
    gc.collect()
    # The imports peak higher than a small model's load: the high-water mark starts again from here (Linux).
    Path("/proc/self/clear_refs").write_text("5")
    before = status_mib("VmRSS")
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    quantization = {"4bit": Quantization(4), "8bit": Quantization(8)}.get(variant)
    model = load_model(Path(model_dir), dtype=dtype, quantization=quantization)
    tensors = list(model.parameters()) + list(model.buffers())
    # Weights loaded without a conversion still point into the memory-mapped checkpoint, whose pages count only
    # once read: one byte per page of every tensor is read, as the first forward would.
    for t in tensors:
        t.detach().contiguous().view(-1).view(torch.uint8)[::4096].sum()
    peak, resident = status_mib("VmHWM"), status_mib("VmRSS")
    size = sum(t.numel() * t.element_size() for t in tensors)
    print(json.dumps({"peak_mib": peak - before, "resident_mib": resident - before, "tensors_mib": size / 2**20}))


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now; VmHWM: the peak since the last reset), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def release_like(model_dir: Path) -> Path:
    """Re-save a random model in bfloat16, as the Qwen releases are stored."""
    import torch
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.bfloat16).save_pretrained(model_dir)
    return model_dir


def measure(model_dir: Path, variant: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", str(model_dir), variant], capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"{variant}: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--large_hidden", type=int, default=1024)
    parser.add_argument("--large_layers", type=int, default=16)
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from vlmtune.model.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="vlmtune-load-memory-") as tmp:
        models = {"tiny": release_like(build_tiny_model(Path(tmp) / "tiny")),
                  f"larger (hidden {args.large_hidden}, {args.large_layers} layers)": release_like(build_tiny_model(
                      Path(tmp) / "large", text_hidden=args.large_hidden, text_layers=args.large_layers,
                      vision_hidden=256, vision_depth=4))}
        print("| model | load | peak RSS while loading | RSS after loading | model tensors |")
        print("| --- | --- | --- | --- | --- |")
        for name, model_dir in models.items():
            for variant in args.variants:
                m = measure(model_dir, variant)
                print(f"| {name} | {variant} | +{m['peak_mib']:,.0f} MiB | +{m['resident_mib']:,.0f} MiB | "
                      f"{m['tensors_mib']:,.1f} MiB |", flush=True)


if __name__ == "__main__":
    main()
