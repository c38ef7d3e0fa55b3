"""Memory really held: the storage of every tensor a cache holds, against a 16-bit full cache.

The bytes are measured by walking the cache's objects and summing each tensor's storage
(``untyped_storage().nbytes()``, once per storage), not from the cache's own accounting, so
spare capacity, oversized buffers and views of larger tensors all count.

To keep 30 layers x 4,096 tokens fast on CPU, assembling what one ``update`` returns (dequantizing the
middle and concatenating it with the sink and window: tensors attention reads and the cache does not
keep) is skipped: what is stored, and so what is held, does not depend on it.
"""

from __future__ import annotations

import types

import pytest
import torch
from transformers import LlamaConfig

import selkv
from selkv.layers import SelectiveLayer

# SmolLM2-135M's cache shape (the embedded model): 30 layers, 3 KV heads, head_dim 64.
EMBEDDED_SHAPE = {
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64,
}
TOKENS = 4096


@pytest.fixture
def no_assembly(monkeypatch):
    monkeypatch.setattr(SelectiveLayer, "_assemble", lambda layer, num_read_back, keys, values: (keys, values))


def held_bytes(root) -> int:
    """Bytes of every tensor storage reachable from ``root`` (objects, dicts, lists), each storage once."""
    storages: dict[int, int] = {}
    visited: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            continue
        if id(obj) in visited or isinstance(obj, (type, types.ModuleType, types.FunctionType, str, bytes)):
            continue
        visited.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return sum(storages.values())


def fill(cache, config, tokens: int, chunk: int, dtype=torch.bfloat16):
    """Feed ``tokens`` random key/value states through every layer, ``chunk`` tokens per update."""
    for start in range(0, tokens, chunk):
        count = min(chunk, tokens - start)
        for layer_idx in range(config.num_hidden_layers):
            shape = (1, config.num_key_value_heads, count, config.head_dim)
            cache.update(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), layer_idx)
    return cache


def full16_bytes(config, tokens: int) -> int:
    return config.num_hidden_layers * config.num_key_value_heads * tokens * config.head_dim * 2 * 2


def test_held_bytes_counts_whole_storages_once():
    base = torch.zeros(100, dtype=torch.float16)
    holder = types.SimpleNamespace(a=base[:10], b=base[50:], c={"d": [torch.zeros(3, dtype=torch.uint8)]})
    assert held_bytes(holder) == 200 + 3


@pytest.mark.parametrize("chunk", [512, 64])
@pytest.mark.parametrize(("spec", "target"), [
    ("quant:bits=8,sink=4,window=124", 1.8),
    ("quant:bits=4,sink=4,window=124", 3.1),
    ("quant:bits=2,sink=4,window=124", 5.0),
])
def test_memory_held_meets_the_targets(spec, target, chunk, no_assembly):
    config = LlamaConfig(**EMBEDDED_SHAPE)
    cache = fill(selkv.make_cache(spec, config), config, TOKENS, chunk)
    held = held_bytes(cache)
    ratio = full16_bytes(config, TOKENS) / held
    assert ratio >= target, f"{spec}, chunks of {chunk}: {held / 2**20:.2f} MiB held, {ratio:.3f}x < {target}x"
    # the cache's own figure of what it holds agrees with the storage really held
    assert selkv.kv_bytes(cache)["allocated"] == held


@pytest.mark.parametrize("chunk", [512, 1])
def test_a_long_chunk_leaves_no_oversized_window_behind(chunk):
    config = LlamaConfig(**{**EMBEDDED_SHAPE, "num_hidden_layers": 1})
    cache = fill(selkv.make_cache("drop:sink=4,window=124", config), config, 2048, chunk)
    layer = cache.layers[0]
    per_token = config.num_key_value_heads * config.head_dim * 2 * 2
    # sink + the tokens the window holds, plus less than one block of spare room
    assert held_bytes(cache) < (layer.num_sink + layer.num_recent + layer.block_length) * per_token
