"""`report_to`: the trackers receive train loss and eval metrics (wandb offline; mlflow — only the `[mlflow]`
extra installed — with no tracking URI, with sqlite:/// and with a file store), through accelerate's trackers;
a tracker that is not installed is one line naming the extra."""

import importlib.util
import json
import os

import pytest

from helpers import assert_one_line_error, run_cli, run_inline

pytestmark = pytest.mark.slow
RUN = dict(max_steps=4, logging_steps=1, eval_steps=2, eval_strategy="steps", val_size=0.25, plot_loss=False,
           disable_tqdm=True, learning_rate=5e-3, save_strategy="no")


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (test extra)")
def test_mlflow_receives_train_loss_and_eval_metrics(train_config, tmp_path, monkeypatch, capsys):
    store = tmp_path / "mlruns"
    cfg = train_config(report_to="mlflow,tensorboard", run_name="judge", **RUN)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "vlmtune-test")
    # MLflow 3 refuses a file store unless asked: a tracker that cannot start is one line, before training
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    refused = run_inline(capsys, "train", cfg)
    assert_one_line_error(refused, "report_to:", "could not start", "opens only with MLFLOW_ALLOW_FILE_STORE=true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    result = run_inline(capsys, "train", cfg)
    assert result.returncode == 0, result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("vlmtune-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/f1")] == [2, 4]
    assert {"eval/loss", "eval/accuracy", "train/learning_rate"} <= set(run.data.metrics)
    assert run.data.params["lora_rank"] == "8"
    assert list((tmp_path / "out" / "runs" / "judge").glob("events.out.tfevents.*"))  # and TensorBoard beside it


def tracked_series(log_path) -> dict[str, list[tuple[int, float]]]:
    """trainer_log.jsonl's rows as the trackers receive them: `train/loss`, `train/learning_rate`, `eval/f1`, …
    → [(step, value)] (timing columns stay in the log; a NaN is not sent)."""
    series: dict[str, list[tuple[int, float]]] = {}
    timing = {"step", "current_steps", "total_steps", "percentage", "elapsed_time", "remaining_time"}
    for row in map(json.loads, log_path.read_text(encoding="utf-8").splitlines()):
        prefix = "eval" if "eval_loss" in row else "train"
        for key, value in row.items():
            if key in timing or not isinstance(value, (int, float)) or value != value:
                continue
            tag = "learning_rate" if key == "lr" else key.removeprefix("eval_")
            series.setdefault(f"{prefix}/{tag}", []).append((row["step"], value))
    return series


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (test extra)")
@pytest.mark.parametrize("where", ["mlflow default", "MLFLOW_TRACKING_URI=sqlite"])
def test_mlflow_records_train_loss_and_eval_metrics_out_of_the_box(where, train_config, tmp_path, monkeypatch,
                                                                   capsys):
    """`pip install vlmtune[mlflow]`, `report_to: mlflow`, and nothing else: MLflow 3's default store is
    sqlite:///mlflow.db in the working directory, which mlflow-skinny opens only with the extra's SQLAlchemy and
    Alembic. Every series of trainer_log.jsonl reaches it, value for value."""
    for name in [n for n in os.environ if n.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    db = work / "mlflow.db" if where == "mlflow default" else tmp_path / "elsewhere" / "mlflow.db"
    if where != "mlflow default":
        db.parent.mkdir()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cfg = train_config(report_to="mlflow", run_name="judge", **RUN)
    result = run_inline(capsys, "train", cfg)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("report_to: mlflow: run ")]
    assert line.endswith(f"of experiment 'judge' recorded in sqlite:///{db}"), line
    assert db.is_file() and not (tmp_path / "out" / "mlflow.db").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("judge").experiment_id])
    expected = tracked_series(tmp_path / "out" / "trainer_log.jsonl")
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "eval/f1",
            "eval/accuracy"} <= set(expected)
    assert set(run.data.metrics) == set(expected)
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in expected["eval/f1"]] == [2, 4]
    for key, points in expected.items():
        recorded = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [step for step, _ in recorded] == [step for step, _ in points], key
        # trainer_log.jsonl rounds to 6 decimals; the tracker gets the value itself
        assert [value for _, value in recorded] == pytest.approx([v for _, v in points], rel=1e-5, abs=1e-6), key
    assert run.data.params["lora_rank"] == "8"


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
