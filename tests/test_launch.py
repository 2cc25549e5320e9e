"""`launch.py`: when a command starts torchrun itself, and when it must not."""

import pytest

from vlmtune.errors import VlmtuneError
from vlmtune.launch import torchrun_processes


def test_srun_tasks_without_ranks_are_refused_not_relaunched():
    """srun with 8 tasks per node and no torchrun environment: each task would start torchrun, 8 independent jobs
    writing one output_dir."""
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8"}
    with pytest.raises(VlmtuneError, match=r"srun started 8 tasks .*\(LOCAL_RANK"):
        torchrun_processes(deepspeed=False, gpus=8, env=env)
    with pytest.raises(VlmtuneError):
        torchrun_processes(deepspeed=False, gpus=0, env=env)  # alone on a CPU each would train on its own too
    assert torchrun_processes(deepspeed=False, gpus=8, env={**env, "SLURM_STEP_NUM_TASKS": "1"}) == 8
    assert torchrun_processes(deepspeed=False, gpus=8, env={**env, "LOCAL_RANK": "3"}) is None  # srun gave ranks


@pytest.mark.parametrize("launcher, env, expected", [
    ("torchrun", {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}, (1, 4)),
    ("deepspeed", {"LOCAL_RANK": "1", "LOCAL_SIZE": "2", "WORLD_SIZE": "2"}, (1, 2)),
    ("mpirun", {"OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "WORLD_SIZE": "8"}, (3, 4)),
    ("srun", {"LOCAL_RANK": "1", "SLURM_TASKS_PER_NODE": "4(x2),2", "SLURM_NODEID": "2", "WORLD_SIZE": "10"}, (1, 2)),
    ("sbatch, one process", {"SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "8"}, (0, 1)),
    ("alone", {}, (0, 1)),
])
def test_the_local_world_of_each_launcher(monkeypatch, launcher, env, expected):
    """A launcher that sets no LOCAL_WORLD_SIZE made every local rank a one-rank store builder (its own temporary
    copy of the dataset, never cleaned up)."""
    from vlmtune.launch import LOCAL_RANK_VARS, LOCAL_WORLD_VARS, local_rank_and_world

    for name in (*LOCAL_RANK_VARS, *LOCAL_WORLD_VARS, "WORLD_SIZE", "SLURM_TASKS_PER_NODE", "SLURM_NODEID",
                 "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert local_rank_and_world() == expected, launcher
