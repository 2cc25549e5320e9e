"""Start-up header checks against the image format: the time `load_splits` takes (image headers + token counts,
what every `vlmtune train` does before its first step) on N records of PNG or JPEG images.

    python benchmarks/header_checks.py [--records 3000] [--size 448] [--format png jpg] [--threads 2]

Prints per format: the seconds of two `load_splits` calls (the second with the files in the page cache) and
the milliseconds of one `header_size` of a 1,024×1,024 image. Run it on a quiet machine; it writes its data
under a temporary directory. To time an older version, run it with that version's `src` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def write_records(directory: Path, n: int, size: int, fmt: str) -> None:
    """n sharegpt records, each with a size×size image (a smooth gradient and a rectangle) in `fmt`."""
    import numpy as np
    from PIL import Image, ImageDraw

    (directory / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:size, 0:size]
        base = np.stack([(x * rng.uniform(0.1, 0.5)) % 256, (y * rng.uniform(0.1, 0.5)) % 256,
                         ((x + y) * 0.2) % 256], axis=-1).astype(np.uint8)
        image = Image.fromarray(base)
        ImageDraw.Draw(image).rectangle([size // 8, size // 8, size // 3, size // 3], fill=(200, 10, 10))
        image.save(directory / "images" / f"{i}.{fmt}")
        records.append({"messages": [{"role": "user", "content": "<image>判断以上图片是否满足要求。"},
                                     {"role": "assistant", "content": "满足要求" if i % 2 else "不满足要求"}],
                        "images": [f"images/{i}.{fmt}"]})
    (directory / "bench.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    entry = {"file_name": "bench.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
    (directory / "dataset_info.json").write_text(json.dumps({"bench": entry}), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--format", nargs="+", default=["png", "jpg"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    from PIL import Image

    from vlmtune.config import DataConfig
    from vlmtune.data.images import header_size
    from vlmtune.data.loader import load_splits
    from vlmtune.data.processor import load_processor
    from vlmtune.model.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        processor = load_processor(build_tiny_model(tmp / "tiny"))
        for fmt in args.format:
            data = tmp / fmt
            write_records(data, args.records, args.size, fmt)
            times = []
            for _ in range(2):
                start = time.perf_counter()
                splits = load_splits(DataConfig(dataset="bench", dataset_dir=str(data)), 42, processor)
                times.append(time.perf_counter() - start)
            big = tmp / f"big.{fmt}"
            Image.effect_noise((1024, 1024), 64).convert("RGB").save(big)
            start = time.perf_counter()
            for _ in range(50):
                header_size(big)
            one = (time.perf_counter() - start) / 50 * 1000
            print(f"{fmt}: load_splits of {len(splits.train)} records ({args.size}×{args.size}): "
                  f"{times[0]:.2f} s, again {times[1]:.2f} s; header_size of a 1,024×1,024 {fmt}: {one:.2f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
