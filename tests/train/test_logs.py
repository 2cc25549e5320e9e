"""The training console (train.logs.TrainLogger): on a terminal the bar shows the progress; elsewhere (a log
file, CI, `nohup`) each logging step's row carries it, one line per step and no carriage returns."""

import io
import sys

from vlmtune.train.logs import TrainLogger


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def four_steps(tmp_path, capsys, monkeypatch, stderr: io.StringIO, enabled: bool = True) -> tuple[str, str]:
    """Rows logged at steps 2 and 4 and an evaluation at 4, the bar (if any) on `stderr`: (stdout, stderr)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "stderr", stderr)
    logger = TrainLogger(tmp_path, is_main=True, accelerator=None, total_steps=4)
    progress = logger.start_progress(enabled=enabled)
    for step in range(1, 5):
        progress.update(1, loss="1.0")
        if step % 2 == 0:
            logger.log(step, {"loss": 1.0, "lr": 1e-4}, prefix="train")
    logger.log(4, {"eval_loss": 0.5}, prefix="eval")
    progress.close()
    return capsys.readouterr().out, stderr.getvalue()


def test_off_a_terminal_each_logged_row_carries_the_progress(tmp_path, capsys, monkeypatch):
    out, err = four_steps(tmp_path, capsys, monkeypatch, io.StringIO())
    assert err == "" and "\r" not in out
    train = [line for line in out.splitlines() if line.startswith("[train step")]
    assert len(train) == 2 and train[0].startswith("[train step 2/4] loss=1, lr=0.0001 (50%, 0:00:00 elapsed, ")
    assert all(line.endswith(" left)") for line in train)
    assert "elapsed" not in next(line for line in out.splitlines() if line.startswith("[eval step 4/4]"))


def test_on_a_terminal_the_bar_shows_it_and_disable_tqdm_hides_it(tmp_path, capsys, monkeypatch):
    out, err = four_steps(tmp_path, capsys, monkeypatch, Terminal())
    assert "4/4" in err and "\r" in err  # the bar, redrawn in place
    assert "[train step 2/4] loss=1, lr=0.0001\n" in out
    out, err = four_steps(tmp_path, capsys, monkeypatch, Terminal(), enabled=False)  # disable_tqdm: no bar
    assert err == "" and "[train step 2/4] loss=1, lr=0.0001 (50%, " in out
