"""Padding-free packing (`packing`, `neat_packing`): the samples of one micro-batch in one row, no padding.

Each sample keeps its own positions and attends to no other sample, so a packed step's loss and gradients are the
padded step's (tests/data/test_packing.py, every family's tiny model). transformers already keeps packed samples
apart when told where they start, and nothing here builds a mask:

* The Qwen-VL text models take `position_ids` of shape (4, batch, length): row 0 the text positions, rows 1–3
  the 3-D rope positions. With `attention_mask` None, the mask builder reads row 0 and, where it falls back
  instead of growing by one, starts a new sample (transformers' `masking_utils.find_packed_sequence_indices`):
  sdpa and eager get a block-diagonal causal mask; flash_attention_2 derives `cu_seqlens` from the same row
  and runs its variable-length kernel. So the packed row's row 0 counts 0, 1, ... again in every sample, and its
  rope rows are each sample's own (the model's `get_rope_index` on the padded micro-batch, real tokens kept).
  The forward must run without a cache (`use_cache=False`, as the training step's does): with one, transformers
  does not look for packed samples, and they attend to each other.
* Linear-attention layers (families with `recurrent_state`: Qwen3.5's Gated DeltaNet) read no positions: their
  gated delta rule takes `cu_seq_lens_q` (flash-linear-attention's `cu_seqlens`) and their causal convolution
  `seq_idx` (causal-conv1d's), and only those CUDA kernels honour them (without them transformers refuses the
  keyword, or ignores it and lets one sample's state run into the next). `varlen_kwargs` gives both;
  `packing_problem` says, once at start-up, when a run cannot have them.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import torch

from vlmtune.data.batch import IGNORE_INDEX, Batch, LabelGather
from vlmtune.families import Family, parts_of

# (padded batch) → its (3, rows, width) rope positions, as the model computes them for those padded rows.
RopePositions = Callable[[Batch], torch.Tensor]


def rope_positions(core: torch.nn.Module) -> RopePositions:
    """The model's own rope rule (`get_rope_index` of its family's owner module) for padded batches; `core` is the
    transformers model, not wrapped. It reads only the model's config, never its weights."""
    owner = parts_of(core).owner

    def positions(batch: Batch) -> torch.Tensor:
        rope, _ = owner.get_rope_index(batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids,
                                       image_grid_thw=batch.image_grid_thw, attention_mask=batch.attention_mask)
        return rope
    return positions


def pack(padded: Batch, positions: RopePositions) -> Batch:
    """One row holding the real tokens of every row of `padded` (the Collator's batch of the micro-batch's
    samples), in order, with each sample's own positions: `position_ids` (4, 1, total) — row 0 the text
    positions from 0 in every sample, rows 1–3 the sample's rope positions — and no attention mask.

    Images (pixels or cached features) stay as the Collator put them: the samples' images in sample order, which
    is the order of their image tokens in the row. A sample's first token gets no label: no position of its own
    sample predicts it (in the padded batch nothing does), and the previous sample's last one must not."""
    real = padded.attention_mask.bool()
    lengths = real.sum(1)
    rope = positions(padded)
    text = torch.cat([torch.arange(int(n), dtype=rope.dtype) for n in lengths])
    labels = padded.labels[real]
    starts = lengths.cumsum(0) - lengths
    labels[starts] = IGNORE_INDEX
    labels = labels.unsqueeze(0)
    return dataclasses.replace(
        padded, input_ids=padded.input_ids[real].unsqueeze(0), attention_mask=None,
        mm_token_type_ids=padded.mm_token_type_ids[real].unsqueeze(0), labels=labels,
        position_ids=torch.cat([text.unsqueeze(0), rope[:, real]]).unsqueeze(1), gather=LabelGather.of(labels))


def sample_lengths(batch: Batch) -> torch.Tensor:
    """The lengths of the samples of a packed row, from its text positions (each sample's start again at 0)."""
    text = batch.position_ids[0, 0]
    starts = torch.cat([(text == 0).nonzero().flatten(), torch.tensor([text.numel()])])
    return starts.diff()


def varlen_kwargs(lengths: torch.Tensor) -> dict:
    """What the linear-attention layers of a packed row need (families with `recurrent_state`): `cu_seq_lens_q` /
    `cu_seq_lens_k` (int32 sample starts and the end, flash-attention's and flash-linear-attention's
    `cu_seqlens`), `max_length_q` / `max_length_k` (flash-attention's varlen kernel then skips deriving them from
    the positions in every layer) and `seq_idx` (int32 (1, total): each token's sample, for causal-conv1d). Built
    on the CPU with the batch; extra keyword arguments of the model's forward.

    The model's forward also hands them to its vision tower, whose flash-attention call sets `cu_seq_lens_q` itself:
    transformers that do not drop them there (5.16.1 does not) fail on `pixel_values` under flash_attention_2, so
    there the images go in as features (`mm_encoder_outputs`) or the vision tower runs sdpa."""
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths).unsqueeze(0)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
            "seq_idx": seq_idx}


def packing_problem(family: Family | None, device: torch.device, setting: str = "packing") -> str | None:
    """Why this run cannot pack (one line naming `setting` and what to do instead), or None when it can.

    Attention keeps packed samples apart on every device; a family with linear-attention layers also needs the
    CUDA kernels that take sample boundaries (`Family.kernels`: flash-linear-attention's gated delta rule with
    `cu_seqlens`, causal-conv1d with `seq_idx`). `family`: the model's record (`Processor.family`), so the
    question is answered at start-up, before the model loads."""
    if family is None or not family.recurrent_state:
        return None
    wanted = ", ".join(pip for _, pip in family.kernels)
    if device.type != "cuda":
        return (f"{setting}: {family.name}'s linear-attention layers keep packed samples apart only with CUDA "
                f"kernels ({wanted}), and this run has no CUDA device; set {setting}: false")
    missing = [pip for module, pip in family.kernels if not _imports(module)]
    if missing:
        return (f"{setting}: {family.name}'s linear-attention layers keep packed samples apart only with "
                f"{wanted} ({', '.join(missing)} not installed): pip install 'vlmtune[gdn]', or set {setting}: "
                f"false")
    return None


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # not installed, or installed without a working build (e.g. no triton)
        return False
    return True
