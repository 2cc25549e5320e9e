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


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun_processes(deepspeed: bool, gpus: int, env) -> int | None:
    """How many processes to start under torchrun, None to run in this one: one per GPU when there are
    several, and one for DeepSpeed on a single GPU or a CPU; never inside a launcher (LOCAL_RANK set) or
    with VLMTUNE_NO_TORCHRUN=1."""
    if "LOCAL_RANK" in env or env.get("VLMTUNE_NO_TORCHRUN") == "1":
        return None
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


def local_rank_and_world() -> tuple[int, int]:
    """This process's rank on its node and the number of processes there (0 and 1 alone)."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def share_cores_between_local_ranks() -> None:
    """On a CPU: the node's cores split between its processes, never more threads than asked for (with
    OMP_NUM_THREADS / torch.set_num_threads). Two processes × two threads on two cores is catastrophic."""
    import torch

    local_world = local_rank_and_world()[1]
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // local_world)))
