"""`vlmtune train CONFIG.yaml [key=value ...]`

On a machine with several GPUs and no launcher around it, this starts torchrun itself with one process
per GPU (as LLaMA-Factory does); `torchrun --nproc_per_node N -m vlmtune train CONFIG.yaml` and the usual
multi-node torchrun flags work as well. On CPUs, torchrun with several processes uses the gloo backend.
"""

from __future__ import annotations

import argparse
import os
import sys

from vlmtune.config import load_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="training YAML (LLaMA-Factory keys; see docs/config.md)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that override the YAML")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # validate before launching anything
    if _should_launch_torchrun():
        import torch

        n = torch.cuda.device_count()
        print(f"{n} GPUs visible: starting torchrun --nproc_per_node {n}", flush=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                   "-m", "vlmtune", "train", args.config, *args.overrides]
        os.execv(sys.executable, command)
    from vlmtune.train.loop import train

    train(cfg)
    return 0


def _should_launch_torchrun() -> bool:
    if "LOCAL_RANK" in os.environ or os.environ.get("VLMTUNE_NO_TORCHRUN") == "1":
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.device_count() > 1
