"""A training YAML shaped like the user's, for a tiny model and a small dataset."""

from pathlib import Path

import pytest

from helpers import TEMPLATE_OF, write_config


@pytest.fixture
def train_config(tmp_path, tiny_model_dir, small_dataset):
    """Returns a function: write_config with model and data filled in (the Qwen2.5-VL tiny model)."""
    def make(name: str = "cfg.yaml", **values) -> Path:
        base = dict(model_name_or_path=str(tiny_model_dir), dataset_dir=str(small_dataset),
                    output_dir=str(tmp_path / "out"), image_max_pixels=50176)
        base.update(values)
        return write_config(tmp_path / name, **base)
    return make


@pytest.fixture
def family_train_config(train_config, arch, family_model_dir):
    """`train_config` for the tiny model of each end-to-end family, with the template its users write."""
    def make(name: str = "cfg.yaml", **values) -> Path:
        return train_config(name, **{"model_name_or_path": str(family_model_dir), "template": TEMPLATE_OF[arch],
                                     **values})
    return make
