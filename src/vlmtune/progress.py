"""Progress of a long loop, readable wherever the output goes.

On a terminal a tqdm bar redraws itself in place. Anywhere else — a log file, CI, `nohup`, a pipe — each
redraw is one more carriage-return update in the file (hundreds in a training log), so there is no bar: the
loop's own lines carry the progress instead (training: its row at each logging step, with the percentage,
elapsed and remaining time; prediction: one line per tenth of the rows). `quiet_library_bars` does the same
for transformers' and huggingface_hub's bars (loading weights, downloads).
"""

from __future__ import annotations

import os
import sys
import time

HUB_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"  # huggingface_hub's switch; transformers reads it too


def on_terminal(stream=None) -> bool:
    """Whether `stream` (default: stderr, where bars go) is a terminal; a closed or replaced stream is not."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def quiet_library_bars() -> None:
    """Off a terminal, no bars from transformers and huggingface_hub either: through the environment for what
    is imported later and for worker processes (torchrun), directly for what is already imported. A user who
    set HF_HUB_DISABLE_PROGRESS_BARS keeps their choice."""
    if on_terminal() or os.environ.get(HUB_BARS_ENV) is not None:
        return
    os.environ[HUB_BARS_ENV] = "1"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """`done` of `total` units: a tqdm bar on a terminal; elsewhere, with `lines=k`, one line at each k-th part
    of `total` (and at the end), or with `lines=0` nothing (the caller prints lines of its own).

    `enabled=False` shows nothing anywhere (another rank, `disable_tqdm`). `bar` is None where no bar is drawn.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True,
                 lines: int = 0):
        from tqdm.auto import tqdm

        self.total, self.done, self.desc, self.unit = total, initial, desc, unit
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True) \
            if enabled and on_terminal() else None
        self.lines = lines if enabled and self.bar is None and total > 0 else 0
        self.start, self.start_done = time.time(), initial
        self.next_line = self._next_mark(initial)

    def _next_mark(self, done: int) -> int:
        """The first count past `done` that ends one of the `lines` equal parts of `total` (ceiling division)."""
        if not self.lines:
            return self.total + 1
        part = done * self.lines // self.total + 1
        return -(-part * self.total // self.lines)

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.lines and self.done >= self.next_line:
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({self.timing()})", file=sys.stderr,
                  flush=True)
            self.next_line = self._next_mark(self.done)

    def set_postfix(self, **postfix) -> None:
        """Values shown after the bar (on a terminal) until the next ones."""
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)

    def timing(self) -> str:
        """`40%, 0:01:02 elapsed, 0:01:33 left` (the rate of this run's units so far)."""
        elapsed = time.time() - self.start
        rate = max(self.done - self.start_done, 1) / max(elapsed, 1e-9)
        remaining = max(self.total - self.done, 0) / rate
        return f"{100 * self.done / max(self.total, 1):.0f}%, {clock(elapsed)} elapsed, {clock(remaining)} left"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
