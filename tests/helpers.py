"""Plain helpers for tests: small ShareGPT datasets with images, running the CLI (in a subprocess, or in this
process), and checksums of a command's inputs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from vlmtune.families import FAMILIES, family_of_type

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# Every model type of the registry (`vlmtune.families`): what the unit tests and the end-to-end tests run on.
ALL_ARCHS = tuple(t for family in FAMILIES for t in family.model_types)
# One model type per family (its first, dense one), and the mixtures of experts.
ONE_PER_FAMILY = tuple(family.model_types[0] for family in FAMILIES)
MOE_ARCHS = tuple(t for t in ALL_ARCHS if "moe" in t)
# The `template:` each family's users write: its default (Qwen3-VL Instruct: the no-thinking one).
TEMPLATE_OF = {arch: family_of_type(arch).template_names[0] for arch in ALL_ARCHS}


def archs_with(attribute: str) -> tuple[str, ...]:
    """The model types whose family record has `attribute` set (a fast path proven on it, deepstack, ...)."""
    return tuple(t for family in FAMILIES if getattr(family, attribute) for t in family.model_types)

SYSTEM = "你是一个商品陈列合规检查助手。"
RULES_PROMPT = ('<image>判断以上图片是否满足要求:\n1. 画面中只允许出现立方体、圆柱体、圆环、五角星徽章和灯。\n'
                '2. 每个五角星徽章必须位于圆环内。\n请只输出如下格式:"满足要求", 或 "不满足要求"。')
SHAREGPT_ENTRY = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant", "system_tag": "system"}}


def save_image(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def png_data_url(path: Path, size: tuple[int, int] = (112, 84), seed: int = 7) -> str:
    """A random image saved at `path`, as the `data:image/png;base64,...` URL an API client sends."""
    import base64

    save_image(path, size, seed)
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def record(image: str, answer: str, system: bool = True) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    messages += [{"role": "user", "content": RULES_PROMPT}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "images": [image]}


def write_dataset(directory: Path, name: str, records: list, entry: dict | None = None, jsonl: bool = False) -> Path:
    """Write records and merge a dataset_info.json entry; returns the dataset file."""
    directory.mkdir(parents=True, exist_ok=True)
    file_name = f"{name}.jsonl" if jsonl else f"{name}.json"
    path = directory / file_name
    if jsonl:
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    info_path = directory / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {"file_name": file_name, **(entry if entry is not None else SHAREGPT_ENTRY)}
    info_path.write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")
    return path


def make_dataset(directory: Path, n: int = 12, name: str = "my_dataset") -> Path:
    """n records (2 in 3 compliant) with images of two sizes; returns the dataset_dir."""
    records = []
    for i in range(n):
        size = (224, 224) if i % 2 else (320, 240)
        save_image(directory / "images" / f"img_{i}.png", size, seed=i)
        records.append(record(f"images/img_{i}.png", "满足要求" if i % 3 else "不满足要求"))
    write_dataset(directory, name, records)
    return directory


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`vlmtune ARGS` in a subprocess, as a user would run it (`env`: variables to set for it)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", **(env or {}))
    return subprocess.run([sys.executable, "-m", "vlmtune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 1, no traceback, one `error:` line containing every fragment; returns that line."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def run_inline(capsys, *args) -> subprocess.CompletedProcess:
    """`vlmtune ARGS` in this process (no 8 s of imports); the result looks like run_cli's. A Python exception
    other than the one-line errors cli.py turns into `error: ...` escapes, and fails the test."""
    from vlmtune.cli import main as cli_main

    code = cli_main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def checksums(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (files, or directories walked recursively), by path."""
    found = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            found[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def changed_files(before: dict[str, str], *paths: Path) -> list[str]:
    """The files of a `checksums(*paths)` taken earlier that are now different or gone (new files do not count)."""
    now = checksums(*paths)
    return sorted(path for path, digest in before.items() if now.get(path) != digest)


def write_config(path: Path, **values) -> Path:
    """examples/tiny_cpu.yaml with `values` changed, written to `path` (a training YAML for the tiny model)."""
    import yaml

    cfg = yaml.safe_load((REPO / "examples" / "tiny_cpu.yaml").read_text())
    cfg.update(values)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to `keep` of its bytes (a copy interrupted, a download cut short)."""
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def save_bomb(path: Path) -> None:
    """A 20000 × 20000 PNG (1-bit, ≈50 KB): 400 M pixels, over twice Pillow's decompression-bomb limit."""
    Image.new("1", (20_000, 20_000)).save(path, format="PNG")


def unwritable_dir(tmp: Path) -> Path:
    """A directory path nothing can be written under: sysfs refuses even root; a 0555 directory others."""
    if os.geteuid() == 0:
        return Path("/sys/vlmtune-unwritable")
    path = tmp / "read-only"
    path.mkdir()
    path.chmod(0o555)
    return path / "out"


def save_grey16_png(path: Path, width: int, height: int) -> Path:
    """A black 16-bit greyscale PNG (Pillow mode I;16) written a row at a time, so the test never holds its pixels:
    a few hundred KB on disk, 2 bytes a pixel once Pillow decodes it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, parts = zlib.compressobj(9), []
    rows = bytes((1 + 2 * width) * 64)  # 64 rows of filter byte 0 + the row's samples
    for start in range(0, height, 64):
        parts.append(packer.compress(rows if start + 64 <= height else rows[:(1 + 2 * width) * (height - start)]))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16 bits, greyscale, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))
    return path


def register(directory: Path, name: str, **entry) -> Path:
    """Merge one dataset_info.json entry (as given: file_name and all) into `directory`'s registry."""
    directory.mkdir(parents=True, exist_ok=True)
    info_path = directory / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = entry
    info_path.write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")
    return info_path
