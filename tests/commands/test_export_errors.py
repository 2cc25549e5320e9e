"""`vlmtune export` on damaged adapters and bad places to write (issue 17): one `error:` line naming the file or
the flag, exit code 1, no traceback, no input changed. In-process runs (`run_inline`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_one_line_error, changed_files, checksums, run_inline, truncate, unwritable_dir


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
