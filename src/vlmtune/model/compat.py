"""What differs between the transformers versions vlmtune supports (5.16.1, what vLLM's releases pin, to the
newest), in one place. Each function asks the installed library what it does — by signature, never by
version number — and the rest of vlmtune calls these instead of the library where the two disagree.

* Precomputed image features (training's feature cache, scoring, generation, the servers): transformers
  ≥ 5.18 takes them as `mm_encoder_outputs`; earlier versions compute them inside the forward by
  `self.get_image_features(pixel_values, image_grid_thw)`. There `image_inputs` hands the model a
  placeholder `pixel_values` and has the model's own `get_image_features` return the given features
  (per thread: prediction scores from two threads at once), in that version's format — Qwen3-VL's
  deepstack features one tensor per layer for all images, not per image.
* The vision towers' rotary module: `rotary(x, position_ids) → (cos, sin)` from 5.20, before it
  `rotary(position_ids) → angles`, which the tower turned into cos / sin itself (`vision_rotary`).
* The KV cache keyword of the forwards: `cache` from 5.24 (`past_key_values` before; `cache_kwarg`).

`logits_to_keep` takes an int or a 1-D tensor of positions on every version (a per-row mask only from
5.24): vlmtune asks for the union of the positions it reads and picks rows itself.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import types
from typing import Iterator

import torch

from vlmtune.families import parts_of

_given = threading.local()  # .features: {id(model): output} while `image_inputs` is active on this thread


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP and peft wrappers (peft's LoRA layers live inside it)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def cache_kwarg(module: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.24); the name this module's forward takes."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


def vision_rotary(visual: torch.nn.Module, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of a vision tower's rotary embedding at `position_ids` (tokens, 2), (tokens, head_dim),
    float32, as the tower's forward computes them on this version."""
    rotary = visual.rotary_pos_emb
    if len(inspect.signature(type(rotary).forward).parameters) > 2:  # forward(self, x, position_ids)
        anchor = torch.empty(0, device=position_ids.device)  # the module only reads its device
        return rotary(anchor, position_ids)
    angles = rotary(position_ids)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def takes_encoder_outputs(core: torch.nn.Module) -> bool:
    """True when the model's forward takes precomputed image features (`mm_encoder_outputs`, 5.18+)."""
    return "mm_encoder_outputs" in inspect.signature(type(parts_of(core).owner).forward).parameters


@contextlib.contextmanager
def image_inputs(core: torch.nn.Module, inputs: dict) -> Iterator[dict]:
    """`inputs` for `core(**inputs)` / `core.generate(**inputs)` on this version: unchanged where the forward
    takes `mm_encoder_outputs`; otherwise those features come back from the model's `get_image_features`
    while inside (and `pixel_values` is a placeholder that makes the forward ask for them)."""
    outputs = (inputs.get("mm_encoder_outputs") or {}).get("image")
    if outputs is None or takes_encoder_outputs(core):
        yield inputs
        return
    owner = parts_of(core).owner
    _install(owner)
    deepstack = getattr(outputs, "deepstack_features", None)
    if deepstack:  # before 5.18: one tensor per deepstack layer, all images concatenated
        outputs = type(outputs)(pooler_output=outputs.pooler_output,
                                deepstack_features=[torch.cat(list(layer)) for layer in deepstack])
    given = getattr(_given, "features", None)
    if given is None:
        given = _given.features = {}
    given[id(owner)] = outputs
    rest = {k: v for k, v in inputs.items() if k != "mm_encoder_outputs"}
    try:
        yield {**rest, "pixel_values": torch.empty(0)}
    finally:
        given.pop(id(owner), None)


def _install(owner: torch.nn.Module) -> None:
    """Put a `get_image_features` on the model instance that returns the features given on this thread (once;
    an instance attribute: the class, the state dict and other models stay as they are)."""
    if "get_image_features" in owner.__dict__:
        return

    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        given = getattr(_given, "features", None) or {}
        if id(self) in given:
            return given[id(self)]
        return type(self).get_image_features(self, pixel_values, image_grid_thw, **kwargs)

    owner.get_image_features = types.MethodType(get_image_features, owner)
