"""Same seed -> byte-identical files; different seed -> different data."""

from __future__ import annotations

from pathlib import Path

from vlmtune.synth import generate


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a = files(generate(12, tmp_path / "a", seed=11, image_size=160).parent)
    b = files(generate(12, tmp_path / "b", seed=11, image_size=160).parent)
    assert len(a) == 12 + 3 and a == b


def test_different_seed_differs(tmp_path):
    a = files(generate(12, tmp_path / "a", seed=11, image_size=160).parent)
    c = files(generate(12, tmp_path / "c", seed=12, image_size=160).parent)
    assert a.keys() == c.keys()
    assert a["synth_train.truth.jsonl"] != c["synth_train.truth.jsonl"]
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) >= 10


def test_sample_content_does_not_depend_on_n(tmp_path):
    # With break_prob 0 no sample is negative, so sample i is the same whatever n is.
    small = files(generate(5, tmp_path / "s", seed=2, image_size=128, break_prob=0).parent)
    large = files(generate(8, tmp_path / "l", seed=2, image_size=128, break_prob=0).parent)
    images = [k for k in small if k.startswith("images/")]
    assert len(images) == 5 and all(small[k] == large[k] for k in images)
