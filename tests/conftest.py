"""Shared fixtures: a tiny random Llama, the embedded model, seeds and tolerances."""

from __future__ import annotations

import importlib.util
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


def _embedded_model_missing() -> str | None:
    """Why the embedded model cannot load here (``None``: it can): its package and its converted copy are absent."""
    from selkv.models import EMBEDDED, cache_dir

    package = EMBEDDED["smollm2-135m"][0]
    if importlib.util.find_spec(package) is not None or (cache_dir() / "smollm2-135m" / "config.json").exists():
        return None
    return f"the embedded model needs the {package.replace('_', '-')!r} package (`make setup` installs it)"


def _missing_package(module: str, pip_name: str) -> str | None:
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None or importlib.util.find_spec(module) is None:
        return f"needs the {pip_name!r} package (pip install 'selkv[peers]')"
    return None


EMBEDDED_MISSING = _embedded_model_missing()
QUANTO_MISSING = _missing_package("optimum.quanto", "optimum-quanto")
# Marks for tests that load the embedded model ("smollm2-135m") or build an 'hf-quanto' cache.
needs_embedded_model = pytest.mark.skipif(EMBEDDED_MISSING is not None, reason=EMBEDDED_MISSING or "")
needs_quanto = pytest.mark.skipif(QUANTO_MISSING is not None, reason=QUANTO_MISSING or "")


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct in float32 on CPU: (model, tokenizer)."""
    import selkv

    if EMBEDDED_MISSING:
        pytest.skip(EMBEDDED_MISSING)
    return selkv.load_model("smollm2-135m", device="cpu", dtype=torch.float32)


def read_book(chars: int = 20000) -> str:
    path = os.path.join(DATA, "lm", "books", "pg19_test_10146.txt")
    with open(path, encoding="utf-8") as f:
        return f.read()[:chars]
