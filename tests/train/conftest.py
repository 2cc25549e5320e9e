"""A training YAML shaped like the user's, for a tiny model and a small dataset."""

from pathlib import Path

import pytest
import yaml

from helpers import REPO


def write_config(path: Path, **values) -> Path:
    cfg = yaml.safe_load((REPO / "examples" / "tiny_cpu.yaml").read_text())
    cfg.update(values)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


@pytest.fixture
def train_config(tmp_path, tiny_model_dir, small_dataset):
    """Returns a function: write_config with model and data filled in."""
    def make(name: str = "cfg.yaml", **values) -> Path:
        base = dict(model_name_or_path=str(tiny_model_dir), dataset_dir=str(small_dataset),
                    output_dir=str(tmp_path / "out"), image_max_pixels=50176)
        base.update(values)
        return write_config(tmp_path / name, **base)
    return make
