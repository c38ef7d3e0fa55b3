"""The model and the caches of the end-to-end benchmarks (``decode_e2e.py``, ``profile_e2e.py``).

A Llama-3-8B-shaped model with random weights (``build_model``), caches filled directly with random data
(a 32k prefill at batch 8 measures nothing about decode): the full ``DynamicCache`` / ``StaticCache``
(``fill_full``, ``fill_static``, ``rewind``), selkv's dynamic cache (``fill_selective``) and its static
cache (``static_selkv``, ``fill_static_selective``), and the decode steps both scripts time or profile:
``decode_step`` (eager, as ``generate()`` calls the model), ``compile_step`` (``torch.compile``) and
``captured_selkv`` (``selkv.compile_decode_step``).
"""

from __future__ import annotations

import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import selkv  # noqa: E402,F401  (registers attn_implementation="selkv")
from selkv import make_cache  # noqa: E402
from selkv.models import cache_kwarg  # noqa: E402
from selkv.testing import fill_layer  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
)
TINY = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    vocab_size=512,
    max_position_embeddings=4096,
)
SPECS = {bits: f"quant:bits={bits},sink=4,window=124" for bits in (8, 4, 3, 2)}
GIB = 2**30


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _kv_shape(config) -> tuple[int, int]:
    return config.num_key_value_heads, config.hidden_size // config.num_attention_heads


def full_kv_bytes(config, batch: int, tokens: int, element_size: int = 2) -> int:
    """Bytes of 16-bit keys + values for ``tokens`` positions of every layer."""
    heads, head_dim = _kv_shape(config)
    return 2 * batch * tokens * config.num_hidden_layers * heads * head_dim * element_size


def fill_full(cache, config, batch: int, context: int, device, dtype) -> None:
    heads, head_dim = _kv_shape(config)
    for layer_idx in range(config.num_hidden_layers):
        keys = torch.randn(batch, heads, context, head_dim, device=device, dtype=dtype)
        cache.update(keys, torch.randn_like(keys), layer_idx)


def fill_static(cache, config, batch: int, context: int, device, dtype) -> None:
    """Allocate a ``StaticCache`` (one-token update per layer) and write random keys/values for ``context`` positions.

    Written in place, so that filling needs no memory beyond the cache (the max-batch probe runs close to the limit).
    """
    heads, head_dim = _kv_shape(config)
    first = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
    for layer_idx in range(config.num_hidden_layers):
        cache.update(first, first, layer_idx, cache_kwargs={"cache_position": torch.arange(1, device=device)})
    for layer in cache.layers:
        layer.keys[:, :, :context].normal_()
        layer.values[:, :, :context].normal_()
    rewind(cache, context)


def rewind(cache, length: int) -> None:
    """Set a full cache back to ``length`` positions (transformers' static layers count them in a device tensor)."""
    from transformers import DynamicCache

    if isinstance(cache, DynamicCache):
        extra = cache.get_seq_length() - length
        if extra > 0:
            cache.crop(-extra)  # a negative count removes tokens in every transformers 5 release
        return
    for layer in cache.layers:
        counted = getattr(layer, "cumulative_length", None)
        if isinstance(counted, torch.Tensor):
            counted.fill_(length)
        elif counted is not None:
            layer.cumulative_length = length


def fill_selective(cache, config, batch: int, context: int, device, dtype, room: int = 256) -> None:
    """Write random sink, middle (codes + scales) and window into every layer's storage (``selkv.testing``).

    The middle gets spare capacity for ``room`` more tokens, so that the timed steps' evictions
    append without the store growing.
    """
    heads, head_dim = _kv_shape(config)
    for layer in cache.layers:
        fill_layer(layer, batch, heads, head_dim, context, device, dtype, room=room)


class Unavailable(Exception):
    """A row that cannot run on this machine or with this selkv; the message says why."""


def _takes_cache_position(model) -> bool:
    """transformers before 5.24 takes positions as ``cache_position``; 5.24 reads them from the cache."""
    return "cache_position" in inspect.signature(model.forward).parameters


def decode_step(model, positions: bool = False):
    """``step(tokens [batch, 1], cache, position [1]) -> logits [batch, vocab]`` through ``model(...)``.

    With ``positions`` the position goes in as ``cache_position`` where the model takes one (a rewound
    ``StaticCache`` must not count its positions from its contents); else the call is the one
    ``generate()`` makes, and the model reads positions from the cache.
    """
    with_position = positions and _takes_cache_position(model)
    name = cache_kwarg(model)  # looked up here: inside a compiled step the lookup's side effect forces a recompile

    def step(tokens, cache, position):
        extra = {"cache_position": position} if with_position else {}
        return model(input_ids=tokens, use_cache=True, logits_to_keep=1, **{name: cache}, **extra).logits[:, -1]

    return step


def fill_static_selective(cache, config, batch: int, context: int, device, dtype) -> None:
    """Write random sink, middle and window into a static selkv cache's storage; set its device lengths to ``context``.

    The middle rows past ``num_stored`` and the ring slots past the window are never read, so only the lengths
    say how many tokens the cache holds.
    """
    heads, head_dim = _kv_shape(config)
    for layer in cache.layers:
        fill_layer(layer, batch, heads, head_dim, context, device, dtype)


def static_selkv(model, spec: str, batch: int, context: int, room: int, device, dtype):
    """selkv's static cache (``make_cache(..., max_cache_len=N)``) filled to ``context``, ``room`` tokens
    to spare, with the model's attention set to the fused kernel."""
    model.set_attn_implementation("selkv")
    cache = make_cache(spec, model.config, max_cache_len=context + room)
    fill_static_selective(cache, model.config, batch, context, device, dtype)
    return cache


def captured_selkv(
    model, spec: str, batch: int, context: int, room: int, device, dtype, graphs: bool = True, plan_commits: bool = True
):
    """selkv's static cache filled to ``context`` + its captured decode step + how to rewind it.

    Returns ``(cache, step(tokens, cache, position), rewind())``; ``rewind`` puts the device lengths back
    to ``context`` (rows written past them are never read). With ``static_selkv``, the one place that
    knows the static cache's API (``selkv.compile_decode_step``, the layers' device lengths).
    ``graphs=False`` compiles without CUDA graphs; ``plan_commits=False`` quantizes the window's oldest block
    at every step (``selkv.compile_decode_step``'s unplanned variant).
    """
    cache = static_selkv(model, spec, batch, context, room, device, dtype)
    mode = "reduce-overhead" if device == "cuda" and graphs else None
    compiled = selkv.compile_decode_step(model, mode=mode, plan_commits=plan_commits)
    return cache, lambda tokens, cache, position: compiled(tokens, cache), rewinder(cache, context)


def rewinder(cache, context: int):
    """``rewind()`` that sets ``cache`` back to its state at ``context`` tokens: transformers' static layers
    by their position counter (``rewind``), selkv's static layers by the device lengths they hold now
    (rows written past them are never read)."""
    if not all(isinstance(getattr(layer, "lengths", None), torch.Tensor) for layer in cache.layers):
        return lambda: rewind(cache, context)
    start = [(layer.lengths.tolist(), int(layer.cumulative_length)) for layer in cache.layers]

    def rewind_lengths() -> None:
        for layer, (lengths, seen) in zip(cache.layers, start, strict=True):
            layer.set_lengths(*lengths, seen)

    return rewind_lengths


def compile_step(model, mode: str | None, dynamic: bool | None):
    """``decode_step(model)`` under ``torch.compile`` (no ``fullgraph``: flex's mask builder breaks the graph)."""
    options = dict(mode=mode) if mode else {}
    return torch.compile(decode_step(model, positions=True), dynamic=dynamic, **options)


def graph_breaks() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])
