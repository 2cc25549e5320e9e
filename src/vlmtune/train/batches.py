"""The order samples are trained in: a pure function of (seed, epoch), so a resumed run replays it.

Each epoch is a seeded permutation of the training set, split round-robin over the ranks (rank r takes
positions r, r+W, r+2W, …, padded by wrapping like torch's DistributedSampler so every rank has the
same number of micro-batches). With W ranks and gradient accumulation A, one optimisation step covers
the same W·A·B consecutive samples of the permutation as one rank with accumulation W·A — which is
what makes a 2-rank run match a 1-rank run with doubled accumulation.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from typing import Iterator

import torch


class EpochBatches:
    def __init__(self, n_samples: int, batch_size: int, grad_accum: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches each rank runs per epoch."""
        return math.ceil(self.n_samples / (self.batch_size * self.world_size))

    @property
    def steps_per_epoch(self) -> int:
        """Optimisation steps per epoch; a short last window still makes a step."""
        return math.ceil(self.micro_batches_per_epoch / self.grad_accum)

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for an epoch."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n_samples, generator=generator).tolist()
        per_step = self.batch_size * self.world_size
        total = self.micro_batches_per_epoch * per_step
        order = (order * math.ceil(total / self.n_samples))[:total]
        # Position p of a block of W·B goes to rank p % W: consecutive samples spread over the ranks.
        mine = [order[i] for i in range(self.rank, total, self.world_size)]
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def windows(self, epoch: int, skip_micro_batches: int = 0) -> list[list[list[int]]]:
        """The epoch's accumulation windows (one per optimisation step), after skipping what was done."""
        batches = self.micro_batches(epoch)
        windows = [batches[i:i + self.grad_accum] for i in range(0, len(batches), self.grad_accum)]
        assert skip_micro_batches % self.grad_accum == 0 or skip_micro_batches == len(batches)
        return windows[skip_micro_batches // self.grad_accum:]


@contextlib.contextmanager
def read_ahead(items: Iterator, depth: int) -> Iterator[Iterator]:
    """`items`, read by a thread up to `depth` items ahead of the consumer (0: read when asked, in this thread).

    Reading the store's samples and the cached image features is file reads and copies (the GIL released), so a
    thread keeps the next micro-batches ready while the model works. The reader stops when the consumer leaves."""
    if depth <= 0:
        yield items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    leaving = threading.Event()
    end = object()

    def read() -> None:
        try:
            for item in items:
                while not leaving.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if leaving.is_set():
                    return
            ready.put((end, None))
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put((end, exc))

    def consume() -> Iterator:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item

    reader = threading.Thread(target=read, name="vlmtune-read-ahead", daemon=True)
    reader.start()
    try:
        yield consume()
    finally:
        leaving.set()
        while reader.is_alive():  # let a blocked put see `leaving`
            with contextlib.suppress(queue.Empty):
                ready.get_nowait()
            reader.join(timeout=0.05)
