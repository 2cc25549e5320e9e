"""Experiment trackers (`report_to`): TensorBoard, Weights & Biases, MLflow, SwanLab — through accelerate's
trackers, each configured the usual way by its own environment variables (WANDB_MODE=offline,
WANDB_PROJECT, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, SWANLAB_MODE, ...).

`report_to` takes the seed YAML's values: one name, a comma list or a YAML list, `none`, or `all` (every
tracker that is installed). A tracker that is not installed is a one-line error naming the extra that
installs it, before any model is loaded. TensorBoard events go to `logging_dir` (default
`output_dir/runs`) under the run's name, as the HF Trainer lays them out.
"""

from __future__ import annotations

import importlib.util

from vlmtune.errors import VlmtuneError

# report_to name → (module it needs, vlmtune extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "swanlab": ("swanlab", "swanlab")}


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name][0]) is not None


def chosen_trackers(report_to: list[str]) -> list[str]:
    """The trackers a run reports to (config.validate has checked the names); `all` = the installed ones."""
    if "all" in report_to:
        return [name for name in TRACKERS if installed(name)]
    missing = [name for name in report_to if not installed(name)]
    if missing:
        name = missing[0]
        raise VlmtuneError(f"report_to: {name} is not installed; pip install 'vlmtune[{TRACKERS[name][1]}]' "
                           f"(or drop it from report_to)")
    return list(dict.fromkeys(report_to))


def run_config(flat: dict) -> dict:
    """The run's settings as trackers store them: scalars as they are, everything else as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def start_trackers(accelerator, run_name: str, config: dict) -> None:
    """`accelerator.init_trackers`, a tracker that cannot start (a refused store, no login) as one line."""
    try:
        accelerator.init_trackers(run_name, config=config)
    except Exception as exc:  # noqa: BLE001 — each tracker library raises its own types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        names = ", ".join(str(t) for t in accelerator.log_with)
        raise VlmtuneError(f"report_to: {names}: the tracker could not start ({message[:300]})") from None
