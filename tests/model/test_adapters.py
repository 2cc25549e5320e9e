from pathlib import Path

import pytest
import torch

from helpers import ONE_PER_FAMILY, REPO, run_cli, run_inline
from vlmtune.config import FinetuneConfig
from vlmtune.data.encode import Collator, encode
from vlmtune.data.loader import load_datasets
from vlmtune.data.processor import load_processor
from vlmtune.model.adapters import apply_finetuning, count_parameters, parameter_summary
from vlmtune.model.load import load_model

SEVEN_B = REPO / "tests" / "fixtures" / "qwen2_5_vl_7b"
ALL_SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
QWEN3_5_LINEARS = "out_proj,in_proj_qkv,in_proj_z,in_proj_b,in_proj_a,gate_proj,up_proj,down_proj,q_proj,k_proj,v_proj,o_proj"
# Released configs (tests/fixtures; Qwen3-VL-2B's is the 8B's with the 2B's sizes and tied embeddings) and
# the exact summary LLaMA-Factory prints for LoRA r=8, `lora_target: all`.
RELEASES = {
    "qwen2_5_vl_7b": (ALL_SEVEN, "trainable params: 20,185,088 || all params: 8,312,351,744 || trainable%: 0.2428"),
    "qwen3_vl_8b_instruct": (ALL_SEVEN,
                             "trainable params: 21,823,488 || all params: 8,788,947,184 || trainable%: 0.2483"),
    # the MoE's experts are fused 3-D parameters, not linear layers: attention only
    "qwen3_vl_30b_a3b_instruct": ("q_proj,k_proj,v_proj,o_proj",
                                  "trainable params: 6,684,672 || all params: 31,077,438,704 || trainable%: 0.0215"),
    # tied embeddings counted once: 2,127,532,032 + the adapter (not 2,447,413,248 + adapter)
    "qwen3_vl_2b_instruct": (ALL_SEVEN, "trainable params: 8,716,288 || all params: 2,136,248,320 || trainable%: 0.4080"),
    # Qwen3.5: every Linear of the language model — the linear-attention projections too (LLaMA-Factory's `all`)
    "qwen3_5_9b": (QWEN3_5_LINEARS, "trainable params: 21,639,168 || all params: 9,431,452,912 || trainable%: 0.2294"),
    "qwen3_5_0_8b": (QWEN3_5_LINEARS,  # tied embeddings
                     "trainable params: 5,411,328 || all params: 858,397,248 || trainable%: 0.6304"),
    # ... on the MoE the shared expert and its gate, not the routed experts (fused 3-D) or the router
    "qwen3_6_35b_a3b": (QWEN3_5_LINEARS.replace("down_proj", "down_proj,shared_expert_gate"),
                        "trainable params: 11,238,720 || all params: 35,118,420,656 || trainable%: 0.0320"),
}


@pytest.mark.parametrize("release", list(RELEASES))
def test_lora_count_from_config_only_directory(release, capsys):
    """r=8 on all language-model linears: LLaMA-Factory's exact numbers, no weights read (the first release from a
    shell, the others in this process: the same command without 4 s of imports)."""
    directory = REPO / "tests" / "fixtures" / release
    assert sorted(p.name for p in directory.iterdir()) == ["config.json"]
    args = ("inspect", "--model_name_or_path", str(directory), "--finetuning_type", "lora", "--lora_rank", "8",
            "--lora_target", "all")
    result = run_cli(*args) if release == next(iter(RELEASES)) else run_inline(capsys, *args)
    assert result.returncode == 0, result.stderr
    modules, summary = RELEASES[release]
    assert summary in result.stdout
    assert f"Found linear modules: {modules}\n" in result.stdout


def test_tied_embeddings_are_counted_once():
    """The meta-device model of a tied config shares lm_head with the embedding, as a loaded one does."""
    from vlmtune.model.load import build_empty_model

    tied = build_empty_model(REPO / "tests" / "fixtures" / "qwen3_vl_2b_instruct")
    assert tied.config.tie_word_embeddings
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    assert count_parameters(tied)[1] == 2_127_532_032
    untied = build_empty_model(REPO / "tests" / "fixtures" / "qwen3_vl_8b_instruct")
    assert untied.lm_head.weight is not untied.get_input_embeddings().weight
    small = build_empty_model(REPO / "tests" / "fixtures" / "qwen3_5_0_8b")  # Qwen3.5-0.8B ties them too
    assert small.lm_head.weight is small.get_input_embeddings().weight
    assert count_parameters(small)[1] == 852_985_920


def test_lora_on_moe_experts_is_an_opt_in(capsys):
    """peft's target_parameters on the fused experts (every expert's gate_up_proj and down_proj): r·E·(in + out)
    per parameter and layer on top of the attention LoRA."""
    directory = REPO / "tests" / "fixtures" / "qwen3_vl_30b_a3b_instruct"
    result = run_inline(capsys, "inspect", "--model_name_or_path", str(directory), "--lora_target_experts", "true")
    assert result.returncode == 0, result.stderr
    assert "LoRA on the experts' parameters: experts.gate_up_proj,experts.down_proj" in result.stdout
    # 48 layers × 8 × 128 experts × ((2048 + 2·768) + (768 + 2048)) = 314,572,800, + 6,684,672 attention
    assert "trainable params: 321,257,472 || all params: 31,392,011,504 || trainable%: 1.0234" in result.stdout
    dense = run_inline(capsys, "inspect", "--model_name_or_path", str(SEVEN_B), "--lora_target_experts", "true")
    assert dense.returncode == 1 and "not a mixture of experts" in dense.stderr


@pytest.fixture(scope="module")
def batch_of_two(tiny_model_dir, tmp_path_factory):
    """Two samples whose images have different sizes (320×240 and 224×224)."""
    from helpers import make_dataset

    data_dir = make_dataset(tmp_path_factory.mktemp("data"), n=2)
    processor = load_processor(tiny_model_dir, max_pixels=262144)
    convs = load_datasets("my_dataset", str(data_dir), None).conversations
    samples = [encode(c, processor, 4096) for c in convs]
    assert samples[0].images[0].shape != samples[1].images[0].shape
    batch = Collator(processor)(samples)
    return {**batch.model_inputs(), "labels": batch.labels}  # the model's own loss


def test_forward_backward_reaches_only_lora(tiny_model_dir, batch_of_two):
    torch.manual_seed(0)
    model = apply_finetuning(load_model(Path(tiny_model_dir)), FinetuneConfig(lora_rank=8), log=lambda _: None)
    out = model(**batch_of_two)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(".language_model." in n for n in with_grad)
    # lora_B starts at zero, so at step 0 only lora_B receives a non-zero gradient
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_image_positions_need_mm_token_type_ids(tiny_model_dir, batch_of_two):
    """Without mm_token_type_ids transformers silently uses 1-D positions: the collator must pass it."""
    model = load_model(Path(tiny_model_dir))
    assert "mm_token_type_ids" in batch_of_two
    assert int(batch_of_two["mm_token_type_ids"].sum()) == int((batch_of_two["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        with_types = model(**batch_of_two).logits
        without = model(**{k: v for k, v in batch_of_two.items() if k != "mm_token_type_ids"}).logits
    assert (with_types - without).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)
def test_lora_target_list_and_freeze_and_full(tiny_models, arch):
    tiny_model_dir = tiny_models(arch)
    model = apply_finetuning(load_model(Path(tiny_model_dir)), FinetuneConfig(lora_target="q_proj,v_proj"),
                             log=lambda _: None)
    lora_modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_" in n}
    assert lora_modules == {"q_proj", "v_proj"}

    frozen = apply_finetuning(load_model(Path(tiny_model_dir)),
                              FinetuneConfig(finetuning_type="freeze", freeze_trainable_layers=1), log=lambda _: None)
    trainable = [n for n, p in frozen.named_parameters() if p.requires_grad]
    assert trainable and all(".language_model.layers.1." in n for n in trainable)

    full = apply_finetuning(load_model(Path(tiny_model_dir)), FinetuneConfig(finetuning_type="full"),
                            log=lambda _: None)
    names = {n: p.requires_grad for n, p in full.named_parameters()}
    assert all(v for n, v in names.items() if ".language_model." in n)
    assert not any(v for n, v in names.items() if ".visual." in n)
    assert "trainable%" in parameter_summary(full)


def test_unfrozen_projector_is_trained_with_lora(tiny_model_dir):
    model = apply_finetuning(load_model(Path(tiny_model_dir)),
                             FinetuneConfig(freeze_multi_modal_projector=False), log=lambda _: None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("merger" in n for n in trainable)
    assert not any(".visual.blocks." in n for n in trainable)


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_qwen3_deepstack_mergers_belong_to_the_tower(tiny_models, finetuning_type):
    """LLaMA-Factory's split for Qwen3-VL: the projector is `visual.merger`; the deepstack mergers (and the
    learned position grid) are the vision tower's."""
    def trainable(**flags):
        model = apply_finetuning(load_model(tiny_models("qwen3_vl")),
                                 FinetuneConfig(finetuning_type=finetuning_type, **flags), log=lambda _: None)
        return {n for n, p in model.named_parameters() if p.requires_grad and ".visual." in n}

    assert not trainable()  # both frozen by default
    tower = trainable(freeze_vision_tower=False)
    assert any(".deepstack_merger_list." in n for n in tower) and any(".blocks." in n for n in tower)
    assert not any(".visual.merger." in n for n in tower)
    if finetuning_type == "full":
        assert any(".pos_embed." in n for n in tower)
    else:  # LoRA on the tower's linears (the adapter holds them), nothing else of it
        assert all("lora_" in n for n in tower)
    projector = trainable(freeze_multi_modal_projector=False)
    assert projector and all(".visual.merger." in n for n in projector)


def test_unknown_lora_target_is_clear(tiny_model_dir):
    from vlmtune.errors import VlmtuneError

    with pytest.raises(VlmtuneError, match="no linear module named qkv_proj"):
        apply_finetuning(load_model(Path(tiny_model_dir)), FinetuneConfig(lora_target="qkv_proj"), log=lambda _: None)


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)
def test_unfrozen_tower_with_lora_is_saved_with_the_adapter(tiny_models, arch, tmp_path):
    """freeze_vision_tower: false + LoRA: what trains in the tower is in the saved adapter, and the adapter
    loaded onto a fresh base gives the trained model's outputs (the tower's changes included). The projector
    (`visual.merger`) stays frozen although its leaf names may equal the tower MLP's (Qwen3-VL, Qwen3.5:
    linear_fc1 / linear_fc2)."""
    from peft import PeftModel

    model_dir = tiny_models(arch)
    torch.manual_seed(0)
    model = apply_finetuning(load_model(model_dir), FinetuneConfig(freeze_vision_tower=False), log=lambda _: None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)  # as if trained
    trained_tower = {n for n, p in model.named_parameters() if p.requires_grad and ".visual." in n}
    assert trained_tower and not any(".visual.merger." in n for n in trained_tower)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(".visual." in k for k in saved)
    assert len([k for k in saved if ".visual." in k]) == len(trained_tower)
    visual = model.get_base_model().model.visual
    pixels = torch.randn(64, visual.patch_embed.proj.weight[0].numel())
    grid = torch.tensor([[1, 8, 8]])
    reloaded = PeftModel.from_pretrained(load_model(model_dir), str(tmp_path)).get_base_model().model.visual
    with torch.no_grad():
        want = visual(pixels, grid_thw=grid).pooler_output
        assert (reloaded(pixels, grid_thw=grid).pooler_output - want).abs().max() < 1e-5
        assert (load_model(model_dir).model.visual(pixels, grid_thw=grid).pooler_output - want).abs().max() > 1e-3


@pytest.mark.parametrize("fast", [False, True])
def test_fp16_vision_blocks_are_guarded_against_overflow(tiny_model_dir, fast):
    """A vision block whose output outgrows float16 (inf) is clamped to its range, as vLLM and LLaMA-Factory do
    for Qwen2.5-VL: in transformers' forward (a hook) and in vlmtune's encoder; the answer stays finite."""
    from vlmtune.data.images import to_patches
    from vlmtune.model.vision import VisionEncoder

    model = load_model(Path(tiny_model_dir), dtype=torch.float16).eval()
    visual = model.model.visual
    processor = load_processor(tiny_model_dir)
    raw = [torch.randint(0, 256, (3, 112, 112), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))]
    pixels, grid = to_patches(raw, processor.image_processor)
    with torch.no_grad():
        for block in visual.blocks:  # each block adds 6e4: the second one's output overflows float16
            block.mlp.down_proj.bias.fill_(6e4)
        encoder = VisionEncoder(visual)
        encoder.fast = fast
        out = encoder(pixels, grid).embeds
        assert torch.isfinite(out).all()
        visual._forward_hooks.clear()
        for block in visual.blocks:
            block._forward_hooks.clear()
        if not fast:  # without the guard the same forward gives inf / NaN: the test can fail
            assert not torch.isfinite(visual(pixels.half(), grid_thw=grid).pooler_output).all()
