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


def test_the_fp16_guard_clamps_only_with_an_inf_and_never_asks_the_host():
    from vlmtune.model.load import clamp_fp16_overflow

    limit = torch.finfo(torch.float16).max - 1000
    big = torch.tensor([65000.0, -1.0, 3.0], dtype=torch.float16)
    assert torch.equal(clamp_fp16_overflow(big), big)  # no inf: untouched, even above the clamp limit
    overflow = torch.tensor([float("inf"), 65000.0, -float("inf"), 3.0], dtype=torch.float16)
    want = torch.tensor([limit, limit, -limit, 3.0], dtype=torch.float16)
    assert torch.equal(clamp_fp16_overflow(overflow), want)
    assert clamp_fp16_overflow(torch.ones(2)).dtype == torch.float32  # other dtypes pass through
    # On the meta device a tensor has no values: a guard that read one on the host (a GPU sync per block) raises.
    assert clamp_fp16_overflow(torch.empty(4, dtype=torch.float16, device="meta")).device.type == "meta"


def test_a_model_for_a_gpu_loads_straight_onto_it(tiny_model_dir, monkeypatch):
    """`load_model(device=cuda:N)` hands transformers a device map for that device (no host copy first); the
    weights here land on the CPU standing in for it."""
    from transformers import AutoModelForImageTextToText

    from vlmtune.model.load import load_model

    asked = []
    original = AutoModelForImageTextToText.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append(kwargs.get("device_map"))
        kwargs["device_map"] = {"": torch.device("cpu")}
        return original(cls, *args, **kwargs)
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(spy))
    model = load_model(tiny_model_dir, device=torch.device("cuda:1"), attn_implementation="sdpa")
    assert asked == [{"": torch.device("cuda:1")}]
    assert next(model.parameters()).device.type == "cpu"
    load_model(tiny_model_dir, device=torch.device("cpu"))
    assert asked[-1] is None  # on a CPU: loaded in place, as before


def test_training_loads_onto_the_ranks_gpu_except_under_zero3(monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from vlmtune.train import distributed as loop

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    assert loop.load_device(accelerator, None) is None
    assert loop.load_device(accelerator, quantization=object()) == torch.device("cpu")
    monkeypatch.setattr(type(accelerator), "device", property(lambda self: torch.device("cuda", 3)))
    assert loop.load_device(accelerator, None) == torch.device("cuda", 3)
    monkeypatch.setattr(loop, "zero_stage", lambda _: 3)
    assert loop.load_device(accelerator, None) is None
    AcceleratorState._reset_state(True)


def test_a_library_error_over_several_lines_is_one_line_with_its_continuation(tiny_model_dir, tmp_path):
    """transformers' tokenizer error ends its first line with "from one of:" and lists the ways on the next: the
    one-line error keeps them (`errors.brief`), not a sentence cut in the middle."""
    import shutil

    from vlmtune.data.processor import load_processor
    from vlmtune.errors import VlmtuneError

    broken = tmp_path / "no-tokenizer-file"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(VlmtuneError) as error:
        load_processor(broken)
    message = str(error.value)
    assert "\n" not in message and "cannot load the tokenizer" in message
    assert "from one of: (1)" in message and len(message) < len(str(broken)) + 350
