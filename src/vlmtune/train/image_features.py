"""Frozen vision tower: each image's features computed once, reused every epoch — kept on disk, not in memory.

With LoRA on the language model (the default), the vision tower and projector never change, so their
output for an image is the same in epoch 1 and epoch 30. The first time a training sample is met, its
image features are computed (no grad) and written to `<output_dir>/.image-features/<run>/<position>.safetensors`
(a small file per sample, written atomically; the local ranks share the directory, so a sample another
rank has met is not computed again); afterwards they are read back with the batch and the model receives
them as `mm_encoder_outputs`, skipping the vision tower. The files are written by a thread, off the training
thread (safetensors' write and the rename release the GIL): the step does not wait for the disk. The process's memory does not grow with the
number of cached images: a batch's features are read, used and freed. Size on disk per image: image
tokens × hidden size in the compute dtype (64 × 128 × 4 B = 32 KB on the tiny model, 334 × 3584 × 2 B =
2.4 MB on Qwen2.5-VL-7B at 262,144 pixels). Qwen3-VL's tower also gives deepstack features, one more
such tensor per deepstack layer (three on the releases), which the language model adds to its first
layers: they are cached with the features. The directory is removed when training ends.
"""

import functools
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from vlmtune.data.encode import EncodedSample
from vlmtune.data.images import image_grids
from vlmtune.families import parts_of
from vlmtune.model.compat import unwrap
from vlmtune.model.vision import vision_encoder


FEATURES_DIR = ".image-features"


class ImageFeatureCache:
    def __init__(self, model, processor, accelerator, enabled: bool, directory: Path | None = None):
        """`directory`: where features go (one run's, shared by its local ranks); None keeps them on the
        samples themselves (for samples that are not read from the encoded store)."""
        self.model, self.processor, self.accelerator = model, processor, accelerator
        self.enabled = enabled
        self.directory = directory
        self._writer: ThreadPoolExecutor | None = None
        self._writing: dict[Path, Future] = {}
        if enabled and directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def path(self, sample: EncodedSample) -> Path | None:
        return feature_path(self.directory, sample)

    def reader(self):
        """`read_cached` for this cache without the model: what DataLoader workers get (pickled under spawn)."""
        return functools.partial(read_cached, self.directory if self.enabled else None)

    @torch.no_grad()
    def fill(self, samples: list[EncodedSample]) -> list[EncodedSample]:
        """Attach features to the samples: read where a rank has written them, computed (and written) where not."""
        if not self.enabled:
            return samples
        for sample in samples:  # a file this process is still writing: wait for it (it is small)
            pending = self._writing.pop(self.path(sample), None)
            if pending is not None:
                pending.result()
        todo = [s for s in read_cached(self.directory, samples) if s.image_features is None and s.images]
        if todo:
            self._compute(todo)
        return samples

    def _compute(self, todo: list[EncodedSample]) -> None:
        # The resized images through `model.vision.VisionEncoder`: transformers' vision tower and merger in
        # fewer, larger ops (equal to `get_image_features` within 1e-5).
        settings = self.processor.image_processor
        images = [im for s in todo for im in s.images]
        grids = image_grids(images, settings)
        encoder = vision_encoder(parts_of(unwrap(self.accelerator.unwrap_model(self.model))).vision_tower)
        with self.accelerator.autocast():
            features = encoder.still_images(images, grids.to(self.accelerator.device), settings)
        features = iter([f.to("cpu") for f in encoder.split(features, grids)])
        del images
        for sample in todo:
            n = len(sample.images)
            own, own_grids, grids = [next(features) for _ in range(n)], grids[:n], grids[n:]
            path = self.path(sample)
            if path is not None:
                self._write(path, own, own_grids)
            attach(sample, own, own_grids)

    def _write(self, path: Path, features: list, grids: torch.Tensor) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmtune-features")
        done = [p for p, f in self._writing.items() if f.done()]
        for p in done:
            self._writing.pop(p).result()  # a failed write (a full disk) is said here
        self._writing[path] = self._writer.submit(write_features, path, features, grids)

    def flush(self) -> None:
        """Wait for the files still being written (a write error is raised here)."""
        for path in list(self._writing):
            self._writing.pop(path).result()

    def close(self) -> None:
        """Remove the run's features (the main process, once every rank is done with them)."""
        self.flush()
        if self._writer is not None:
            self._writer.shutdown()
        if self.directory is not None and self.accelerator.is_main_process:
            shutil.rmtree(self.directory, ignore_errors=True)


def feature_path(directory: Path | None, sample: EncodedSample) -> Path | None:
    if directory is None or sample.position is None:
        return None
    return directory / f"{sample.position}.safetensors"


def read_cached(directory: Path | None, samples: list[EncodedSample]) -> list[EncodedSample]:
    """Attach the features some rank has already written to `directory` (None: none are cached)."""
    for sample in samples:
        path = feature_path(directory, sample) if sample.image_features is None and sample.images else None
        if path is not None and path.is_file():
            attach(sample, *read_features(path))
    return samples


def attach(sample: EncodedSample, features: list, grids: torch.Tensor) -> None:
    sample.image_features, sample.image_grid_thw = features, grids
    sample.images = []  # the pixels are not needed any more


def write_features(path: Path, features: list, grids: torch.Tensor) -> None:
    """One sample's image features as a safetensors file, atomically (another rank may read it at once)."""
    from safetensors.torch import save_file

    tensors = {"grids": grids.contiguous()}
    for i, feature in enumerate(features):
        tensors[f"embeds.{i}"] = feature.embeds.contiguous()
        for k, layer in enumerate(feature.deepstack):
            tensors[f"deepstack.{i}.{k}"] = layer.contiguous()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def read_features(path: Path) -> tuple[list, torch.Tensor]:
    from safetensors.torch import load_file

    from vlmtune.data.features import ImageFeatures

    tensors = load_file(str(path))
    grids = tensors["grids"]
    features = []
    for i in range(grids.shape[0]):
        layers = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith(f"deepstack.{i}."))
        features.append(ImageFeatures(tensors[f"embeds.{i}"], tuple(v for _, v in layers)))
    return features, grids


def can_cache(cfg) -> bool:
    """Only when nothing in the vision path trains."""
    ft = cfg.finetune
    return cfg.train.cache_image_features and ft.freeze_vision_tower and ft.freeze_multi_modal_projector
