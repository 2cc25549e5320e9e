"""`deepspeed: ds_config.json` with LLaMA-Factory's stock ZeRO-2 / ZeRO-3 configs (examples/deepspeed/): the
"auto" values filled from our config and the model; real ZeRO-2 and ZeRO-3 runs on 2 CPU ranks (DeepSpeed's CPU
accelerator over gloo) with the loss curve of plain DDP, checkpoints without the frozen base model, and a
resume that ends where the uninterrupted run does."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import ALL_ARCHS, REPO, TEMPLATE_OF, assert_one_line_error
from vlmtune.config import load_config
from vlmtune.errors import VlmtuneError
from vlmtune.families import family_of_type
from vlmtune.train.distributed import deepspeed_plugin

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install "
                                                               "'vlmtune[deepspeed]')")
STOCK = {stage: REPO / "examples" / "deepspeed" / f"ds_z{stage}_config.json" for stage in (2, 3)}


def config_with(train_config, ds_path, *overrides):
    return load_config(train_config(), [f"deepspeed={ds_path}", "per_device_train_batch_size=2",
                                        "gradient_accumulation_steps=4", "max_grad_norm=0.5", *overrides])


@pytest.fixture
def deepspeed_available(monkeypatch):
    """The plugin itself needs no deepspeed import: pretend it is installed where it is not."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_deepspeed_available", lambda: True)


def test_stock_config_auto_values_filled(tmp_path, train_config, deepspeed_available, monkeypatch):
    """Batch geometry and clipping from our config; the ZeRO-3 bucket sizes from the language model's hidden
    size (text_config.hidden_size: accelerate reads model.config.hidden_size, which a VL config lacks)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    plugin = deepspeed_plugin(config_with(train_config, STOCK[3]))
    ds = plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (2, 4, 2 * 4 * 2, 0.5)
    hidden = 128  # the tiny model's text hidden size
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (hidden * hidden, int(0.9 * hidden * hidden), 10 * hidden)
    assert plugin.zero_stage == 3 and ds["zero_allow_untested_optimizer"] is True


def test_explicit_values_must_agree(tmp_path, train_config, deepspeed_available):
    stock = json.loads(STOCK[2].read_text())
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**stock, "gradient_accumulation_steps": 16}))
    with pytest.raises(VlmtuneError, match="gradient_accumulation_steps is 16 there but 4"):
        deepspeed_plugin(config_with(train_config, path))
    path.write_text(json.dumps({**stock, "gradient_accumulation_steps": 4}))  # agreeing values are fine
    assert deepspeed_plugin(config_with(train_config, path)).deepspeed_config["gradient_accumulation_steps"] == 4


def test_missing_deepspeed_and_unreadable_config_are_clear_errors(tmp_path, train_config, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_deepspeed_available", lambda: False)
    with pytest.raises(VlmtuneError, match=r"DeepSpeed is not installed; pip install 'vlmtune\[deepspeed\]'"):
        deepspeed_plugin(config_with(train_config, STOCK[2]))
    monkeypatch.setattr(accelerate.utils, "is_deepspeed_available", lambda: True)
    with pytest.raises(VlmtuneError, match="cannot read the DeepSpeed config"):
        deepspeed_plugin(config_with(train_config, tmp_path / "missing.json"))


def test_deepspeed_and_several_gpus_start_torchrun_on_a_free_port():
    from vlmtune.launch import free_port, torchrun_command, torchrun_processes

    assert torchrun_processes(deepspeed=False, gpus=8, env={}) == 8
    assert torchrun_processes(deepspeed=True, gpus=1, env={}) == 1  # DeepSpeed needs torchrun's environment
    assert torchrun_processes(deepspeed=True, gpus=0, env={}) == 1  # ... on a CPU too
    assert torchrun_processes(deepspeed=False, gpus=1, env={}) is None
    assert torchrun_processes(deepspeed=True, gpus=8, env={"LOCAL_RANK": "0"}) is None  # inside a launcher
    port = free_port()
    command = torchrun_command(2, port, "train", ["cfg.yaml", "lr=1"])
    assert command[command.index("--master_port") + 1] == str(port)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # it was free


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def torchrun(cfg, *overrides, port):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "vlmtune", "train", str(cfg), *overrides], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)


def zero_and_ddp(train_config, tmp_path, stage: int, common: dict) -> subprocess.CompletedProcess:
    """The same run under DDP and under ZeRO-`stage` on 2 CPU ranks (tmp_path / "ddp", "zero"): their loss curves
    and final adapters agree within 1e-4. Returns the ZeRO run."""
    from vlmtune.launch import free_port

    ddp = train_config("ddp.yaml", output_dir=str(tmp_path / "ddp"), **common)
    zero = train_config("zero.yaml", output_dir=str(tmp_path / "zero"), deepspeed=str(STOCK[stage]), **common)
    for cfg in (ddp, zero):
        result = torchrun(cfg, port=free_port())
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "zero")
    assert len(a) == len(b) == common["max_steps"] and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    final = load_file(tmp_path / "zero" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    assert final.keys() == reference.keys()
    assert max((final[k] - reference[k]).abs().max().item() for k in final) < 1e-4
    return result


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_two_cpu_ranks_equals_ddp_and_resumes(train_config, tmp_path, stage):
    """With a text-only record among the data: under ZeRO-3 a rank whose micro-batch has no image runs the vision
    tower on a placeholder (its forward gathers weights from every rank: skipping it hangs the run, which the
    torchrun timeout turns into a failure), and the losses stay DDP's."""
    from vlmtune.launch import free_port

    data = tmp_path / "data" / "my_dataset.json"
    records = json.loads(data.read_text(encoding="utf-8"))
    records.append({"messages": [{"role": "user", "content": "规则: 只允许立方体。是否满足?"},
                                 {"role": "assistant", "content": "满足要求"}]})
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    common = dict(max_steps=4, logging_steps=1, save_steps=2, val_size=0, plot_loss=False, report_to="none",
                  disable_tqdm=True, learning_rate=5e-3, gradient_accumulation_steps=2, per_device_train_batch_size=1)
    result = zero_and_ddp(train_config, tmp_path, stage, common)
    assert "trainable params: 32,768 || all params: 848,320" in result.stdout  # counted right under ZeRO-3 too
    final = load_file(tmp_path / "zero" / "adapter_model.safetensors")
    # The checkpoint: the engine's state (optimizer partitions) without the frozen base model.
    engine = tmp_path / "zero" / "checkpoint-2" / "deepspeed"
    model_files = [p for p in engine.rglob("*model_states.pt")]
    assert model_files and sum(p.stat().st_size for p in model_files) < 1_000_000  # the base model is 3.4 MB
    # Resume from checkpoint-2 in a fresh output_dir: the same final adapter as the uninterrupted run.
    resumed = train_config("resumed.yaml", output_dir=str(tmp_path / "zero"), deepspeed=str(STOCK[stage]),
                           resume_from_checkpoint=str(tmp_path / "zero" / "checkpoint-2"), **common)
    (tmp_path / "zero" / "adapter_model.safetensors").unlink()
    result = torchrun(resumed, port=free_port())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stdout
    again = load_file(tmp_path / "zero" / "adapter_model.safetensors")
    assert max((again[k] - final[k]).abs().max().item() for k in final) < 1e-5


@pytest.mark.slow
@needs_deepspeed
def test_single_process_deepspeed_goes_through_torchrun(train_config, tmp_path):
    """`vlmtune train` with a deepspeed key and no launcher starts torchrun itself (no MPI discovery)."""
    from helpers import run_cli

    cfg = train_config(deepspeed=str(STOCK[2]), max_steps=2, val_size=0, plot_loss=False, report_to="none",
                       disable_tqdm=True)
    result = run_cli("train", str(cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting torchrun --nproc_per_node 1 --master_addr 127.0.0.1 --master_port" in result.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed: the runs above use it")
def test_train_command_without_deepspeed_is_one_line(tmp_path, train_config):
    from helpers import run_cli

    result = run_cli("train", str(train_config(deepspeed=str(STOCK[2]))), timeout=300)
    assert_one_line_error(result, "deepspeed:", "ds_z2_config.json")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a ZeRO run on a GPU needs CUDA")
@needs_deepspeed
def test_zero3_on_a_gpu(tmp_path, train_config):
    from helpers import run_cli

    out = tmp_path / "out-gpu"
    cfg = train_config(deepspeed=str(STOCK[3]), output_dir=str(out), bf16=True, num_train_epochs=1,
                       save_strategy="epoch", eval_strategy="epoch")
    result = run_cli("train", str(cfg), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "all_results.json").read_text())["eval_loss"] > 0


@needs_deepspeed
@pytest.mark.parametrize("arch", [t for t in ALL_ARCHS if family_of_type(t).zero3_leaf_modules])
def test_moe_blocks_become_zero3_leaf_modules(tiny_models, arch):
    """The family's mixture-of-experts blocks (and nothing on its dense variant) are DeepSpeed leaf modules, by
    DeepSpeed's own flag, before the engine wraps the model."""
    from deepspeed.utils import get_z3_leaf_modules

    from vlmtune.model.load import load_model
    from vlmtune.train.distributed import mark_zero3_leaves

    model, lines = load_model(tiny_models(arch)), []
    marked = mark_zero3_leaves(model, lines.append)
    leaves = get_z3_leaf_modules(model)
    names = set(family_of_type(arch).zero3_leaf_modules)
    assert marked == len(leaves) == sum(type(m).__name__ in names for m in model.modules())
    assert marked == (model.config.text_config.num_hidden_layers if "moe" in arch else 0)
    assert bool(lines) == bool(marked)


@pytest.mark.slow
@needs_deepspeed
def test_zero3_on_a_hybrid_moe_equals_ddp(train_config, tiny_models, tmp_path):
    """Qwen3.5-MoE (linear attention, experts as ZeRO-3 leaves) on 2 CPU ranks: the loss curve and adapter of DDP."""
    arch = next(t for t in ALL_ARCHS if family_of_type(t).recurrent_state and family_of_type(t).zero3_leaf_modules
                and "moe" in t)
    common = dict(model_name_or_path=str(tiny_models(arch)), template=TEMPLATE_OF[arch], max_steps=3,
                  logging_steps=1, save_steps=10, val_size=0, plot_loss=False, report_to="none", disable_tqdm=True,
                  learning_rate=5e-3, gradient_accumulation_steps=2, per_device_train_batch_size=1)
    result = zero_and_ddp(train_config, tmp_path, 3, common)
    assert "ZeRO-3: 2 mixture-of-experts blocks" in result.stdout
