"""infer.last_positions: the last decoder layer computed only at the kept positions gives the whole
forward's values there, leaves the cache as the whole forward does, and is switched per thread."""

from __future__ import annotations

import threading

import pytest
import torch

from helpers import archs_with
from vlmtune.infer import last_positions
from vlmtune.infer.last_positions import kept_positions, text_model
from vlmtune.infer.scoring import cache_kwarg, output_cache
from vlmtune.model.load import load_model


@pytest.fixture(scope="module", params=archs_with("fast_decoder_layers"))
def model(request, tiny_models):
    """Every text model the path is proven on (Qwen3-VL's attention normalises q and k per head; its MoE routes
    tokens)."""
    model = load_model(tiny_models(request.param))
    model.eval()
    return model


def prompt_ids(model, rows=3, length=9, seed=1):
    vocab = model.config.text_config.vocab_size
    return torch.randint(0, vocab - 20, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_kept_positions_equal_the_whole_forward(model):
    ids = prompt_ids(model)
    positions = torch.tensor([[8], [4], [0]])  # per row: where a right-padded prompt ends
    with torch.no_grad():
        whole = model(input_ids=ids, use_cache=True)
        with kept_positions(model, positions) as used:
            part = model(input_ids=ids, use_cache=True)
    assert used
    assert part.logits.shape == (3, 1, whole.logits.shape[-1])
    want = torch.take_along_dim(whole.logits, positions[..., None], dim=1)
    torch.testing.assert_close(part.logits, want, atol=1e-5, rtol=1e-5)
    # The cache holds every position of every layer, as after the whole forward: one more token agrees.
    following = prompt_ids(model, length=1, seed=2)
    with torch.no_grad():
        after = [model(input_ids=following, use_cache=True, **{cache_kwarg(model): output_cache(out)}).logits
                 for out in (whole, part)]
    torch.testing.assert_close(after[1], after[0], atol=1e-5, rtol=1e-5)


def test_other_threads_run_the_whole_layer(model):
    ids = prompt_ids(model)
    inside, seen = threading.Event(), {}

    def other_thread():
        inside.wait(10)
        with torch.no_grad():
            seen["shape"] = tuple(model(input_ids=ids).logits.shape)

    thread = threading.Thread(target=other_thread)
    thread.start()
    with kept_positions(model, torch.tensor([[8], [8], [8]])) as used:
        inside.set()
        thread.join(30)
    assert used and seen["shape"] == (3, 9, model.config.text_config.vocab_size)


def test_a_last_layer_that_deepstack_feeds_keeps_the_library_forward(tiny_models, tmp_path):
    """Qwen3-VL adds deepstack features after its first layers: a model so shallow that the last layer is one
    of them needs every position there, so the trick stays off (and scoring still equals the library)."""
    from vlmtune.model.tiny import build_tiny_model

    shallow = load_model(build_tiny_model(tmp_path / "one-layer", arch="qwen3_vl", text_layers=1)).eval()
    with kept_positions(shallow, torch.tensor([[3]])) as used:
        logits = shallow(input_ids=prompt_ids(shallow, rows=1, length=4)).logits
    assert not used and logits.shape[1] == 4
    assert last_positions.fed_by_deepstack(shallow, 1) and not last_positions.fed_by_deepstack(shallow, 2)


def test_a_layer_failing_the_self_check_keeps_the_library_forward(tiny_model_dir, monkeypatch):
    fresh = load_model(tiny_model_dir)
    monkeypatch.setattr(last_positions, "agrees_with_library", lambda lm: False)
    with kept_positions(fresh, torch.tensor([[3]])) as used:
        logits = fresh(input_ids=prompt_ids(fresh, rows=1, length=4)).logits
    assert not used and logits.shape[1] == 4
    assert "forward" not in text_model(fresh).layers[-1].__dict__  # the dispatcher was taken off again


def test_the_self_check_catches_a_wrong_layer(tiny_model_dir, monkeypatch):
    """A last layer that computes something else at the kept positions fails the check."""
    fresh = load_model(tiny_model_dir)
    right = last_positions.last_layer_at
    monkeypatch.setattr(last_positions, "last_layer_at", lambda *a, **k: right(*a, **k) + 0.01)
    with kept_positions(fresh, torch.tensor([[3]])) as used:
        pass
    assert not used


def test_models_it_does_not_know_are_left_alone():
    with kept_positions(torch.nn.Linear(2, 2), torch.tensor([[0]])) as used:
        assert not used


def test_a_deep_copy_runs_its_own_layer(model):
    import copy

    with kept_positions(model, torch.tensor([[0]])):
        pass
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in text_model(twin).layers[-1].mlp.parameters():
            p.add_(0.5)  # the copy's last layer differs from the original's
        ids = prompt_ids(model)
        assert not torch.allclose(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_layer_someone_else_wrapped_is_left_alone(tiny_model_dir):
    """accelerate's device hooks (device_map) put their own forward on layers: it must keep running."""
    fresh = load_model(tiny_model_dir)
    layer = text_model(fresh).layers[-1]
    calls = []
    library_forward = layer.forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return library_forward(*args, **kwargs)

    layer.forward = hooked
    with kept_positions(fresh, torch.tensor([[3]])) as used, torch.no_grad():
        fresh(input_ids=prompt_ids(fresh, rows=1, length=4))
    assert not used and calls and layer.forward is hooked


def test_a_self_check_that_fails_to_run_keeps_the_library_forward(tiny_model_dir, monkeypatch):
    fresh = load_model(tiny_model_dir)

    def broken(*args, **kwargs):
        raise TypeError("scaled_dot_product_attention() got an unexpected keyword argument 'enable_gqa'")

    monkeypatch.setattr(last_positions.F, "scaled_dot_product_attention", broken)
    with kept_positions(fresh, torch.tensor([[3]])) as used:
        pass
    assert not used and "forward" not in text_model(fresh).layers[-1].__dict__
