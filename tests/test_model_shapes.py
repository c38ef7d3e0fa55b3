"""Caches fitted to a model's shape: hybrid sliding-window layers, KV heads, default groups, bounds."""

from __future__ import annotations

import pytest
import torch
from support.markers import needs_quanto
from support.models import tiny_llama_config
from transformers import DynamicCache

import selkv
from selkv import SpecError
from selkv.layers import QuantizedSinkWindowLayer
from selkv.middle import MiddleLayout
from selkv.sizing import cache_size, size_table

# A window longer than every sequence here: nothing leaves it, so these caches equal `full`.
LOSSLESS = ["quant:bits=8,sink=4,window=4096", "drop:sink=4,window=4096"]


def hybrid_config(layer_types=("sliding_attention", "full_attention", "sliding_attention"), sliding_window=8):
    config = tiny_llama_config(layers=len(layer_types))
    config.layer_types = list(layer_types)
    config.sliding_window = sliding_window
    return config


def fill(cache, config, tokens=30, chunk=7, batch_size=1):
    """Feed the same random bfloat16 states to every layer; returns each layer's last returned keys."""
    shape = selkv.model_shape(config)
    torch.manual_seed(0)
    states = torch.randn(batch_size, shape["num_key_value_heads"], tokens, shape["head_dim"], dtype=torch.bfloat16)
    returned = []
    for start in range(0, tokens, chunk):
        returned = [
            cache.update(states[:, :, start : start + chunk], states[:, :, start : start + chunk], i)[0]
            for i in range(config.num_hidden_layers)
        ]
    return returned


@pytest.mark.parametrize("spec", ["full", pytest.param("hf-quanto:bits=4,residual=8", marks=needs_quanto), *LOSSLESS])
def test_sliding_layers_keep_transformers_layer_and_full_layers_get_the_spec(spec):
    config = hybrid_config()
    cache = selkv.make_cache(spec, config)
    assert cache.is_sliding == DynamicCache(config=config).is_sliding == [True, False, True]
    assert [layer.sliding_window for layer in cache.layers[::2]] == [8, 8]
    fill(cache, config)
    assert cache.get_seq_length() == 30


@pytest.mark.parametrize("spec", LOSSLESS)
def test_lossless_spec_on_a_hybrid_model_returns_and_counts_what_full_does(spec):
    config = hybrid_config()
    full, cache = DynamicCache(config=config), selkv.make_cache(spec, config)
    for expected, got in zip(fill(full, config), fill(cache, config), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    counted, reference = selkv.kv_bytes(cache), selkv.kv_bytes(full)
    assert counted["total"] == reference["total"] == reference["full16"]
    assert counted["compression_filled"] == reference["compression"] == 1.0  # selkv's buffers keep spare pages
    # Sliding layers hold their window only, in both caches: 7 tokens there, 30 in the full-attention layer.
    assert reference["total"] == (7 + 30 + 7) * 2 * 32 * 2 * 2  # KV heads * head_dim * (K, V) * bfloat16


def test_kv_bytes_of_a_hybrid_cache_count_both_kinds_of_layer():
    config = hybrid_config()
    cache = selkv.make_cache("quant:bits=4,sink=4,window=8,block=4", config)
    fill(cache, config, tokens=60)
    sliding = 7 * 2 * 32 * 2 * 2  # the last sliding_window - 1 tokens, 16-bit keys and values
    selective = cache.layers[1].nbytes()
    counted = selkv.kv_bytes(cache)
    assert counted["bytes_16bit"] == 2 * sliding + selective["bytes_16bit"]
    assert counted["bytes_codes"] == selective["bytes_codes"] > 0
    assert counted["full16"] == 2 * sliding + 60 * 2 * 32 * 2 * 2


def test_sizing_fills_one_layer_of_each_kind():
    config = hybrid_config(("sliding_attention", "full_attention", "sliding_attention", "full_attention"))
    estimated = cache_size("quant:bits=4,window=20", config, 300, chunk=7)
    cache = selkv.make_cache("quant:bits=4,window=20", config)
    for start in range(0, 300, 7):
        count = min(7, 300 - start)
        for layer_idx in range(4):
            states = torch.randn(1, 2, count, 32, dtype=torch.bfloat16)
            cache.update(states, states.clone(), layer_idx)
    assert selkv.kv_bytes(cache) == estimated
    table = size_table(["quant:bits=4"], config, 64)
    assert "2 full-attention; 2 sliding-window of 8 tokens" in table


def test_sliding_window_value_on_full_attention_layers_is_accepted():
    # Qwen2-style: a `sliding_window` in the config, but every layer is full attention.
    config = hybrid_config(("full_attention", "full_attention"), sliding_window=4096)
    cache = selkv.make_cache("quant:bits=8", config)
    assert cache.is_sliding == [False, False]
    assert all(isinstance(layer, QuantizedSinkWindowLayer) for layer in cache.layers)


def test_config_without_layer_types_slides_as_transformers_reads_it():
    # Mistral-7B-v0.1-style: one `sliding_window` and no `layer_types`: every layer slides.
    config = tiny_llama_config()
    config.sliding_window = 8
    cache = selkv.make_cache("quant:bits=8", config)
    assert cache.is_sliding == DynamicCache(config=config).is_sliding


def test_unsupported_layer_types_are_refused_clearly():
    config = hybrid_config(("linear_attention", "full_attention"))
    with pytest.raises(
        SpecError, match="full-attention and sliding-window layers; this model also has linear_attention"
    ):
        selkv.make_cache("quant:bits=8", config)


@pytest.mark.parametrize(
    ("head_dim", "groups"),
    [
        (96, {8: 32, 4: 32, 2: 32}),
        (80, {8: 16, 4: 16, 2: 16}),
        (64, {8: 64, 4: 32, 2: 64}),
        (16, {8: 16, 4: 16, 2: 16}),
    ],
)
def test_default_group_divides_head_dim(head_dim, groups):
    for nbits, group in groups.items():
        assert selkv.parse_spec(f"quant:bits={nbits}").check_model(head_dim).group == group
    assert selkv.parse_spec("hf-quanto:bits=4").check_model(head_dim).group == min(groups[8], 64)


@pytest.mark.parametrize(
    "spec",
    ["quant:bits=8", "quant:bits=4", "quant:bits=2", pytest.param("hf-quanto:bits=2,residual=8", marks=needs_quanto)],
)
def test_default_specs_run_on_head_dim_80_and_96(spec):
    for head_dim in (80, 96):
        config = tiny_llama_config(head_dim=head_dim)
        cache = selkv.make_cache(spec, config)
        fill(cache, config, tokens=200, chunk=64)
        assert cache.get_seq_length() == 200


def test_explicit_group_that_does_not_divide_head_dim_is_refused():
    with pytest.raises(SpecError, match=r"group=64 must divide the model's head_dim \(96\)"):
        selkv.make_cache("quant:bits=4,group=64", tiny_llama_config(head_dim=96))


def test_size_table_names_the_group_each_spec_gets():
    table = size_table(["quant:bits=4", "full"], tiny_llama_config(head_dim=80), 64)
    assert "| `quant:bits=4` | 16 |" in table and "| `full` | – |" in table
    assert "head_dim 80" in table


def test_long_sink_and_window_are_not_preallocated():
    layer = QuantizedSinkWindowLayer(100_000, 100_000, MiddleLayout(8, 8, 32))
    layer.update(torch.randn(1, 3, 10, 64), torch.randn(1, 3, 10, 64))
    assert layer.nbytes()["allocated"] <= 2 * 2 * 256 * 3 * 64 * 4  # sink and window: 256 positions each


@pytest.mark.parametrize(("sink", "window"), [(300, 100_000), (0, 100_000), (1000, 100_000)])
def test_grown_sink_and_window_return_every_token_exactly(sink, window):
    layer = QuantizedSinkWindowLayer(sink, window, MiddleLayout(8, 8, 16, block_length=8))
    states = torch.randn(1, 2, 900, 16)
    for start, step in zip(range(0, 900, 90), [90] * 10, strict=True):  # chunks, then room for one-token steps
        keys, _ = layer.update(states[:, :, start : start + step], -states[:, :, start : start + step])
    torch.testing.assert_close(keys, states, rtol=0, atol=0)
    for _ in range(100):  # one token at a time: the buffers keep growing
        token = torch.randn(1, 2, 1, 16)
        states = torch.cat([states, token], dim=-2)
        keys, _ = layer.update(token, -token)
    torch.testing.assert_close(keys, states, rtol=0, atol=0)


@pytest.mark.parametrize("config", [None, {"num_hidden_layers": 2}, "smollm2-135m"])
def test_a_missing_config_is_a_clear_error(config):
    with pytest.raises(TypeError, match="needs the model's config"):
        selkv.make_cache("quant:bits=4", config)


def test_a_long_window_grows_in_proportional_pages():
    """A long window is not regrown (and copied) every few steps: its pages grow with it (about 1/32 of its
    tokens), so filling 3,000 tokens takes about a hundred regrowths, and the spare room stays bounded."""
    layer = QuantizedSinkWindowLayer(0, 4000, MiddleLayout(8, 8, 16, block_length=8))
    capacities = set()
    for _ in range(3000):
        layer.update(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16))
        capacities.add(layer.recent_keys.shape[-2])
    assert len(capacities) < 150
    assert layer.recent_keys.shape[-2] - layer.num_recent <= 3000 // 32
