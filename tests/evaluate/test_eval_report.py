"""`vlmtune report`: a self-contained HTML file with metrics, curves and the misclassified images."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.errors import VlmtuneError
from vlmtune.commands import report as report_command

POS, NEG = "满足要求", "不满足要求"
PROMPT = "判断以上图片是否满足要求:\n1. <b>不能</b> 有星形 & 台灯\n请只输出\"满足要求\""


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """Images (one large, one with alpha, one corrupt, one missing) and a score-mode JSONL."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (900, 500), "red").save(tmp_path / "imgs" / "big.jpg")
    Image.new("RGBA", (64, 64), (0, 0, 255, 128)).save(tmp_path / "imgs" / "alpha.png")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    rows = [  # id, label, predict, P(positive), image
        ("ok-1", POS, POS, 0.9, "imgs/big.jpg"),
        ("ok-2", NEG, NEG, 0.1, "imgs/big.jpg"),
        ("wrong-fp", NEG, POS, 0.8, "imgs/big.jpg"),
        ("wrong-fn", POS, NEG, 0.3, str(tmp_path / "imgs" / "alpha.png")),  # absolute path
        ("wrong-invalid", NEG, "不满足要求。", 0.4, "imgs/broken.jpg"),
        ("wrong-missing", POS, "满足", 0.45, "imgs/missing.jpg"),
    ]
    with open(tmp_path / "pred.jsonl", "w", encoding="utf-8") as fh:
        for rid, label, predict, p, image in rows:
            fh.write(json.dumps({"id": rid, "images": [image], "prompt": PROMPT, "predict": predict,
                                 "label": label, "scores": {POS: p, NEG: 1 - p}}, ensure_ascii=False) + "\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4} for s in (10, 20, 30, 40)]
    log += [{"step": s, "eval_loss": 1.0 / s, "eval_f1": s / 50, "eval_accuracy": s / 45} for s in (20, 40)]
    (run_dir / "trainer_log.jsonl").write_text("\n".join(json.dumps(r) for r in log) + '\n{"step": 5',
                                               encoding="utf-8")  # last line still being written
    return tmp_path


def make_report(workdir: Path, *extra: str) -> str:
    """Run the command in-process, failing on any warning (e.g. matplotlib's missing CJK glyphs)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert report_command.main([str(workdir / "pred.jsonl"), *extra]) == 0
    assert not [w for w in caught if "glyph" in str(w.message).lower()], [str(w.message) for w in caught]
    out = next((Path(a.split("=", 1)[-1]) for a in extra if a.endswith(".html")), workdir / "report.html")
    return out.read_text(encoding="utf-8")


def data_images(page: str, kind: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rf'src="data:image/{kind};base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_is_self_contained_and_complete(workdir):
    page = make_report(workdir)
    assert "http://" not in page and "https://" not in page
    assert not re.search(r'(src|href)\s*=\s*["\']?(?!data:|#)[^"\'\s>]', page)  # only data: URLs / anchors
    # Misclassified ids are in the gallery, correct ones are not.
    for rid in ("wrong-fp", "wrong-fn", "wrong-invalid", "wrong-missing"):
        assert rid in page
    assert "ok-1" not in page and "ok-2" not in page
    # Most confident mistake first: wrong-fp (P(pos)=0.8 for a negative).
    assert page.index("wrong-fp") < page.index("wrong-fn") < page.index("wrong-missing")
    # Thumbnails: inline JPEG, at most 320 px; missing and corrupt images are placeholders.
    thumbs = data_images(page, "jpeg")
    assert len(thumbs) >= 2 and all(max(Image.open(io.BytesIO(t)).size) <= 320 for t in thumbs)
    assert "image not found: imgs/missing.jpg" in page and "cannot read image: imgs/broken.jpg" in page
    # Metrics, confusion matrix, labels and score plots (PR, ROC, histogram).
    for needle in ('id="metrics"', 'id="confusion"', 'id="curves"', "ROC-AUC", "PR-AUC", POS, NEG, "invalid"):
        assert needle in page, needle
    assert "0.3333" in page  # accuracy: 2 of 6
    assert len(data_images(page, "png")) == 3
    # The prompt is escaped text, not markup.
    assert "&lt;b&gt;不能&lt;/b&gt;" in page and "<b>不能</b>" not in page and "&amp; 台灯" in page
    assert 'id="training"' not in page


def test_report_with_run_dir_has_training_curves(workdir):
    page = make_report(workdir, "--run_dir", str(workdir / "run"), "--out", str(workdir / "r.html"))
    assert 'id="training"' in page
    assert len(data_images(page, "png")) == 3 + 3  # loss, eval metrics, learning rate


def test_report_generate_mode_and_gallery_limit(workdir):
    lines = (workdir / "pred.jsonl").read_text(encoding="utf-8").splitlines()
    stripped = []
    for line in lines:
        obj = json.loads(line)
        del obj["scores"]
        stripped.append(json.dumps(obj, ensure_ascii=False))
    (workdir / "pred.jsonl").write_text("\n".join(stripped) + "\n", encoding="utf-8")
    page = make_report(workdir, "--max_gallery", "1")
    assert 'id="curves"' not in page and "ROC-AUC" not in page
    assert "showing the first 1" in page and "wrong-fp" in page and "wrong-missing" not in page


def test_report_bad_run_dir_is_an_error_and_keeps_old_report(workdir):
    old = workdir / "report.html"
    old.write_text("old", encoding="utf-8")
    (workdir / "empty").mkdir()
    with pytest.raises(VlmtuneError, match="trainer_log.jsonl"):
        report_command.main([str(workdir / "pred.jsonl"), "--run_dir", str(workdir / "empty")])
    assert old.read_text(encoding="utf-8") == "old"


def test_report_cli_subprocess(workdir):
    proc = subprocess.run([sys.executable, "-m", "vlmtune", "report", str(workdir / "pred.jsonl"),
                           "--run_dir", str(workdir / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and (workdir / "report.html").is_file()
    assert "Glyph" not in proc.stderr and "Traceback" not in proc.stderr
