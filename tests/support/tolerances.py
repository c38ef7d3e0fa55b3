"""The one tolerance table of the tests, and the relative error some of its entries bound."""

from __future__ import annotations

import torch

TOLERANCES = {
    # torch.testing.assert_close's atol/rtol, by what is compared
    "lossless_fp32": dict(atol=1e-5, rtol=1e-5),
    "kernel_fp32": dict(atol=1e-4, rtol=1e-4),
    "kernel_bf16": dict(atol=2e-2, rtol=2e-2),
    # the largest relative_error of a kernel's output to the float64 reference, by the kernel's dtype
    # (the kernel rounds p to 16 bits before p @ v); read through max_relative_error
    "float64_fp32": dict(rel=1e-5),
    "float64_fp16": dict(rel=4e-3),
    "float64_bf16": dict(rel=2e-2),
}

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def max_relative_error(dtype: torch.dtype) -> float:
    """The bound on :func:`relative_error` to the float64 reference of a kernel run in ``dtype``."""
    return TOLERANCES[f"float64_{_DTYPE_NAMES[dtype]}"]["rel"]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` over the whole tensor (``ref`` a float64 tensor on the CPU)."""
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()
