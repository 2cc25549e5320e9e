"""The optimisation step (`train.step`): the gradient of one big batch, without ever waiting for the device; a
packed run trains as the padded one."""

import json
import types
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from helpers import ONE_PER_FAMILY, TEMPLATE_OF, assert_one_line_error, archs_with, make_dataset, run_inline
from vlmtune.config import FinetuneConfig
from vlmtune.data.batch import Batch, LabelGather
from vlmtune.data.encode import Collator, encode
from vlmtune.data.loader import load_datasets
from vlmtune.data.processor import load_processor
from vlmtune.model.adapters import apply_finetuning
from vlmtune.model.load import load_model
from vlmtune.train.step import optimisation_step, token_loss_sum


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class StandIn(torch.nn.Module):
    """A language model's shape (ids → logits at `logits_to_keep`) that itself never reads a tensor's value."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50)

    def forward(self, input_ids, logits_to_keep, use_cache=False, **_):
        return types.SimpleNamespace(logits=self.head(self.embed(input_ids)[:, logits_to_keep]))


class OnMeta(Accelerator):
    """accelerate's own Accelerator with the meta device as its device: a tensor there has a shape but no values,
    so any read of a value on the host (`.item()`, `int(t)`, `nonzero()`, a boolean-mask index) raises."""

    @property
    def device(self) -> torch.device:
        return torch.device("meta")


def random_batch(rows: int, width: int, answer: int) -> Batch:
    ids = torch.randint(0, 50, (rows, width))
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids),
                 labels=labels, num_samples=rows, num_tokens=rows * width, gather=LabelGather.of(labels))


def test_the_step_never_waits_for_the_device():
    model = StandIn().to("meta")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    micro = [random_batch(2, 7, 3), random_batch(1, 11, 2), random_batch(3, 5, 1)]
    result = optimisation_step(model, optimizer, scheduler, OnMeta(cpu=True), micro, list(model.parameters()),
                               max_grad_norm=1.0, accum=3)
    assert result.loss.device.type == "meta" and (result.samples, result.tokens) == (6, 40)
    # The stand-in catches every way a step used to wait for the device (the loop before train/step.py did each).
    probe = torch.zeros(4, device="meta")
    for wait in (lambda: probe.nonzero(), lambda: probe[probe > 0], lambda: int(probe.sum()), lambda: probe.item(),
                 lambda: probe.sum().tolist()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            wait()


def tiny_run(model_dir: Path, data_dir: Path):
    processor = load_processor(model_dir, max_pixels=262144)
    samples = [encode(c, processor, 4096) for c in load_datasets("my_dataset", str(data_dir), None).conversations]
    torch.manual_seed(0)
    model = apply_finetuning(load_model(model_dir), FinetuneConfig(), log=lambda _: None)
    with torch.no_grad():  # LoRA B non-zero, so gradients reach A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return processor, samples, model


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)
def test_the_step_is_the_gradient_of_one_big_batch(arch, tiny_models, tmp_path):
    """Micro-batches of uneven label counts, through the step with SGD at lr 1: the weights move by minus the
    gradient of the mean label-token loss of all the samples in one padded batch (the model's own loss)."""
    processor, samples, model = tiny_run(tiny_models(arch), make_dataset(tmp_path, n=5))
    params = [p for p in model.parameters() if p.requires_grad]
    collate = Collator(processor)
    whole = collate(samples)
    model(**whole.model_inputs(), labels=whole.labels).loss.backward()
    want = [p.detach() - p.grad for p in params]
    reference_loss = model(**whole.model_inputs(), labels=whole.labels).loss.detach()
    model.zero_grad()
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    micro = [collate(samples[:1]), collate(samples[1:4]), collate(samples[4:])]
    result = optimisation_step(model, optimizer, scheduler, Accelerator(cpu=True), micro, params, max_grad_norm=0,
                               accum=3)
    assert torch.allclose(result.loss, reference_loss, atol=1e-5)
    for p, w in zip(params, want):
        assert torch.allclose(p.detach(), w, atol=1e-6)


def trained(capsys, config: Path, **values) -> tuple[list[dict], dict]:
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg.update(values)
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    result = run_inline(capsys, "train", config)
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(cfg["output_dir"])
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], load_file(out / "adapter_model.safetensors")


def test_a_packed_run_trains_as_the_padded_one(train_config, tmp_path, capsys):
    """`packing: true` through `vlmtune train`: the same losses step by step and the same adapter, batch 4."""
    settings = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=3, logging_steps=1,
                    val_size=0, eval_strategy="no", save_strategy="no", learning_rate=1e-3)
    padded_rows, padded = trained(capsys, train_config("padded.yaml", output_dir=str(tmp_path / "padded")),
                                  **settings)
    AcceleratorState._reset_state(True)
    packed_rows, packed = trained(capsys, train_config("packed.yaml", output_dir=str(tmp_path / "packed")),
                                  packing=True, **settings)
    assert [r["step"] for r in packed_rows] == [1, 2, 3]
    for a, b in zip(padded_rows, packed_rows):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    for name, weight in padded.items():
        assert torch.allclose(weight, packed[name], atol=1e-4), name


@pytest.mark.parametrize("arch", archs_with("recurrent_state")[:1])
def test_packing_a_linear_attention_family_without_its_kernels_is_refused(arch, tiny_models, train_config, capsys):
    config = train_config(model_name_or_path=str(tiny_models(arch)), template=TEMPLATE_OF[arch], neat_packing=True)
    result = run_inline(capsys, "train", config)
    assert_one_line_error(result, "neat_packing:", "linear-attention", "neat_packing: false")
    assert "Running training" not in result.stdout


def text_only(processor, n: int):
    from vlmtune.data.conversation import Conversation, Message

    conversations = [Conversation(messages=[Message("user", f"第{i}条规则: 只允许立方体。"),
                                            Message("assistant", "满足要求" if i % 2 else "不满足要求")], images=[],
                                 source="text.json", index=i)
                     for i in range(n)]
    return [encode(c, processor, 4096) for c in conversations]


def test_a_batch_without_images_still_runs_the_vision_tower(tiny_model_dir):
    """`vision_every_batch` (ZeRO-3, or a trained vision path on several ranks): a text-only batch gets the
    placeholder row; the tower runs and its trained weights get gradients, and the loss and the language model's
    gradients are the batch's without it."""
    from vlmtune.families import parts_of

    processor = load_processor(tiny_model_dir, max_pixels=262144)
    torch.manual_seed(0)
    model = apply_finetuning(load_model(tiny_model_dir), FinetuneConfig(freeze_multi_modal_projector=False),
                             log=lambda _: None)
    samples = text_only(processor, 3)
    parts = parts_of(model.get_base_model())
    tower_runs = []
    parts.vision_tower.register_forward_hook(lambda *_: tower_runs.append(1))
    projector = [p for p in parts.projector.parameters() if p.requires_grad]
    language = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    results = []
    for every in (False, True):
        model.zero_grad()
        batch = Collator(processor, vision_every_batch=every)(samples)
        assert (batch.num_samples, batch.input_ids.shape[0]) == (3, 3 + every)
        loss = token_loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in language], [p.grad for p in projector]))
    (plain_loss, plain_grads, none), (loss, grads, projector_grads) = results
    assert tower_runs == [1] and all(g is None for g in none) and all(g is not None for g in projector_grads)
    assert torch.allclose(plain_loss, loss, atol=1e-6)
    for a, b in zip(plain_grads, grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_frozen_vision_tower_is_not_backpropagated_with_checkpointing(tiny_model_dir, tmp_path):
    """Checkpointing + LoRA: transformers and peft mark every sub-model's input embeddings as needing gradients,
    the frozen tower's patch embedding included; `keep_frozen_vision_out_of_backward` takes those off the tower,
    and the adapter's gradients stay the same."""
    from vlmtune.families import parts_of
    from vlmtune.train.loop import enable_checkpointing, keep_frozen_vision_out_of_backward

    processor = load_processor(tiny_model_dir, max_pixels=262144)
    samples = [encode(c, processor, 4096)
               for c in load_datasets("my_dataset", str(make_dataset(tmp_path, n=2)), None).conversations]
    batch = Collator(processor)(samples)
    assert batch.pixel_values is not None
    grads = []
    for fix in (False, True):
        torch.manual_seed(0)
        model = load_model(tiny_model_dir)
        enable_checkpointing(model, reentrant=False)
        model = apply_finetuning(model, FinetuneConfig(), log=lambda _: None)
        tower = parts_of(model.get_base_model()).vision_tower
        if fix:
            assert keep_frozen_vision_out_of_backward(model) >= 1
        outputs = []
        tower.register_forward_hook(lambda _m, _i, out: outputs.append(out))
        model.train()
        token_loss_sum(model, batch).backward()
        tower_output = outputs[0] if isinstance(outputs[0], torch.Tensor) else outputs[0][0]
        assert tower_output.requires_grad is not fix  # without the fix the frozen tower is in the backward
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
