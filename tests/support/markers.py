"""Which tests run on this machine: skip markers (GPU, the embedded model, optional packages, the shared data),
and the kernel module, which must run (in Triton's interpreter without a GPU) rather than skip."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from selkv.kernels import interpreter_enabled, triton_available

from .data import SHARED_DATA_MISSING


def _embedded_model_missing() -> str | None:
    """Why the embedded model cannot load here (``None``: it can): its package and its converted copy are absent."""
    from selkv.models import EMBEDDED, cache_dir

    package = EMBEDDED["smollm2-135m"][0]
    if importlib.util.find_spec(package) is not None or (cache_dir() / "smollm2-135m" / "config.json").exists():
        return None
    return f"the embedded model needs the {package.replace('_', '-')!r} package (`make setup` installs it)"


def _missing_package(module: str, pip_name: str, extra: str = "peers") -> str | None:
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None or importlib.util.find_spec(module) is None:
        return f"needs the {pip_name!r} package, which this machine lacks (pip install 'selkv[{extra}]')"
    return None


EMBEDDED_MISSING = _embedded_model_missing()
QUANTO_MISSING = _missing_package("optimum.quanto", "optimum-quanto")
ROUGE_MISSING = _missing_package("rouge_score", "rouge-score", extra="eval")

# Marks for tests that load the embedded model ("smollm2-135m"), build an 'hf-quanto' cache, score ROUGE or
# read the shared evaluation sets (a GPU machine has none of them).
needs_embedded_model = pytest.mark.skipif(EMBEDDED_MISSING is not None, reason=EMBEDDED_MISSING or "")
needs_quanto = pytest.mark.skipif(QUANTO_MISSING is not None, reason=QUANTO_MISSING or "")
needs_rouge = pytest.mark.skipif(ROUGE_MISSING is not None, reason=ROUGE_MISSING or "")
needs_shared_data = pytest.mark.skipif(SHARED_DATA_MISSING is not None, reason=SHARED_DATA_MISSING or "")

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# On a GPU machine the compiled kernels are tested instead (Triton is compiled or interpreted per process).
interpreter_only = pytest.mark.skipif(HAS_CUDA, reason="a GPU is present: the compiled kernels are tested instead")


def kernel_module():
    """The kernel module; without a GPU its kernels must run in the interpreter (never skip silently)."""
    assert triton_available(), "triton is not installed: `make setup` installs it (the dev extra)"
    assert HAS_CUDA or interpreter_enabled(), (
        "no GPU and Triton was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1"
    )
    from selkv.kernels import decode_attention

    return decode_attention
