"""`dataset_info.json` entries as LLaMA-Factory writes them: what is refused (in one line naming the registry,
the dataset and the field), what is read, and the keys LLaMA-Factory does not know (ignored, and said)."""

from __future__ import annotations

import pytest

from helpers import SHAREGPT_ENTRY, register
from vlmtune.data.registry import resolve
from vlmtune.errors import VlmtuneError


def entry(**changes) -> dict:
    return {"file_name": "d.json", **SHAREGPT_ENTRY, **changes}


COLUMNS = SHAREGPT_ENTRY["columns"]

# case → (the entry, fragments of the one line)
REFUSED = {
    "preference data": (entry(ranking=True), ["field 'ranking'", "supervised fine-tuning"]),
    "chosen / rejected columns": (entry(columns={**COLUMNS, "chosen": "chosen", "rejected": "rejected"}),
                                  ["field 'columns.chosen'", "preference or KTO", "supervised fine-tuning"]),
    "a kto_tag column": (entry(columns={**COLUMNS, "kto_tag": "label"}), ["field 'columns.kto_tag'"]),
    "a cloud file": ({"cloud_file_name": "s3://bucket/d.json", **SHAREGPT_ENTRY},
                     ["field 'cloud_file_name'", "download the file and use file_name"]),
    "num_samples 0": (entry(num_samples=0), ["field 'num_samples'", "positive whole number", "got 0"]),
    "num_samples a string": (entry(num_samples="100"), ["field 'num_samples'", "got '100'"]),
    "num_samples true": (entry(num_samples=True), ["field 'num_samples'", "got True"]),
    "num_samples a fraction": (entry(num_samples=0.5), ["field 'num_samples'", "got 0.5"]),
    "a parquet file": (entry(file_name="d.parquet"), ["field 'file_name'", "d.parquet", "reads .json and .jsonl"]),
    "a csv file": (entry(file_name="d.csv"), ["field 'file_name'", "d.csv", "convert csv"]),
    "another formatting": (entry(formatting="chatml"), ["field 'formatting'", "sharegpt, openai, alpaca"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_vlmtune_cannot_read_is_one_line(tmp_path, case):
    raw, fragments = REFUSED[case]
    (tmp_path / "d.parquet").write_bytes(b"PAR1\x15\x04\x15\x00\x15\xff\xfe" * 8)  # binary, as parquet is
    (tmp_path / "d.csv").write_text("instruction,output\nhi,yes\n")
    register(tmp_path, "d", **raw)
    with pytest.raises(VlmtuneError) as caught:
        resolve("d", tmp_path)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"{tmp_path / 'dataset_info.json'}: dataset 'd': "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_openai_defaults_to_the_sharegpt_columns_and_tags(tmp_path):
    """LLaMA-Factory's openai entries take the ShareGPT defaults; their files' role/content come from `tags`."""
    register(tmp_path, "d", file_name="d.jsonl", formatting="openai", num_samples=3)
    (found,) = resolve("d", tmp_path)
    assert found.formatting == "openai" and found.columns["messages"] == "conversations"
    assert found.tags["role_tag"] == "from" and found.num_samples == 3 and found.files == [tmp_path / "d.jsonl"]


def test_keys_llama_factory_does_not_know_are_read_past_and_noted(tmp_path):
    raw = entry(column={"images": "images"}, file_sha1="0" * 40,  # older registries' key: no note
                columns={**COLUMNS, "image": "pictures"}, tags={**SHAREGPT_ENTRY["tags"], "role": "from"})
    register(tmp_path, "d", **raw)
    (found,) = resolve("d", tmp_path)
    assert found.columns["images"] == "images"  # ignored, as LLaMA-Factory ignores it
    where = f"{tmp_path / 'dataset_info.json'}: dataset 'd'"
    assert found.notes == [
        f"{where}: key 'column' is not a LLaMA-Factory key and is ignored (closest known key: 'columns')",
        f"{where}: key 'columns.image' is not a LLaMA-Factory key and is ignored (closest known key: "
        f"'columns.images')",
        f"{where}: key 'tags.role' is not a LLaMA-Factory key and is ignored (closest known key: 'tags.role_tag')"]
    register(tmp_path, "clean", **entry())
    assert resolve("clean", tmp_path)[0].notes == []


def test_odd_dataset_paths_are_one_line_naming_the_dataset(tmp_path, monkeypatch):
    """`~user/` of no user (a RuntimeError of pathlib), a link to itself (not "no such file"), a file name holding a
    comma (cut in two at it, as LLaMA-Factory cuts `dataset`: the error names the piece and says why)."""
    import os

    monkeypatch.chdir(tmp_path)
    os.symlink("loop.jsonl", tmp_path / "loop.jsonl")
    (tmp_path / "my,data.jsonl").write_text("{}\n", encoding="utf-8")
    cases = {"~no_such_user_zz/x.jsonl": ["dataset '~no_such_user_zz/x.jsonl'", "no home directory"],
             "loop.jsonl": ["dataset 'loop.jsonl'", "symbolic link to nothing"],
             "my,data.jsonl": ["dataset 'my'", "dataset_info.json: not found", "split at commas"]}
    for name, fragments in cases.items():
        with pytest.raises(VlmtuneError) as error:
            resolve(name, tmp_path / "data")
        assert "\n" not in str(error.value)
        for fragment in fragments:
            assert fragment in str(error.value), str(error.value)
