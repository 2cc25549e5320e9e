"""Writing a synthetic dataset: images, ShareGPT records, the truth sidecar, dataset_info.json.

How labels are balanced. The label is decided *first*: exactly ``round(n * break_prob)`` samples
(chosen by a seeded shuffle) are negatives. A negative breaks one active rule chosen uniformly at
random, plus each other active rule with probability ``extra_break`` (so some negatives are wrong in
several ways). Each active rule is thus broken in about ``break_prob * (1/k + (k-1)/k * extra_break)``
of the samples. Inactive rules are broken independently with probability ``inactive_break`` whatever
the label, so the image statistics do not depend on which rules are asked about.

Determinism. Sample ``i`` draws from its own ``random.Random("vlmtune.synth/<seed>/<i>")``; string
seeds hash with SHA-512, which does not depend on PYTHONHASHSEED or the platform, so the same seed
gives byte-identical JSON and pixel-identical PNGs everywhere.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from vlmtune.errors import VlmtuneError
from vlmtune.files import write_atomic
from vlmtune.synth import draw
from vlmtune.synth.rules import (
    PRESETS,
    RULE_BY_NUMBER,
    RULE_KEYS,
    SYSTEM_PROMPT,
    build_prompt,
    evaluate,
    label,
)
from vlmtune.synth.scene import caption, sample_scene

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MIN_SIZE, MAX_SIZE = 128, 2048  # below 128 px the watermark text no longer fits its corner


def resolve_rules(preset: str | None = None, rules: Sequence[int] | str | None = None) -> tuple[int, ...]:
    """The active rule numbers: an explicit ``rules`` list wins, else the preset (default full)."""
    if rules is not None:
        if isinstance(rules, str):
            parts = [p.strip() for p in rules.split(",") if p.strip()]
            try:
                rules = [int(p) for p in parts]
            except ValueError:
                raise VlmtuneError(f"--rules: expected comma-separated rule numbers 1-7, got {rules!r}") from None
        bad = [r for r in rules if r not in RULE_BY_NUMBER]
        if bad or not rules:
            raise VlmtuneError(f"--rules: rule numbers must be in 1-7 (got {', '.join(map(str, bad)) or 'none'})")
        return tuple(sorted(set(rules)))
    preset = preset or "full"
    if preset not in PRESETS:
        raise VlmtuneError(f"--preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[preset]


def choose_broken(rng: random.Random, active: Sequence[int], negative: bool, extra_break: float,
                  inactive_break: float) -> set[str]:
    """Which rule keys a sample must break (see the module docstring)."""
    active_keys = [RULE_BY_NUMBER[n].key for n in active]
    broken = {k for k in RULE_KEYS if k not in active_keys and rng.random() < inactive_break}
    if negative:
        first = rng.choice(active_keys)
        broken.add(first)
        broken.update(k for k in active_keys if k != first and rng.random() < extra_break)
    return broken


def register(out_dir: Path, name: str) -> Path:
    """Merge this dataset's entry into ``out_dir/dataset_info.json``, keeping the other entries."""
    info_path = out_dir / "dataset_info.json"
    info: dict = {}
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VlmtuneError(f"{info_path}: not valid JSON ({exc}); fix or remove it") from None
        if not isinstance(info, dict):
            raise VlmtuneError(f"{info_path}: expected a JSON object of dataset entries")
    info[name] = {
        "file_name": f"{name}.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "system_tag": "system"},
    }
    write_atomic(info_path, json.dumps(info, ensure_ascii=False, indent=2) + "\n")
    return info_path


def generate(n: int, out_dir: str | os.PathLike, seed: int = 0, preset: str | None = None,
             rules: Sequence[int] | str | None = None, name: str = "synth_train", image_size: int = 448,
             break_prob: float = 0.5, extra_break: float = 0.25, inactive_break: float = 0.3,
             progress: bool | None = None) -> Path:
    """Generate ``n`` labelled scenes into ``out_dir`` and return the path of ``<name>.json``.

    Args:
        n: number of samples (>= 1).
        out_dir: created if missing; images go to ``out_dir/images/``.
        seed: same seed -> identical files; sample i does not depend on n (n=10 is a prefix of
            n=20 in scene content, though which samples are negative depends on n).
        preset: "easy" (rules 1, 2) or "full" (all seven, the default); ignored when ``rules`` is given.
        rules: explicit active rule numbers, e.g. ``[1, 2, 5]`` or ``"1,2,5"``.
        name: dataset name: file stem, image prefix and the dataset_info.json key.
        image_size: side of the square images in pixels (128-2048).
        break_prob: fraction of negatives (0 -> all 满足要求, 1 -> all 不满足要求).
        extra_break: in a negative, chance that each further active rule is broken too.
        inactive_break: chance that each inactive rule is broken (does not affect the label).
        progress: show a tqdm bar; default only on a terminal and for n >= 200.
    """
    if not isinstance(n, int) or n < 1:
        raise VlmtuneError(f"--n: number of samples must be a positive integer (got {n})")
    if not isinstance(image_size, int) or not MIN_SIZE <= image_size <= MAX_SIZE:
        raise VlmtuneError(f"--image_size: must be between {MIN_SIZE} and {MAX_SIZE} pixels (got {image_size})")
    for flag, value in (("break_prob", break_prob), ("extra_break", extra_break), ("inactive_break", inactive_break)):
        if not 0.0 <= value <= 1.0:
            raise VlmtuneError(f"--{flag}: must be a probability between 0 and 1 (got {value})")
    if not NAME_RE.match(name):
        raise VlmtuneError(f"--name: {name!r} must be letters, digits, '_', '-' or '.', starting with a letter or digit")
    active = resolve_rules(preset, rules)
    active_keys = [RULE_BY_NUMBER[k].key for k in active]

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VlmtuneError(f"--out: {out} exists and is not a directory")
    (out / "images").mkdir(parents=True, exist_ok=True)

    plan = random.Random(f"vlmtune.synth/plan/{seed}")
    negatives = set(plan.sample(range(n), round(n * break_prob)))
    prompt = build_prompt(active)
    if progress is None:
        progress = n >= 200 and sys.stderr.isatty()

    records, truths = [], []
    for i in tqdm(range(n), desc=f"synth {name}", unit="img", disable=not progress):
        rng = random.Random(f"vlmtune.synth/{seed}/{i}")
        broken = choose_broken(rng, active, i in negatives, extra_break, inactive_break)
        scene = sample_scene(rng, image_size, broken)
        held = evaluate(scene)
        if {k for k, ok in held.items() if not ok} != broken:  # sampler and checker disagree: a bug
            raise AssertionError(f"sample {i}: asked to break {sorted(broken)}, evaluate() says {held}")
        answer = label(held, active)
        sample_id = f"{name}_{i:06d}"
        image = f"images/{sample_id}.png"
        # compress_level 1: ~3x faster than the default, files ~15 % larger; the pixels are the same.
        draw.render(scene).save(out / image, format="PNG", compress_level=1)
        records.append({
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ],
            "images": [image],
        })
        truth = {"id": sample_id, "image": image, "label": answer,
                 "active_rules": active_keys, "active_rule_numbers": list(active),
                 "broken_rules": [k for k in active_keys if not held[k]],
                 "rules_held": held}
        truth.update(scene.to_dict())
        for corner, (_, box) in draw.watermark_boxes(scene).items():
            truth["watermarks"][corner]["box"] = list(box)  # where the plate is, for checks
        truth["caption"] = caption(scene)
        truths.append(truth)

    json_path = out / f"{name}.json"
    write_atomic(json_path, json.dumps(records, ensure_ascii=False, indent=2) + "\n")
    write_atomic(out / f"{name}.truth.jsonl",
                  "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in truths))
    register(out, name)
    return json_path
