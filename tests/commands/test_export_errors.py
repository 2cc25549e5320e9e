"""`vlmtune export` on damaged adapters and bad places to write (issue 17): one `error:` line naming the file or
the flag, exit code 1, no traceback, no input changed. In-process runs (`run_inline`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import assert_one_line_error, changed_files, checksums, run_inline, truncate, unwritable_dir

from vlmtune.errors import VlmtuneError
from vlmtune.model import export as export_module


@pytest.fixture
def adapter(adapter_copy) -> Path:
    return adapter_copy


# case → (prepare(adapter, tmp) → (export_dir, base model or None for the tiny one), fragments)
CASES = {
    "truncated adapter weights": (lambda a, t: (truncate(a / "adapter_model.safetensors"), t / "merged")[1],
                                  ["adapter_model.safetensors", "not a readable safetensors"]),
    "adapter_config.json not UTF-8": (lambda a, t: ((a / "adapter_config.json").write_bytes(b'{"r": "\xff"}'),
                                                    t / "merged")[1], ["adapter_config.json", "not UTF-8"]),
    "adapter_config.json a list": (lambda a, t: ((a / "adapter_config.json").write_text("[]"), t / "merged")[1],
                                   ["adapter_config.json", "JSON object"]),
    "base_model_name_or_path a number": (
        lambda a, t: ((a / "adapter_config.json").write_text('{"base_model_name_or_path": 7}'), t / "merged")[1],
        ["adapter_config.json", "base_model_name_or_path", "7"]),
    "export_dir a file": (lambda a, t: ((t / "taken").write_text("mine"), t / "taken")[1],
                          ["--export_dir", "taken", "not a directory"]),
    "export_dir under a file": (lambda a, t: ((t / "taken").write_text("mine"), t / "taken" / "merged")[1],
                                ["--export_dir", "under", "taken", "a file"]),
    "export_dir read-only": (lambda a, t: unwritable_dir(t), ["--export_dir", "cannot write there"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_no_input_changes(tmp_path, capsys, tiny_model_dir, adapter, case):
    prepare, fragments = CASES[case]
    export_dir = prepare(adapter, tmp_path)
    before = checksums(tmp_path, tiny_model_dir)
    result = run_inline(capsys, "export", "--model_name_or_path", tiny_model_dir, "--adapter_name_or_path", adapter,
                        "--export_dir", export_dir)
    assert_one_line_error(result, *fragments)
    assert not changed_files(before, tmp_path, tiny_model_dir)
    assert not list(Path(tmp_path).rglob("*.safetensors.*"))


def test_an_adapter_of_another_base_is_refused(tmp_path, capsys, adapter, wider_model_dir):
    result = run_inline(capsys, "export", "--model_name_or_path", wider_model_dir, "--adapter_name_or_path", adapter,
                        "--export_dir", tmp_path / "merged")
    assert_one_line_error(result, "cannot load the adapter onto", "tiny-256", "size mismatch")
    assert "warning:" in result.stderr and "trained on" in result.stderr  # said before the shapes refuse it
    assert not list((tmp_path / "merged").glob("*.safetensors"))


class Killed(BaseException):
    """What kill -9 does to the export in the middle of a write: nothing after it runs (no except, no cleanup)."""


def fail_after_the_weights(monkeypatch, error: BaseException) -> None:
    """The write step fails once the weights are written and before the processor files are."""
    def keep_base_tensors(*args):
        raise error
    monkeypatch.setattr(export_module, "keep_base_tensors", keep_base_tensors)


def export_quietly(model, adapter, target, **kwargs):
    return export_module.export(str(model), str(adapter), target, log=lambda *_: None, **kwargs)


def test_an_export_killed_midway_leaves_the_directory_complete_or_absent(tmp_path, tiny_model_dir, adapter,
                                                                         monkeypatch):
    """kill -9 during `--overwrite`: the earlier export is whole (its weights too); during a plain export: no
    directory that looks finished. The next export cleans what the killed one left beside it."""
    good, fresh = tmp_path / "merged", tmp_path / "fresh"
    export_quietly(tiny_model_dir, adapter, good)
    (good / "notes.txt").write_text("keep me")
    before = checksums(good)
    fail_after_the_weights(monkeypatch, Killed())
    with pytest.raises(Killed):
        export_quietly(tiny_model_dir, adapter, good, overwrite=True, export_dtype="bfloat16")
    assert checksums(good) == before
    with pytest.raises(Killed):
        export_quietly(tiny_model_dir, adapter, fresh)
    assert not fresh.exists()
    monkeypatch.undo()
    export_quietly(tiny_model_dir, adapter, fresh)
    export_quietly(tiny_model_dir, adapter, good, overwrite=True, export_dtype="bfloat16")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left
    assert (good / "notes.txt").read_text() == "keep me"
    assert json.loads((good / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.name for p in fresh.iterdir()} == {p.name for p in good.iterdir()} - {"notes.txt"}
    # Killed between the swap's two renames: the earlier export, moved aside, is put back (and not overwritten).
    before = checksums(good)
    good.rename(tmp_path / ".merged.replaced.tmp")
    with pytest.raises(VlmtuneError, match="not empty"):
        export_quietly(tiny_model_dir, adapter, good)
    assert checksums(good) == before


def test_a_full_disk_during_overwrite_keeps_the_earlier_export(tmp_path, capsys, tiny_model_dir, adapter,
                                                               monkeypatch):
    good = tmp_path / "merged"
    export_quietly(tiny_model_dir, adapter, good)
    before = checksums(tmp_path, tiny_model_dir)
    fail_after_the_weights(monkeypatch, OSError(28, "No space left on device"))
    result = run_inline(capsys, "export", "--model_name_or_path", tiny_model_dir, "--adapter_name_or_path", adapter,
                        "--export_dir", good, "--overwrite", "--export_dtype", "bfloat16")
    assert_one_line_error(result, "--export_dir", "No space left on device", "earlier export there is unchanged")
    assert not changed_files(before, tmp_path, tiny_model_dir)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
