"""glibc malloc settings per command: what happens to a large buffer (an activation, a batch of
image patches) after torch frees it. Set at the start of a command, before torch allocates.

glibc gives each allocation above its mmap threshold its own mapping and unmaps it when freed; the
next one of the same size is page-faulted in again, 4 KiB at a time. By default the threshold grows
each time such a block is freed, so after a while large buffers come from the heaps instead, where
fragmentation may keep freed memory resident. Commands want opposite things:

* training (`for_training`): memory. A fixed 4 MiB threshold: peak RSS 497 MiB instead of 543–851
  MiB (benchmarks/train_throughput.py, 2 cores), at the same speed; 128 KiB cost a third of the speed.
* serving (`for_serving`): memory, as training. A request's images are decoded at full size (an
  8k × 8k image is 190 MB) and freed once resized; with glibc's growing threshold those blocks end up
  in the heaps and stay resident between requests, so the API fixes the threshold at 4 MiB too.
* prediction (`for_prediction`): speed. Every batch allocates the same buffers again (8 images of
  448² are 19 MB of patches alone); kept by the process and reused, they cost no page faults: 1,800
  minor faults per sample and ≈10 % of the CPU time in the kernel before, none after
  (benchmarks/predict_throughput.py, 2 cores). One arena (the score workers share it) with a 32 MiB
  mmap threshold (glibc's maximum) and a 1 GiB trim threshold; memory stays at the peak of a batch.

`MALLOC_*` variables in the environment win. Other C libraries: nothing happens.
"""

from __future__ import annotations

import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # malloc.h


def _mallopt(settings: dict[int, int]) -> None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        for option, value in settings.items():
            libc.mallopt(option, value)
    except (OSError, AttributeError):  # not glibc
        pass


def user_decided() -> bool:
    return any(key.startswith("MALLOC_") and key.endswith("_") for key in os.environ)


def for_training(mmap_threshold: int = 4 << 20) -> None:
    """Large buffers get their own mapping and go back to the OS when freed (low peak RSS)."""
    if not user_decided():
        _mallopt({M_MMAP_THRESHOLD: mmap_threshold})


def for_prediction() -> None:
    """Freed buffers stay with the process and are reused (no page faults per batch)."""
    if not user_decided():
        _mallopt({M_ARENA_MAX: 1, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30})


def for_serving(mmap_threshold: int = 4 << 20) -> None:
    """Decoded request images go back to the OS when freed (RSS flat between requests)."""
    for_training(mmap_threshold)
