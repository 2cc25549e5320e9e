"""`vlmtune eval` end to end, as a user runs it: a subprocess, its output, files and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vlmtune.evaluate.metrics import compute_metrics

POS, NEG = "满足要求", "不满足要求"
ROWS = [  # (label, predict, P(positive))
    (POS, POS, 0.9), (POS, NEG, 0.3), (NEG, NEG, 0.2), (NEG, POS, 0.6),
    (NEG, "不满足要求。", 0.45), (POS, " 满足要求\n", 0.8), (NEG, NEG, 0.1), (POS, "满足", 0.5),
]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-m", "vlmtune", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=env)


def write_predictions(path: Path, scores: bool = True) -> Path:
    lines = []
    for i, (label, predict, p) in enumerate(ROWS):
        obj = {"id": f"s{i}", "images": [f"img{i}.jpg"], "prompt": "1. 不能有星形", "predict": predict, "label": label}
        if scores:
            obj["scores"] = {POS: p, NEG: 1 - p}
        lines.append(json.dumps(obj, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_eval_writes_metrics_and_prints_table(tmp_path):
    pred = write_predictions(tmp_path / "pred.jsonl")
    proc = run("eval", str(pred), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    want = compute_metrics([r[0] for r in ROWS], [r[1] for r in ROWS], positive_scores=[r[2] for r in ROWS])
    for key, value in want.items():
        assert saved[key] == value, key
    assert saved["n_invalid"] == 2 and saved["tp"] == 2  # "满足" and "不满足要求。" are invalid
    for needle in ("accuracy", "precision", "recall", "F1", "specificity", "invalid answers", "ROC-AUC",
                   "PR-AUC", "best-F1 threshold", "confusion matrix", POS, NEG, "invalid"):
        assert needle in proc.stdout, needle
    assert f"{saved['accuracy']:.4f}" in proc.stdout
    assert not list(tmp_path.glob(".metrics.json.*"))  # no temp file left behind


def test_eval_generate_mode_out_and_labels(tmp_path):
    pred = write_predictions(tmp_path / "gen.jsonl", scores=False)
    out = tmp_path / "sub" / "m.json"
    proc = run("eval", str(pred), "--out", str(out), "--labels", f"{POS},{NEG}", "--positive", POS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert "roc_auc" not in saved and "ROC-AUC" not in proc.stdout and saved["n"] == len(ROWS)
    assert not (tmp_path / "metrics.json").exists()


def test_eval_malformed_line_is_one_line_error_and_keeps_old_metrics(tmp_path):
    pred = write_predictions(tmp_path / "pred.jsonl")
    lines = pred.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][:-5]  # truncated JSON on line 3
    pred.write_text("\n".join(lines) + "\n", encoding="utf-8")
    old = tmp_path / "metrics.json"
    old.write_text('{"old": true}\n', encoding="utf-8")
    proc = run("eval", str(pred), cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(pred) in err[0] and "line 3" in err[0]
    assert old.read_text(encoding="utf-8") == '{"old": true}\n'


def test_eval_missing_field_and_missing_file(tmp_path):
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps({"id": "a", "predict": POS}) + "\n", encoding="utf-8")
    proc = run("eval", str(pred), cwd=tmp_path)
    assert proc.returncode == 1 and "line 1: field 'label': missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("eval", str(tmp_path / "absent.jsonl"), cwd=tmp_path)
    assert proc.returncode == 1 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_does_not_import_torch():
    code = ("import sys, vlmtune.commands.eval, vlmtune.commands.report; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
