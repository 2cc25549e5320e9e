"""`vlmtune data check` from the shell, as a new user runs it: each malformed input, one line, exit 1."""

import json
import os

import pytest

from helpers import RULES_PROMPT, assert_one_line_error, make_dataset, record, run_cli, save_image, write_dataset


def check(data_dir, *extra):
    return run_cli("data", "check", "--dataset", "my_dataset", "--dataset_dir", str(data_dir), *extra)


def test_clean_dataset_with_model_reports_counts_and_tokens(small_dataset, tiny_model_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: my_dataset\ndataset_dir: {small_dataset}\n"
                   f"val_size: 0.25\ncutoff_len: 4096\nimage_max_pixels: 262144\n")
    result = run_cli("data", "check", str(cfg))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "records: 12 read, 0 with problems; train 9, val 3" in out
    assert "answers (train): 满足要求 6 (66.7%), 不满足要求 3 (33.3%)" in out
    assert "answers (val):   满足要求 2 (66.7%), 不满足要求 1 (33.3%)" in out
    # 320×240 → smart resize 308×252 → 22×18 patches → 99 tokens; 224×224 → 16×16 patches → 64 tokens
    assert "image tokens per sample: min 64 / median 81.5 / max 99" in out
    assert "total tokens per sample: min " in out
    assert "no problems found" in out


@pytest.mark.parametrize("arch, shown", [("qwen3_vl", "model: Qwen3-VL, template qwen3_vl_nothink"),
                                         ("qwen3_5", "model: Qwen3.5, template qwen3_5 (enable_thinking: false)")])
def test_token_counts_use_the_models_grid(small_dataset, tiny_models, arch, shown):
    """Qwen3-VL and Qwen3.5: one token per 32 × 32 px. 320×240 → 320×256 → 10×8 tokens; 224×224 → 7×7 = 49."""
    result = check(small_dataset, "--model_name_or_path", str(tiny_models(arch)), "--image_max_pixels", "262144")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{shown}; one image token per 32×32 pixels" in result.stdout
    assert "image tokens per sample: min 49 / median 64.5 / max 80" in result.stdout
    if arch != "qwen3_vl":
        return
    wrong = check(small_dataset, "--model_name_or_path", str(tiny_models("qwen3_vl")), "--template", "qwen2_vl")
    assert_one_line_error(wrong, "template: 'qwen2_vl' does not fit", "use qwen3_vl_nothink or qwen3_vl")


def problem_lines(result):
    return [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]


BROKEN = {
    "missing image": (lambda d: record("images/nope.png", "满足要求"), "field 'images[0]': image not found"),
    "unreadable image": (lambda d: (d / "images" / "bad.png").write_bytes(b"not a png") and record("images/bad.png", "满足要求"),
                         "field 'images[0]': unreadable image"),
    "placeholder count": (lambda d: {"messages": [{"role": "user", "content": "no placeholder"},
                                                  {"role": "assistant", "content": "满足要求"}],
                                     "images": ["images/img_0.png"]},
                          "field 'images': 0 <image> placeholder(s) in the messages but 1 image(s) given"),
    "role order": (lambda d: {"messages": [{"role": "user", "content": RULES_PROMPT},
                                           {"role": "user", "content": "again"},
                                           {"role": "assistant", "content": "满足要求"}],
                              "images": ["images/img_0.png"]},
                   "field 'messages[1].role': expected a assistant turn, got user"),
    "empty content": (lambda d: {"messages": [{"role": "user", "content": RULES_PROMPT},
                                              {"role": "assistant", "content": ""}], "images": ["images/img_0.png"]},
                      "field 'messages[1].content': empty assistant content"),
    "no answer": (lambda d: {"messages": [{"role": "user", "content": RULES_PROMPT}], "images": ["images/img_0.png"]},
                  "field 'messages': no assistant answer at the end"),
    "a FIFO as image": (lambda d: os.mkfifo(d / "images" / "pipe.jpg") or record("images/pipe.jpg", "满足要求"),
                        "field 'images[0]': not an image file (a FIFO)"),
    # LLaMA-Factory's mllm_video_demo / mllm_audio_demo shapes: refused, not silently left out
    "a video record": (lambda d: {"messages": [{"role": "user", "content": "<video>What is she doing?"},
                                               {"role": "assistant", "content": "满足要求"}],
                                  "videos": ["mllm_demo_data/1.mp4"]}, "field 'videos': videos are not read"),
    "an audio placeholder": (lambda d: {"messages": [{"role": "user", "content": "<audio>What is it?"},
                                                     {"role": "assistant", "content": "满足要求"}]},
                             "field 'messages[0].content': <audio> placeholder: vlmtune reads images only"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_bad_record_is_one_line_naming_file_record_field(tmp_path, case):
    data_dir = make_dataset(tmp_path / "data", n=4)
    make_bad, expected = BROKEN[case]
    records = json.loads((data_dir / "my_dataset.json").read_text())
    records.insert(2, make_bad(data_dir))
    path = write_dataset(data_dir, "my_dataset", records)
    result = check(data_dir)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    lines = problem_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: record 2: ") and expected in lines[0], lines[0]


def test_sample_over_cutoff_len(small_dataset, tiny_model_dir):
    result = check(small_dataset, "--model_name_or_path", str(tiny_model_dir), "--cutoff_len", "160")
    assert result.returncode == 1
    lines = problem_lines(result)
    # the six samples with a 320×240 image (99 image tokens, 186 in all) do not fit; those with 64 (151) do
    assert len(lines) == 6 and all("186 tokens" in line and "cutoff_len 160" in line for line in lines), lines
    assert all("field 'messages'" in line for line in lines)


def test_unknown_dataset_and_missing_registry(small_dataset, tmp_path):
    result = run_cli("data", "check", "--dataset", "my_datset", "--dataset_dir", str(small_dataset))
    assert_one_line_error(result, "dataset_info.json", "unknown dataset 'my_datset'", "my_dataset")
    result = run_cli("data", "check", "--dataset", "my_dataset", "--dataset_dir", str(tmp_path / "empty"))
    assert_one_line_error(result, "dataset_info.json: not found")


def test_a_dataset_given_by_path_is_checked_without_a_registry(tmp_path):
    """ms-swift's way: `--dataset train.jsonl` from the directory holding it, no dataset_info.json anywhere."""
    save_image(tmp_path / "pics" / "a.png", (64, 64), 0)
    rows = [{"messages": [{"role": "user", "content": "<image>合规吗?"}, {"role": "assistant", "content": answer}],
             "images": ["pics/a.png"]} for answer in ("满足要求", "不满足要求", "满足要求")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                          encoding="utf-8")
    result = run_cli("data", "check", "--dataset", "train.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "datasets: train.jsonl"
    assert "records: 3 read, 0 with problems" in result.stdout and "no problems found" in result.stdout
    result = run_cli("data", "check", "--dataset", "tran.jsonl", cwd=tmp_path)
    assert_one_line_error(result, "dataset 'tran.jsonl': no such file")


def test_bad_json_file(tmp_path):
    save_image(tmp_path / "a.png", (32, 32), 0)
    write_dataset(tmp_path, "my_dataset", [])
    (tmp_path / "my_dataset.json").write_text('[{"messages": ')
    assert_one_line_error(check(tmp_path), "my_dataset.json", "not valid JSON")
