"""selkv caches on tiny random models of the architectures transformers users run most.

Each architecture is accepted (its cache shape read right, a lossless spec generating exactly
what ``full`` does, unpadded and left-padded, with the model's own attention and with
``attn_implementation="selkv"``, int8 logits close to ``full``) or refused with one clear error.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

import selkv
from selkv import SpecError
from selkv.models import cache_kwarg, forward_with_cache
from selkv.sizing import cache_size
from selkv.upstream import falcon_uses_attention_interface

# Every config: 2 layers, 4 attention heads, a 256-token vocabulary.
_COMMON = {
    "vocab_size": 256,
    "num_hidden_layers": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "max_position_embeddings": 512,
}


def _llama_like(name: str, **settings):
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    return lambda: getattr(transformers, name)(**_COMMON, **{**shape, **settings})


def _other(name: str, **settings):
    return lambda: getattr(transformers, name)(**_COMMON, **settings)


_SLIDING = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
ARCHITECTURES = {
    "llama": _llama_like("LlamaConfig"),
    "qwen2": _llama_like("Qwen2Config"),
    # Qwen2 with sliding layers above max_window_layers.
    "qwen2-sliding": _llama_like("Qwen2Config", use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": _llama_like("Qwen3Config", head_dim=16),
    # Mistral-7B-v0.1: one window for every layer, so every layer slides.
    "mistral": _llama_like("MistralConfig", sliding_window=8),
    "mistral-no-window": _llama_like("MistralConfig", sliding_window=None),
    # Phi-3-mini's head_dim, 96, which the per-bit default groups (64, 32) do not all divide.
    "phi3": _llama_like("Phi3Config", hidden_size=384, num_key_value_heads=4),
    "gemma": _llama_like("GemmaConfig", head_dim=16),
    "gemma2": _llama_like("Gemma2Config", head_dim=16, **_SLIDING),
    "gemma3": _llama_like("Gemma3TextConfig", head_dim=16, **_SLIDING),
    "gpt-neox": _other("GPTNeoXConfig", hidden_size=64, intermediate_size=128, num_attention_heads=4),
    "opt": _other("OPTConfig", hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64),
    # Falcon-7B: multi-query attention caches one KV head.
    "falcon": _other("FalconConfig", hidden_size=64, num_attention_heads=4),
    # Falcon-40B: 2 KV groups (broadcast to every head before the cache up to transformers 5.24).
    "falcon-new-arch": _other(
        "FalconConfig", hidden_size=64, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True
    ),
    "olmo2": _llama_like("Olmo2Config"),
    "granite": _llama_like("GraniteConfig"),
    "smollm3": _llama_like("SmolLM3Config"),
    "cohere": _llama_like("CohereConfig"),
    # StableLM-3B's head_dim, 80 (as Phi-2's and Pythia-2.8B's).
    "stablelm": _llama_like("StableLmConfig", hidden_size=320, num_key_value_heads=4),
    "qwen2-moe": _llama_like(
        "Qwen2MoeConfig",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    ),
}

# Refused: layers selkv has no cache for (linear attention). `full` still works there.
REFUSED = {
    "qwen3-next": (
        _llama_like(
            "Qwen3NextConfig",
            head_dim=16,
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            layer_types=["linear_attention", "full_attention"],
        ),
        "this model also has linear_attention layers",
    ),
}

# How `attn_implementation="selkv"` ends up on each architecture (default: it is used).
# Falcon calls transformers' attention interface from 5.25; before, transformers keeps its sdpa (with a warning).
_FALCON = "used" if falcon_uses_attention_interface() else "kept sdpa"
SELKV_ATTENTION = {
    "falcon": _FALCON,
    "falcon-new-arch": _FALCON,
    # Gemma 2 softcaps attention logits, which selkv's attention (like sdpa) does not do: refused.
    "gemma2": "refused",
}

# Lossless: nothing leaves the window.
LOSSLESS = "quant:bits=8,sink=4,window=4096"
# Lossy: tokens 4.. leave a window of 8 in blocks of 4 and are stored as int8 (default group).
INT8 = "quant:bits=8,sink=4,window=8,block=4"


def make_model(name: str, attn: str = "default"):
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[name]()).eval()
    if attn == "selkv":
        model.set_attn_implementation("selkv")
    # Random weights give near-uniform logits; sharpen them so that greedy choices are stable.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def greedy(model, input_ids, attention_mask, spec, max_new_tokens=6):
    cache = selkv.make_cache(spec, model.config)
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            **{cache_kwarg(model): cache},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, input_ids.shape[1] :]


def left_padded(lengths):
    """Random rows of ``lengths`` tokens, left-padded: ``(input_ids, attention_mask)`` ``[len(lengths), max]``."""
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(3, 256, (length,))
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_cache_shape_is_what_the_model_caches(name):
    model = make_model(name)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        forward_with_cache(model, cache, torch.randint(3, 256, (1, 5)))
    shape = selkv.model_shape(model.config)
    for layer in cache.layers:
        assert layer.keys.shape[1:] == (shape["num_key_value_heads"], 5, shape["head_dim"])
    assert cache.is_sliding == [layer_type != "full_attention" for layer_type in shape["layer_types"]]
    # `selkv size` counts what the cache holds (float32 here: 4 bytes per element).
    assert cache_size("full", model.config, 5, dtype=torch.float32)["total"] == selkv.kv_bytes(cache)["total"]


def prompt(padded: bool):
    """``(input_ids, attention_mask)``: one row of 10 tokens, or rows of 10 and 5 tokens left-padded."""
    torch.manual_seed(99)
    return left_padded([10, 5]) if padded else (torch.randint(3, 256, (1, 10)), None)


@functools.cache
def full_tokens(name: str, padded: bool) -> torch.Tensor:
    """What ``full`` generates with the model's own attention (selkv's attention runs sdpa on a ``full`` cache)."""
    return greedy(make_model(name), *prompt(padded), "full")


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("attn", ["default", "selkv"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_lossless_spec_generates_what_full_does(name, attn, padded):
    model = make_model(name, attn)
    if attn == "selkv" and SELKV_ATTENTION.get(name) == "refused":
        with pytest.raises(ValueError, match="does not apply attention-logit softcapping"):
            greedy(model, *prompt(padded), LOSSLESS)
        return
    if attn == "selkv":
        expected = "sdpa" if SELKV_ATTENTION.get(name) == "kept sdpa" else "selkv"
        assert model.config._attn_implementation == expected
    assert torch.equal(greedy(model, *prompt(padded), LOSSLESS), full_tokens(name, padded))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_int8_teacher_forced_logits_are_close_to_full(name):
    model = make_model(name)
    input_ids = torch.randint(3, 256, (1, 40))

    def logits(spec):
        cache = selkv.make_cache(spec, model.config)
        with torch.no_grad():  # chunks of 8, then one token at a time: every chunk reads the compressed cache
            steps = [forward_with_cache(model, cache, input_ids[:, i : i + 8]).logits for i in range(0, 32, 8)]
            steps += [forward_with_cache(model, cache, input_ids[:, i : i + 1]).logits for i in range(32, 40)]
        return torch.cat(steps, dim=1), cache

    reference, _ = logits("full")
    got, cache = logits(INT8)
    if "full_attention" not in selkv.model_shape(model.config)["layer_types"]:
        # Every layer slides (Mistral-7B-v0.1): transformers' sliding layers everywhere, nothing quantized.
        assert selkv.kv_bytes(cache)["bytes_codes"] == 0 and torch.equal(got, reference)
        return
    assert selkv.kv_bytes(cache)["bytes_codes"] > 0  # the middle really is int8
    error = (got - reference).norm() / reference.norm()
    assert error < 1e-2, float(error)  # measured 1e-5 to 2.5e-3


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_layers_are_refused_clearly(name):
    make_config, message = REFUSED[name]
    config = make_config()
    for spec in ("quant:bits=4", "drop:sink=4,window=8", "hf-quanto:bits=4"):
        with pytest.raises(SpecError, match=message):
            selkv.make_cache(spec, config)
    assert isinstance(selkv.make_cache("full", config), DynamicCache)
