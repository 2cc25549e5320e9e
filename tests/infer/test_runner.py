"""The prediction loop: score-mode workers change nothing but the speed; rows stay in dataset order."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vlmtune.data.loader import load_datasets
from vlmtune.errors import VlmtuneError
from vlmtune.infer.engine import load_engine
from vlmtune.infer.runner import TransformersPredictor, predict_batches

POS, NEG = "满足要求", "不满足要求"


@pytest.fixture(scope="module")
def engine(tiny_model_dir, label_adapter):
    return load_engine(str(tiny_model_dir), str(label_adapter), merge_adapter=True, log=lambda *_: None)


@pytest.fixture(scope="module")
def conversations(rules_dir):
    return load_datasets("rules", str(rules_dir), None).conversations


def rows_of(predictor, conversations, batch_size=3, mode="score"):
    return [row for _, rows in predict_batches(predictor, conversations, mode, [POS, NEG], batch_size) for row in rows]


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_give_the_rows_of_one_worker_in_order(engine, conversations, workers):
    import torch

    convs = conversations[:14]  # 5 batches of 3 (the last one short): more batches than workers
    one = rows_of(TransformersPredictor(engine, workers=1), convs)
    torch.set_num_threads(2)  # the workers split these; the fixture in conftest restores 1 afterwards
    many_predictor = TransformersPredictor(engine, workers=workers)
    many = rows_of(many_predictor, convs)
    assert torch.get_num_threads() == 2  # given back after the run
    assert [r["id"] for r in many] == [c.id for c in convs]
    assert [r["predict"] for r in many] == [r["predict"] for r in one]
    assert {POS, NEG} <= {r["predict"] for r in many}  # the adapter answers both: the check is not trivial
    for a, b in zip(one, many):
        assert {k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"}
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


def test_auto_workers(engine):
    import torch

    torch.set_num_threads(2)
    assert TransformersPredictor(engine).workers == 2  # a CPU with two threads
    torch.set_num_threads(1)
    assert TransformersPredictor(engine).workers == 1
    assert TransformersPredictor(engine, workers=3).workers == 3


def test_a_bad_record_stops_the_run_after_the_rows_before_it(engine, conversations, tmp_path):
    convs = list(conversations[:9])
    convs[7] = dataclasses.replace(convs[7], images=[str(tmp_path / "missing.png")])
    seen = []
    with pytest.raises(VlmtuneError, match=r"record \d+: field 'images\[0\]': image not found"):
        for _, rows in predict_batches(TransformersPredictor(engine, workers=2), convs, "score", [POS, NEG], 3):
            seen += rows
    assert [r["id"] for r in seen] == [c.id for c in convs[:6]]  # the two batches before the bad one


def test_generate_mode_runs_on_one_worker(engine, conversations):
    rows = rows_of(TransformersPredictor(engine, workers=2), conversations[:6], mode="generate")
    assert [r["id"] for r in rows] == [c.id for c in conversations[:6]]
    assert all("scores" not in r for r in rows)
    json.dumps(rows, ensure_ascii=False)
