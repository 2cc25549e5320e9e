"""Qwen2.5-VL's and Qwen3-VL's vision towers for inference: transformers' weights and math, in fewer and
larger ops.

Why not just call `model.visual(pixel_values, grid_thw)`: with sdpa or eager attention, transformers'
forward of these towers (5.x)

* runs one attention call per image in the full-attention layers (every layer of Qwen3-VL's tower)
  and, in Qwen2.5-VL's windowed layers, one per window per image (a 448×448 image has 16 windows:
  128 calls per layer for a batch of 8) — with two torch threads on a busy machine each small call
  can cost a millisecond of waiting;
* recomputes the per-grid tables from `grid_thw` on every call: window order, rotary tables, segment
  lengths, and for Qwen3-VL the taps that resample its learned position grid to each image;
* embeds patches with a Conv3d whose kernel equals its stride: a plain matmul, which the Conv3d path
  runs about 2× slower on a CPU, and for a still image half of it is redundant: the image processor
  repeats the frame over the temporal patch (`temporal_patch_size` 2), so the two halves of the
  kernel see the same pixels.

Here, with the same result (tests/infer/test_vision.py: ≤ 1e-5 against `visual(...)`, mixed image
sizes, LoRA on the vision blocks, Qwen3-VL's deepstack features included):

* patches are embedded by one matmul with the Conv3d kernel flattened; `VisionEncoder.still_images`
  takes the resized uint8 images themselves and runs the patch embedding as a strided conv2d with
  the kernel's temporal slices summed (a still image's two frames are copies: W₀·x + W₁·x =
  (W₀ + W₁)·x) and the pixel normalisation folded in;
* windows (and images) of equal length attend in one batched `scaled_dot_product_attention` call;
* q and k get their rotary embedding together, in four half-size ops (`rotate`) instead of ten;
* the per-grid tables come from transformers' own functions (`vision_utils.get_vision_*`, the model's
  rotary module) and are cached per `grid_thw`;
* everything with weights is the model's own module (norms, qkv / proj / MLP linears — LoRA-wrapped
  ones included —, the learned position grid, the mergers), called as transformers calls it.

Measured on the tiny models (2 threads, batches of 8 images of 448², 2026-12-02): 4.6–4.8 ms per image for
Qwen2.5-VL's and Qwen3-VL's towers, against 8.1–8.4 ms for transformers' forward of the already cut
patches (docs/benchmarks.md).

Flash-attention models keep transformers' forward (their varlen kernel is already one call per
layer), as does any vision tower this was not proven on (`vlmtune.families`: Qwen2-VL's runs
transformers' own forward), and a patch embedding that is not a plain Conv3d (a LoRA on it).
Inference only in spirit — it is differentiable, but training uses it only for a frozen tower's
cached features (`train.image_features`) and otherwise keeps the library's forward.

What the encoder returns is `ImageFeatures`: the merged features the language model puts at the
image tokens and, for towers with deepstack (Qwen3-VL), the features of the tower's deepstack layers
that the language model adds to its first layers' hidden states. `data.features.encoder_outputs` turns
per-image features back into the `mm_encoder_outputs` the model's forward takes.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmtune.data.features import ImageFeatures
from vlmtune.families import FAMILIES
from vlmtune.model.compat import vision_rotary
from vlmtune.model.load import clamp_fp16_overflow

SUPPORTED = tuple(name for family in FAMILIES for name in family.fast_vision_towers)
PLAIN_ATTENTION = (None, "sdpa", "eager")


@dataclass
class Segments:
    """How a layer's tokens split into attention segments: runs of equal length, batched together."""

    equal_length: int | None  # all segments this long and contiguous: a plain view, no gather
    groups: list[tuple[int, torch.Tensor]]  # otherwise (length, token index (n, length)) per length


@dataclass
class Plan:
    """Everything the forward needs that depends on `grid_thw` only (not on pixels or weights)."""

    cos: torch.Tensor  # rotary tables in the order the blocks see the tokens, (tokens, head_dim)
    sin: torch.Tensor
    full: Segments  # one segment per image
    # Qwen2.5-VL's windowed layers: the merge-unit order they run in (transformers' window_index),
    # its inverse, and the windows; None for towers without windows (Qwen3-VL).
    window_index: torch.Tensor | None = None
    reverse_index: torch.Tensor | None = None
    windows: Segments | None = None
    # Qwen3-VL's learned position grid resampled to each image: (patches, taps) indices and weights.
    position_taps: tuple[torch.Tensor, torch.Tensor] | None = None


def segments(lengths: list[int], device: torch.device) -> Segments:
    lengths = [n for n in lengths if n > 0]
    if len(set(lengths)) == 1:
        return Segments(lengths[0], [])
    starts, offset = {}, 0
    for n in lengths:
        starts.setdefault(n, []).append(offset)
        offset += n
    groups = [(n, (torch.tensor(s, device=device)[:, None] + torch.arange(n, device=device)))
              for n, s in starts.items()]
    return Segments(None, groups)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, library=None) -> torch.Tensor:
    """Rotary embedding of q and k at once: x (tokens, 2, heads, head_dim), cos / sin (tokens, head_dim).

    transformers' `apply_rotary_pos_emb_vision` computes q·cos + rotate_half(q)·sin, rotate_half(q) =
    (−q₂, q₁), in float32: ten whole-tensor ops for q and k (two of them copies for `rotate_half`),
    each broadcasting the tables over the heads. Written out per half — o₁ = x₁·c₁ − x₂·s₁,
    o₂ = x₂·c₂ + x₁·s₂ — it is four ops over half the elements, into one output: a third of the time.
    Under autograd (nothing here needs it) the library's function (`library`: the tower module's
    `apply_rotary_pos_emb_vision`) runs instead, or the same formula in differentiable ops.
    """
    tokens, pair, heads, dim = x.shape
    half, dtype = dim // 2, x.dtype
    if torch.is_grad_enabled() and x.requires_grad:
        if library is not None:
            return torch.stack(library(x[:, 0], x[:, 1], cos, sin), dim=1)
        x, c, s = x.float(), cos.float()[:, None, None], sin.float()[:, None, None]
        return (x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s).to(dtype)
    x = x.float().unflatten(-1, (2, half))
    c, s = (t.float().view(tokens, 1, 1, 2, half) for t in (cos, sin))
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    first, second = out[..., 0, :], out[..., 1, :]
    torch.mul(x[..., 0, :], c[..., 0, :], out=first).addcmul_(x[..., 1, :], s[..., 0, :], value=-1)
    torch.mul(x[..., 1, :], c[..., 1, :], out=second).addcmul_(x[..., 0, :], s[..., 1, :])
    return out.view(tokens, pair, heads, dim).to(dtype)  # back to the model's dtype, as transformers does


def usable(visual: torch.nn.Module) -> bool:
    """True when `VisionEncoder`'s own forward may replace `visual(...)` for this tower."""
    attn = getattr(getattr(visual, "config", None), "_attn_implementation", None)
    proj = getattr(getattr(visual, "patch_embed", None), "proj", None)
    if any(hasattr(p, "ds_id") for p in visual.parameters()):  # ZeRO-3: partitioned, gathered in the library's
        return False                                            # forward only (through the modules' hooks)
    return (type(visual).__name__ in SUPPORTED and attn in PLAIN_ATTENTION
            and type(proj) is torch.nn.Conv3d and proj.kernel_size == proj.stride and proj.padding == (0, 0, 0))


class VisionEncoder:
    """`encoder(pixel_values, grid_thw)` → `ImageFeatures` of all images, as `visual(...)` gives them.

    Wraps a vision tower without changing it; the plan cache holds tables for the last `cache_size`
    distinct `grid_thw` batches.
    """

    def __init__(self, visual: torch.nn.Module, cache_size: int = 16):
        self.visual = visual
        self.fast = usable(visual)
        self.cache_size = cache_size
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._plans_lock = threading.Lock()  # prediction scores batches from several threads

    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> ImageFeatures:
        """From `pixel_values` as the image processor makes them ([patches, C·T·P·P])."""
        visual = self.visual
        if not self.fast:  # transformers' own forward
            out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw)
            return ImageFeatures(out.pooler_output, tuple(getattr(out, "deepstack_features", None) or ()))
        proj = visual.patch_embed.proj
        x = pixel_values.to(proj.weight.dtype).reshape(pixel_values.shape[0], -1)
        return self._blocks(F.linear(x, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias), grid_thw)

    def still_images(self, images: list[torch.Tensor], grid_thw: torch.Tensor, settings) -> ImageFeatures:
        """From resized still images as they are (uint8, C × H × W, `data.images.load_resized`), with
        the image settings (`data.image_settings.ImageSettings`) that say how to normalise them.

        The patch embedding runs as a strided conv2d over each image instead of a matmul over cut
        patches: a Conv3d whose stride equals its kernel sees every patch once, and for a still image
        the temporal half of its kernel folds away (W₀·x + W₁·x = (W₀ + W₁)·x); the rescale and
        normalisation (per channel x·a + b, `data.images.pixel_affine`) fold in as well:
        W·(x·a + b) = (W·a)·x + W·b. No patch array is built (it was a third of the CPU time of
        preparing a batch), and the conv is faster than the matmul. The embeddings are then put in
        Qwen's merge order (2 × 2 blocks of neighbouring patches).
        """
        from vlmtune.data.images import pixel_affine, to_patches

        visual = self.visual
        if not self.fast:
            pixels, _ = to_patches(images, settings)  # as the image processor makes them
            return self(pixels.to(visual.patch_embed.proj.weight.device), grid_thw)
        proj = visual.patch_embed.proj
        dtype, device = proj.weight.dtype, proj.weight.device
        scale, shift = (a.view(1, -1, 1, 1) for a in pixel_affine(settings).to(device))
        folded = proj.weight.float().sum(dim=2)  # (E, C, T, P, P) → (E, C, P, P), in float32
        bias = (folded * shift).sum(dim=(1, 2, 3)) + (0 if proj.bias is None else proj.bias.float())
        kernel, bias = (folded * scale).to(dtype), bias.to(dtype)
        patch, merge = proj.kernel_size[-1], visual.spatial_merge_size
        parts = []
        for image in images:  # one conv per image: sizes may differ within a batch
            y = F.conv2d(image.to(device, dtype)[None], kernel, bias, stride=patch)[0]  # (E, gh, gw)
            e, gh, gw = y.shape
            y = y.reshape(e, gh // merge, merge, gw // merge, merge).permute(1, 3, 2, 4, 0)
            parts.append(y.reshape(-1, e))
        return self._blocks(torch.cat(parts), grid_thw)

    def _blocks(self, x: torch.Tensor, grid_thw: torch.Tensor) -> ImageFeatures:
        """The rest of the tower's forward after the patch embedding: Qwen2_5_VisionTransformerPretrainedModel's
        (windowed layers, tokens in window order) or Qwen3VLVisionModel's (learned positions added, every
        layer full attention, the deepstack mergers' outputs after their layers)."""
        visual = self.visual
        plan = self.plan(grid_thw, x.device)
        if plan.window_index is not None:
            unit = visual.spatial_merge_unit
            x = x.reshape(-1, unit, x.shape[-1])[plan.window_index].reshape(x.shape)
        if plan.position_taps is not None:
            indices, weights = plan.position_taps
            x = x + (visual.pos_embed(indices) * weights[:, :, None]).sum(1).to(x.dtype)
        position = (plan.cos, plan.sin)  # float32, as transformers keeps them (rotary runs in float32)
        full_layers = getattr(visual, "fullatt_block_indexes", None)
        deepstack_layers = list(getattr(visual, "deepstack_visual_indexes", None) or ())
        deepstack = []
        for layer, block in enumerate(visual.blocks):
            layout = plan.full if full_layers is None or layer in full_layers else plan.windows
            x = x + self.attention(block.attn, block.norm1(x), position, layout)
            x = clamp_fp16_overflow(x + block.mlp(block.norm2(x)))  # as the library's blocks are guarded
            if layer in deepstack_layers:
                deepstack.append(visual.deepstack_merger_list[deepstack_layers.index(layer)](x))
        merged = visual.merger(x)
        return ImageFeatures(merged if plan.reverse_index is None else merged[plan.reverse_index], tuple(deepstack))

    def split(self, features: ImageFeatures, grid_thw: torch.Tensor) -> list[ImageFeatures]:
        """Per-image features, as `get_image_features(...)` splits them."""
        sizes = (grid_thw.prod(-1) // self.visual.spatial_merge_size ** 2).tolist()
        embeds = torch.split(features.embeds, sizes)
        deepstack = [torch.split(layer, sizes) for layer in features.deepstack]
        return [ImageFeatures(e, tuple(layer[i] for layer in deepstack)) for i, e in enumerate(embeds)]

    # -- pieces ------------------------------------------------------------------------------

    @staticmethod
    def attention(attn: torch.nn.Module, hidden: torch.Tensor, position: tuple[torch.Tensor, torch.Tensor],
                  layout: Segments) -> torch.Tensor:
        """Qwen2_5_VLVisionAttention.forward (and Qwen3VLVisionAttention's, the same) with segments of equal
        length batched."""
        tokens = hidden.shape[0]
        qkv = attn.qkv(hidden).view(tokens, 3, attn.num_heads, -1)
        library = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb_vision", None)
        q, k = rotate(qkv[:, :2], *position, library=library).unbind(1)
        v = qkv[:, 2]
        if layout.equal_length is not None:
            n = layout.equal_length

            def batched(t):  # (tokens, heads, dim) → (segments, heads, n, dim)
                return t.reshape(tokens // n, n, t.shape[1], t.shape[2]).transpose(1, 2)

            out = F.scaled_dot_product_attention(batched(q), batched(k), batched(v), scale=attn.scaling)
            out = out.transpose(1, 2).reshape(tokens, -1)
        else:
            out = q.new_empty(tokens, q.shape[1], v.shape[2])
            for _, index in layout.groups:
                part = F.scaled_dot_product_attention(q[index].transpose(1, 2), k[index].transpose(1, 2),
                                                      v[index].transpose(1, 2), scale=attn.scaling)
                out[index] = part.transpose(1, 2)
            out = out.reshape(tokens, -1)
        return attn.proj(out)

    def plan(self, grid_thw: torch.Tensor, device: torch.device) -> Plan:
        key = (tuple(map(tuple, grid_thw.tolist())), str(device))
        with self._plans_lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = self._make_plan(grid_thw.to(device), device)
        with self._plans_lock:
            self._plans[key] = plan
            while len(self._plans) > self.cache_size:
                self._plans.popitem(last=False)
        return plan

    def _make_plan(self, grid_thw: torch.Tensor, device: torch.device) -> Plan:
        from transformers.vision_utils import (get_vision_cu_seqlens, get_vision_interpolation_indices_and_weights,
                                               get_vision_position_ids, get_vision_window_index)

        visual = self.visual
        unit = visual.spatial_merge_unit
        cu_full = get_vision_cu_seqlens(grid_thw)
        position_ids = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
        tokens = int(cu_full[-1])
        cos, sin = vision_rotary(visual, position_ids.to(device))
        plan = Plan(cos, sin, full=segments(cu_full.diff().tolist(), device))
        if getattr(visual, "fullatt_block_indexes", None) is not None:  # Qwen2.5-VL: windowed layers
            window_index, cu_windows = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                               window_size=visual.window_size,
                                                               patch_size=visual.patch_size)
            window_index = window_index.to(device)
            cos, sin = (t.reshape(tokens // unit, unit, -1)[window_index].reshape(tokens, -1) for t in (cos, sin))
            plan = Plan(cos, sin, plan.full, window_index, torch.argsort(window_index),
                        segments(cu_windows.diff().tolist(), device))
        if getattr(visual, "pos_embed", None) is not None:  # Qwen3-VL: a learned position grid, resampled
            indices, weights = get_vision_interpolation_indices_and_weights(
                grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
            plan.position_taps = (indices.to(device), weights.to(device))
        return plan


def vision_encoder(visual: torch.nn.Module) -> VisionEncoder:
    """The encoder of a vision tower (`model.visual`), kept on it so that its plan cache lives as long."""
    encoder = visual.__dict__.get("_vlmtune_encoder")
    if encoder is None:
        encoder = VisionEncoder(visual)
        visual.__dict__["_vlmtune_encoder"] = encoder  # a plain attribute: not a submodule, not in state_dict
    encoder.fast = usable(visual)  # the attention implementation may have been switched since
    return encoder
