"""Padding-free packing (data/packing.py) against the padded micro-batch: the same summed label-token loss and the
same gradients on every family's tiny model, with a sample much longer than the others and a text-only one, from
pixels and from cached image features; a row whose positions do not start again per sample differs (so the
equality is the packing's doing); the linear-attention family refuses to pack on a CPU."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from helpers import ONE_PER_FAMILY, SYSTEM, record, save_image, write_dataset
from vlmtune.config import FinetuneConfig
from vlmtune.data.encode import Collator, encode
from vlmtune.data.loader import load_datasets
from vlmtune.data.packing import pack, packing_problem, rope_positions, sample_lengths, varlen_kwargs
from vlmtune.data.processor import load_processor
from vlmtune.families import family_of_model, family_of_type
from vlmtune.model.adapters import apply_finetuning
from vlmtune.model.load import load_model

from vlmtune.train.step import token_loss_sum

ATTENTION_ONLY = tuple(t for t in ONE_PER_FAMILY if not family_of_type(t).recurrent_state)
RECURRENT = tuple(t for t in ONE_PER_FAMILY if family_of_type(t).recurrent_state)


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    """Four records: a small image, a text-only question, a large image under a long system prompt, a small
    image again."""
    directory = tmp_path_factory.mktemp("packing")
    for i, size in enumerate([(112, 84), (448, 448), (84, 112)]):
        save_image(directory / "images" / f"{i}.png", size, seed=i)
    text_only = {"messages": [{"role": "user", "content": "画面中有几个立方体?"},
                              {"role": "assistant", "content": "不满足要求"}]}
    long = record("images/1.png", "满足要求")
    long["messages"][0]["content"] = SYSTEM * 12
    write_dataset(directory, "mixed", [record("images/0.png", "满足要求"), text_only, long,
                                       record("images/2.png", "不满足要求")])
    return directory


def setup(model_dir: Path, data_dir: Path):
    processor = load_processor(model_dir, max_pixels=262144)
    samples = [encode(c, processor, 8192) for c in load_datasets("mixed", str(data_dir), None).conversations]
    torch.manual_seed(0)
    model = apply_finetuning(load_model(model_dir), FinetuneConfig(), log=lambda _: None)
    with torch.no_grad():  # LoRA B away from zero, so that gradients reach A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return processor, samples, model


def loss_and_grads(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def assert_equal(padded, packed):
    (loss_a, grads_a), (loss_b, grads_b) = padded, packed
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-5), (loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("arch", ATTENTION_ONLY)
def test_packed_row_equals_padded_batch(arch, tiny_models, mixed_data):
    model_dir = tiny_models(arch)
    processor, samples, model = setup(model_dir, mixed_data)
    assert max(map(len, samples)) > 3 * min(map(len, samples)) and any(not s.images for s in samples)
    collate, positions = Collator(processor), rope_positions(model.get_base_model())
    padded = collate(samples)
    packed = pack(padded, positions)
    assert packed.input_ids.shape == (1, sum(map(len, samples))) and packed.attention_mask is None
    assert packed.position_ids.shape == (4, 1, packed.input_ids.shape[1])
    assert packed.num_label_tokens == padded.num_label_tokens
    assert sample_lengths(packed).tolist() == [len(s) for s in samples]
    reference = loss_and_grads(model, padded)
    assert_equal(reference, loss_and_grads(model, packed))

    # Positions that run on across the samples: one long sequence, every sample attending to those before it.
    position_ids = packed.position_ids.clone()
    position_ids[0, 0] = torch.arange(position_ids.shape[-1])
    leaking = dataclasses.replace(packed, position_ids=position_ids)
    assert not torch.allclose(reference[0], token_loss_sum(model, leaking).detach(), rtol=1e-4, atol=1e-4)

    # Cached image features (frozen vision): the Collator's feature inputs go into the row as they are.
    from accelerate import Accelerator

    from vlmtune.train.image_features import ImageFeatureCache

    cached = copy.deepcopy(samples)
    ImageFeatureCache(model, processor, Accelerator(cpu=True), enabled=True).fill(cached)
    packed = pack(collate(cached), positions)
    assert packed.pixel_values is None and packed.mm_encoder_outputs is not None
    assert_equal(reference, loss_and_grads(model, packed))


@pytest.mark.parametrize("arch", RECURRENT)
def test_linear_attention_family_refuses_to_pack_without_its_kernels(arch, tiny_models, mixed_data):
    processor, samples, model = setup(tiny_models(arch), mixed_data)
    core = model.get_base_model()
    # Why: without the kernels the linear-attention state and convolution run from one sample into the next.
    padded = Collator(processor)(samples)
    packed = pack(padded, rope_positions(core))
    assert not torch.allclose(token_loss_sum(model, padded), token_loss_sum(model, packed), rtol=1e-4, atol=1e-4)
    line = packing_problem(family_of_model(core), torch.device("cpu"), "neat_packing")
    assert line is not None and "\n" not in line
    assert line.startswith("neat_packing: ") and "no CUDA device" in line and "neat_packing: false" in line
    # On a CUDA device the kernels decide (this machine has neither device nor kernels, so both are named).
    line = packing_problem(family_of_model(core), torch.device("cuda"))
    if line is not None:
        assert "flash-linear-attention" in line and "pip install 'vlmtune[gdn]'" in line


def test_attention_only_families_pack_anywhere(tiny_models):
    core = load_model(tiny_models(ATTENTION_ONLY[0]))
    assert packing_problem(family_of_model(core), torch.device("cpu")) is None


def test_varlen_kwargs_mark_the_sample_boundaries():
    kwargs = varlen_kwargs(torch.tensor([3, 1, 2]))
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 3
    assert kwargs["seq_idx"].tolist() == [[0, 0, 0, 1, 2, 2]] and kwargs["seq_idx"].dtype == torch.int32
