"""Starting torchrun from a vlmtune command (one process per GPU, on a free port), and what a process
started by it learns from its environment (rank, world, its share of the cores).

`vlmtune train` and `vlmtune predict` start torchrun themselves on a machine with several GPUs and no
launcher around them (LOCAL_RANK unset), as LLaMA-Factory does; training also for DeepSpeed on one GPU or
a CPU, which needs the environment torchrun gives its processes (without it DeepSpeed looks for MPI).
VLMTUNE_NO_TORCHRUN=1 keeps a command in its one process.

LLaMA-Factory's launcher variables mean the same here, so its cluster scripts run unchanged: FORCE_TORCHRUN=1
(torchrun even on one GPU or a CPU), NPROC_PER_NODE (processes per node; default one per GPU), and for several
nodes NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT — or an elastic job with RDZV_ID (and MIN_NNODES / MAX_NNODES,
MAX_RESTARTS). Several nodes need NODE_RANK, MASTER_ADDR and MASTER_PORT on every node: LLaMA-Factory's defaults
(node 0, 127.0.0.1, a free port) would leave each node waiting for the others at its own address.
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
    if _digits(tasks) and int(tasks) > 1:
        from vlmtune.errors import VlmtuneError

        raise VlmtuneError(f"srun started {tasks} tasks of this command, and none of them knows its rank (LOCAL_RANK "
                           f"is unset): run one task per node (srun --ntasks-per-node 1; vlmtune starts one process per "
                           f"GPU there) with torchrun's multi-node flags, or start the ranks with torchrun yourself")
    nodes = multi_node(env)
    if gpus > 1 or nodes.nnodes > 1 or nodes.rdzv_id or env.get("FORCE_TORCHRUN", "").strip().lower() in TRUE:
        return _whole(env, "NPROC_PER_NODE", minimum=1) or max(1, gpus)
    return 1 if deepspeed else None


TRUE = ("1", "true", "y", "yes")


@dataclass(frozen=True)
class Nodes:
    """The nodes of a job as LLaMA-Factory's launcher variables give them (one node by default)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port on this one node
    rdzv_id: str | None = None  # an elastic job: torchrun's c10d rendezvous at master_addr:master_port
    rdzv_nnodes: str = "1"  # `N`, or `MIN:MAX` nodes
    max_restarts: int = 0


def multi_node(env) -> Nodes:
    """The job's nodes from NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID, MIN_NNODES, MAX_NNODES and
    MAX_RESTARTS; a value that cannot be right is one line naming its variable."""
    from vlmtune.errors import VlmtuneError

    nnodes = _whole(env, "NNODES", minimum=1) or 1
    rdzv_id = env.get("RDZV_ID", "").strip() or None
    if nnodes > 1 or rdzv_id:
        needed = ("MASTER_ADDR", "MASTER_PORT") + (("NODE_RANK",) if not rdzv_id else ())
        missing = [name for name in needed if not env.get(name, "").strip()]
        if missing:
            raise VlmtuneError(f"NNODES={nnodes}{' with RDZV_ID' if rdzv_id else ''}: set {', '.join(missing)} on "
                               f"every node (node 0's address and a port it can open; each node its NODE_RANK), as "
                               f"for LLaMA-Factory's multi-node launch")
    node_rank = _whole(env, "NODE_RANK", minimum=0) or 0
    if node_rank >= nnodes and not rdzv_id:
        raise VlmtuneError(f"NODE_RANK={node_rank}: must be below NNODES={nnodes} (nodes count from 0)")
    low, high = _whole(env, "MIN_NNODES", minimum=1), _whole(env, "MAX_NNODES", minimum=1)
    if (low is None) != (high is None) or (low is not None and low > high):
        raise VlmtuneError(f"MIN_NNODES / MAX_NNODES: set both, the first at most the second (got "
                           f"{env.get('MIN_NNODES')!r} and {env.get('MAX_NNODES')!r})")
    return Nodes(nnodes, node_rank, _master_addr(env),
                 _whole(env, "MASTER_PORT", minimum=1, maximum=65535), rdzv_id,
                 f"{low}:{high}" if low is not None else str(nnodes), _whole(env, "MAX_RESTARTS", minimum=0) or 0)


def _whole(env, name: str, minimum: int, maximum: int | None = None) -> int | None:
    """An environment variable that must hold a whole number in [minimum, maximum]; None when unset or blank."""
    value = env.get(name, "").strip()
    if not value:
        return None
    if not _digits(value) or int(value) < minimum or (maximum is not None and int(value) > maximum):
        from vlmtune.errors import VlmtuneError

        bound = f"between {minimum} and {maximum}" if maximum is not None else f"≥ {minimum}"
        raise VlmtuneError(f"{name}={value!r}: must be a whole number {bound}")
    return int(value)


def _digits(value: str) -> bool:
    """ASCII digits only: str.isdigit() is also true of '²', which int() refuses with a ValueError."""
    return value.isascii() and value.isdigit()


def _master_addr(env) -> str:
    """MASTER_ADDR, a host name or an address (IPv6: several colons). One with a port (`host:29500`: one colon) or
    a blank would leave every node waiting at an address that is nobody's: one line instead."""
    from vlmtune.errors import VlmtuneError

    value = env.get("MASTER_ADDR", "").strip()
    if value.count(":") == 1 or any(c.isspace() for c in value):
        raise VlmtuneError(f"MASTER_ADDR={value!r}: must be node 0's host name or address alone (its port goes in "
                           f"MASTER_PORT)")
    return value or "127.0.0.1"


def free_port() -> int:
    """A port nobody listens on now, for torchrun's rendezvous (29500, its default, may be another job's)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(processes: int, port: int, command: str, args: list[str], nodes: Nodes = Nodes()) -> list[str]:
    """torchrun running `vlmtune COMMAND ARGS` in `processes` processes on this node, of `nodes`."""
    if nodes.rdzv_id:
        where = ["--nnodes", nodes.rdzv_nnodes, "--rdzv_id", nodes.rdzv_id, "--rdzv_backend", "c10d",
                 "--rdzv_endpoint", f"{nodes.master_addr}:{port}", "--max_restarts", str(nodes.max_restarts)]
    elif nodes.nnodes > 1:
        where = ["--nnodes", str(nodes.nnodes), "--node_rank", str(nodes.node_rank), "--master_addr",
                 nodes.master_addr, "--master_port", str(port)]
    else:
        where = ["--master_addr", nodes.master_addr, "--master_port", str(port)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *where,
            "-m", "vlmtune", command, *args]


def relaunch_under_torchrun(command: str, args: list[str], processes: int) -> None:
    """Replace this process by torchrun running `vlmtune COMMAND ARGS` in `processes` processes (on each node of
    LLaMA-Factory's multi-node variables)."""
    nodes = multi_node(os.environ)
    port = nodes.master_port or free_port()
    launch = torchrun_command(processes, port, command, args, nodes)
    print(f"starting torchrun {' '.join(launch[3:launch.index('-m', 3)])}", flush=True)
    os.execv(sys.executable, launch)


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
    rank = next((int(env[v]) for v in LOCAL_RANK_VARS if _digits(env.get(v, ""))), 0)
    world = next((int(env[v]) for v in LOCAL_WORLD_VARS if _digits(env.get(v, ""))), None) or _slurm_tasks_here(env)
    job = env.get("WORLD_SIZE", "1")
    return rank, max(1, min(world or 1, int(job) if _digits(job) else 1))


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
    return counts[int(node)] if _digits(node) and int(node) < len(counts) else None


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
