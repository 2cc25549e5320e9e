import json

import pytest

from helpers import SHAREGPT_ENTRY, make_dataset, record, register, save_image, write_dataset
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


OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def test_openai_formatting_reads_as_sharegpt_with_a_first_system_message(tmp_path):
    save_image(tmp_path / "a.png", (64, 64), 0)
    good = {"messages": turns(("system", "sys"), ("user", "<image>ok?"), ("assistant", "yes")), "images": ["a.png"],
            "system": "the column's system"}
    tool = {"messages": turns(("user", "<image>ok?"), ("observation", "42"), ("assistant", "yes")),
            "images": ["a.png"]}
    call = {"messages": [{"role": "user", "content": "<image>ok?"},
                         {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}],
            "images": ["a.png"]}
    path = write_dataset(tmp_path, "d", [good, tool, call],
                         entry={"formatting": "openai", "columns": {"messages": "messages", "system": "system"},
                                "tags": OPENAI_TAGS})
    loaded = load_datasets("d", str(tmp_path), None)
    assert len(loaded.conversations) == 1
    conv = loaded.conversations[0]
    assert conv.system == "sys" and [m.role for m in conv.messages] == ["system", "user", "assistant"]
    lines = [str(p) for p in loaded.problems]
    assert any(line.startswith(f"{path}: record 1: field 'messages[1].role': unknown role 'observation'")
               and "tool turns are not trained" in line for line in lines), lines
    assert f"{path}: record 2: field 'messages[1].tool_calls': tool calls are not trained by vlmtune" in lines


def test_a_folder_is_read_file_by_file_in_name_order(tmp_path):
    save_image(tmp_path / "a.png", (64, 64), 0)
    folder = tmp_path / "parts"
    folder.mkdir()
    bad = {"messages": turns(("bot", "<image>")), "images": ["a.png"]}
    (folder / "b.jsonl").write_text("\n".join(json.dumps(r) for r in [record("a.png", "yes"), bad]) + "\n")
    (folder / "a.json").write_text(json.dumps([record("a.png", "no")]))
    (folder / ".a.json.swp").write_bytes(b"\0\1")  # an editor's swap file is no one's data
    register(tmp_path, "d", file_name="parts", **SHAREGPT_ENTRY)
    loaded = load_datasets("d", str(tmp_path), None)
    assert [(c.source, c.index, c.answer) for c in loaded.conversations] == [
        (str(folder / "a.json"), 0, "no"), (str(folder / "b.jsonl"), 0, "yes")]
    assert len({c.id for c in loaded.conversations}) == 2  # both files count from record 0
    assert [str(p) for p in loaded.problems] == [
        f"{folder / 'b.jsonl'}: record 1: field 'messages[0].role': unknown role 'bot' (expected one of user, "
        f"assistant, system)"]


@pytest.mark.parametrize("files, fragments", [
    ({"a.json": "[]", "b.csv": "x,y\n"}, ["field 'file_name'", "b.csv", "reads .json and .jsonl"]),
    ({}, ["field 'file_name'", "holds no .json or .jsonl file"]),
    ({"a.json": "[]"}, ["parts", "no records (no file of the folder holds a record)"]),
])
def test_a_folder_of_other_types_or_of_nothing_is_one_line(tmp_path, files, fragments):
    (tmp_path / "parts").mkdir()
    for name, text in files.items():
        (tmp_path / "parts" / name).write_text(text)
    register(tmp_path, "d", file_name="parts", **SHAREGPT_ENTRY)
    with pytest.raises(VlmtuneError) as caught:
        load_datasets("d", str(tmp_path), None)
    assert "\n" not in str(caught.value) and all(f in str(caught.value) for f in fragments), str(caught.value)


def test_num_samples_draws_a_seeded_permutation_topped_up_with_replacement(tmp_path):
    save_image(tmp_path / "a.png", (64, 64), 0)
    bad = {"messages": turns(("user", "<image>")), "images": ["a.png"]}
    records = [record("a.png", f"answer {i}") for i in range(5)] + [bad]
    path = write_dataset(tmp_path, "d", records, entry={**SHAREGPT_ENTRY, "num_samples": 4})

    def drawn(seed: int, max_samples: int | None = None) -> list[int]:
        return [c.index for c in load_datasets("d", str(tmp_path), max_samples, seed=seed).conversations]

    first = drawn(1)
    assert first == drawn(1) and len(set(first)) == len(first) and len(first) in (3, 4)  # the bad one left out
    assert len({tuple(drawn(seed)) for seed in range(6)}) > 1  # the seed decides which
    write_dataset(tmp_path, "d", records, entry={**SHAREGPT_ENTRY, "num_samples": 20})
    picks = _draw(6, 20, 3)
    assert len(picks) == 20 and sorted(picks[:6]) == list(range(6))  # every record once, then drawn again
    loaded = load_datasets("d", str(tmp_path), None, seed=3)
    assert [c.index for c in loaded.conversations] == [i for i in picks if i != 5]
    assert [str(p) for p in loaded.problems] == [f"{path}: record 5: field 'messages': no assistant answer at the end"]
    assert drawn(3, max_samples=7) == [i for i in picks[:7] if i != 5]  # max_samples after num_samples


def _draw(n: int, num_samples: int, seed: int) -> list[int]:
    from vlmtune.data.formats import sample_indices

    return sample_indices(n, num_samples, seed)


def test_copies_drawn_by_num_samples_stay_on_one_side_of_the_split(tmp_path):
    make_dataset(tmp_path, n=6)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["my_dataset"]["num_samples"] = 30
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    splits = load_splits(DataConfig(dataset="my_dataset", dataset_dir=str(tmp_path), val_size=2), seed=1)
    val_keys = [(c.source, c.index) for c in splits.val]
    assert len(val_keys) == len(set(val_keys)) == 2
    assert len(splits.train) == 30 - sum(1 for i in _draw(6, 30, 1) if (str(tmp_path / "my_dataset.json"), i)
                                         in set(val_keys))
    assert not set(val_keys) & {(c.source, c.index) for c in splits.train}


def test_relative_image_falls_back_to_the_path_as_given(tmp_path, monkeypatch):
    """As LLaMA-Factory: dataset_dir / path when that file exists, else the path from the current directory."""
    data, work = tmp_path / "data", tmp_path / "work"
    save_image(work / "pics" / "only_here.png", (64, 64), 0)
    save_image(work / "pics" / "both.png", (64, 64), 1)
    save_image(data / "pics" / "both.png", (64, 64), 2)
    monkeypatch.chdir(work)
    write_dataset(data, "d", [record("pics/only_here.png", "yes"), record("pics/both.png", "no"),
                              record("pics/nowhere.png", "no")])
    images = [c.images[0] for c in load_datasets("d", str(data), None).conversations]
    assert images == [str(work / "pics" / "only_here.png"), str(data / "pics" / "both.png"),
                      str(data / "pics" / "nowhere.png")]


def test_image_objects_as_datasets_exports_them(tmp_path):
    save_image(tmp_path / "a.png", (64, 64), 0)
    as_object = {**record("a.png", "yes"), "images": [{"path": "a.png", "bytes": None}]}
    with_bytes = {**record("a.png", "yes"), "images": [{"path": None, "bytes": "iVBORw0KGgo="}]}
    no_path = {**record("a.png", "yes"), "images": [{"bytes": None}]}
    path = write_dataset(tmp_path, "d", [as_object, with_bytes, no_path])
    loaded = load_datasets("d", str(tmp_path), None)
    assert [c.images for c in loaded.conversations] == [[str(tmp_path / "a.png")]]
    lines = [str(p) for p in loaded.problems]
    assert lines[0].startswith(f"{path}: record 1: field 'images[0].bytes': embedded image bytes: vlmtune reads "
                               f"image files"), lines
    assert lines[1] == f"{path}: record 2: field 'images[0].path': must be an image path (a string), got None"


# ms-swift's standard layouts, as a dataset given by its path (no dataset_info.json): layout → one record.
SWIFT_LAYOUTS = {
    "messages": {"messages": [{"role": "system", "content": "你是检查助手。"},
                              {"role": "user", "content": "<image>合规吗?"},
                              {"role": "assistant", "content": "满足要求"}], "images": ["pics/a.png"]},
    "conversations": {"conversations": [{"from": "human", "value": "<image>合规吗?"},
                                        {"from": "gpt", "value": "满足要求"}], "images": ["pics/a.png"],
                      "system": "你是检查助手。"},
    "alpaca": {"system": "你是检查助手。", "instruction": "<image>合规吗?", "input": "", "output": "满足要求",
               "images": ["pics/a.png"]},
    "query-response": {"system": "你是检查助手。", "query": "<image>合规吗?", "response": "满足要求",
                       "history": [["先看图", "好的"]], "images": [{"path": "pics/a.png"}]},
}


@pytest.mark.parametrize("layout", list(SWIFT_LAYOUTS))
def test_a_dataset_given_by_its_path_reads_as_ms_swift_does(tmp_path, monkeypatch, layout):
    """`dataset: data/train.jsonl` — no registry: the layout is read off the first record, images resolve against
    the file's folder; the path is found from the current directory or under dataset_dir."""
    data = tmp_path / "swift"
    save_image(data / "pics" / "a.png", (64, 64), 0)
    records = [SWIFT_LAYOUTS[layout], SWIFT_LAYOUTS[layout]]
    (data / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                      encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for name, dataset_dir in (("swift/train.jsonl", "elsewhere"), ("train.jsonl", str(data)),
                              (str(data / "train.jsonl"), "data")):
        loaded = load_datasets(name, dataset_dir, None)
        assert not loaded.problems, loaded.problems
        conv = loaded.conversations[0]
        assert conv.system == "你是检查助手。" and conv.answer == "满足要求" and conv.id == "train-0"
        assert conv.images == [str(data / "pics" / "a.png")]
        assert conv.prompt == "<image>合规吗?" or layout == "query-response"
    if layout == "query-response":
        assert [m.content for m in conv.messages[1:]] == ["先看图", "好的", "<image>合规吗?", "满足要求"]


def test_a_dataset_path_vlmtune_cannot_read_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "hello", "label": 1}) + "\n", encoding="utf-8")
    cases = {"odd.jsonl": ["odd.jsonl", "cannot tell the layout", "first record: label, text",
                           "register the file in dataset_info.json"],
             "missing/train.jsonl": ["dataset 'missing/train.jsonl': no such file", "nor under dataset_dir",
                                     "registers no dataset of that name"],
             "train.parquet/": ["dataset 'train.parquet/'", "no such file"]}
    (tmp_path / "train.csv").write_text("a,b\n", encoding="utf-8")
    cases["train.csv"] = None  # not a path vlmtune reads (and no registry): the registry's own message
    for name, fragments in cases.items():
        with pytest.raises(VlmtuneError) as error:
            load_datasets(name, str(tmp_path / "data"), None)
        message = str(error.value)
        assert "\n" not in message
        for fragment in fragments or ["dataset_info.json: not found"]:
            assert fragment in message, message


def test_a_registered_name_wins_over_a_file_of_that_name(tmp_path, monkeypatch):
    """With a registry, `dataset: train.jsonl` names its entry when it has one (LLaMA-Factory's meaning)."""
    save_image(tmp_path / "a.png", (64, 64), 0)
    write_dataset(tmp_path, "registered", [record("a.png", "不满足要求")] * 3)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["train.jsonl"] = info["registered"]
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    (tmp_path / "train.jsonl").write_text(json.dumps(SWIFT_LAYOUTS["messages"]) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert len(load_datasets("train.jsonl", str(tmp_path), None).conversations) == 3
    assert len(load_datasets("./train.jsonl", str(tmp_path), None).conversations) == 1


# A content as a list of parts: OpenAI's / ms-swift's and LLaMA-Factory v1's spellings of one record.
PARTS = {
    "openai": [{"type": "text", "text": "看图:"}, {"type": "image_url", "image_url": {"url": "pics/a.png"}},
               {"type": "text", "text": "合规吗?"}],
    "ms-swift": [{"type": "text", "text": "看图:"}, {"type": "image", "image": "pics/a.png"},
                 {"type": "text", "text": "合规吗?"}],
    "llama-factory v1": [{"type": "text", "value": "看图:"}, {"type": "image_url", "value": "pics/a.png"},
                         {"type": "text", "value": "合规吗?"}],
}


@pytest.mark.parametrize("spelling", list(PARTS))
def test_content_parts_are_text_with_image_placeholders_where_the_images_stand(tmp_path, spelling):
    save_image(tmp_path / "pics" / "a.png", (64, 64), 0)
    parts_record = {"messages": [{"role": "user", "content": PARTS[spelling]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "满足要求"}]}]}
    string_record = {"messages": [{"role": "user", "content": "看图:<image>合规吗?"},
                                  {"role": "assistant", "content": "满足要求"}], "images": ["pics/a.png"]}
    write_dataset(tmp_path, "parts", [parts_record], entry=SHAREGPT_ENTRY)
    write_dataset(tmp_path, "strings", [string_record], entry=SHAREGPT_ENTRY)
    (parts,), (strings,) = (load_datasets(name, str(tmp_path), None).conversations for name in ("parts", "strings"))
    assert [m.content for m in parts.messages] == [m.content for m in strings.messages]
    assert parts.images == strings.images == [str(tmp_path / "pics" / "a.png")]


def test_content_parts_vlmtune_cannot_use_are_problems_naming_the_part(tmp_path):
    save_image(tmp_path / "a.png", (64, 64), 0)
    user = lambda *parts: {"messages": [{"role": "user", "content": list(parts)},  # noqa: E731
                                        {"role": "assistant", "content": "满足要求"}]}
    text = {"type": "text", "text": "合规吗?"}
    records = [user({"type": "video", "video": "v.mp4"}, text),
               user({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}, text),
               user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, text),
               user({"type": "chart"}, text),
               {**user({"type": "image", "image": "a.png"}, text), "images": ["a.png"]},
               user({"type": "text"})]
    write_dataset(tmp_path, "d", records, entry=SHAREGPT_ENTRY)
    loaded = load_datasets("d", str(tmp_path), None)
    assert not loaded.conversations
    found = {(p.record, p.field): p.message for p in loaded.problems}
    assert "video parts are not read" in found[(0, "messages[0].content[0]")]
    assert "data: URL" in found[(1, "messages[0].content[0].image_url.url")]
    assert "an image URL" in found[(2, "messages[0].content[0].image_url.url")]
    assert "unknown part type 'chart'" in found[(3, "messages[0].content[0]")]
    assert "both here and in the messages' content parts" in found[(4, "images")]
    assert "a text part needs its text" in found[(5, "messages[0].content[0]")]
    assert len(found) == 6


def test_a_dataset_path_that_is_no_json_text_is_refused_without_reading_it(tmp_path, monkeypatch):
    """A pipe named x.jsonl is not opened (it would block); a 2 GB sparse file is refused at its first NUL byte,
    not read whole; a file of nothing but bad lines, strings or an empty object says so, on one line."""
    import os
    import resource

    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "pipe.jsonl")
    with open(tmp_path / "sparse.jsonl", "wb") as fh:
        fh.truncate(2 << 30)
    (tmp_path / "bad.jsonl").write_text("nope\n{also not\n", encoding="utf-8")
    (tmp_path / "strings.json").write_text('["a", "b"]', encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text('{}\n', encoding="utf-8")
    (tmp_path / "odd_key.jsonl").write_text(json.dumps({"a\nb": 1}) + "\n", encoding="utf-8")
    cases = {"pipe.jsonl": "pipe.jsonl: not a regular file",
             "sparse.jsonl": "sparse.jsonl: not JSON text (a NUL byte at offset 0",
             "bad.jsonl": "(no record is a JSON object; line 1: not valid JSON at column 1",
             "strings.json": "(no record is a JSON object)",
             "empty.jsonl": "(first record: an empty object)",
             "odd_key.jsonl": "(first record: 'a\\nb')"}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, fragment in cases.items():
        with pytest.raises(VlmtuneError) as error:
            load_datasets(name, str(tmp_path / "data"), None)
        assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KB: the 2 GB were not read


def test_a_huge_num_samples_is_drawn_only_as_far_as_max_samples(tmp_path):
    """num_samples: 10**12 allocated 10**12 picks (the memory filled); with max_samples only those are drawn (the
    same as the first max_samples of the whole draw), without it one line names the registry key."""
    save_image(tmp_path / "a.png", (64, 64), 0)
    write_dataset(tmp_path, "d", [record("a.png", f"answer {i}") for i in range(3)],
                  entry={**SHAREGPT_ENTRY, "num_samples": 10**12})
    loaded = load_datasets("d", str(tmp_path), 7, seed=5)
    assert [c.index for c in loaded.conversations] == _draw(3, 20, 5)[:7]
    with pytest.raises(VlmtuneError) as error:
        load_datasets("d", str(tmp_path), None)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'dataset_info.json'}: field 'd.num_samples': 1,000,000,000,000 records")
    assert "set max_samples" in message


def test_image_urls_of_any_scheme_and_file_urls_as_urls(tmp_path):
    """`HTTPS://` and `s3://` are URLs (they were read as relative paths "HTTPS:/..."); a file URL is percent-encoded
    (`my%20pic.png` is `my pic.png`)."""
    save_image(tmp_path / "my pic.png", (64, 64), 0)
    urls = ["HTTPS://example.com/a.png", "s3://bucket/a.png", f"file://{tmp_path}/my%20pic.png",
            f"file://localhost{tmp_path}/my%20pic.png", "file://"]
    path = write_dataset(tmp_path, "d", [{**record("a.png", "yes"), "images": [url]} for url in urls])
    loaded = load_datasets("d", str(tmp_path), None)
    assert [(c.index, c.images) for c in loaded.conversations] == [(2, [str(tmp_path / "my pic.png")]),
                                                                   (3, [str(tmp_path / "my pic.png")])]
    assert [str(p) for p in loaded.problems][:2] == [f"{path}: record {i}: field 'images[0]': an image URL: vlmtune "
                                                     f"reads image files; download the images and give their paths"
                                                     for i in (0, 1)]
    assert str(loaded.problems[2]) == f"{path}: record 4: field 'images[0]': not a file path: ''"


def test_images_given_as_content_parts_are_named_by_their_parts(tmp_path):
    """A record with image parts has no images column: a count mismatch names the messages, an image that cannot
    be read names its part (not 'images[0]')."""
    from vlmtune.data.checks import check_conversations

    (tmp_path / "broken.png").write_bytes(b"not a png")
    image = {"type": "image_url", "image_url": {"url": "broken.png"}}
    text = {"type": "text", "text": "<image>合规吗?"}
    answer = {"role": "assistant", "content": "满足要求"}
    records = [{"messages": [{"role": "user", "content": [image, text]}, answer]},
               {"messages": [{"role": "user", "content": [text]}, answer], "images": ["broken.png"]},
               {"messages": [{"role": "user", "content": [{"type": "text", "text": "看:"}, image]}, answer]}]
    path = write_dataset(tmp_path, "d", records, entry=SHAREGPT_ENTRY)
    loaded = load_datasets("d", str(tmp_path), None)
    assert [str(p) for p in loaded.problems] == [f"{path}: record 0: field 'messages': 2 <image> placeholder(s) in "
                                                 f"the messages but 1 image(s) given"]
    checked = check_conversations(loaded.conversations)
    assert [(p.record, p.field) for p in checked.problems] == [(1, "images[0]"),
                                                               (2, "messages[0].content[1].image_url.url")]


def test_a_dataset_name_holding_a_line_break_is_still_a_one_line_error(tmp_path, capsys):
    """The CLI prints every error on one line, whatever the message quotes (here the user's own dataset name)."""
    from helpers import assert_one_line_error, run_inline

    result = run_inline(capsys, "data", "check", "--dataset", "my\ndata.jsonl", "--dataset_dir", tmp_path)
    assert_one_line_error(result, "my data.jsonl")
