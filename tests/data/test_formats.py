import json

import pytest

from helpers import RULES_PROMPT, SHAREGPT_ENTRY, make_dataset, record, save_image, write_dataset
from vlmtune.config import DataConfig
from vlmtune.data.loader import load_datasets, load_splits
from vlmtune.errors import VlmtuneError


def test_sharegpt_with_custom_tags_and_relative_images(small_dataset):
    loaded = load_datasets("my_dataset", str(small_dataset), None)
    assert not loaded.problems
    assert len(loaded.conversations) == 12
    conv = loaded.conversations[0]
    assert [m.role for m in conv.messages] == ["system", "user", "assistant"]
    assert conv.answer == "不满足要求"
    assert conv.images == [str((small_dataset / "images" / "img_0.png").resolve())]


def test_sharegpt_default_tags_jsonl_and_system_column(tmp_path):
    save_image(tmp_path / "a.png", (64, 64), 0)
    rec = {"conversations": [{"from": "human", "value": "<image>ok?"}, {"from": "gpt", "value": "满足要求"}],
           "images": ["a.png"], "system": "sys prompt"}
    write_dataset(tmp_path, "d", [rec, rec], entry={"formatting": "sharegpt",
                                                    "columns": {"system": "system"}}, jsonl=True)
    loaded = load_datasets("d", str(tmp_path), None)
    assert not loaded.problems and len(loaded.conversations) == 2
    assert loaded.conversations[0].system == "sys prompt"
    assert loaded.conversations[0].prompt == "<image>ok?"


def test_alpaca_and_comma_joined_datasets_and_max_samples(tmp_path):
    save_image(tmp_path / "a.png", (64, 64), 0)
    alpaca = [{"instruction": "<image>判断", "input": "规则", "output": "满足要求", "images": ["a.png"]}] * 5
    write_dataset(tmp_path, "alp", alpaca, entry={"formatting": "alpaca", "columns": {"images": "images"}})
    write_dataset(tmp_path, "sg", [record("a.png", "不满足要求")] * 4)
    loaded = load_datasets("alp, sg", str(tmp_path), 3)
    assert len(loaded.conversations) == 6
    assert loaded.conversations[0].messages[0].content == "<image>判断\n规则"
    assert [c.dataset for c in loaded.conversations] == ["alp"] * 3 + ["sg"] * 3


def test_registry_errors_name_the_file(tmp_path):
    with pytest.raises(VlmtuneError, match="dataset_info.json: not found"):
        load_datasets("x", str(tmp_path), None)
    write_dataset(tmp_path, "my_dataset", [])
    with pytest.raises(VlmtuneError, match="unknown dataset 'my_datset' \\(did you mean 'my_dataset'\\?\\)"):
        load_datasets("my_datset", str(tmp_path), None)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["gone"] = {"file_name": "gone.json", **SHAREGPT_ENTRY}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(VlmtuneError, match="gone.json: dataset file not found"):
        load_datasets("gone", str(tmp_path), None)


def test_record_problems_name_file_record_and_field(tmp_path):
    save_image(tmp_path / "a.png", (64, 64), 0)
    good = record("a.png", "满足要求")
    no_answer = {"messages": good["messages"][:2], "images": ["a.png"]}
    two_placeholders = {"messages": [{"role": "user", "content": "<image><image>x"},
                                     {"role": "assistant", "content": "满足要求"}], "images": ["a.png"]}
    wrong_order = {"messages": [{"role": "assistant", "content": "满足要求"}, {"role": "user", "content": "<image>"}],
                   "images": ["a.png"]}
    empty = {"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": " "}],
             "images": ["a.png"]}
    bad_role = {"messages": [{"role": "bot", "content": "<image>"}], "images": ["a.png"]}
    path = write_dataset(tmp_path, "d", [good, no_answer, two_placeholders, wrong_order, empty, bad_role])
    loaded = load_datasets("d", str(tmp_path), None)
    assert len(loaded.conversations) == 1
    lines = [str(p) for p in loaded.problems]
    assert f"{path}: record 1: field 'messages': no assistant answer at the end" in lines
    assert any(line.startswith(f"{path}: record 2: field 'images': 2 <image>") for line in lines)
    assert any(line.startswith(f"{path}: record 3: field 'messages[0].role': expected a user turn") for line in lines)
    assert any(line.startswith(f"{path}: record 4: field 'messages[1].content': empty assistant") for line in lines)
    assert any(line.startswith(f"{path}: record 5: field 'messages[0].role': unknown role 'bot'") for line in lines)


def test_val_split_uses_eval_dataset_when_given(tmp_path):
    make_dataset(tmp_path, n=6, name="train_set")
    make_dataset(tmp_path, n=4, name="val_set")
    splits = load_splits(DataConfig(dataset="train_set", eval_dataset="val_set", dataset_dir=str(tmp_path),
                                    val_size=0.5), seed=1)
    assert len(splits.train) == 6 and len(splits.val) == 4
