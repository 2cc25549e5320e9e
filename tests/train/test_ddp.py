"""Two CPU ranks (gloo) against one rank with doubled gradient accumulation: the same loss curve."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import MOE_ARCHS, run_cli
from vlmtune.families import TINY_DEFAULT

pytestmark = pytest.mark.slow


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.mark.parametrize("arch", [TINY_DEFAULT, *MOE_ARCHS])  # the seed user's family, the MoEs' routers
def test_two_ranks_match_one_rank_with_double_accumulation(family_train_config, tmp_path):
    train_config = family_train_config
    common = dict(max_steps=5, logging_steps=1, val_size=0, plot_loss=False, report_to="none", disable_tqdm=True,
                  learning_rate=5e-3)
    two = tmp_path / "two"
    cfg = train_config("two.yaml", output_dir=str(two), gradient_accumulation_steps=2, **common)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29533", "-m", "vlmtune", "train", str(cfg)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Process rank: 0, world size: 2" in result.stdout and "Process rank: 1, world size: 2" in result.stdout
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in result.stdout

    one = tmp_path / "one"
    result = run_cli("train", str(train_config("one.yaml", output_dir=str(one), gradient_accumulation_steps=4,
                                               **common)))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(two), losses(one)
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert a[-1] < a[0]


def test_one_validation_record_on_two_ranks_finishes_with_one_ranks_metrics(train_config, tmp_path):
    """Rank 1 has no validation sample of its own: it must still run the evaluation forwards (DDP's buffer
    broadcast, ZeRO-3's gathers) instead of leaving rank 0 waiting, and the metrics are one rank's."""
    common = dict(max_steps=2, logging_steps=1, eval_steps=1, eval_strategy="steps", val_size=1, plot_loss=False,
                  report_to="none", disable_tqdm=True, learning_rate=5e-3, ddp_timeout=120)
    two = tmp_path / "two"
    cfg = train_config("two.yaml", output_dir=str(two), gradient_accumulation_steps=1, **common)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29534", "-m", "vlmtune", "train", str(cfg)],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = tmp_path / "one"
    result = run_cli("train", str(train_config("one.yaml", output_dir=str(one), gradient_accumulation_steps=2,
                                               **common)))
    assert result.returncode == 0, result.stderr[-3000:]

    def evals(out):
        rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith("eval_") and k != "eval_runtime"} for r in rows
                if "eval_loss" in r]
    a, b = evals(two), evals(one)
    assert len(a) == len(b) == 2 and all(r["eval_accuracy"] in (0.0, 1.0) for r in a)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert all(abs(x[k] - y[k]) < 1e-4 for k in x if x[k] == x[k]), (x, y)  # NaN-free keys compared
