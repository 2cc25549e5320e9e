"""A rules dataset and LoRA adapters that have learned its answers, for prediction and serving tests.

A random tiny model generates noise, so the agreement of score and generate mode would be tested on
nothing. The adapter here is trained in the test session (plain torch AdamW, ~1 s): the answer
depends on which rule the prompt states, so both labels occur and generation ends with `<|im_end|>`.
The fixtures that build them once per session are in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

from helpers import SYSTEM, save_image, write_dataset

POS, NEG = "满足要求", "不满足要求"
RULE_OK = "画面中只允许出现立方体。"
RULE_BAD = "每个五角星徽章必须位于圆环内。"
ADAPTER_MAX_PIXELS = 112 * 112  # the adapter's own limit (the tiny model's default is 448 × 448)


@contextlib.contextmanager
def one_torch_thread():
    """These models are tiny: one thread is as fast as two on an idle machine, and on a busy one two
    threads spinning for a core are many times slower (DESIGN.md §5: oversubscription)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rules_records(n: int, image_dir: Path) -> list[dict]:
    """n records: images of two sizes; the answer follows the rule named in the prompt (i % 2)."""
    records = []
    for i in range(n):
        save_image(image_dir / f"r{i}.png", (56, 56) if i % 3 else (84, 56), seed=100 + i)
        ok = i % 2 == 0
        prompt = (f"<image>判断以上图片是否满足要求:\n1. {RULE_OK if ok else RULE_BAD}\n"
                  f'请只输出如下格式:"满足要求", 或 "不满足要求"。')
        records.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
                                     {"role": "assistant", "content": POS if ok else NEG}],
                        "images": [f"images/r{i}.png"]})
    return records


def make_rules_dataset(directory: Path, n: int = 30, name: str = "rules") -> Path:
    write_dataset(directory, name, rules_records(n, directory / "images"))
    return directory


def train_label_adapter(model_dir: Path, data_dir: Path, out: Path, steps: int = 20, seed: int = 0,
                        template: str | None = None) -> Path:
    """LoRA r=8 (+ lm_head) trained on the answers of `rules` in data_dir; saved with its processor."""
    import torch

    from vlmtune.config import FinetuneConfig
    from vlmtune.data.encode import Collator, encode
    from vlmtune.data.loader import load_datasets
    from vlmtune.data.processor import load_processor
    from vlmtune.model.adapters import apply_finetuning
    from vlmtune.model.load import load_model

    torch.manual_seed(seed)
    processor = load_processor(model_dir, max_pixels=ADAPTER_MAX_PIXELS, template=template)
    conversations = load_datasets("rules", str(data_dir), None).conversations
    samples = [encode(c, processor, None) for c in conversations]
    model = apply_finetuning(load_model(model_dir),
                             FinetuneConfig(lora_rank=8, lora_alpha=16, additional_target="lm_head"),
                             log=lambda *_: None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    collate = Collator(processor)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = collate(rng.sample(samples, 8))
        model(**batch.model_inputs(), labels=batch.labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
