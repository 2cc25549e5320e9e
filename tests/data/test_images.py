from pathlib import Path

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
    over_white = [round(c * 40 / 255 + 255 * (1 - 40 / 255)) for c in (10, 20, 30)]  # as viewed
    assert a[:, 0, 0].tolist() == over_white and g.unique().tolist() == [77]


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


# Pillow's transposition for each EXIF orientation: what a viewer shows of the stored pixels.
VIEWED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90,
          2: Image.Transpose.FLIP_LEFT_RIGHT, 5: Image.Transpose.TRANSPOSE}


@pytest.mark.parametrize("orientation", sorted(VIEWED))
def test_a_photo_is_used_as_viewed_whatever_its_exif_orientation(tmp_path, orientation):
    """A phone photo stored sideways with its orientation in EXIF reaches the model as every viewer shows it: the
    same pixels and token count as the file turned and saved without the tag."""
    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 255, (84, 140, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged, upright = tmp_path / "tagged.png", tmp_path / "upright.png"
    stored.save(tagged, exif=exif)
    stored.transpose(VIEWED[orientation]).save(upright)
    settings = ImageSettings.from_dict({"max_pixels": 448 * 448})
    assert header_size(tagged) == header_size(upright) == Image.open(upright).size
    assert torch.equal(load_resized(tagged, settings), load_resized(upright, settings))
    from vlmtune.serve.common import open_image, resize_image  # the API's and web page's decode: the same

    assert torch.equal(resize_image(open_image(tagged.read_bytes()), settings), load_resized(upright, settings))
    if orientation != 3:  # and not what the file stores: a sideways (or mirrored) picture
        plain = tmp_path / "plain.png"
        stored.save(plain)
        assert not torch.equal(load_resized(tagged, settings), load_resized(plain, settings))


def with_late_exif(png: bytes, exif: Image.Exif) -> bytes:
    """The PNG with an eXIf chunk after its pixel data (before IEND), where some writers put it."""
    import struct
    import zlib

    data = exif.tobytes()
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


def test_a_png_with_exif_after_its_pixels_is_turned_without_decoding_it_for_its_header(tmp_path, monkeypatch):
    """Pillow finds such a block only by decoding the whole PNG: vlmtune walks the chunk headers, so a header check
    of 100,000 PNGs stays a header check (16 ms a megapixel PNG before) — and still sees it turned."""
    from PIL import ImageFile

    from vlmtune.data.images import decoded_bytes, open_header, orientation

    stored = Image.fromarray(np.random.default_rng(6).integers(0, 255, (84, 140, 3), dtype=np.uint8))
    plain, late, upright = tmp_path / "plain.png", tmp_path / "late.png", tmp_path / "upright.png"
    stored.save(plain)
    exif = Image.Exif()
    exif[0x0112] = 6
    late.write_bytes(with_late_exif(plain.read_bytes(), exif))
    stored.transpose(VIEWED[6]).save(upright)
    assert "exif" not in Image.open(late).info and Image.open(late).getexif()[0x0112] == 6  # Pillow: after a decode
    settings = ImageSettings.from_dict({"max_pixels": 448 * 448})
    assert torch.equal(load_resized(late, settings), load_resized(upright, settings))

    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self))
    assert header_size(late) == (84, 140) and header_size(plain) == (140, 84)
    with open_header(late) as image:
        assert orientation(image) == 6 and decoded_bytes(image) == 140 * 84 * 8  # turned: one more copy
        assert not loads
        assert np.array_equal(np.asarray(image), np.asarray(stored))  # the file is still read from where it was


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_white_and_partial_ones_blend(tmp_path, mode):
    """A PNG with transparency reaches the model as viewed on white, not as the colours under its alpha."""
    rgba = np.zeros((56, 56, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere, hidden where transparent
    rgba[:, :28, 3] = 0  # left half: fully transparent
    rgba[:, 28:, 3] = 255
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":  # palette entry 0 (red) marked transparent on the left, entry 1 (blue) on the right
        indices = np.zeros((56, 56), dtype=np.uint8)
        indices[:, 28:] = 1
        image = Image.fromarray(indices, "P")
        image.putpalette([200, 0, 0, 0, 0, 200])
        image.info["transparency"] = 0
    path = tmp_path / f"{mode}.png"
    image.save(path, **({"transparency": 0} if mode == "P" else {}))
    settings = ImageSettings.from_dict({"max_pixels": 56 * 56, "min_pixels": 28 * 28})
    pixels = load_resized(path, settings)  # 3 × 56 × 56, no resize
    assert (pixels[:, :, :28] == 255).all()  # transparent → white
    assert not (pixels[:, :, 28:] == 255).all()  # opaque: its colour
    half = np.zeros((56, 56, 4), dtype=np.uint8)
    half[..., 0], half[..., 3] = 200, 128
    Image.fromarray(half, "RGBA").save(tmp_path / "half.png")
    blended = load_resized(tmp_path / "half.png", settings)
    assert blended[0, 0, 0].item() == round(200 * 128 / 255 + 255 * (1 - 128 / 255))  # red over white
    assert blended[1, 0, 0].item() == round(255 * (1 - 128 / 255))


def test_a_fifo_or_directory_named_as_an_image_is_refused_at_once(tmp_path):
    """A special file would block the read forever: it is refused without opening it."""
    import os

    from vlmtune.data.images import ImageError

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    (tmp_path / "folder.png").mkdir()
    for path, kind in ((fifo, "a FIFO"), (tmp_path / "folder.png", "a directory")):
        with pytest.raises(ImageError, match=f"not an image file \\({kind}\\)"):
            header_size(path, decode=True)
        with pytest.raises(ImageError):
            load_resized(path, ImageSettings.from_dict({}))


def decode_cases(tmp_path) -> dict[str, Path]:
    """A 3000 × 3000 black file of each kind of decode: 8-bit and wide greyscale, palette (with transparency too),
    RGB, RGBA, LA, CMYK, and a turned photo (EXIF orientation 6)."""
    side, files = 3000, {}
    for name, mode, fmt, extra in [("1", "1", "PNG", {}), ("L", "L", "PNG", {}), ("P", "P", "PNG", {}),
                                   ("P+tRNS", "P", "PNG", {"transparency": 0}), ("RGB", "RGB", "PNG", {}),
                                   ("RGBA", "RGBA", "PNG", {}), ("LA", "LA", "PNG", {}), ("I;16", "I;16", "PNG", {}),
                                   ("I", "I", "TIFF", {"compression": "tiff_deflate"}),
                                   ("F", "F", "TIFF", {"compression": "tiff_deflate"}), ("CMYK", "CMYK", "JPEG", {})]:
        files[name] = tmp_path / f"{name.replace(';', '_')}.{fmt.lower()}"
        Image.new(mode, (side, side)).save(files[name], format=fmt, **extra)
    exif = Image.Exif()
    exif[0x0112] = 6
    files["RGB turned"] = tmp_path / "turned.jpg"
    Image.new("RGB", (side, side)).save(files["RGB turned"], exif=exif)
    return files


def test_decoded_bytes_bounds_what_decoding_holds(tmp_path):
    """`decoded_bytes`, read from the header, is at least the memory `decode_rgb` takes at its peak, whatever the
    mode (16-bit greyscale: 7 bytes a pixel, no longer 21), so a server can refuse an image before decoding it."""
    from pathlib import Path

    from vlmtune.data.images import decode_rgb, decoded_bytes, open_header

    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        pytest.skip("no /proc/self/clear_refs to reset the peak memory with")

    def rss_kb(key: str) -> int:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
        return int(line.split()[1])

    for name, path in decode_cases(tmp_path).items():
        with open_header(path) as image:
            bound = decoded_bytes(image)
            clear_refs.write_text("5")  # VmHWM := VmRSS
            start = rss_kb("VmRSS")
            rgb = decode_rgb(image)
            peak = (rss_kb("VmHWM") - start) * 1024
        assert rgb.mode == "RGB"
        del rgb
        assert peak <= bound + 12 * 2**20, (name, peak / 9e6, bound / 9e6)  # bytes a pixel; 12 MB of working copies


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """Phone photos: JPEGs stored sideways or upside down with EXIF Orientation 3, 6 and 8, and the upright picture
    each shows (the JPEG's decoded pixels turned, saved losslessly): {orientation: (tagged, upright)}."""
    tmp = tmp_path_factory.mktemp("photos")
    out = {}
    for orientation in (3, 6, 8):
        stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 255, (150, 200, 3), dtype=np.uint8))
        exif = Image.Exif()
        exif[0x0112] = orientation
        tagged, upright = tmp / f"tagged-{orientation}.jpg", tmp / f"upright-{orientation}.png"
        stored.save(tagged, exif=exif, quality=90)
        with Image.open(tagged) as decoded:  # the stored pixels as the decoder gives them, turned as viewed
            decoded.convert("RGB").transpose(VIEWED[orientation]).save(upright)
        out[orientation] = (tagged, upright)
    return out


def test_phone_photos_predict_as_viewed_in_predict_the_api_and_the_web_page(tiny_model_dir, photos):
    """Orientation 3, 6, 8 JPEGs score exactly as their upright pictures: in `vlmtune predict`'s runner, through the
    API's JSON (a data URL) and the web page's handler; the training path's pixels are the upright ones."""
    import base64

    from fastapi.testclient import TestClient

    from helpers import RULES_PROMPT, record
    from vlmtune.data.conversation import Conversation, Message
    from vlmtune.data.encode import encode
    from vlmtune.infer.engine import load_engine
    from vlmtune.infer.runner import TransformersPredictor
    from vlmtune.serve.api import create_app
    from vlmtune.serve.common import Limits, ModelService
    from vlmtune.serve.webui import answer_page

    labels = ["满足要求", "不满足要求"]
    engine = load_engine(str(tiny_model_dir), log=lambda *_: None)
    predictor, service = TransformersPredictor(engine, workers=1), ModelService(engine, labels)
    client = TestClient(create_app(service, "judge", default_mode="score"))

    def conversation(path):
        messages = [Message(m["role"], m["content"]) for m in record(str(path), labels[0])["messages"]]
        return Conversation(messages=messages, images=[str(path)], source="photos.json", index=0)

    def api_scores(path):
        url = "data:image/jpeg;base64," if path.suffix == ".jpg" else "data:image/png;base64,"
        content = [{"type": "image_url", "image_url": {"url": url + base64.b64encode(path.read_bytes()).decode()}},
                   {"type": "text", "text": RULES_PROMPT.replace("<image>", "")}]
        response = client.post("/v1/chat/completions", json={"model": "judge", "messages": [
            {"role": "user", "content": content}]})
        assert response.status_code == 200, response.text
        return response.json()["vlmtune"]["scores"]

    for tagged, upright in photos.values():
        runs = {which: predictor.score(predictor.prepare([conversation(path)]), labels)[0]
                for which, path in (("tagged", tagged), ("upright", upright))}
        assert runs["tagged"] == pytest.approx(runs["upright"], abs=1e-6)
        assert api_scores(tagged) == pytest.approx(api_scores(upright), abs=1e-6)
        page = [answer_page(service, Limits(), str(path), RULES_PROMPT.replace("<image>", ""), "", "score", 8, 0.0)
                for path in (tagged, upright)]
        assert page[0].scores == pytest.approx(page[1].scores, abs=1e-6)
        training = [encode(conversation(path), engine.processor, None).images[0] for path in (tagged, upright)]
        assert torch.equal(training[0], training[1])
