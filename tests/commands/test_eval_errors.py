"""`vlmtune eval` and `vlmtune report` on bad input (issue 17): each case is one `error:` line naming the file,
line and field (or the flag), exit code 1, no traceback, and no input file changed — in particular, neither
command writes over the predictions it reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import assert_one_line_error, checksums, run_inline

POS, NEG = "满足要求", "不满足要求"


def rows(n: int = 4) -> list[dict]:
    return [{"id": f"s{i}", "images": [f"img{i}.png"], "predict": POS if i % 2 else NEG, "label": POS if i < 2 else NEG,
             "scores": {POS: 0.8 if i % 2 else 0.3, NEG: 0.2 if i % 2 else 0.7}} for i in range(n)]


def write_rows(path: Path, items: list, raw_line: bytes | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in items]
    if raw_line is not None:
        lines.insert(2, raw_line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def with_scores(score: dict) -> list[dict]:
    items = rows()
    items[2]["scores"] = score
    return items


def predictions(tmp: Path, name: str = "pred.jsonl", **kwargs) -> Path:
    return write_rows(tmp / name, kwargs.pop("items", rows()), **kwargs)


# case → (make the input in tmp: returns the args after the command, fragments of the one error line)
CASES = {
    "--out is the predictions file": (lambda t: [predictions(t), "--out", t / "pred.jsonl"],
                                      ["--out", "pred.jsonl", "inputs"]),
    "--out is the same file by another name": (lambda t: [predictions(t), "--out", t / "sub" / ".." / "pred.jsonl"],
                                               ["--out", "inputs"]),
    "predictions named like the default output": (lambda t: [predictions(t, "OUTPUT")], ["inputs"]),
    "a probability above 1": (lambda t: [predictions(t, items=with_scores({POS: 1.5, NEG: -0.5}))],
                              ["pred.jsonl: line 3", "field 'scores'", "[0, 1]", "1.5"]),
    "a negative probability": (lambda t: [predictions(t, items=with_scores({POS: 0.5, NEG: -0.1}))],
                               ["line 3", "field 'scores'", "-0.1"]),
    "the same label twice in scores": (lambda t: [predictions(t, items=with_scores({POS: 0.5, f" {POS}": 0.5}))],
                                       ["line 3", "field 'scores'", "the same label twice"]),
    "the same label twice in --labels": (lambda t: [predictions(t), "--labels", f"{POS},{NEG},{POS}"],
                                         ["--labels", "the same label twice"]),
    "a line nested too deeply": (lambda t: [predictions(t, raw_line=b"[" * 100_000 + b"]" * 100_000)],
                                 ["line 3", "nested too deeply"]),
    "a line not UTF-8": (lambda t: [predictions(t, raw_line=b'{"predict": "\xff"}')], ["line 3", "not valid UTF-8"]),
}
DEFAULT_OUTPUT = {"eval": "metrics.json", "report": "report.html"}


@pytest.mark.parametrize("command", ["eval", "report"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_no_input_changes(tmp_path, capsys, command, case):
    make, fragments = CASES[case]
    args = make(tmp_path)
    if case == "predictions named like the default output":
        args = [args[0].rename(tmp_path / DEFAULT_OUTPUT[command])]
    before = checksums(tmp_path)
    result = run_inline(capsys, command, *args)
    assert_one_line_error(result, *fragments)
    assert checksums(tmp_path) == before


def test_report_does_not_write_over_the_run_logs_or_an_image(tmp_path, capsys):
    pred = predictions(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "trainer_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "img1.png").write_bytes(b"an image the gallery reads")
    before = checksums(tmp_path)
    result = run_inline(capsys, "report", pred, "--run_dir", run_dir, "--out", run_dir / "trainer_log.jsonl")
    assert_one_line_error(result, "--out", "trainer_log.jsonl", "inputs")
    result = run_inline(capsys, "report", pred, "--out", tmp_path / "img1.png")
    assert_one_line_error(result, "--out", "img1.png", "inputs")
    assert checksums(tmp_path) == before
    assert run_inline(capsys, "report", pred, "--run_dir", run_dir).returncode == 0  # the default out is fine
