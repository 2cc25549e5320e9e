"""Progress wherever the output goes (vlmtune.progress): a tqdm bar on a terminal; in a log file, CI or
`nohup` no carriage-return redraws — a line per tenth of the work where the loop asks for lines."""

import io
import sys

from vlmtune import progress as progress_module
from vlmtune.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_bar_redraws_in_place(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    with Progress(20, desc="predict", unit="samples", lines=10) as bar:
        for _ in range(20):
            bar.update(1, loss="0.5")
    assert bar.bar is not None
    assert "\r" in sys.stderr.getvalue() and "20/20" in sys.stderr.getvalue()


def test_off_a_terminal_one_line_per_tenth_and_no_carriage_return(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with Progress(1200, initial=200, desc="predict", unit="samples", lines=10) as bar:  # resumed at row 200
        for _ in range(40):
            bar.update(25)
    written = sys.stderr.getvalue()
    assert bar.bar is None and "\r" not in written
    lines = written.splitlines()
    # the first tenth was done before the resume; a line where each later tenth is passed
    assert [line.split()[1] for line in lines] == [f"{n}/1200" for n in (250, 375, 500, 600, 725, 850, 975, 1100,
                                                                         1200)]
    assert lines[-1].startswith("predict: 1200/1200 samples (100%, ") and lines[-1].endswith(" left)")
    # lines=0: the caller prints its own lines (training: its rows), and a disabled one prints nothing anywhere
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    for quiet in (Progress(10), Progress(10, lines=10, enabled=False)):
        quiet.update(10)
    assert sys.stderr.getvalue() == ""


def test_library_bars_follow_the_terminal_unless_the_user_chose(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(hf_logging, "_tqdm_active", True)  # restored afterwards
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.delenv(progress_module.HUB_BARS_ENV, raising=False)
    progress_module.quiet_library_bars()
    assert hf_logging.is_progress_bar_enabled()
    monkeypatch.setenv(progress_module.HUB_BARS_ENV, "0")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    progress_module.quiet_library_bars()  # the user's setting stands
    assert hf_logging.is_progress_bar_enabled()
    monkeypatch.delenv(progress_module.HUB_BARS_ENV)
    monkeypatch.setattr("huggingface_hub.utils.disable_progress_bars", lambda: None)  # hub's state left as it is
    progress_module.quiet_library_bars()
    assert not hf_logging.is_progress_bar_enabled()
    assert progress_module.os.environ[progress_module.HUB_BARS_ENV] == "1"  # for worker processes too
