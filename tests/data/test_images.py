import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlmtune.data.image_settings import ImageSettings
from vlmtune.data.images import header_size, load_resized, to_patches, token_count


@pytest.mark.parametrize("size,max_pixels,tokens", [
    ((224, 224), None, 64), ((448, 448), None, 256), ((1024, 768), None, 999), ((1024, 768), 262144, 315),
])
def test_token_counts_match_qwen(size, max_pixels, tokens):
    # None: Qwen2-VL's default limits, given explicitly (transformers' class defaults differ between versions)
    ip = Qwen2VLImageProcessorPil(max_pixels=max_pixels or 28 * 28 * 1280, min_pixels=56 * 56)
    assert token_count(*size, ImageSettings.from_dict(ip.to_dict())) == tokens


def test_fast_patches_equal_the_processor(tmp_path):
    ip = Qwen2VLImageProcessorPil(max_pixels=262144, min_pixels=3136)
    settings = ImageSettings.from_dict(ip.to_dict())
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(1024, 768), (300, 500), (64, 40)]):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
        assert header_size(path) == (w, h)
    ours_pixels, ours_grid = to_patches([load_resized(p, settings) for p in paths], settings)
    reference = ip(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
    assert torch.equal(ours_grid, reference["image_grid_thw"])
    assert ours_pixels.shape == reference["pixel_values"].shape
    assert torch.allclose(ours_pixels, reference["pixel_values"], atol=1e-5)
    # The grid follows from the resized image: tokens = patches / merge²
    assert [int(g.prod()) // 4 for g in ours_grid] == [token_count(*Image.open(p).size, settings) for p in paths]


def test_loaded_images_are_rgb_and_stay_usable_after_the_file_closes(tmp_path):
    settings = ImageSettings.from_dict({})
    rgba, gray = tmp_path / "a.png", tmp_path / "g.png"
    Image.new("RGBA", (112, 56), (10, 20, 30, 40)).save(rgba)
    Image.new("L", (56, 112), 77).save(gray)
    a, g = load_resized(rgba, settings), load_resized(gray, settings)
    assert a.shape == (3, 56, 112) and g.shape == (3, 112, 56)
    assert a[:, 0, 0].tolist() == [10, 20, 30] and g.unique().tolist() == [77]


@pytest.mark.parametrize("config", [{}, {"do_normalize": False}, {"do_rescale": False, "image_mean": [0.5] * 3}])
def test_pixel_affine_is_the_processors_normalisation(config):
    """x · scale + shift equals the processor's (x · rescale − mean) / std for every uint8 value."""
    from vlmtune.data.images import pixel_affine

    settings = ImageSettings.from_dict(config)
    ip = Qwen2VLImageProcessorPil(**settings.to_dict())
    values = np.arange(256, dtype=np.float64)
    scale, shift = pixel_affine(settings).double()
    for c in range(3):
        x = values * ip.rescale_factor if ip.do_rescale else values
        expected = (x - ip.image_mean[c]) / ip.image_std[c] if ip.do_normalize else x
        assert np.allclose(values * scale[c].item() + shift[c].item(), expected, atol=1e-5)


def test_16_bit_greyscale_is_scaled_not_whitened(tmp_path):
    """A 16-bit PNG (mode I;16) keeps its picture: values scaled by 255/65535, not clipped at 255 (which made
    every pixel above 255 — nearly all of them — white)."""
    settings = ImageSettings.from_dict({"max_pixels": 64 * 64, "min_pixels": 56 * 56})
    ramp = np.tile(np.linspace(0, 65535, 56).astype(np.uint16), (56, 1))
    path = tmp_path / "scan16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    loaded = load_resized(path, settings)
    assert loaded.shape == (3, 56, 56)
    expected = torch.from_numpy(np.rint(ramp / 257.0).astype(np.uint8))
    assert torch.equal(loaded[0], expected) and torch.equal(loaded[1], expected)
    eight_bit = tmp_path / "scan8.png"
    Image.fromarray(expected.numpy()).save(eight_bit)  # the same picture saved in 8 bits loads the same
    assert torch.equal(load_resized(eight_bit, settings), loaded)
