"""Experiment trackers (`report_to`): TensorBoard, Weights & Biases, MLflow, SwanLab — through accelerate's
trackers, each configured the usual way by its own environment variables (WANDB_MODE=offline,
WANDB_PROJECT, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, SWANLAB_MODE, ...).

`report_to` takes the seed YAML's values: one name, a comma list or a YAML list, `none`, or `all` (every
tracker that is installed). A tracker that is not installed is a one-line error naming the extra that
installs it, before any model is loaded. TensorBoard events go to `logging_dir` (default
`output_dir/runs`) under the run's name, as the HF Trainer lays them out.

MLflow records into MLFLOW_TRACKING_URI, else into MLflow's own default: `mlflow.db` (SQLite) in the working
directory, or `./mlruns` where that already holds runs (a file store, which MLflow 3 opens only with
MLFLOW_ALLOW_FILE_STORE=true: the error says so). Deliberately not `output_dir`: one store per working
directory is where the HF Trainer and LLaMA-Factory record, where `mlflow ui` started there looks, and what
lets runs be compared; a store per output_dir would hold a single run. A start-up line names the store, the
experiment (MLFLOW_EXPERIMENT_NAME, else the run's name) and the run. The `[mlflow]` extra brings SQLAlchemy
and Alembic with mlflow-skinny: without them MLflow has no SQL store and its default URI fails.
"""

from __future__ import annotations

import importlib.util

from vlmtune.errors import VlmtuneError, brief

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
    """`accelerator.init_trackers`, a tracker that cannot start (a refused store, no login) as one line; on the
    main process, one line saying where MLflow records the run."""
    try:
        accelerator.init_trackers(run_name, config=config)
    except Exception as exc:  # noqa: BLE001 — each tracker library raises its own types
        message = brief(exc, 300)
        names = ", ".join(str(t) for t in accelerator.log_with)
        hint = _mlflow_hint() if type(exc).__module__.startswith("mlflow") else ""
        raise VlmtuneError(f"report_to: {names}: the tracker could not start ({message[:300]}){hint}") from None
    if accelerator.is_main_process and "mlflow" in [str(t) for t in accelerator.log_with]:
        import mlflow

        tracker = accelerator.get_tracker("mlflow")
        print(f"report_to: mlflow: run {tracker.active_run.info.run_id} of experiment '{tracker.experiment_name}' "
              f"recorded in {mlflow.get_tracking_uri()}", flush=True)


def _mlflow_hint() -> str:
    """What to set when MLflow's store did not open (its own advice comes after the part of its message kept)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("file:", "/", ".")):  # a file store: a file URI or a path
        return (f"; {uri} is a file store, which MLflow 3 opens only with MLFLOW_ALLOW_FILE_STORE=true; or set "
                f"MLFLOW_TRACKING_URI=sqlite:///mlflow.db")
    if uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql") and not all(
            importlib.util.find_spec(m) for m in ("sqlalchemy", "alembic")):
        return f"; {uri} is an SQL store, which needs SQLAlchemy and Alembic: pip install 'vlmtune[mlflow]'"
    return f" (MLflow tracking URI: {uri})"
