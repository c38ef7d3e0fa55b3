"""Fixtures and hooks: seeds, a tiny random Llama, the embedded model (plain helpers live in support/)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, selkv's Triton kernels are tested in Triton's CPU interpreter, which must be
# chosen before anything (transformers does) first imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support.markers import EMBEDDED_MISSING  # noqa: E402
from support.models import make_tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct in float32 on CPU: (model, tokenizer)."""
    import selkv

    if EMBEDDED_MISSING:
        pytest.skip(EMBEDDED_MISSING)
    return selkv.load_model("smollm2-135m", device="cpu", dtype=torch.float32)
