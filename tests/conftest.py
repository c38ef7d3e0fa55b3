"""Shared fixtures: a tiny random Llama, the embedded model, seeds and tolerances."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, selkv's Triton kernels are tested in Triton's CPU interpreter, which must be
# chosen before anything (transformers does) first imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One tolerance table for every comparison (STYLE: assert_close with tolerances from one table).
TOLERANCES = {
    "lossless_fp32": dict(atol=1e-5, rtol=1e-5),
    "kernel_fp32": dict(atol=1e-4, rtol=1e-4),
    "kernel_bf16": dict(atol=2e-2, rtol=2e-2),
}

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct in float32 on CPU: (model, tokenizer)."""
    import selkv

    return selkv.load_model("smollm2-135m", device="cpu", dtype=torch.float32)


def read_book(chars: int = 20000) -> str:
    path = os.path.join(DATA, "lm", "books", "pg19_test_10146.txt")
    with open(path, encoding="utf-8") as f:
        return f.read()[:chars]
