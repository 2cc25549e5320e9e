"""The prompt pass of label scoring, with the last decoder layer computed only where it is read.

Scoring reads two things from the prompt pass (`infer.scoring.label_logprobs`): the KV cache of every
layer, and the output at ONE position per row (the last prompt token: log P(first label token)).
The last layer's keys and values come from its input; its queries, attention, output projection and
MLP at every other position feed nothing. So inside `kept_positions(core, keep)` the last decoder
layer computes keys and values for every position (into the cache, as usual) and the rest only at
the kept positions, returning (batch, kept, hidden) instead of (batch, sequence, hidden).
The arithmetic at the kept positions is the layer's own (same modules, the module's `rotate_half`);
only the attention runs as one masked `scaled_dot_product_attention` for the kept queries. llama.cpp
skips the same rows (its `inp_out_ids`). What it saves is most of one layer of the prompt pass: on
the benchmark's two-layer model ≈ 40 % of the language model's time, on a 28-layer one ≈ 3 %.

Where it applies: a decoder layer of a class it was proven on (`vlmtune.families`: Qwen2-VL,
Qwen2.5-VL, Qwen3-VL dense and MoE; Qwen3's per-head q/k norms included) with full attention, that
Qwen3-VL's deepstack does not feed (the language model adds deepstack features to the hidden states
of its first layers at the image positions, which needs every position), and a right-padded prompt
batch (the caller's promise: every row's keys up to its kept position are real tokens). Anything
else, or a layer that fails the self-check (the same tiny input through the whole text model with
and without it must agree), runs the library's forward untouched and the context says so.
The switch is per thread: prediction scores batches from several threads at once.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from typing import Iterator

import torch
import torch.nn.functional as F

from vlmtune.families import FAMILIES, family_of_model, parts_of

SUPPORTED = tuple(name for family in FAMILIES for name in family.fast_decoder_layers)
_kept = threading.local()  # .positions: (batch, kept) long, or None: the layer runs as usual
_install_lock = threading.Lock()


def text_model(core: torch.nn.Module) -> torch.nn.Module | None:
    """The language model (embeddings, decoder layers, norm) of a model of a known family, else None."""
    return parts_of(core).language_model if family_of_model(core) is not None else None


@contextlib.contextmanager
def kept_positions(core: torch.nn.Module, positions: torch.Tensor) -> Iterator[bool]:
    """While inside, a forward of `core` gives the last layer's output only at `positions` (batch, kept)
    of each row — and so hidden states and logits of shape (batch, kept, …). Yields False (and changes
    nothing) where this model is not supported; the caller then slices the logits itself."""
    lm = text_model(core)
    if lm is None or fed_by_deepstack(core, len(getattr(lm, "layers", ()))) or not install(lm):
        yield False
        return
    _kept.positions = positions
    try:
        yield True
    finally:
        _kept.positions = None


def fed_by_deepstack(core: torch.nn.Module, n_layers: int) -> bool:
    """True when deepstack features reach the last decoder layer's output (Qwen3-VL adds the k-th
    deepstack feature after layer k, for k below the number of deepstack layers)."""
    vision = getattr(getattr(core, "config", None), "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", None) or ()) >= n_layers


def install(lm: torch.nn.Module) -> bool:
    """Put the dispatching forward on the last decoder layer (once); True when it may be used."""
    layer = lm.layers[-1] if len(getattr(lm, "layers", ())) else None
    if layer is None:
        return False
    verdict = layer.__dict__.get("_vlmtune_kept_positions")
    if verdict is not None:
        return verdict
    with _install_lock:
        verdict = layer.__dict__.get("_vlmtune_kept_positions")
        if verdict is None:
            verdict = supported(lm, layer)
            if verdict:
                # A bound method as an instance attribute: the state dict and the class stay as they are,
                # and a deep copy of the model rebinds it to the copied layer.
                layer.forward = types.MethodType(dispatching_forward, layer)
                try:
                    verdict = agrees_with_library(lm)
                except Exception:  # the check failed to run (an older torch without sdpa's enable_gqa,
                    verdict = False  # a changed cache API): the library's forward it is
                if not verdict:
                    del layer.forward
            layer.__dict__["_vlmtune_kept_positions"] = verdict
    return verdict


def dispatching_forward(layer: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    positions = getattr(_kept, "positions", None)
    if positions is not None:
        return last_layer_at(layer, hidden_states, positions, **kwargs)
    return type(layer).forward(layer, hidden_states, *args, **kwargs)


def supported(lm: torch.nn.Module, layer: torch.nn.Module) -> bool:
    config = getattr(lm, "config", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    module = sys.modules.get(type(layer).__module__)
    # A forward someone else put on the layer (accelerate's device hooks with a device_map): theirs runs.
    # ZeRO-3 partitions the weights (gathered module by module): the library's forward, the same on every rank.
    partitioned = any(hasattr(p, "ds_id") for p in layer.parameters())
    return (type(layer).__name__ in SUPPORTED and layer_types[-1] == "full_attention" and not partitioned
            and "forward" not in layer.__dict__
            and callable(getattr(module, "rotate_half", None))
            and all(hasattr(layer, name) for name in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")))


def last_layer_at(layer: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor, *,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor], cache=None, past_key_values=None,
                  **_ignored) -> torch.Tensor:
    """The decoder layer's forward (`Qwen2_5_VLDecoderLayer.forward`, `Qwen3VLTextDecoderLayer.forward`) at
    `positions` only; keys and values of every position go into the cache. The causal mask the model
    passes is not needed: a right-padded row's kept position sees exactly the keys at or before it."""
    cache = cache if cache is not None else past_key_values  # the keyword before transformers 5.24
    attn = layer.self_attn
    module = sys.modules[type(layer).__module__]
    batch, length, _ = hidden.shape
    kept = positions.shape[1]
    rows = positions[..., None]

    def at_kept(t, dim=1):  # (batch, length, …) → (batch, kept, …)
        return torch.take_along_dim(t, rows if dim == 1 else rows[None], dim=dim)

    normed = layer.input_layernorm(hidden)
    head_dim = attn.head_dim
    q_norm, k_norm = (getattr(attn, name, None) or (lambda t: t) for name in ("q_norm", "k_norm"))  # Qwen3's
    key = k_norm(attn.k_proj(normed).view(batch, length, -1, head_dim)).transpose(1, 2)
    value = attn.v_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    query = q_norm(attn.q_proj(at_kept(normed)).view(batch, kept, -1, head_dim)).transpose(1, 2)

    cos, sin = position_embeddings
    if cos.ndim == 4:
        # Before transformers 5.2x Qwen2(.5)-VL's tables are (3, batch, length, dim) and the attention merges
        # the sections itself: the module's own function, once for keys and once for the kept queries.
        section = attn.config.rope_parameters["mrope_section"]

        def rotary(t, cos, sin):
            return module.apply_multimodal_rotary_pos_emb(t, t, cos, sin, section)[0]
        key, query = rotary(key, cos, sin), rotary(query, at_kept(cos, 2), at_kept(sin, 2))
    else:
        def rotary(t, cos, sin):  # the module's apply_rotary_pos_emb for one tensor (keys and queries differ)
            return t * cos.unsqueeze(1) + module.rotate_half(t) * sin.unsqueeze(1)
        key, query = rotary(key, cos, sin), rotary(query, at_kept(cos), at_kept(sin))
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx)
    visible = torch.arange(key.shape[2], device=hidden.device) <= positions[..., None]  # (batch, kept, keys)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible[:, None], scale=attn.scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    out = attn.o_proj(out.transpose(1, 2).reshape(batch, kept, -1))
    hidden = at_kept(hidden) + out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def agrees_with_library(lm: torch.nn.Module) -> bool:
    """The self-check: a tiny random batch through the text model, whole and with two positions kept,
    then one more token from each cache (so the cache the layer left behind is checked too)."""
    from transformers import DynamicCache

    from vlmtune.model.compat import cache_kwarg

    param = next(lm.parameters())
    cache_name = cache_kwarg(lm)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.config.vocab_size, (2, 8), generator=generator).to(param.device)
    prompt, following = ids[:, :7], ids[:, 7:]
    positions = torch.tensor([[3, 6], [5, 6]], device=param.device)
    outputs = []
    with torch.no_grad():
        for keep in (None, positions):
            cache = DynamicCache(config=lm.config)
            _kept.positions = keep
            try:
                hidden = lm(input_ids=prompt, use_cache=True, **{cache_name: cache}).last_hidden_state
            finally:
                _kept.positions = None
            outputs += [hidden, lm(input_ids=following, use_cache=True, **{cache_name: cache}).last_hidden_state]
    whole, whole_next, part, part_next = (t.float() for t in outputs)
    want = torch.take_along_dim(whole, positions[..., None], dim=1)
    tolerance = 1e-4 if param.dtype == torch.float32 else 3e-2
    return (part.shape == want.shape and torch.allclose(part, want, atol=tolerance, rtol=tolerance)
            and torch.allclose(part_next, whole_next, atol=tolerance, rtol=tolerance))
