"""The batch: one typed value, built in one place (`data.encode.Collator`, or `data.packing` for a packed row).

It holds the model's inputs and, worked out on the CPU while the batch is built, everything the training step
needs to know about it without asking the device: where the label tokens are (the logits' gather indices), how
many there are, how many tokens and samples it has. A step that reads those from the CPU batch never waits for
the device before its forward (no `nonzero()`, no boolean-mask indexing, no `int(tensor)`), so on a GPU the host
runs ahead and queues the next work while the current one computes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LabelGather:
    """Where the logits that predict a label token are, as integer indices.

    Position t predicts token t+1, so only positions whose next token is labelled need logits. The model computes
    them at `columns` (1-D: the positions where any row has one — a 1-D `logits_to_keep` every supported
    transformers version takes), and the label logits are `logits[rows, picks]` (picks index into `columns`), in
    the order of `targets`.
    """

    columns: torch.Tensor  # (C,) long
    rows: torch.Tensor  # (N,) long
    picks: torch.Tensor  # (N,) long, into columns
    targets: torch.Tensor  # (N,) long: the label tokens
    count: int  # N, the label tokens of the batch

    @classmethod
    def of(cls, labels: torch.Tensor) -> LabelGather:
        predicts_label = torch.zeros_like(labels, dtype=torch.bool)
        predicts_label[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        columns = predicts_label.any(0).nonzero().flatten()
        rows, picks = predicts_label[:, columns].nonzero(as_tuple=True)
        targets = labels[rows, columns[picks] + 1]
        return cls(columns=columns, rows=rows, picks=picks, targets=targets, count=int(targets.numel()))

    def to(self, device: torch.device, non_blocking: bool = True) -> LabelGather:
        move = (lambda t: t.to(device, non_blocking=non_blocking))
        return dataclasses.replace(self, columns=move(self.columns), rows=move(self.rows), picks=move(self.picks),
                                   targets=move(self.targets))


# The fields a model's forward takes, in this order; the rest are for vlmtune's own code.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                "mm_encoder_outputs")


@dataclass
class Batch:
    """Token ids, masks, images and labels of several samples (padded rows, or one packed row).

    Images come in one of three forms: `pixel_values` (patches, for the model's own vision tower),
    `mm_encoder_outputs` (cached features: the tower does not run) or `image_pixels` + `image_settings` (the
    resized images as they are, for `model.vision.VisionEncoder.still_images`, in prediction); `image_grid_thw`
    with each. `position_ids` is given when the rows' positions are not the model's own rule on the padded rows
    (a packed row: each sample's positions start again).
    """

    input_ids: torch.Tensor  # (rows, width) long
    attention_mask: torch.Tensor | None  # (rows, width) long, 1 at real tokens; None for a packed row
    mm_token_type_ids: torch.Tensor  # (rows, width) long, 1 at image tokens
    labels: torch.Tensor | None = None  # (rows, width) long, IGNORE_INDEX outside the answers
    position_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    mm_encoder_outputs: dict | None = None
    image_pixels: list | None = None
    image_settings: object | None = None
    num_samples: int = 0
    num_tokens: int = 0  # real (not padding) tokens
    gather: LabelGather | None = None  # of `labels`, when there are labels
    # A packed row of a family with linear-attention layers: where its samples start, as those layers' kernels take
    # it (`data.packing.varlen_kwargs`); extra keyword arguments of the forward.
    varlen: dict | None = None

    @property
    def num_label_tokens(self) -> int:
        return self.gather.count if self.gather is not None else 0

    def model_inputs(self) -> dict:
        """The keyword arguments of the model's forward (labels not among them: vlmtune computes its loss)."""
        values = {name: getattr(self, name) for name in MODEL_INPUTS}
        return {**{name: value for name, value in values.items() if value is not None}, **(self.varlen or {})}

    def to(self, device: torch.device, non_blocking: bool = True) -> Batch:
        """The batch on `device`: tensors copied without waiting (`non_blocking`); cached image features stay
        where they are (the model moves them), the raw images too (the vision encoder moves them)."""
        move = (lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t)
        return dataclasses.replace(
            self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
            mm_token_type_ids=move(self.mm_token_type_ids), labels=move(self.labels),
            position_ids=move(self.position_ids), pixel_values=move(self.pixel_values),
            image_grid_thw=move(self.image_grid_thw),
            gather=self.gather.to(device, non_blocking) if self.gather is not None else None,
            varlen={k: move(v) for k, v in self.varlen.items()} if self.varlen is not None else None)
