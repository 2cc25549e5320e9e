"""`vlmtune synth` end to end in a subprocess, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vlmtune.cli import main as cli_main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmtune", "synth", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_writes_and_merges(tmp_path):
    other = {"file_name": "mine.json", "formatting": "sharegpt"}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": other}), encoding="utf-8")
    proc = run("--n", "20", "--out", str(tmp_path), "--seed", "1", "--image_size", "224")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    info = json.loads((tmp_path / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["mine"] == other
    entry = info["synth_train"]
    assert entry["file_name"] == "synth_train.json" and entry["formatting"] == "sharegpt"
    assert entry["columns"] == {"messages": "messages", "images": "images"}
    assert entry["tags"]["user_tag"] == "user" and entry["tags"]["system_tag"] == "system"
    records = json.loads((tmp_path / "synth_train.json").read_text(encoding="utf-8"))
    assert len(records) == 20
    assert all((tmp_path / r["images"][0]).is_file() for r in records)
    assert len((tmp_path / "synth_train.truth.jsonl").read_text(encoding="utf-8").splitlines()) == 20
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_cli_bad_flag_subprocess(tmp_path):
    proc = run("--n", "-1", "--out", str(tmp_path))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--n" in lines[0], proc.stderr
    assert not (tmp_path / "synth_train.json").exists()


@pytest.mark.parametrize("args,needle", [
    (["--n", "5", "--rules", "9"], "--rules"),
    (["--n", "5", "--rules", "one"], "--rules"),
    (["--n", "0"], "--n"),
    (["--n", "5", "--image_size", "10"], "--image_size"),
    (["--n", "5", "--break_prob", "2"], "--break_prob"),
    (["--n", "5", "--preset", "hard"], "--preset"),
    (["--n", "5", "--preset", "easy", "--rules", "1"], "--rules"),
    (["--n", "5", "--name", "../x"], "--name"),
    (["--n", "5", "--bogus"], "--bogus"),
    (["--n", "five"], "--n"),
    ([], "--n"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, needle):
    out_args = [] if args == [] else ["--out", str(tmp_path / "o")]
    assert cli_main(["synth", *args, *out_args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_bad_existing_dataset_info(tmp_path, capsys):
    (tmp_path / "dataset_info.json").write_text("{not json", encoding="utf-8")
    assert cli_main(["synth", "--n", "2", "--out", str(tmp_path), "--image_size", "128"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset_info.json" in err[0]


def test_import_is_quiet_and_torch_free():
    code = "import sys, vlmtune.synth; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "False\n" and proc.stderr == ""
