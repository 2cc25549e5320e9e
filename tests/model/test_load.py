"""`model/load.py`: the attention implementation chosen for a model's dtype and machine (the GPU and flash-attn
stood in for by their checks: torch's device queries and transformers' own flash-attn check)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from vlmtune.errors import VlmtuneError
from vlmtune.model.load import pick_attention


@pytest.fixture
def gpu_with_flash_attn(monkeypatch):
    """A CUDA machine with an Ampere GPU and a flash-attn that transformers accepts and that imports;
    `set(capability=(7, 5))` makes the GPU older."""
    import transformers.utils

    machine = {"capability": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: machine["capability"])
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda *_, **__: True)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    return machine


def test_auto_picks_flash_attention_only_for_half_precision(gpu_with_flash_attn):
    # vlmtune's default precision (bf16: false, fp16: false) is float32, which flash-attention refuses
    assert pick_attention("auto", torch.float32) == "sdpa"
    assert pick_attention("auto", torch.bfloat16) == "flash_attention_2"
    assert pick_attention("auto", torch.float16) == "flash_attention_2"
    gpu_with_flash_attn["capability"] = (7, 5)  # a T4 / V100: flash-attn 2 needs Ampere
    assert pick_attention("auto", torch.bfloat16) == "sdpa"


def test_explicit_flash_attention_with_float32_is_refused_in_one_line(gpu_with_flash_attn, capsys):
    with pytest.raises(VlmtuneError, match="flash_attention_2 .* bf16 or fp16 only.* float32: set bf16: true") as exc:
        pick_attention("flash_attention_2", torch.float32)
    assert "\n" not in str(exc.value)
    assert pick_attention("flash_attention_2", torch.bfloat16) == "flash_attention_2"
    gpu_with_flash_attn["capability"] = (7, 0)  # where it cannot run, a YAML's fa2 becomes sdpa with a note
    assert pick_attention("flash_attention_2", torch.float32) == "sdpa"
    assert "older than Ampere, which flash-attn needs; using sdpa" in capsys.readouterr().err


def test_without_a_gpu_or_flash_attn_it_is_sdpa(monkeypatch, capsys):
    import transformers.utils

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_attention("auto", torch.bfloat16) == "sdpa"
    assert pick_attention("eager", torch.float32) == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda *_, **__: False)
    assert pick_attention("flash_attention_2", torch.bfloat16) == "sdpa"
    assert "flash-attn is not installed" in capsys.readouterr().err
