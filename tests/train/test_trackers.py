"""`report_to`: the trackers receive train loss and eval metrics (wandb offline, mlflow with a local store),
through accelerate's trackers; a tracker that is not installed is one line naming the extra."""

import importlib.util

import pytest

from helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow
RUN = dict(max_steps=4, logging_steps=1, eval_steps=2, eval_strategy="steps", val_size=0.25, plot_loss=False,
           disable_tqdm=True, learning_rate=5e-3, save_strategy="no")


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (test extra)")
def test_mlflow_receives_train_loss_and_eval_metrics(train_config, tmp_path, monkeypatch):
    store = tmp_path / "mlruns"
    cfg = train_config(report_to="mlflow,tensorboard", run_name="judge", **RUN)
    env = {"MLFLOW_TRACKING_URI": store.as_uri(), "MLFLOW_EXPERIMENT_NAME": "vlmtune-test"}
    # MLflow 3 refuses a file store unless asked: a tracker that cannot start is one line, before training
    refused = run_cli("train", str(cfg), env={**env, "MLFLOW_ALLOW_FILE_STORE": "false"})
    assert_one_line_error(refused, "report_to:", "could not start")
    result = run_cli("train", str(cfg), env={**env, "MLFLOW_ALLOW_FILE_STORE": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's client too
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("vlmtune-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/f1")] == [2, 4]
    assert {"eval/loss", "eval/accuracy", "train/learning_rate"} <= set(run.data.metrics)
    assert run.data.params["lora_rank"] == "8"
    assert list((tmp_path / "out" / "runs" / "judge").glob("events.out.tfevents.*"))  # and TensorBoard beside it


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (test extra)")
def test_wandb_offline_receives_train_loss_and_eval_metrics(train_config, tmp_path):
    cfg = train_config(report_to="wandb", **RUN)
    result = run_cli("train", str(cfg), env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                                              "WANDB_PROJECT": "vlmtune-test", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    # The run file is wandb's own record log (read by `wandb sync`; wandb ships no reader for it): each logged
    # row is a history record naming its keys, so every logging step and evaluation leaves its keys in it.
    records = next(run_dir.glob("*.wandb")).read_bytes()
    assert records.count(b"train/loss") >= 4 and records.count(b"train/learning_rate") >= 4
    assert records.count(b"eval/f1") >= 2 and records.count(b"eval/loss") >= 2


def test_a_tracker_that_is_not_installed_names_its_extra(train_config, monkeypatch):
    from vlmtune.errors import VlmtuneError
    from vlmtune.train import trackers

    monkeypatch.setattr(trackers, "installed", lambda name: name == "tensorboard")
    with pytest.raises(VlmtuneError, match=r"report_to: swanlab is not installed; pip install 'vlmtune\[swanlab\]'"):
        trackers.chosen_trackers(["tensorboard", "swanlab"])
    assert trackers.chosen_trackers(["all"]) == ["tensorboard"]
    assert_one_line_error(run_cli("train", str(train_config(report_to="neptune"))), "'report_to' must be any of")
