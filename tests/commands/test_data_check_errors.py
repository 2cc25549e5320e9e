"""`vlmtune data check` on hostile input (issue 17): each case of the table is one line naming the file, record
and field (an `error:` line, or one problem line of the listing), exit code 1, no traceback, and the input
files unchanged. Runs in-process (the command imports no torch without a model)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import RULES_PROMPT, checksums, make_dataset, record, run_inline, save_bomb, write_dataset


def dataset_file(data: Path) -> Path:
    return data / "my_dataset.json"


def records_of(data: Path) -> list:
    return json.loads(dataset_file(data).read_text(encoding="utf-8"))


def with_record(data: Path, bad, at: int = 2, entry: dict | None = None, jsonl: bool = False) -> None:
    records = records_of(data)
    records.insert(at, bad)
    write_dataset(data, "my_dataset", records, entry=entry, jsonl=jsonl)


def edit_registry(data: Path, **changes) -> None:
    info = json.loads((data / "dataset_info.json").read_text())
    info["my_dataset"].update(changes)
    (data / "dataset_info.json").write_text(json.dumps(info))


def png_bytes(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def broken_image(data: Path, raw: bytes) -> None:
    (data / "images" / "broken.png").write_bytes(raw)
    with_record(data, record("images/broken.png", "满足要求"))


def bomb(data: Path) -> None:
    save_bomb(data / "images" / "bomb.png")
    with_record(data, record("images/bomb.png", "满足要求"))


def sharegpt_defaults(data: Path, turns: list[dict]) -> None:
    """A record in the ShareGPT defaults (conversations / from / value / human / gpt)."""
    entry = {"formatting": "sharegpt", "columns": {"messages": "conversations", "images": "images"}}
    records = [{"conversations": [{"from": "human", "value": RULES_PROMPT}, {"from": "gpt", "value": "满足要求"}],
                "images": ["images/img_0.png"]}] * 2
    write_dataset(data, "my_dataset", records[:1] + [{"conversations": turns, "images": ["images/img_0.png"]}]
                  + records[1:], entry=entry)


def config(data: Path, text: bytes) -> list[str]:
    path = data.parent / "cfg.yaml"
    path.write_bytes(text)
    return [str(path)]


HUMAN, GPT = {"from": "human", "value": RULES_PROMPT}, {"from": "gpt", "value": "满足要求"}

# case → (break the data in `data`, extra command-line args or None, kind, fragments of the one line).
# kind "error": one `error:` line on stderr; "problem": one problem line in the listing on stdout.
CASES = {
    "dataset not UTF-8": (lambda d: dataset_file(d).write_bytes(b'[{"messages": "\xff\xfe"}]'), None, "error",
                          ["my_dataset.json", "not UTF-8"]),
    "dataset nested too deeply": (lambda d: dataset_file(d).write_text("[" * 100_000 + "]" * 100_000), None,
                                  "error", ["my_dataset.json", "nested too deeply"]),
    "null record (.json)": (lambda d: with_record(d, None), None, "problem",
                            ["my_dataset.json: record 2", "got null"]),
    "null record (.jsonl)": (lambda d: with_record(d, None, jsonl=True), None, "problem",
                             ["my_dataset.jsonl: record 2", "got null"]),
    "0 records": (lambda d: dataset_file(d).write_text("[]"), None, "error", ["my_dataset.json", "no records"]),
    "0 records (.jsonl)": (lambda d: write_dataset(d, "my_dataset", [], jsonl=True), None, "error",
                           ["my_dataset.jsonl", "no records"]),
    "registry not UTF-8": (lambda d: (d / "dataset_info.json").write_bytes(b'{"my_dataset": "\xff"}'), None, "error",
                           ["dataset_info.json", "not UTF-8"]),
    "registry nested too deeply": (lambda d: (d / "dataset_info.json").write_text("[" * 100_000 + "]" * 100_000),
                                   None, "error", ["dataset_info.json", "nested too deeply"]),
    "columns a list": (lambda d: edit_registry(d, columns=["messages", "images"]), None, "error",
                       ["dataset_info.json", "dataset 'my_dataset'", "field 'columns'", "object"]),
    "tags a string": (lambda d: edit_registry(d, tags="role"), None, "error", ["field 'tags'", "object"]),
    "file_name a number": (lambda d: edit_registry(d, file_name=3), None, "error", ["field 'file_name'", "3"]),
    "a column name a number": (lambda d: edit_registry(d, columns={"messages": 7}), None, "error",
                               ["field 'columns.messages'", "7"]),
    "unknown role, file's own names": (lambda d: sharegpt_defaults(d, [HUMAN, GPT, HUMAN, {"from": "robot", "value": "x"}]),
                                       None, "problem", ["record 1", "field 'conversations[3].from'", "'robot'"]),
    "role order, file's own names": (lambda d: sharegpt_defaults(d, [HUMAN, {"from": "human", "value": "again"}, GPT]),
                                     None, "problem",
                                     ["record 1", "field 'conversations[1].from'", "expected a assistant turn"]),
    "empty answer, file's own names": (lambda d: sharegpt_defaults(d, [HUMAN, {"from": "gpt", "value": " "}]), None,
                                       "problem", ["record 1", "field 'conversations[1].value'", "empty"]),
    "a role that is a list": (lambda d: sharegpt_defaults(d, [HUMAN, {"from": ["gpt"], "value": "x"}]), None,
                              "problem", ["field 'conversations[1].from'"]),
    "image path with a NUL byte": (lambda d: with_record(d, record("images/a\0b.png", "满足要求")), None, "problem",
                                   ["record 2", "field 'images[0]'", "not a file path"]),
    "preference data": (lambda d: edit_registry(d, ranking=True), None, "error",
                        ["dataset 'my_dataset'", "field 'ranking'", "supervised fine-tuning"]),
    "num_samples not a number": (lambda d: edit_registry(d, num_samples="all"), None, "error",
                                 ["dataset_info.json", "dataset 'my_dataset'", "field 'num_samples'", "'all'"]),
    "a parquet file": (lambda d: (dataset_file(d).with_suffix(".parquet").write_bytes(b"PAR1\xff\x00" * 9),
                                  edit_registry(d, file_name="my_dataset.parquet")), None, "error",
                       ["dataset 'my_dataset'", "field 'file_name'", "my_dataset.parquet", ".json and .jsonl"]),
    "a bad record drawn again by num_samples": (lambda d: (with_record(d, record("images/img_0.png", "")),
                                                           edit_registry(d, num_samples=60)), None, "problem",
                                                ["my_dataset.json: record 2", "empty assistant content"]),
    "image bytes in the record": (lambda d: with_record(d, {**record("x", "满足要求"),
                                                            "images": [{"bytes": "iVBORw0KGgo=", "path": None}]}),
                                  None, "problem", ["record 2", "field 'images[0].bytes'", "reads image files"]),
    "truncated image": (lambda d: broken_image(d, png_bytes()[:-200]), None, "problem",
                        ["record 2", "field 'images[0]'", "unreadable image", "broken.png"]),
    "header-only image": (lambda d: broken_image(d, png_bytes()[:60]), None, "problem",
                          ["record 2", "field 'images[0]'", "unreadable image"]),
    "decompression bomb": (bomb, None, "problem", ["record 2", "field 'images[0]'", "too many pixels", "bomb.png"]),
    "YAML not UTF-8": (lambda d: None, lambda d: config(d, b"dataset: my_dataset\ndataset_dir: \xff\n"), "error",
                       ["cfg.yaml", "not UTF-8"]),
    "duplicate YAML key": (lambda d: None,
                           lambda d: config(d, f"dataset: my_dataset\ndataset_dir: {d}\ndataset: other\n".encode()),
                           "error", ["cfg.yaml", "line 3", "'dataset'", "line 1"]),
    "val_size leaves 1 record": (lambda d: None, lambda d: ["val_size=11"], "error",
                                 ["val_size 11", "leaves 1 training record"]),
    "val_size negative": (lambda d: None, lambda d: ["val_size=-0.1"], "error", ["'val_size'", "-0.1"]),
    "labels: one label": (lambda d: None, lambda d: ["labels=满足要求"], "error", ["'labels'", "at least two"]),
    "an answer with a trailing full-width period": (
        lambda d: with_record(d, record("images/img_0.png", "满足要求。")), None, "problem",
        ["my_dataset.json: record 2", "field 'messages[2].content'", "'满足要求。'", "'满足要求'"]),
    "an answer in capitals with a full stop": (
        lambda d: write_dataset(d, "my_dataset", [record(f"images/img_{i}.png", "yes" if i % 3 else "no")
                                                 for i in range(11)] + [record("images/img_0.png", "YES.")]),
        None, "problem", ["record 11", "'YES.'", "'yes'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_input_is_one_line_and_nothing_changes(tmp_path, capsys, case):
    data = make_dataset(tmp_path / "data", n=12)
    make_bad, extra, kind, fragments = CASES[case]
    make_bad(data)
    args = extra(data) if extra else []
    before = checksums(tmp_path)
    flags = [] if args and args[0].endswith(".yaml") else ["--dataset", "my_dataset", "--dataset_dir", str(data)]
    result = run_inline(capsys, "data", "check", *args, *flags)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    if kind == "error":
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        line = errors[0]
    else:
        problems = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
        assert len(problems) == 1, problems
        line = problems[0]
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert checksums(tmp_path) == before


def test_a_bom_is_read_and_every_image_is_decoded(tmp_path, capsys):
    """Files saved by Windows editors start with a BOM: they are read. The summary says images were decoded."""
    data = make_dataset(tmp_path / "data", n=6)
    for name in ("my_dataset.json", "dataset_info.json"):
        path = data / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    result = run_inline(capsys, "data", "check", "--dataset", "my_dataset", "--dataset_dir", data)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "records: 6 read, 0 with problems" in result.stdout
    assert "every image decoded in full" in result.stdout


def test_answers_as_people_type_them(tmp_path, capsys):
    """NFD and spaces around an answer: one label, counted once. A third answer in a few records, and a dataset of
    one answer (no negatives), are each said in one line at the start."""
    import unicodedata

    data = tmp_path / "data"
    make_dataset(data, n=24)
    fit, unfit = "적합", "부적합"
    answers = [fit if i % 2 else unicodedata.normalize("NFD", unfit) + " " for i in range(23)] + ["보류"]
    write_dataset(data, "my_dataset", [record(f"images/img_{i}.png", a) for i, a in enumerate(answers)])
    before = checksums(tmp_path)
    result = run_inline(capsys, "data", "check", "--dataset", "my_dataset", "--dataset_dir", data)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"answers (train): {unfit} 12 (50.0%), {fit} 11 (45.8%), 보류 1 (4.2%)" in result.stdout
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "'보류'" in notes[0] and "record 23" in notes[0], notes
    assert checksums(tmp_path) == before
    write_dataset(data, "my_dataset", [record(f"images/img_{i}.png", fit) for i in range(24)])
    result = run_inline(capsys, "data", "check", "--dataset", "my_dataset", "--dataset_dir", data)
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no negatives" in notes[0], result.stdout


def test_a_1_mb_record_is_refused_without_tokenising_it(tmp_path, capsys, tiny_model_dir):
    """Issue 25 item 0: with a model, a record whose text cannot fit cutoff_len is one problem line naming it,
    found from its length before the tokenizer runs."""
    data = make_dataset(tmp_path / "data", n=12)
    with_record(data, record("images/img_0.png", "满足要求") | {"messages": [
        {"role": "user", "content": "<image>" + "x" * 1_000_000}, {"role": "assistant", "content": "满足要求"}]})
    before = checksums(tmp_path)
    result = run_inline(capsys, "data", "check", "--dataset", "my_dataset", "--dataset_dir", data,
                        "--model_name_or_path", tiny_model_dir)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    problems = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    assert len(problems) == 1, problems
    for fragment in ("my_dataset.json: record 2", "field 'messages'", "1,000,011 characters", "cutoff_len of 2,048",
                     "without tokenising"):
        assert fragment in problems[0], (fragment, problems[0])
    assert checksums(tmp_path) == before


def test_registry_keys_llama_factory_does_not_know_are_notes(tmp_path, capsys):
    """A typo in dataset_info.json (`column`, `columns.image`) is ignored, as LLaMA-Factory ignores it: said in one
    note line a key, with the key meant; the check still passes."""
    data = make_dataset(tmp_path / "data", n=6)
    edit_registry(data, column={"images": "images"}, columns={"messages": "messages", "images": "images",
                                                              "image": "images"})
    result = run_inline(capsys, "data", "check", "--dataset", "my_dataset", "--dataset_dir", data)
    assert result.returncode == 0, result.stdout + result.stderr
    notes = [line for line in result.stdout.splitlines() if "LLaMA-Factory key" in line]
    assert notes == [f"note: {data / 'dataset_info.json'}: dataset 'my_dataset': key 'column' is not a LLaMA-Factory "
                     f"key and is ignored (closest known key: 'columns')",
                     f"note: {data / 'dataset_info.json'}: dataset 'my_dataset': key 'columns.image' is not a "
                     f"LLaMA-Factory key and is ignored (closest known key: 'columns.images')"]


def test_num_samples_copies_are_counted_and_split_as_one_record(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=6)
    edit_registry(data, num_samples=20)
    result = run_inline(capsys, "data", "check", "--dataset", "my_dataset", "--dataset_dir", data, "val_size=2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "records: 20 read, 0 with problems" in result.stdout and ", val 2" in result.stdout
