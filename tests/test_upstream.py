"""The transformers adapter (selkv.upstream) answers what the installed transformers really does."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

from selkv import upstream
from selkv.models import forward_with_cache

_TINY = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}


def _falcon(**settings):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(transformers.FalconConfig(**_TINY, **settings)).eval()


@pytest.mark.parametrize(
    "settings",
    [
        {},  # Falcon-7B: multi-query
        {"multi_query": False, "num_kv_heads": 4},
        {"new_decoder_architecture": True, "num_kv_heads": 2},  # Falcon-40B
    ],
    ids=["multi-query", "multi-head", "new-arch"],
)
def test_falcon_kv_heads_are_what_the_installed_falcon_caches(settings):
    model = _falcon(**settings)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        forward_with_cache(model, cache, torch.randint(0, 64, (1, 3)))
    assert cache.layers[0].keys.shape[1] == upstream.falcon_num_key_value_heads(model.config)


def test_falcon_routing_matches_what_its_attention_calls():
    """A Falcon routed through the attention interface calls the registered function; one that is not, does not."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("selkv_upstream_spy", spy)
    model = _falcon()
    try:
        model.set_attn_implementation("selkv_upstream_spy")
    except (ValueError, KeyError):
        pass  # refused outright: not routed
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 3)))
    assert bool(calls) == upstream.routes_through_attention_interface(type(model), model.config)
    assert bool(calls) == upstream.falcon_uses_attention_interface()
    # ALiBi keeps its position bias in the mask, which selkv's decode kernel does not read: never routed.
    assert not upstream.routes_through_attention_interface(type(model), transformers.FalconConfig(alibi=True))
    assert upstream.routes_through_attention_interface(transformers.LlamaForCausalLM)


def test_forward_parameters_are_read_from_the_model():
    model = AutoModelForCausalLM.from_config(transformers.LlamaConfig(**_TINY, intermediate_size=64))
    import inspect

    parameters = inspect.signature(model.forward).parameters
    assert upstream.cache_kwarg(model) in parameters
    assert upstream.accepts_logits_to_keep(model) == ("logits_to_keep" in parameters)
    assert upstream.causal_lm_class_for(model.config) is transformers.LlamaForCausalLM
    assert upstream.causal_lm_class_for(transformers.T5Config()) is None


def test_layer_types_and_kwargs_give_one_entry_per_layer():
    config = transformers.Gemma2Config(
        **_TINY,
        head_dim=8,
        sliding_window=8,
        num_key_value_heads=2,
        intermediate_size=64,
        layer_types=["sliding_attention"],
    )
    layer_types, layer_kwargs = upstream.layer_types_and_kwargs(config)
    assert layer_types == ["sliding_attention"] and len(layer_kwargs) == 1
    assert layer_kwargs[0].get("sliding_window") == 8


def test_attention_implementation_is_the_one_the_model_runs_with():
    """The attention the config records follows set_attn_implementation; selkv's caches decide fused decode from
    it unless told (make_cache(..., fused_decode=...))."""
    import selkv

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**_TINY, intermediate_size=64, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    assert upstream.attention_implementation(model.config) == "sdpa"
    spec = "quant:bits=4,sink=4,window=8,block=4"
    assert not any(layer.fused_decode for layer in selkv.make_cache(spec, model.config).layers)
    model.set_attn_implementation("selkv")
    assert upstream.attention_implementation(model.config) == "selkv"
    assert all(layer.fused_decode for layer in selkv.make_cache(spec, model.config).layers)
    assert not any(layer.fused_decode for layer in selkv.make_cache(spec, model.config, fused_decode=False).layers)
    model.set_attn_implementation("sdpa")
    assert all(layer.fused_decode for layer in selkv.make_cache(spec, model.config, fused_decode=True).layers)
