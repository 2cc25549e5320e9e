"""The loss paths against the plain ones: label-position logits, token-normalised accumulation, the frozen-
vision feature cache — on every family (Qwen3-VL's deepstack features go through the cache too)."""

from pathlib import Path

import torch
import torch.nn.functional as F

from helpers import make_dataset
from vlmtune.config import FinetuneConfig
from vlmtune.data.encode import Collator, encode
from vlmtune.data.loader import load_datasets
from vlmtune.data.processor import load_processor
from vlmtune.model.adapters import apply_finetuning
from vlmtune.model.load import load_model
from vlmtune.train.step import token_loss_sum


def setup(tiny_model_dir, tmp_path, n=4):
    data_dir = make_dataset(tmp_path, n=n)
    processor = load_processor(tiny_model_dir, max_pixels=262144)
    samples = [encode(c, processor, 4096) for c in load_datasets("my_dataset", str(data_dir), None).conversations]
    torch.manual_seed(0)
    model = apply_finetuning(load_model(Path(tiny_model_dir)), FinetuneConfig(), log=lambda _: None)
    # give LoRA B non-zero values so gradients reach A too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return processor, samples, model


def test_label_position_logits_equal_full_logits(family_model_dir, tmp_path):
    processor, samples, model = setup(family_model_dir, tmp_path)
    batch = Collator(processor)(samples[:3])
    ours, n = token_loss_sum(model, batch), batch.num_label_tokens
    logits = model(**batch.model_inputs()).logits
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                            ignore_index=-100, reduction="sum")
    assert n == int((batch.labels != -100).sum())
    assert torch.allclose(ours, plain, atol=1e-4), (ours, plain)
    # and the model's own mean loss agrees
    assert torch.allclose(ours / n, model(**batch.model_inputs(), labels=batch.labels).loss, atol=1e-5)


def test_accumulated_token_normalised_gradient_equals_one_batch(family_model_dir, tmp_path):
    processor, samples, model = setup(family_model_dir, tmp_path)
    collate = Collator(processor)
    params = [p for p in model.parameters() if p.requires_grad]

    whole = collate(samples)
    (token_loss_sum(model, whole) / whole.num_label_tokens).backward()
    one_batch = [p.grad.clone() for p in params]
    model.zero_grad()

    micro = [collate(samples[:1]), collate(samples[1:])]
    total = sum(int((b.labels[:, 1:] != -100).sum()) for b in micro)
    for b in micro:
        (token_loss_sum(model, b) / total).backward()
    for a, b in zip(one_batch, (p.grad for p in params)):
        assert torch.allclose(a, b, atol=1e-6)


def test_cached_image_features_give_the_same_loss_and_gradients(family_model_dir, tmp_path):
    """The frozen-vision feature cache against the plain pixel path."""
    from accelerate import Accelerator

    from vlmtune.train.image_features import ImageFeatureCache

    processor, samples, model = setup(family_model_dir, tmp_path)
    collate = Collator(processor)
    params = [p for p in model.parameters() if p.requires_grad]
    plain_loss = token_loss_sum(model, collate(samples[:3]))
    plain_loss.backward()
    plain_grads = [p.grad.clone() for p in params]
    model.zero_grad()

    cache = ImageFeatureCache(model, processor, Accelerator(cpu=True), enabled=True)
    cache.fill(samples[:1])  # filled in two rounds, as micro-batches arrive
    cache.fill(samples[:3])
    assert all(s.image_features is not None and not s.images for s in samples[:3])
    batch = collate(samples[:3])
    assert batch.pixel_values is None and batch.mm_encoder_outputs is not None
    deepstack = getattr(batch.mm_encoder_outputs["image"], "deepstack_features", None)
    assert bool(deepstack) is (processor.family.deepstack_output is not None)
    cached_loss = token_loss_sum(model, batch)
    cached_loss.backward()
    assert torch.allclose(plain_loss, cached_loss, atol=1e-5)
    for a, b in zip(plain_grads, (p.grad for p in params)):
        assert torch.allclose(a, b, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family_model_dir, tmp_path):
    """The default (non-reentrant) checkpointing and LLaMA-Factory's reentrant one against no checkpointing: LoRA
    inside every layer gets the same gradient (the reentrant one only with the inputs' gradients enabled)."""
    from vlmtune.train.loop import enable_checkpointing

    processor, samples, model = setup(family_model_dir, tmp_path)
    batch = Collator(processor)(samples[:3])
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def loss_and_grads():
        model.zero_grad()
        loss = token_loss_sum(model, batch)
        (loss / batch.num_label_tokens).backward()
        return loss.detach(), [p.grad.clone() for p in params]

    plain_loss, plain = loss_and_grads()
    for reentrant in (False, True):
        enable_checkpointing(model, reentrant)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        loss, grads = loss_and_grads()
        assert torch.allclose(loss, plain_loss, atol=1e-6)
        for a, b in zip(plain, grads):
            assert torch.allclose(a, b, atol=1e-6) and b.abs().sum() > 0
        for m in model.modules():  # off again for the next round
            if getattr(m, "gradient_checkpointing", False):
                m.gradient_checkpointing = False
