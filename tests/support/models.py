"""Tiny random Llama configs and models (transformers is imported only when one is built)."""

from __future__ import annotations

import torch


def tiny_llama_config(num_key_value_heads: int = 2, num_attention_heads: int = 4, head_dim: int = 32, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=num_attention_heads * head_dim,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def make_tiny_llama(attn_implementation: str = "sdpa", **shape):
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    config = tiny_llama_config(**shape)
    model = LlamaForCausalLM(config).eval()
    if attn_implementation != "sdpa":
        model.set_attn_implementation(attn_implementation)
    # Random weights give near-uniform logits; sharpen them so greedy choices are stable.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model
