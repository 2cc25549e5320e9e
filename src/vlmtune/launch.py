"""Starting torchrun from a vlmtune command (one process per GPU, on a free port), and what a process
started by it learns from its environment (rank, world, its share of the cores).

`vlmtune train` and `vlmtune predict` start torchrun themselves on a machine with several GPUs and no
launcher around them (LOCAL_RANK unset), as LLaMA-Factory does; training also for DeepSpeed on one GPU or
a CPU, which needs the environment torchrun gives its processes (without it DeepSpeed looks for MPI).
VLMTUNE_NO_TORCHRUN=1 keeps a command in its one process.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun_processes(deepspeed: bool, gpus: int, env) -> int | None:
    """How many processes to start under torchrun, None to run in this one: one per GPU when there are
    several, and one for DeepSpeed on a single GPU or a CPU; never inside a launcher (LOCAL_RANK set) or
    with VLMTUNE_NO_TORCHRUN=1. Refused in one line inside an `srun` step of several tasks that gives no ranks: each
    task would start its own torchrun, independent jobs writing one output_dir."""
    if "LOCAL_RANK" in env or env.get("VLMTUNE_NO_TORCHRUN") == "1":
        return None
    tasks = env.get("SLURM_STEP_NUM_TASKS", "1")
    if tasks.isdigit() and int(tasks) > 1:
        from vlmtune.errors import VlmtuneError

        raise VlmtuneError(f"srun started {tasks} tasks of this command, and none of them knows its rank (LOCAL_RANK "
                           f"is unset): run one task per node (srun --ntasks-per-node 1; vlmtune starts one process per "
                           f"GPU there) with torchrun's multi-node flags, or start the ranks with torchrun yourself")
    if gpus > 1:
        return gpus
    return 1 if deepspeed else None


def free_port() -> int:
    """A port nobody listens on now, for torchrun's rendezvous (29500, its default, may be another job's)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(processes: int, port: int, command: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
            str(port), "-m", "vlmtune", command, *args]


def relaunch_under_torchrun(command: str, args: list[str], processes: int) -> None:
    """Replace this process by torchrun running `vlmtune COMMAND ARGS` in `processes` processes."""
    port = free_port()
    print(f"starting torchrun --nproc_per_node {processes} --master_port {port}", flush=True)
    os.execv(sys.executable, torchrun_command(processes, port, command, args))


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun's environment; 0 and 1 alone)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# What each launcher calls this process's rank on its node, and the number of processes there: torchrun, DeepSpeed's
# `deepspeed` (LOCAL_SIZE), Open MPI, MPICH / Intel MPI, srun (SLURM_LOCALID; the tasks per node below).
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
LOCAL_WORLD_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                    "SLURM_NTASKS_PER_NODE")


def local_rank_and_world(env=None) -> tuple[int, int]:
    """This process's rank on its node and the number of processes there (0 and 1 alone), from whichever launcher
    started it; never more processes on the node than in the job (WORLD_SIZE). `node_ranks` asks the processes
    themselves once they are connected."""
    env = os.environ if env is None else env
    rank = next((int(env[v]) for v in LOCAL_RANK_VARS if env.get(v, "").isdigit()), 0)
    world = next((int(env[v]) for v in LOCAL_WORLD_VARS if env.get(v, "").isdigit()), None) or _slurm_tasks_here(env)
    job = env.get("WORLD_SIZE", "1")
    return rank, max(1, min(world or 1, int(job) if job.isdigit() else 1))


def _slurm_tasks_here(env) -> int | None:
    """srun's tasks on this node: SLURM_STEP_TASKS_PER_NODE (or the job's) reads like `2(x3),1`, one count per
    node, SLURM_NODEID picks this node's."""
    import re

    counts = []
    for part in (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "").split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return None
        counts += [int(match[1])] * int(match[2] or 1)
    node = env.get("SLURM_NODEID", "0")
    return counts[int(node)] if node.isdigit() and int(node) < len(counts) else None


@dataclass(frozen=True)
class Ranks:
    """This process among the job's processes and among those on its node, as the processes themselves said (each
    told its host name: `node_ranks`), whatever the launcher set. Every method but the properties is a collective:
    all ranks call it, in the same order. A VlmtuneError raised by the work of one rank is raised on every rank."""

    rank: int = 0
    world: int = 1
    node: tuple[int, ...] = (0,)  # the job's ranks on this node, ascending: node[0] leads the node

    @property
    def local_rank(self) -> int:
        return self.node.index(self.rank)

    @property
    def local_world(self) -> int:
        return len(self.node)

    @property
    def leads(self) -> bool:
        return self.rank == self.node[0]

    def gather(self, value) -> list:
        """Every rank's value, in rank order."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def from_first(self, work: Callable[[], T]) -> T:
        """`work()` run by rank 0 alone, its result on every rank."""
        outcome = [_attempt(work) if self.rank == 0 else None]
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(outcome, src=0)
        return _settle(outcome[0])

    def from_leader(self, work: Callable[[], T]) -> T:
        """`work()` run by the node's leader alone, its result on the node's ranks."""
        return _settle(self.gather(_attempt(work) if self.leads else None)[self.node[0]])

    def everyone(self, work: Callable[[], T]) -> T:
        """`work()` run by every rank; returns when all have finished it (each its own result)."""
        outcomes = self.gather(_attempt(work))
        for outcome in outcomes:
            if outcome[0] == "error":
                _settle(outcome)
        return _settle(outcomes[self.rank])


def node_ranks() -> Ranks:
    """This process's `Ranks`: each process of the job tells its host name (a collective); alone without one."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Ranks()
    rank, world = dist.get_rank(), dist.get_world_size()
    hosts = Ranks(rank, world).gather(socket.gethostname())
    return Ranks(rank, world, tuple(r for r, host in enumerate(hosts) if host == hosts[rank]))


def _attempt(work) -> tuple:
    from vlmtune.errors import VlmtuneError

    try:
        return "ok", work()
    except VlmtuneError as exc:
        return "error", str(exc)


def _settle(outcome: tuple):
    from vlmtune.errors import VlmtuneError

    if outcome[0] == "error":
        raise VlmtuneError(outcome[1])
    return outcome[1]


def share_cores_between_local_ranks() -> None:
    """On a CPU: the node's cores split between its processes, never more threads than asked for (with
    OMP_NUM_THREADS / torch.set_num_threads). Two processes × two threads on two cores is catastrophic."""
    import torch

    local_world = local_rank_and_world()[1]
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // local_world)))
