"""SIGKILL a run at different points, resume it: the adapter equals the uninterrupted run's."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ONE_PER_FAMILY, run_cli, run_inline
from vlmtune.families import TINY_DEFAULT

pytestmark = pytest.mark.slow

SETTINGS = dict(max_steps=12, save_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                val_size=0, logging_steps=1, learning_rate=5e-3, lora_dropout=0.1, plot_loss=False,
                report_to="none", disable_tqdm=True)


def start(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlmtune", "train", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="2"))


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL the process as soon as `ready()` holds; False if it finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    process.kill()
    raise AssertionError("the run did not reach the kill point")


def adapter(out: Path) -> dict:
    return load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)  # a model type of each family (MoE: test_ddp, test_deepspeed)
def test_kill_and_resume_equals_uninterrupted(family_train_config, arch, tmp_path):
    """Every family resumes exactly from a kill during a checkpoint write; the seed user's also from a kill
    mid-step after a checkpoint (the trainer's own logic, the same for every family)."""
    train_config = family_train_config
    reference = tmp_path / "reference"
    result = run_cli("train", str(train_config("ref.yaml", output_dir=str(reference), **SETTINGS)))
    assert result.returncode == 0, result.stderr[-2000:]
    expected = adapter(reference)
    steps_done = lambda out: sum(1 for _ in open(out / "trainer_log.jsonl")) if (out / "trainer_log.jsonl").exists() else 0  # noqa: E731

    kill_points = {
        # mid-step, a little after the first checkpoint
        "after a checkpoint": lambda out: steps_done(out) >= 5,
        # while a checkpoint is being written (its temporary directory exists)
        "during a checkpoint write": lambda out: any(out.glob(".tmp-checkpoint-9")),
        # before any checkpoint: resume must refuse, then a fresh start is the only way
    }
    if arch != TINY_DEFAULT:
        kill_points = {name: ready for name, ready in kill_points.items() if name == "during a checkpoint write"}
    for name, ready in kill_points.items():
        out = tmp_path / name.replace(" ", "_")
        cfg = train_config(f"{out.name}.yaml", output_dir=str(out), **SETTINGS)
        killed = kill_when(start(cfg), lambda: ready(out))
        assert killed, name
        assert not (out / "adapter_model.safetensors").exists()
        resumed = run_cli("train", str(cfg), "resume_from_checkpoint=true")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "Resumed from" in resumed.stdout
        got = adapter(out)
        assert got.keys() == expected.keys()
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst <= 1e-5, (name, worst)
        # no step logged twice or skipped
        import json

        steps = [json.loads(line)["step"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 13)), (name, steps)
        assert not list(out.glob(".tmp-checkpoint-*"))


def test_resume_without_checkpoint_is_clear(train_config, tmp_path):
    from helpers import assert_one_line_error

    cfg = train_config(output_dir=str(tmp_path / "empty"))
    assert_one_line_error(run_cli("train", str(cfg), "resume_from_checkpoint=true"),
                          "resume_from_checkpoint is true but there is no complete checkpoint")


@pytest.mark.parametrize("cache_image_features", [True, False])
def test_dataloader_worker_processes_give_the_same_training(train_config, tmp_path, capsys, monkeypatch,
                                                            cache_image_features):
    """On a GPU, `dataloader_num_workers` processes read the batches (and the cached image features of the
    epochs after the first) ahead of the model: the adapter is the one batches read in-process give."""
    from vlmtune.train import image_features, loop

    run = dict(SETTINGS, max_steps=-1, num_train_epochs=3, save_strategy="no",
               cache_image_features=cache_image_features)
    reference, pooled = tmp_path / "in_process", tmp_path / "workers"
    assert run_inline(capsys, "train", train_config("a.yaml", output_dir=str(reference), **run)).returncode == 0

    readers = tmp_path / "reader_pids"
    real_read_cached = image_features.read_cached

    def spy(directory, samples):  # which process read each batch (appended: workers are separate processes)
        with open(readers, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real_read_cached(directory, samples)

    monkeypatch.setattr(image_features, "read_cached", spy)
    monkeypatch.setattr(loop, "loader_workers", lambda cfg, device: 2)  # what a GPU device gets
    result = run_inline(capsys, "train", train_config("b.yaml", output_dir=str(pooled), **run))
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(set(readers.read_text().split()) - {str(os.getpid())}) >= 2  # worker processes read batches
    expected, got = adapter(reference), adapter(pooled)
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6
