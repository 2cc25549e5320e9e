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


def two_nodes(cfg: Path, env: dict) -> subprocess.CompletedProcess:
    """`vlmtune train CFG` started on two nodes of one process each by LLaMA-Factory's launcher variables
    (FORCE_TORCHRUN, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE) — here both on this machine;
    their outputs joined, node 0's first."""
    from vlmtune.launch import free_port

    nodes = dict(env, FORCE_TORCHRUN="1", NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))
    runs = [subprocess.Popen([sys.executable, "-m", "vlmtune", "train", str(cfg)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(nodes, NODE_RANK=str(rank)))
            for rank in (0, 1)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for rank, (out, _) in enumerate(outputs):
        assert f"starting torchrun --nproc_per_node 1 --nnodes 2 --node_rank {rank} --master_addr 127.0.0.1" in out
    return subprocess.CompletedProcess([], max(run.returncode for run in runs), "".join(o for o, _ in outputs),
                                       "".join(e for _, e in outputs))


@pytest.mark.parametrize("arch", [TINY_DEFAULT, *MOE_ARCHS])  # the seed user's family, the MoEs' routers
def test_two_ranks_match_one_rank_with_double_accumulation(family_train_config, tmp_path, arch):
    train_config = family_train_config
    common = dict(max_steps=5, logging_steps=1, val_size=0, plot_loss=False, report_to="none", disable_tqdm=True,
                  learning_rate=5e-3)
    two = tmp_path / "two"
    cfg = train_config("two.yaml", output_dir=str(two), gradient_accumulation_steps=2, **common)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if arch == TINY_DEFAULT:  # as LLaMA-Factory's cluster scripts start it: `vlmtune train` on each of two "nodes"
        result = two_nodes(cfg, env)
    else:
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


RANKS_SCRIPT = """
import sys
from pathlib import Path
from types import SimpleNamespace

from accelerate import Accelerator

from vlmtune.errors import VlmtuneError
from vlmtune.train.distributed import check_every_rank_sees, decided_by_rank_zero
from vlmtune.train.loop import check_output_dir

accelerator = Accelerator(cpu=True)
rank, tmp = accelerator.process_index, Path(sys.argv[1])
said = open(tmp / f"rank-{rank}.txt", "w")  # one file a rank: two ranks' prints into one pipe interleave
# Rank 1's output_dir holds a file (another rank's probe, seen at the wrong moment): only rank 0 decides, so both go on.
(tmp / "busy").mkdir(exist_ok=True)
(tmp / "busy" / "probe").write_text("")
train = dict(output_dir=str(tmp / ("empty" if rank == 0 else "busy")), resume_from_checkpoint=None,
             overwrite_output_dir=False)
cfg = SimpleNamespace(train=SimpleNamespace(**train))
print("decided", rank, decided_by_rank_zero(accelerator, lambda: check_output_dir(cfg)), file=said, flush=True)
shared = tmp / "shared"
shared.mkdir(exist_ok=True)
check_every_rank_sees(shared, accelerator)
print("shared seen", rank, file=said, flush=True)
local = tmp / f"node-local-{rank}"  # the same path on two nodes, two disks
local.mkdir(exist_ok=True)
try:
    check_every_rank_sees(local, accelerator, wait_s=1)
except VlmtuneError as exc:
    print("refused", rank, exc, file=said, flush=True)
"""


def test_rank_zero_decides_on_output_dir_and_every_rank_must_see_it(tmp_path):
    """gpu_review #13 and #7 on 2 gloo ranks: rank 0 alone checks output_dir (a rank seeing another's probe file does
    not refuse alone), and an output_dir that is not one shared directory stops every rank in one line."""
    from vlmtune.launch import free_port

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), str(script), str(tmp_path)], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for rank in (0, 1) for line in (tmp_path / f"rank-{rank}.txt").read_text().splitlines()]
    assert {"decided 0 None", "decided 1 None", "shared seen 0", "shared seen 1"} <= set(lines), lines
    refused = [line for line in lines if line.startswith("refused")]
    assert len(refused) == 2 and all("rank(s) 1 do not see" in line and "all nodes share" in line for line in refused)
    assert not list((tmp_path / "shared").glob(".vlmtune-shared-*"))  # the token is gone again
