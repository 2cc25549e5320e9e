"""ImageSettings reads and writes preprocessor_config.json as transformers' Qwen2-VL image processor
does, and its smart resize equals transformers' (the reference here is transformers itself)."""

import json
import random

import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from helpers import ONE_PER_FAMILY
from vlmtune.data.image_settings import CONFIG_NAME, ImageSettings
from vlmtune.errors import VlmtuneError
from vlmtune.families import family_of_type


def test_resized_size_equals_transformers_smart_resize():
    rng = random.Random(0)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(3000)]
    sizes += [(28, 28), (27, 29), (1, 199), (448, 448), (4000, 21), (3, 3)]
    for max_pixels, min_pixels in [(28 * 28 * 1280, 56 * 56), (448 * 448, 28 * 28), (262144, 3136), (784, 784)]:
        settings = ImageSettings(max_pixels=max_pixels, min_pixels=min_pixels)
        for h, w in sizes:
            try:
                expected = smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
            except ValueError:
                with pytest.raises(ValueError):
                    settings.resized_size(h, w)
                continue
            assert settings.resized_size(h, w) == expected, (h, w, max_pixels, min_pixels)


def attributes(ip) -> dict:
    return {"patch_size": ip.patch_size, "merge_size": ip.merge_size, "temporal_patch_size": ip.temporal_patch_size,
            "min_pixels": ip.size["shortest_edge"], "max_pixels": ip.size["longest_edge"],
            "do_rescale": ip.do_rescale, "rescale_factor": ip.rescale_factor, "do_normalize": ip.do_normalize,
            "image_mean": tuple(ip.image_mean), "image_std": tuple(ip.image_std), "resample": int(ip.resample)}


# The file as Qwen2.5-VL-7B-Instruct ships it (legacy keys), as transformers 5 writes it, and a mix.
QWEN_RELEASE = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor"}
TRANSFORMERS_5 = {"size": {"shortest_edge": 784, "longest_edge": 200704}, "do_normalize": True, "resample": 3,
                  "rescale_factor": 0.00392156862745098, "image_processor_type": "Qwen2VLImageProcessor",
                  "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
MIXED = {**TRANSFORMERS_5, "max_pixels": 50176, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


@pytest.mark.parametrize("config", [QWEN_RELEASE, TRANSFORMERS_5, MIXED, {}])
@pytest.mark.parametrize("overrides", [{}, {"max_pixels": 448 * 448}, {"max_pixels": 401408, "min_pixels": 1024}])
def test_loading_matches_transformers(tmp_path, config, overrides):
    if config:
        (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
        reference = Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path), **overrides)
    else:  # no file: vlmtune's defaults are transformers 5.2x's (older versions' class defaults differ)
        reference = Qwen2VLImageProcessorPil(**{"max_pixels": 28 * 28 * 1280, "min_pixels": 56 * 56, **overrides})
    assert attributes(ImageSettings.from_pretrained(tmp_path, **overrides)) == attributes(reference)


def test_saved_settings_load_in_transformers_unchanged(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / CONFIG_NAME).write_text(json.dumps(QWEN_RELEASE))
    ours = ImageSettings.from_pretrained(tmp_path / "model", max_pixels=448 * 448)
    ours.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor"  # keys we do not use survive
    assert saved["max_pixels"] == saved["size"]["longest_edge"] == 448 * 448
    reloaded = Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path / "adapter"))
    assert attributes(reloaded) == attributes(ours)
    assert attributes(ImageSettings.from_pretrained(tmp_path / "adapter")) == attributes(ours)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"patch_size": "big"}'])
def test_bad_config_is_one_line_error_naming_the_file(tmp_path, text):
    (tmp_path / CONFIG_NAME).write_text(text)
    with pytest.raises(VlmtuneError, match=CONFIG_NAME) as info:
        ImageSettings.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)


def test_processor_config_settings_come_first_as_in_transformers(tmp_path):
    """transformers 5's `processor.save_pretrained` writes the image settings into processor_config.json only
    (`image_processor`); where both files are, transformers reads that one first."""
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": MIXED, "processor_class": "X"}))
    reference = Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path))
    assert attributes(ImageSettings.from_pretrained(tmp_path)) == attributes(reference)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(QWEN_RELEASE))
    assert attributes(ImageSettings.from_pretrained(tmp_path)) == attributes(reference)
    # An older processor_config.json (no settings in it) leaves them to preprocessor_config.json.
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    assert attributes(ImageSettings.from_pretrained(tmp_path)) == \
        attributes(Qwen2VLImageProcessorPil.from_pretrained(str(tmp_path)))


def tower_variant(model_dir, directory, merge: int):
    """config.json of a tiny model with its vision tower merging `merge` × `merge` patches, nothing else."""
    config = json.loads((model_dir / "config.json").read_text())
    config["vision_config"]["spatial_merge_size"] = merge
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory, config["vision_config"]


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)
def test_sizes_the_file_leaves_out_are_the_vision_towers(tiny_models, tmp_path, arch):
    model_dir, vision = tower_variant(tiny_models(arch), tmp_path / "model", merge=1)
    defaults = family_of_type(arch).image_defaults
    settings = ImageSettings.from_pretrained(model_dir, defaults=defaults)
    assert (settings.patch_size, settings.merge_size, settings.temporal_patch_size) == \
        (vision["patch_size"], 1, vision["temporal_patch_size"])
    (model_dir / CONFIG_NAME).write_text(json.dumps({"merge_size": 1, "max_pixels": 50176}))
    assert ImageSettings.from_pretrained(model_dir, defaults=defaults).merge_size == 1


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)
def test_a_file_that_does_not_fit_the_tower_is_one_line_naming_both(tiny_models, tmp_path, arch):
    model_dir, _ = tower_variant(tiny_models(arch), tmp_path / "model", merge=1)
    settings = json.loads((tiny_models(arch) / CONFIG_NAME).read_text())  # merge_size 2, the family's
    (model_dir / "processor_config.json").write_text(json.dumps({"image_processor": settings}))
    with pytest.raises(VlmtuneError) as info:
        ImageSettings.from_pretrained(model_dir, defaults=family_of_type(arch).image_defaults)
    message = str(info.value)
    assert "\n" not in message and "processor_config.json: merge_size 2" in message
    assert "vision_config.spatial_merge_size 1" in message


@pytest.mark.parametrize("files, fragments", [
    ({"processor_config.json": {"image_processor": "qwen"}}, ["processor_config.json: field 'image_processor'", "str"]),
    ({"processor_config.json": [1]}, ["processor_config.json: field 'image_processor'", "list"]),
    ({"config.json": {"vision_config": {"spatial_merge_size": 0}}}, ["vision_config.spatial_merge_size", "got 0"]),
    ({"config.json": {"vision_config": {"patch_size": "14"}}}, ["vision_config.patch_size", "got '14'"]),
    ({"config.json": {"vision_config": {"patch_size": -14}}}, ["vision_config.patch_size", "got -14"]),
    ({CONFIG_NAME: {"patch_size": 0}}, [CONFIG_NAME, "patch_size must be a positive whole number, got 0"]),
    ({CONFIG_NAME: {"max_pixels": -5}}, [CONFIG_NAME, "max_pixels must be a positive whole number"]),
])
def test_settings_that_cannot_size_an_image_are_one_line(tmp_path, files, fragments):
    """An `image_processor` that is no object was skipped silently; a zero merge or patch size divided by zero when
    an image was resized, a negative one sized images silently."""
    for name, value in files.items():
        (tmp_path / name).write_text(json.dumps(value))
    with pytest.raises(VlmtuneError) as info:
        ImageSettings.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
