"""Qwen2-VL's 3-D rope positions for a prompt batch with still images, in whole-batch tensor ops.

The model's own `get_rope_index` walks every row in Python (group the token types, one `arange`
per text run, one `meshgrid` per image): ≈0.5 ms per sample on a CPU, under the GIL, so with
two scoring threads it also stalls the other one (3–4 % of prediction time). The rule is simple
for still images, and here it is computed for all rows at once:

* positions count over the real tokens of a row (padding gets 0);
* a text token gets (p, p, p), p the current position, which then grows by one;
* an image of merged grid (1, h, w) gets (p, p + row, p + column) over its h × w tokens, and p then
  grows by max(h, w).

`positions` returns None for anything else (videos, multi-frame images, image runs that do not
match `image_grid_thw`); the caller then uses `get_rope_index`. `prompt_positions` in
`infer.scoring` also checks the first batch of each model against `get_rope_index` and keeps using
the library if they ever differ; tests/infer/test_rope_positions.py compares them on many layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positions(input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
              image_grid_thw: torch.Tensor | None, spatial_merge_size: int) -> torch.Tensor | None:
    """(3, batch, sequence) positions, or None when the batch is not text + still images."""
    real = attention_mask.bool()
    types = mm_token_type_ids.masked_fill(~real, 0)
    if bool((types > 1).any()):  # videos
        return None
    image = types == 1
    rows, length = image.shape
    device = input_ids.device
    starts = image & ~F.pad(image[:, :-1], (1, 0))  # first token of every image run
    grids = image_grid_thw if image_grid_thw is not None else torch.zeros(0, 3, dtype=torch.long, device=device)
    n_images = int(starts.sum())
    if n_images != grids.shape[0] or bool((grids[:, 0] != 1).any()):
        return None
    text = (real & ~image).long()
    base = text.cumsum(1) - text  # real text tokens before each token
    if n_images == 0:
        return base.masked_fill(~real, 0).expand(3, rows, length).clone()
    height, width = grids[:, 1] // spatial_merge_size, grids[:, 2] // spatial_merge_size
    image_of_token = (starts.flatten().long().cumsum(0) - 1).view(rows, length).clamp(min=0)
    if not torch.equal(torch.bincount(image_of_token[image], minlength=n_images), height * width):
        return None
    advance = torch.zeros(rows, length, dtype=torch.long, device=device)
    advance[starts] = torch.maximum(height, width)  # row-major, as the images appear
    base = base + advance.cumsum(1) - advance  # + what the images before each token added
    column = torch.arange(length, device=device).expand(rows, length)
    run_start = torch.where(starts, column, 0).cummax(dim=1).values
    start = base.gather(1, run_start)  # an image token's p: the position where its image starts
    within = column - run_start
    w = width[image_of_token]
    image_positions = torch.stack([start, start + within // w, start + within % w])
    out = torch.where(image, image_positions, base)
    return out.masked_fill(~real, 0).to(input_ids.dtype)
