"""model.vision.VisionEncoder gives transformers' vision-tower output (≤ 1e-5), whatever the batch: its own
forward where it is proven (the towers each family record lists: Qwen2.5-VL; Qwen3-VL dense and MoE, deepstack
features included; Qwen3.5 dense and MoE), the library's elsewhere (Qwen2-VL)."""

from __future__ import annotations

import pytest
import torch

from helpers import ALL_ARCHS, archs_with
from vlmtune.data.images import image_grids, to_patches
from vlmtune.families import FAMILIES, family_of_type, parts_of
from vlmtune.data.processor import load_processor
from vlmtune.model.compat import image_inputs
from vlmtune.model.load import load_model
from vlmtune.data.features import encoder_outputs
from vlmtune.model.vision import VisionEncoder, rotate, usable, vision_encoder

# (height, width) after the resize (multiples of 28): 448² has 16 equal windows; the others have
# windows of several sizes (the grid is not a multiple of the 4×4-token window) and differ per image.
MIXED = [(448, 448), (224, 308), (56, 84), (252, 196)]
EQUAL = [(448, 448)] * 3


FAST_ARCHS = archs_with("fast_vision_towers")
# LoRA on the vision blocks: one tower of each family with a fast path.
LORA_ARCHS = tuple(next(t for t in f.model_types if t in FAST_ARCHS) for f in FAMILIES if f.fast_vision_towers)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(tiny_model_dir)
    model.eval()
    return model, load_processor(tiny_model_dir)


def on_grid(sizes, factor):
    """The Qwen2.5-VL sizes (multiples of 28) moved to another family's grid."""
    return [(h // 28 * factor, w // 28 * factor) for h, w in sizes]


def images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]


def library(visual, pixel_values, grid):
    return visual(pixel_values, grid_thw=grid).pooler_output


def library_features(visual, pixel_values, grid):
    out = visual(pixel_values, grid_thw=grid)
    return out.pooler_output, list(getattr(out, "deepstack_features", None) or [])


def assert_close_features(got, want_embeds, want_deepstack=(), atol=1e-5):
    assert (got.embeds - want_embeds).abs().max() <= atol
    assert len(got.deepstack) == len(want_deepstack)
    for mine, theirs in zip(got.deepstack, want_deepstack):
        assert (mine - theirs).abs().max() <= atol


@pytest.mark.parametrize("arch", FAST_ARCHS)
@pytest.mark.parametrize("sizes", [MIXED, EQUAL, MIXED[1:2]], ids=["mixed", "equal", "one"])
def test_encoder_equals_the_vision_tower(tiny_models, arch, sizes):
    model = load_model(tiny_models(arch)).eval()
    processor = load_processor(tiny_models(arch))
    visual = parts_of(model).vision_tower
    encoder = VisionEncoder(visual)
    assert encoder.fast and visual.config._attn_implementation == "sdpa"
    factor = processor.image_processor.factor
    sizes = on_grid(sizes, factor)
    raw = images(sizes)
    pixels, grid = to_patches(raw, processor.image_processor)  # as the image processor makes them
    settings = processor.image_processor
    assert torch.equal(image_grids(raw, settings), grid)
    with torch.no_grad():
        want, deepstack = library_features(visual, pixels, grid)
        assert bool(deepstack) is bool(family_of_type(arch).deepstack_output)
        for _ in range(2):  # the second call runs from the cached plan
            assert_close_features(encoder(pixels, grid), want, deepstack)
            # uint8 images, conv patch embedding with the normalisation folded in
            assert_close_features(encoder.still_images(raw, grid, settings), want, deepstack)
        parts = encoder.split(encoder(pixels, grid), grid)
    assert [p.embeds.shape[0] for p in parts] == [h * w // factor ** 2 for h, w in sizes]
    assert all(len(p.deepstack) == len(deepstack) for p in parts)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_features_given_to_the_model_give_the_pixel_forward(tiny_models, arch):
    """The encoder's per-image features, handed back as `mm_encoder_outputs` (Qwen3-VL: with deepstack), give
    the logits of the model's own pixel forward; a tower without a proven fast path (Qwen2-VL's) runs
    transformers' forward, exactly `get_image_features`."""
    model_dir = tiny_models(arch)
    model, processor = load_model(model_dir).eval(), load_processor(model_dir)
    encoder = vision_encoder(parts_of(model).vision_tower)
    assert encoder.fast is (arch in FAST_ARCHS)
    factor = processor.image_processor.factor
    raw = images([(factor * 8, factor * 8), (factor * 4, factor * 6)])
    pixels, grid = to_patches(raw, processor.image_processor)
    with torch.no_grad():
        want = model.model.get_image_features(pixels, grid)
        deepstack = getattr(want, "deepstack_features", None) or []
        assert bool(deepstack) is bool(family_of_type(arch).deepstack_output)
        sizes = [p.shape[0] for p in want.pooler_output]  # per image; before transformers 5.18 deepstack is not
        deepstack = [layer if isinstance(layer, (list, tuple)) else torch.split(layer, sizes) for layer in deepstack]
        parts = encoder.split(encoder.still_images(raw, grid, processor.image_processor), grid)
        for i, part in enumerate(parts):
            assert_close_features(part, want.pooler_output[i], [layer[i] for layer in deepstack],
                                  atol=1e-5 if encoder.fast else 0)
        pad = processor.image_token_id
        ids = torch.tensor([[5, 6] + [pad] * parts[0].embeds.shape[0] + [7] + [pad] * parts[1].embeds.shape[0] + [8]])
        mm = (ids == pad).long()
        through_pixels = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm).logits
        given = {"input_ids": ids, "mm_encoder_outputs": encoder_outputs(parts, processor.family),
                 "image_grid_thw": grid, "mm_token_type_ids": mm}
        with image_inputs(model, given) as inputs:  # as `mm_encoder_outputs` where the forward takes them
            through_features = model(**inputs).logits
    assert (through_pixels - through_features).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", LORA_ARCHS)
def test_lora_on_the_vision_tower_is_applied(tiny_models, arch):
    """LoRA layers on the blocks (and Qwen3-VL's mergers) run inside the encoder; one on the patch embedding
    sends it back to transformers' forward (the fast path reads the Conv3d weight directly)."""
    from peft import LoraConfig, get_peft_model

    model_dir = tiny_models(arch)
    processor = load_processor(model_dir)
    raw = images(on_grid(MIXED, processor.image_processor.factor), seed=1)
    pixels, grid = to_patches(raw, processor.image_processor)
    blocks = r".*visual.*\.(qkv|attn\.proj|up_proj|down_proj|linear_fc1|linear_fc2)"  # the blocks' MLP names differ
    for targets, fast in ((blocks, True), (r".*visual\.patch_embed\.proj", False)):
        peft_model = get_peft_model(load_model(model_dir),
                                    LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
        visual = peft_model.get_base_model().model.visual
        encoder = vision_encoder(visual)
        assert encoder.fast is fast and usable(visual) is fast
        with torch.no_grad():
            want, deepstack = library_features(visual, pixels, grid)
            with peft_model.disable_adapter():
                assert (library(visual, pixels, grid) - want).abs().max() > 1e-3  # the LoRA does something
            assert_close_features(encoder(pixels, grid), want, deepstack)
            got = encoder.still_images(raw, grid, processor.image_processor)  # fast, or the fallback
            assert_close_features(got, want, deepstack)


def test_flash_attention_keeps_the_library_forward(tiny):
    visual = tiny[0].model.visual
    before = visual.config._attn_implementation
    try:
        visual.config._attn_implementation = "flash_attention_2"
        assert not usable(visual) and not vision_encoder(visual).fast
    finally:
        visual.config._attn_implementation = before
    assert vision_encoder(visual).fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_equals_transformers_rotary(dtype):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    g = torch.Generator().manual_seed(0)
    tokens, heads, dim = 37, 3, 16
    qkv = torch.randn(tokens, 3, heads, dim, generator=g).to(dtype)  # q and k as views into it, as in the tower
    angles = torch.randn(tokens, dim, generator=g)  # halves differ: nothing may assume cat(freqs, freqs)
    q, k = apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], angles.cos(), angles.sin())
    out = rotate(qkv[:, :2], angles.cos(), angles.sin())
    assert out.dtype == dtype and out.shape == (tokens, 2, heads, dim)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out[:, 0], q, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(out[:, 1], k, atol=tolerance, rtol=tolerance)


def test_rotate_keeps_gradients():
    qk = torch.randn(5, 2, 2, 8, requires_grad=True)
    angles = torch.randn(5, 8)
    rotate(qk, angles.cos(), angles.sin()).square().sum().backward()
    assert qk.grad is not None and qk.grad.abs().sum() > 0
