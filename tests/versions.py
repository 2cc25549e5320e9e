"""Predictions of one model + adapter under the newest transformers, to compare other versions against.

vlmtune supports every transformers release from 5.16.1 (what vLLM's releases pin) to the newest. CI
makes the reference with the newest (`python tests/versions.py make DIR`, in the main venv): for each
family a tiny model, an adapter trained by `vlmtune train`, and `vlmtune predict` in score mode. Then,
in a venv with the oldest supported transformers, `VLMTUNE_REFERENCE=DIR pytest tests/infer/test_versions.py`
trains and predicts there too and checks that the reference adapter gives the same labels and P(label)
within 1e-4 (the weights are the same files; what may differ is transformers' code).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from helpers import ALL_ARCHS, TEMPLATE_OF, make_dataset, run_cli

TRAIN = ("max_steps=6", "gradient_accumulation_steps=2", "logging_steps=1", "save_strategy=no",
         "eval_strategy=no", "val_size=0", "report_to=none", "plot_loss=false", "learning_rate=5e-3",
         "image_max_pixels=50176", "disable_tqdm=true")


def train(model_dir: Path, data_dir: Path, out: Path, template: str) -> None:
    """`vlmtune train` of the example CPU config on the tiny model, as a user runs it."""
    from helpers import REPO

    result = run_cli("train", str(REPO / "examples" / "tiny_cpu.yaml"), f"model_name_or_path={model_dir}",
                     f"dataset_dir={data_dir}", f"output_dir={out}", f"template={template}", *TRAIN)
    if result.returncode != 0:
        raise RuntimeError(f"vlmtune train failed:\n{result.stderr[-3000:]}")


def predict(model_dir: Path, adapter: Path, data_dir: Path, save: Path) -> list[dict]:
    result = run_cli("predict", "--model_name_or_path", str(model_dir), "--adapter_name_or_path", str(adapter),
                     "--dataset", "my_dataset", "--dataset_dir", str(data_dir), "--save_name", str(save),
                     "--overwrite")
    if result.returncode != 0:
        raise RuntimeError(f"vlmtune predict failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in save.read_text(encoding="utf-8").splitlines()]


def make(root: Path) -> None:
    """The reference: per family a tiny model, its trained adapter and the predictions, under `root`."""
    import transformers

    import os

    from vlmtune.data.store import CACHE_ENV
    from vlmtune.model.tiny import build_tiny_model

    os.environ[CACHE_ENV] = str(root / "cache")  # the runs' encoded-data stores beside the reference, not in ~
    data_dir = make_dataset(root / "data")
    for arch in ALL_ARCHS:
        model_dir = build_tiny_model(root / arch / "model", arch=arch)
        train(model_dir, data_dir, root / arch / "adapter", TEMPLATE_OF[arch])
        predict(model_dir, root / arch / "adapter", data_dir, root / arch / "reference.jsonl")
    (root / "transformers_version").write_text(transformers.__version__, encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "make":
        sys.exit("usage: python tests/versions.py make DIR")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    make(Path(sys.argv[2]))
    print(f"reference predictions written to {sys.argv[2]}")
