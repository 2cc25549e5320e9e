"""`infer/predict.py` under torchrun: each rank's device, its share of the rows and their join, the batch size per
backend. (The 2-rank runs themselves: tests/commands/test_predict.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from vlmtune.config import build_config
from vlmtune.infer.predict import PredictArgs, batch_size_of, join_parts, rank_device


def test_each_transformers_rank_makes_its_gpu_the_current_device(monkeypatch):
    current = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert rank_device("transformers", {}) == "cuda:1"
    assert current == [1]  # calls on the current device (is_bf16_supported, empty_cache) stay off GPU 0


@pytest.mark.parametrize("visible, tensor_parallel, want", [(None, 1, "1"), (None, 2, "2,3"),
                                                            ("4,5,6,7", 2, "6,7"), ("3,1", 1, "1")])
def test_each_vllm_rank_sees_only_its_own_gpus(monkeypatch, visible, tensor_parallel, want):
    monkeypatch.setenv("LOCAL_RANK", "1")
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *_: pytest.fail("vLLM's rank must not start CUDA"))
    assert rank_device("vllm", {"tensor_parallel_size": tensor_parallel}) is None
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == want


def test_vllm_gets_batches_it_can_schedule_unless_told():
    vllm, transformers = build_config({"infer_backend": "vllm"}, "test"), build_config({}, "test")
    assert batch_size_of(PredictArgs(), vllm, set()) == 256
    assert batch_size_of(PredictArgs(batch_size=16), vllm, {"batch_size"}) == 16
    assert batch_size_of(PredictArgs(), transformers, set()) == 8


def test_parts_hold_every_world_th_row_and_join_in_dataset_order(tmp_path):
    """Rank r predicts rows r, r + world, ...: a dataset sorted by image size is shared evenly; the join restores
    the dataset's order."""
    from vlmtune.infer.output import PredictionFile
    from vlmtune.infer.predict import part_path

    ids = [f"s-{i}" for i in range(7)]
    save = tmp_path / "out.jsonl"
    for rank in range(3):
        rows = [{"id": i, "predict": "x"} for i in ids[rank::3]]
        part_path(save, rank, 3).write_text("".join(json.dumps(r) + "\n" for r in rows))
    join_parts(PredictionFile(save, {"mode": "score"}), [part_path(save, r, 3) for r in range(3)], ids)
    assert [json.loads(line)["id"] for line in save.read_text().splitlines()] == ids
    assert not list(tmp_path.glob("out.jsonl.part-*"))
