"""malloc settings: prediction reuses freed large buffers (no page faults), training returns them to the OS."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
from vlmtune import allocator
getattr(allocator, sys.argv[1])()
import torch
def churn():
    for _ in range(10):
        torch.empty(5 << 20).fill_(1.0)  # 20 MiB, as a batch of image patches
churn()
rounds = []
for _ in range(3):  # the quietest round: page faults the machine adds (NUMA hinting, reclaim) only ever add
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(rounds))
"""


def faults(profile: str) -> int:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROBE, profile], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_prediction_reuses_buffers_and_training_returns_them():
    for_prediction, for_training = faults("for_prediction"), faults("for_training")
    # 10 × 20 MiB touched: ≈51,000 faults of 4 KiB when every buffer is a fresh mapping.
    assert for_training > 20_000
    assert for_prediction < for_training / 20
