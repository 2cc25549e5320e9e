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


def test_llama_factorys_launcher_variables_start_torchrun_as_they_start_it():
    """FORCE_TORCHRUN, NPROC_PER_NODE, NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT and RDZV_ID: the same torchrun
    LLaMA-Factory's launcher would start (tests/train/test_ddp.py trains on two such "nodes")."""
    from vlmtune.launch import multi_node, torchrun_command

    assert torchrun_processes(deepspeed=False, gpus=1, env={"FORCE_TORCHRUN": "1"}) == 1
    assert torchrun_processes(deepspeed=False, gpus=0, env={"FORCE_TORCHRUN": "true", "NPROC_PER_NODE": "2"}) == 2
    assert torchrun_processes(deepspeed=False, gpus=8, env={"NPROC_PER_NODE": "4"}) == 4
    assert torchrun_processes(deepspeed=False, gpus=1, env={"NPROC_PER_NODE": "4"}) is None  # as LLaMA-Factory
    nodes_env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert torchrun_processes(deepspeed=False, gpus=1, env=nodes_env) == 1  # several nodes: never alone
    command = torchrun_command(8, 29500, "train", ["cfg.yaml"], multi_node(nodes_env))
    assert command[3:command.index("-m", 3)] == ["--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1",
                                                  "--master_addr", "10.0.0.1", "--master_port", "29500"]
    elastic = multi_node({"RDZV_ID": "job7", "MIN_NNODES": "2", "MAX_NNODES": "4", "MAX_RESTARTS": "3",
                          "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "NNODES": "4"})
    command = torchrun_command(8, 29500, "train", ["cfg.yaml"], elastic)
    assert command[3:command.index("-m", 3)] == ["--nproc_per_node", "8", "--nnodes", "2:4", "--rdzv_id", "job7",
                                                  "--rdzv_backend", "c10d", "--rdzv_endpoint", "10.0.0.1:29500",
                                                  "--max_restarts", "3"]


@pytest.mark.parametrize("env, fragments", [
    ({"NNODES": "2", "NODE_RANK": "0"}, ["NNODES=2", "MASTER_ADDR, MASTER_PORT", "every node"]),
    ({"NNODES": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, ["NODE_RANK"]),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, ["NODE_RANK=2", "below NNODES=2"]),
    ({"NNODES": "two"}, ["NNODES='two'", "whole number"]),
    ({"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "0"}, ["NPROC_PER_NODE='0'", "≥ 1"]),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, ["MASTER_PORT", "65535"]),
    ({"RDZV_ID": "j", "MASTER_ADDR": "h", "MASTER_PORT": "1", "MIN_NNODES": "2"}, ["MIN_NNODES / MAX_NNODES"]),
    ({"NNODES": "²"}, ["NNODES='²'", "whole number"]),  # str.isdigit() is true of '²'; int() is not
    ({"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "³"}, ["NPROC_PER_NODE='³'"]),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1:29500", "MASTER_PORT": "29500"},
     ["MASTER_ADDR='10.0.0.1:29500'", "MASTER_PORT"]),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node 0", "MASTER_PORT": "29500"}, ["MASTER_ADDR='node 0'"]),
    ({"NNODES": "1", "RDZV_ID": "  ", "MASTER_PORT": "1", "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "a"},
     ["NPROC_PER_NODE"]),  # a blank RDZV_ID is unset: not an elastic job asking for MASTER_ADDR
])
def test_launcher_variables_that_cannot_work_are_one_line(env, fragments):
    """LLaMA-Factory's defaults for a missing MASTER_ADDR / NODE_RANK (127.0.0.1, node 0) leave each node waiting
    for the others at its own address: refused before anything starts."""
    with pytest.raises(VlmtuneError) as error:
        torchrun_processes(deepspeed=False, gpus=8, env=env)
    assert "\n" not in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_odd_launcher_values_that_can_work_do():
    """An IPv6 MASTER_ADDR (several colons) is an address, not host:port; a blank RDZV_ID is unset; a launcher's
    '²' for a rank or a size is no number (no ValueError)."""
    from vlmtune.launch import local_rank_and_world, multi_node, torchrun_command

    nodes = multi_node({"RDZV_ID": "job", "MASTER_ADDR": "fe80::1", "MASTER_PORT": "29500"})
    command = torchrun_command(1, 29500, "train", [], nodes)
    assert command[command.index("--rdzv_endpoint") + 1] == "fe80::1:29500"
    assert multi_node({"RDZV_ID": " "}).rdzv_id is None
    assert torchrun_processes(deepspeed=False, gpus=0, env={"SLURM_STEP_NUM_TASKS": "²"}) is None
    assert local_rank_and_world({"LOCAL_RANK": "²", "LOCAL_WORLD_SIZE": "²", "WORLD_SIZE": "²"}) == (0, 1)
