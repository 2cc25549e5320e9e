"""infer.rope_positions equals the model's get_rope_index for text + still images, whatever the layout, on
every family (Qwen3-VL's get_rope_index is its own; its interleaving happens in the rotary module)."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import archs_with
from vlmtune.infer import rope_positions
from vlmtune.families import parts_of
from vlmtune.infer.scoring import prompt_positions
from vlmtune.model.load import load_model

TEXT, IMAGE_PAD = 5, 7  # token ids only matter through mm_token_type_ids


@pytest.fixture(scope="module", params=archs_with("fast_rope_models"))
def rope(request, tiny_models):
    return parts_of(load_model(tiny_models(request.param))).owner


def random_batch(rng: random.Random, rows: int, padding: str):
    """Rows of text runs and images of random merged grids (h, w), padded to one length."""
    sequences, grids = [], []
    for _ in range(rows):
        types = [0] * rng.randint(0, 6)  # 0: the image opens the row
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            h, w = rng.randint(1, 5), rng.randint(1, 5)
            grids.append((1, 2 * h, 2 * w))
            types += [1] * (h * w) + [0] * rng.randint(1, 4)  # an image is always followed by text
        sequences.append(types or [0])
    length = max(len(s) for s in sequences) + rng.randint(0, 3)
    types = torch.zeros(rows, length, dtype=torch.long)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(0, len(seq)) if padding == "right" else slice(length - len(seq), length)
        types[row, cols] = torch.tensor(seq)
        mask[row, cols] = 1
    ids = torch.where(types == 1, IMAGE_PAD, TEXT)
    grid = torch.tensor(grids, dtype=torch.long).view(-1, 3)
    return ids, types, mask, (grid if len(grids) else None)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_positions_equal_get_rope_index(rope, padding):
    rng = random.Random(0)
    for _ in range(60):
        ids, types, mask, grid = random_batch(rng, rng.randint(1, 4), padding)
        want, _ = rope.get_rope_index(ids, mm_token_type_ids=types, attention_mask=mask, image_grid_thw=grid)
        got = rope_positions.positions(ids, types, mask, grid, rope.config.vision_config.spatial_merge_size)
        assert got is not None and torch.equal(got, want), (types, grid)


def test_what_it_does_not_cover_goes_back_to_the_library(rope):
    ids, types, mask, grid = random_batch(random.Random(1), 2, "right")
    assert grid is not None
    merge = rope.config.vision_config.spatial_merge_size
    assert rope_positions.positions(ids, types, mask, grid[:-1], merge) is None  # an image without a grid
    video = types.clone()
    video[types == 1] = 2
    assert rope_positions.positions(ids, video, mask, grid, merge) is None
    frames = grid.clone()
    frames[:, 0] = 2
    assert rope_positions.positions(ids, types, mask, frames, merge) is None


def test_prompt_positions_checks_the_first_batch_against_the_library(tiny_model_dir, monkeypatch):
    model = load_model(tiny_model_dir)
    rope = parts_of(model).owner
    ids, types, mask, grid = random_batch(random.Random(2), 3, "right")
    batch = {"input_ids": ids, "mm_token_type_ids": types, "attention_mask": mask, "image_grid_thw": grid}
    want, _ = rope.get_rope_index(ids, mm_token_type_ids=types, attention_mask=mask, image_grid_thw=grid)
    assert torch.equal(prompt_positions(model, batch), want)
    assert rope.__dict__["_vlmtune_fast_positions"] is True
    # A rule that differs from the library's is noticed on the first batch and not used again.
    other = load_model(tiny_model_dir)
    right = rope_positions.positions
    monkeypatch.setattr(rope_positions, "positions", lambda *a: right(*a) + 1)
    assert torch.equal(prompt_positions(other, batch), want)
    assert parts_of(other).owner.__dict__["_vlmtune_fast_positions"] is False
    assert torch.equal(prompt_positions(other, batch), want)
