"""Fused decode attention vs its PyTorch twin vs a float64 reference.

The Triton kernels run on CUDA when there is a GPU, and in Triton's CPU interpreter
(small shapes) everywhere, so CI without a GPU still tests their logic. Inputs are fresh
random numbers on every run (the seed is in each failure message); outputs are poisoned first.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from support.markers import cuda_only, interpreter_only, kernel_module
from support.models import tiny_llama_config
from support.references import float64_reference
from support.storages import SMALL, fresh_seed, make_storage, with_device_lengths
from support.tolerances import TOLERANCES, max_relative_error, relative_error

from selkv.kernels import reference
from selkv.middle import MiddleTensors
from selkv.storage import take_published


def check_case(module, device: str, dtype: torch.dtype, seed: int, config=None, device_lengths=False, **shape) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_heads = shape.pop("num_heads")
    storage = make_storage(gen, dtype=dtype, device=device, **shape)
    query = torch.randn(shape["batch_size"], num_heads, 1, shape["head_dim"], generator=gen).to(dtype).to(device)
    scaling = shape["head_dim"] ** -0.5
    ref64 = float64_reference(query, storage, scaling)
    if device_lengths:
        storage = with_device_lengths(storage, gen)
    twin = reference.selective_decode_attention(query, storage, scaling=scaling)
    where = f"seed={seed} dtype={dtype} shape={shape} num_heads={num_heads} device_lengths={device_lengths}"
    assert relative_error(twin, ref64) < max_relative_error(dtype) / 4, f"twin vs float64: {where}"

    poison = torch.full(
        (shape["batch_size"], 1, num_heads, shape["head_dim"]), float("nan"), dtype=dtype, device=device
    )
    launcher = module.selective_decode_attention
    real_empty = torch.empty

    def poisoned_empty(*size, **kwargs):  # every buffer the launcher allocates starts as NaN
        t = real_empty(*size, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    module.torch.empty = poisoned_empty
    try:
        out = launcher(query, storage, scaling=scaling, config=config)
    finally:
        module.torch.empty = real_empty
    assert out.shape == poison.shape and out.dtype == dtype, where
    assert torch.isfinite(out).all(), f"non-finite output (unwritten or poisoned storage read): {where}"
    err = relative_error(out, ref64)
    assert err < max_relative_error(dtype), f"kernel vs float64 rel. error {err:.2e}: {where}"
    tol = TOLERANCES["kernel_fp32" if dtype == torch.float32 else "kernel_bf16"]
    torch.testing.assert_close(out.float().cpu(), twin.float().cpu(), **tol, msg=lambda m: f"{where}\n{m}")


INTERPRETER_CASES = [
    # (nbits, axis_key, group ratio, num_sink, num_stored, num_recent, padding, (block_n, num_splits))
    (8, "token", 1, 4, 48, 21, None, None),
    (4, "token", 3, 4, 16, 1, None, None),
    (4, "channel", 4, 2, 80, 17, None, (16, 3)),  # splits of 32 tokens: the last one partly filled
    (2, "channel", 8, 4, 32, 16, None, (32, 0)),
    (2, "token", 1, 0, 0, 1, None, None),  # the first decode step: nothing quantized yet, no sink
    (8, "channel", 4, 7, 16, 33, [0, 5], None),  # row 1 left-padded: positions < 5 masked
    (4, "token", 2, 5, 144, 16, [3, 0], (16, 4)),  # several splits; 144 = block boundary + 1 tile
    (8, "token", 4, 4, 16, 32, [4, 1], (16, 0)),  # a row whose whole sink is padding
    (3, "channel", 4, 4, 80, 17, [0, 6], (16, 3)),  # 3-bit: a low 2-bit plane plus a high-bit plane
    (3, "token", 2, 2, 48, 5, None, None),
]


@interpreter_only
@pytest.mark.parametrize("device_lengths", [False, True])
@pytest.mark.parametrize("nbits,axis_key,ratio,num_sink,num_stored,num_recent,padding,launch", INTERPRETER_CASES)
def test_interpreter_matches_references(
    nbits, axis_key, ratio, num_sink, num_stored, num_recent, padding, launch, device_lengths
):
    """Host lengths (dynamic caches) and device lengths with a ring window and spare capacity (static caches)."""
    module = kernel_module()
    config = None if launch is None else module.DecodeConfig(block_n=launch[0], block_exact=16, num_splits=launch[1])
    # 2-bit planes (3-bit codes' low planes) of a 32-channel head are 8 channels wide, under the kernel's
    # 16-channel chunks
    head_dim = 64 if nbits in (2, 3) else SMALL["head_dim"]
    shape = dict(
        SMALL,
        head_dim=head_dim,
        num_heads=SMALL["num_kv_heads"] * ratio,
        num_sink=num_sink,
        num_stored=num_stored,
        num_recent=num_recent,
        nbits=nbits,
        axis_key=axis_key,
        row_padding=padding,
    )
    check_case(module, "cpu", torch.float16, fresh_seed(), config=config, device_lengths=device_lengths, **shape)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("axis_key", ["token", "channel"])
@pytest.mark.parametrize("key_nbits,value_nbits", [(4, 2), (8, 4), (2, 4), (3, 2), (4, 3)])
def test_interpreter_keys_and_values_of_their_own_bit_widths(key_nbits, value_nbits, axis_key, dtype):
    """Key and value codes of different widths (``quant:kbits=K,vbits=V``): packed rows of their own sizes."""
    module = kernel_module()
    config = module.DecodeConfig(block_n=16, block_exact=16, num_splits=3)
    shape = dict(
        SMALL,
        head_dim=64,
        num_heads=4,
        num_sink=3,
        num_stored=80,
        num_recent=11,
        nbits=key_nbits,
        value_nbits=value_nbits,
        axis_key=axis_key,
        row_padding=[0, 2],
    )
    check_case(module, "cpu", dtype, fresh_seed(), config=config, **shape)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    "nbits,value_nbits,axis_key", [(4, 4, "token"), (2, 4, "token"), (4, 2, "channel"), (3, 3, "channel")]
)
@pytest.mark.parametrize("device_lengths", [False, True])
@pytest.mark.parametrize("rotate", ["hadamard", "hadamard-signs"])
def test_interpreter_rotated_keys(nbits, value_nbits, axis_key, dtype, device_lengths, rotate):
    """Middle keys stored rotated: the kernel reads them with the rotated query, the references rotate them
    back; sink and window keys are not rotated. The signed matrix is not symmetric: a transpose shows."""
    module = kernel_module()
    config = module.DecodeConfig(block_n=16, block_exact=16, num_splits=3)
    shape = dict(
        SMALL,
        head_dim=64,
        num_heads=4,
        num_sink=3,
        num_stored=80,
        num_recent=11,
        nbits=nbits,
        value_nbits=value_nbits,
        axis_key=axis_key,
        row_padding=[2, 0],
        rotate=rotate,
    )
    check_case(module, "cpu", dtype, fresh_seed(), config=config, device_lengths=device_lengths, **shape)


# (key bits, value bits, key axis, key rotation, value rotation, dtype): values stored rotated, with and without
# rotated keys (the same matrix, or another).
ROTATED_VALUE_CASES = [
    (8, 8, "token", "none", "hadamard", torch.float16),
    (4, 4, "channel", "hadamard", "hadamard", torch.float16),
    (4, 4, "token", "none", "hadamard-signs", torch.float32),
    (3, 3, "channel", "hadamard", "hadamard", torch.float16),
    (3, 3, "channel", "hadamard-signs", "hadamard", torch.float32),
    (2, 2, "channel", "hadamard-signs", "hadamard-signs", torch.float16),
    (2, 2, "channel", "hadamard-signs", "hadamard", torch.float16),  # the int2 default of 2026-12-06: two matrices
    (2, 2, "channel", "hadamard", "hadamard", torch.float16),  # the int2 default since 2026-12-07: one matrix ...
    (3, 2, "channel", "hadamard", "hadamard", torch.float16),  # ... and its 3-bit-key layers
    (2, 2, "token", "none", "hadamard", torch.float16),
    (4, 2, "channel", "hadamard", "hadamard-signs", torch.float16),
]

# (key bits, value bits, key axis, key rotation, value rotation, dtype): symmetric value groups with no zero stored
# (vsym), rotated values and not.
SYMMETRIC_VALUE_CASES = [
    (3, 2, "channel", "hadamard", "hadamard", torch.float16),
    (3, 3, "channel", "hadamard", "hadamard", torch.float16),
    (2, 2, "channel", "hadamard", "hadamard", torch.float32),
    (4, 3, "channel", "hadamard", "hadamard", torch.float16),
    (4, 4, "token", "none", "none", torch.float16),
    (8, 8, "token", "none", "none", torch.float32),
]


def _rotated_values_shape(nbits, value_nbits, axis_key, rotate, vrotate) -> dict:
    """Three splits of 32 tokens (the last partly filled), GQA 2, row 0 left-padded into the middle."""
    return dict(
        SMALL,
        head_dim=64,
        num_heads=4,
        num_sink=3,
        num_stored=80,
        num_recent=11,
        nbits=nbits,
        value_nbits=value_nbits,
        axis_key=axis_key,
        row_padding=[6, 0],
        rotate=rotate,
        vrotate=vrotate,
    )


@interpreter_only
@pytest.mark.parametrize("device_lengths", [False, True])
@pytest.mark.parametrize("nbits,value_nbits,axis_key,rotate,vrotate,dtype", ROTATED_VALUE_CASES)
def test_interpreter_rotated_values(nbits, value_nbits, axis_key, rotate, vrotate, dtype, device_lengths):
    """Middle values stored rotated: the middle programs attend over them as stored and the merge rotates their
    merged output back before adding the 16-bit program's (sink and window values are not rotated); the
    references rotate the dequantized values back. The signed matrix is not symmetric: a transpose shows."""
    module = kernel_module()
    config = module.DecodeConfig(block_n=16, block_exact=16, num_splits=3)
    shape = _rotated_values_shape(nbits, value_nbits, axis_key, rotate, vrotate)
    check_case(module, "cpu", dtype, fresh_seed(), config=config, device_lengths=device_lengths, **shape)


@interpreter_only
@pytest.mark.parametrize("device_lengths", [False, True])
@pytest.mark.parametrize("nbits,value_nbits,axis_key,rotate,vrotate,dtype", SYMMETRIC_VALUE_CASES)
def test_interpreter_symmetric_values(nbits, value_nbits, axis_key, rotate, vrotate, dtype, device_lengths):
    """Value groups that store no zero (vsym): the kernel computes each group's zero from its scale, the float64
    reference by its own formula (its value_zero tensor is empty)."""
    module = kernel_module()
    config = module.DecodeConfig(block_n=16, block_exact=16, num_splits=3)
    shape = _rotated_values_shape(nbits, value_nbits, axis_key, rotate, vrotate)
    check_case(module, "cpu", dtype, fresh_seed(), config=config, device_lengths=device_lengths, vsym=True, **shape)


@interpreter_only
@pytest.mark.parametrize("device_lengths", [False, True])
@pytest.mark.parametrize(
    "key_nbits,value_nbits,rotate,block_length,block_n",
    [(3, 3, "hadamard", 32, 32), (3, 2, "none", 16, 32), (3, 2, "hadamard-signs", 64, 16), (4, 3, "none", 32, 32)],
)
def test_interpreter_three_bit_codes_in_eight_chunks(
    key_nbits, value_nbits, rotate, block_length, block_n, device_lengths
):
    """3-bit codes at head_dim 128 are read in eight chunks of 16 channels whose high bits share one position:
    per-channel keys with their queries kept as four joined pairs (rotated in the kernel or loaded, one or two
    key blocks per tile), values with their accumulators kept as four joined pairs."""
    module = kernel_module()
    assert module._key_chunk(128, 3, 32, "channel") == 16 and module._value_chunk(128, 3, 32) == 16
    config = module.DecodeConfig(block_n=block_n, block_exact=16, num_splits=3)
    shape = dict(
        SMALL,
        head_dim=128,
        q_group_size=32,
        num_heads=4,
        num_sink=3,
        num_stored=96,
        num_recent=7,
        nbits=key_nbits,
        value_nbits=value_nbits,
        axis_key="channel",
        block_length=block_length,
        row_padding=[5, 0],
        rotate=rotate,
        vrotate="none",
    )
    check_case(module, "cpu", torch.float16, fresh_seed(), config=config, device_lengths=device_lengths, **shape)


@interpreter_only
def test_interpreter_symmetric_values_fail_the_reference_with_a_wrong_zero(monkeypatch):
    """The test can fail: a kernel that took the value zeros as 0 instead of computing them from the scales is
    far from the float64 reference."""
    module = kernel_module()
    real_launch = module.selective_decode_attention

    def launch(query, storage, **kwargs):  # the same codes and scales, read as asymmetric groups of zero 0
        middle = storage.middle._replace(value_zero=torch.zeros_like(storage.middle.value_scale))
        layout = dataclasses.replace(storage.layout, vsym=False)
        return real_launch(query, dataclasses.replace(storage, middle=middle, layout=layout), **kwargs)

    monkeypatch.setattr(module, "selective_decode_attention", launch)
    config = module.DecodeConfig(block_n=16, block_exact=16, num_splits=3)
    shape = _rotated_values_shape(2, 2, "channel", "hadamard", "hadamard")
    with pytest.raises(AssertionError, match="kernel vs float64"):
        check_case(module, "cpu", torch.float32, fresh_seed(), config=config, vsym=True, **shape)


@interpreter_only
@pytest.mark.parametrize("device_lengths", [False, True])
def test_interpreter_rotated_values_over_many_splits(device_lengths):
    """40 middle splits: the merge reads the middle's partials in two steps of 32 and the 16-bit one apart."""
    module = kernel_module()
    config = module.DecodeConfig(block_n=16, block_exact=16, num_splits=40)
    shape = dict(
        _rotated_values_shape(4, 4, "channel", "hadamard", "hadamard-signs"),
        batch_size=1,
        num_kv_heads=1,
        num_heads=2,
        num_stored=40 * 16 - 5,
        row_padding=None,
    )
    check_case(module, "cpu", torch.float16, fresh_seed(), config=config, device_lengths=device_lengths, **shape)


@interpreter_only
@pytest.mark.parametrize("broken", ["not rotated back", "rotated back by R, not R^T", "the 16-bit partial rotated too"])
def test_interpreter_rotated_values_fail_the_references_when_not_rotated_back_right(monkeypatch, broken):
    """The tests can fail: a merge that does not rotate the middle's output back, or rotates it back by the
    transposed matrix, or rotates the 16-bit program's partial too, is far from the references."""
    module = kernel_module()
    real = module._value_rotation

    def wrong(storage, query):
        operand, scale = real(storage, query)
        return None if broken == "not rotated back" else (operand.T.contiguous(), scale)

    if broken == "the 16-bit partial rotated too":  # all of the output rotated back after an unrotated merge
        real_launch = module.selective_decode_attention

        def launch(query, storage, **kwargs):
            out = real_launch(query, dataclasses.replace(storage, value_rotation=None, value_rotation_signs=None))
            return (out.float() @ storage.value_rotation.T).to(out.dtype)

        monkeypatch.setattr(module, "selective_decode_attention", launch)
    else:
        monkeypatch.setattr(module, "_value_rotation", wrong)
    config = module.DecodeConfig(block_n=16, block_exact=16, num_splits=3)
    shape = _rotated_values_shape(4, 4, "channel", "hadamard", "hadamard-signs")
    with pytest.raises(AssertionError, match="kernel vs float64"):
        check_case(module, "cpu", torch.float32, fresh_seed(), config=config, **shape)


@pytest.mark.parametrize("from_signs", [True, False])
def test_rotated_values_from_their_signs_or_a_float32_matrix(from_signs):
    """The merge rotates the middle's output back from the +-1 form (value_rotation_signs) or, without one, from
    the float32 matrix: a dense orthogonal one here. On CUDA the compiled kernel, elsewhere Triton's interpreter."""
    module = kernel_module()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    shape = dict(_rotated_values_shape(3, 3, "channel", "hadamard", "hadamard-signs"), row_padding=None)
    shape.pop("num_heads")
    storage = make_storage(gen, dtype=dtype, device=device, **shape)
    assert storage.value_rotation_signs is not None
    if not from_signs:
        # the codes were quantized under another rotation: the references read them with the kernel's matrix
        dense, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
        storage = dataclasses.replace(storage, value_rotation=dense.float().to(device), value_rotation_signs=None)
    query = torch.randn(2, 4, 1, 64, generator=gen).to(dtype).to(device)
    config = module.DecodeConfig(block_exact=16, num_splits=2)
    out = module.selective_decode_attention(query, storage, config=config)
    ref64 = float64_reference(query, storage, 64**-0.5)
    assert relative_error(out, ref64) < max_relative_error(dtype), f"seed={seed}"


def test_a_static_cache_with_rotated_values_through_the_kernel():
    """A static cache's storage carries the values' +-1 rotation (shared by every layer, and with the keys when
    they use the same one); from the first decode steps, whose middle is still empty (its capacity is not),
    through evictions, the kernel gives the twin's output. On CUDA the compiled kernel, else the interpreter."""
    from selkv import make_cache

    module = kernel_module()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = tiny_llama_config()
    cache = make_cache("quant:bits=4,sink=4,window=8,block=8,vrotate=hadamard-signs", config, max_cache_len=64)
    cache.enable_fused_decode()
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    shape = (2, config.num_key_value_heads, 1, config.head_dim)
    cache.update(
        torch.randn(shape[:2] + (6, shape[3]), generator=gen).to(device),
        torch.randn(shape[:2] + (6, shape[3]), generator=gen).to(device),
        0,
    )
    layer = cache.layers[0]
    checked = set()
    for _ in range(24):
        cache.update(torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device), 0)
        storage = layer.decode_storage()
        assert storage.value_rotation_signs is storage.key_rotation_signs is not None  # hadamard-signs both
        stored = layer.num_stored
        if stored in checked:
            continue
        checked.add(stored)
        query = torch.randn(2, config.num_attention_heads, 1, config.head_dim, generator=gen).to(device)
        out = module.selective_decode_attention(query, storage)
        want = reference.selective_decode_attention(query, storage)
        torch.testing.assert_close(out, want, **TOLERANCES["kernel_fp32"], msg=lambda m: f"seed={seed}\n{m}")
    assert checked == {0, 8, 16}, checked
    take_published(0)


@pytest.mark.parametrize("static", [False, True])
def test_a_cache_of_mixed_layer_widths_through_the_kernel(static):
    """``layer_bits``: each layer launches the kernel with its own layout (3-bit keys and values in layer 0, 4-bit
    keys and 2-bit values in layer 1, rotated both); after evictions each layer's output is the twin's (and the
    float64 reference's, dynamic layers). On CUDA the compiled kernel, else the interpreter."""
    from selkv import make_cache

    module = kernel_module()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = tiny_llama_config(head_dim=64)  # 3-bit codes of 32 channels are chunks of 8: too narrow for the kernel
    spec = "quant:bits=3,sink=4,window=8,block=8,group=16,rotate=hadamard,vrotate=hadamard,layer_bits=1:4/2"
    cache = make_cache(spec, config, max_cache_len=64 if static else None)
    cache.enable_fused_decode()
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    shape = (2, config.num_key_value_heads, config.head_dim)
    for count in (29, 1, 1):
        for layer_idx in range(2):
            states = [torch.randn(shape[0], shape[1], count, shape[2], generator=gen).to(device) for _ in range(2)]
            cache.update(*states, layer_idx)
    widths = []
    for layer in cache.layers:
        storage = layer.decode_storage()
        assert layer.num_stored >= 16, layer.num_stored  # two blocks of 8 quantized
        widths.append((storage.layout.key_nbits, storage.layout.value_nbits))
        query = torch.randn(2, config.num_attention_heads, 1, config.head_dim, generator=gen).to(device)
        out = module.selective_decode_attention(query, storage)
        want = reference.selective_decode_attention(query, storage)
        torch.testing.assert_close(out, want, **TOLERANCES["kernel_fp32"], msg=lambda m: f"seed={seed}\n{m}")
        if not static:  # the float64 reference reads the window in order; the static layer's is a ring
            ref64 = float64_reference(query, storage, config.head_dim**-0.5)
            assert relative_error(out, ref64) < max_relative_error(torch.float32), f"seed={seed}"
    assert widths == [(3, 3), (4, 2)]
    take_published(0)


@interpreter_only
@pytest.mark.parametrize("axis_key", ["token", "channel"])
def test_interpreter_scales_loaded_in_the_tile(axis_key):
    """Scales loaded with their tile instead of one tile ahead (``scale_prefetch=False``)."""
    module = kernel_module()
    config = module.DecodeConfig(block_n=16, block_exact=16, num_splits=4, scale_prefetch=False)
    shape = dict(
        SMALL, num_heads=4, num_sink=5, num_stored=144, num_recent=16, nbits=8, axis_key=axis_key, row_padding=[3, 0]
    )
    check_case(module, "cpu", torch.float16, fresh_seed(), config=config, **shape)


@interpreter_only
@pytest.mark.parametrize(
    "nbits,axis_key,block_length,block_n",
    [(8, "token", 32, 16), (4, "channel", 64, 16), (2, "token", 64, 32), (4, "channel", 64, 0)],
)
def test_interpreter_value_blocks_longer_than_tiles(nbits, axis_key, block_length, block_n):
    """Blocks of block-major value codes spanning several tiles; block_n=0: the default choice (64 here)."""
    module = kernel_module()
    config = module.DecodeConfig(block_n=block_n, block_exact=16, num_splits=3)
    shape = dict(
        SMALL,
        head_dim=64,
        num_heads=4,
        num_sink=4,
        num_stored=2 * block_length + block_n + 3,
        num_recent=9,
        nbits=nbits,
        axis_key=axis_key,
        block_length=block_length,
    )
    check_case(module, "cpu", torch.float16, fresh_seed(), config=config, **shape)


def _specialization(fn, args, kwargs) -> tuple:
    """The part of Triton's compile key that the argument values decide (as its runtime computes it)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    dont = getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize") or []
    key = []
    for name, value in zip(fn.arg_names, args, strict=False):
        specialize = name not in dont
        key.append((name, native_specialize_impl(BaseBackend, value, False, specialize, specialize)))
    return tuple(key) + tuple(sorted((k, str(v)) for k, v in kwargs.items()))


@pytest.mark.parametrize("static", [False, True])
def test_one_compiled_kernel_for_a_whole_decode(monkeypatch, static):
    """64 decode steps (window ring, evictions into the middle) launch one kernel specialization each.

    Triton specializes int arguments on == 1 and on divisibility by 16; lengths that change every
    step would otherwise recompile the kernel (seconds) in the middle of generation. A static cache
    hands the kernel its capacities (fixed) and its lengths on the device.
    """
    from selkv import make_cache

    module = kernel_module()
    launches = {"_selective_decode_partial_kernel": [], "_merge_partials_kernel": []}
    for name, calls in launches.items():
        fn = getattr(module, name)

        class Recorder:
            def __init__(self, fn, calls):
                self.fn, self.calls = fn, calls

            def __getitem__(self, grid):
                return lambda *args, **kwargs: self.calls.append(_specialization(self.fn, args, kwargs))

        monkeypatch.setattr(module, name, Recorder(fn, calls))
    config = tiny_llama_config()
    cache = make_cache("quant:bits=8,sink=4,window=16,block=8", config, max_cache_len=120 if static else None)
    cache.enable_fused_decode()
    gen = torch.Generator().manual_seed(fresh_seed())
    shape = (2, config.num_key_value_heads, 1, config.head_dim)
    cache.update(
        torch.randn(shape[:2] + (40, shape[3]), generator=gen),
        torch.randn(shape[:2] + (40, shape[3]), generator=gen),
        0,
    )
    query = torch.randn(2, config.num_attention_heads, 1, config.head_dim)
    layer = cache.layers[0]
    lengths = set()
    for _ in range(64):
        cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), 0)
        module.selective_decode_attention(query, layer.decode_storage())
        lengths.add((layer.num_stored, layer.num_recent))
    take_published(0)  # no attention call took the last step's storage here
    assert len(lengths) > 16, "the test must see many different lengths"
    for name, calls in launches.items():
        assert len(calls) == 64
        assert len(set(calls)) == 1, f"{name}: {len(set(calls))} specializations in one decode"


@interpreter_only
def test_interpreter_unsupported_chunks_say_why():
    module = kernel_module()
    assert module.check_supported(128, 4, 8, 64, torch.float16) is None
    why = module.check_supported(32, 4, 2, 16, torch.float16)  # 2-bit planes of 8 channels
    assert why is not None and "16 channels" in why
    assert module.check_supported(128, 4, 8, 16, torch.float16) is not None  # 8 chunks of 16


@interpreter_only
@pytest.mark.parametrize("axis_key", ["channel", "token"])
def test_interpreter_float32_and_odd_block(axis_key):
    """float32 (exact dots), head_dim 64, one group per token, a key block (24) that does not nest with the tile."""
    module = kernel_module()
    shape = dict(
        batch_size=1,
        num_kv_heads=1,
        num_heads=3,
        head_dim=64,
        q_group_size=64,
        block_length=24,
        num_sink=3,
        num_stored=48,
        num_recent=9,
        nbits=4,
        axis_key=axis_key,
    )
    check_case(module, "cpu", torch.float32, fresh_seed(), **shape)


@interpreter_only
def test_interpreter_rejects_bad_inputs():
    module = kernel_module()
    gen = torch.Generator().manual_seed(fresh_seed())
    storage = make_storage(
        gen,
        batch_size=1,
        num_kv_heads=2,
        head_dim=32,
        num_sink=2,
        num_stored=16,
        num_recent=3,
        nbits=4,
        q_group_size=16,
        axis_key="token",
        block_length=16,
        dtype=torch.float16,
        device="cpu",
    )
    replace = dataclasses.replace
    with pytest.raises(ValueError, match="query length"):
        module.selective_decode_attention(torch.randn(1, 4, 2, 32).half(), storage)
    with pytest.raises(ValueError, match="multiple"):
        module.selective_decode_attention(torch.randn(1, 3, 1, 32).half(), storage)
    with pytest.raises(ValueError, match="float32"):
        module.selective_decode_attention(
            torch.randn(1, 4, 1, 32).half(), replace(storage, sink_keys=storage.sink_keys.float())
        )
    query = torch.randn(1, 4, 1, 32).half()
    middle = storage.middle
    longer = torch.cat([middle.value_codes, torch.zeros_like(middle.value_codes[:, :, :16])], dim=2)
    with pytest.raises(ValueError, match="same batch, heads and capacity"):  # rows are addressed alike
        module.selective_decode_attention(query, replace(storage, middle=middle._replace(value_codes=longer)))
    with pytest.raises(ValueError, match="whole blocks of 16"):  # the value store is block-major
        cut = middle._replace(key_codes=middle.key_codes[:, :, :24], value_codes=middle.value_codes[:, :, :24])
        module.selective_decode_attention(query, replace(storage, middle=cut))
    # value zeros that the layout does not expect: none stored without vsym, or stored with it
    no_zeros = middle._replace(value_zero=middle.value_zero[..., :0])
    with pytest.raises(ValueError, match=r"value_zero has shape .*; expected .* for vsym=False"):
        module.selective_decode_attention(query, replace(storage, middle=no_zeros))
    symmetric = replace(storage, layout=replace(storage.layout, vsym=True))
    with pytest.raises(ValueError, match=r"value_zero has shape .*; expected .* for vsym=True"):
        module.selective_decode_attention(query, symmetric)


CUDA_LENGTHS = [  # (num_sink, num_stored, num_recent)
    (4, 0, 1),
    (4, 32, 124),
    (4, 33 * 32, 128),  # block boundary + 1 block
    (36, 4096, 150),  # left-padding room in the sink, long middle (many splits)
]


# dtype x head_dim x (nbits, key axis), each with one GQA ratio in turn (one compiled variant per case).
CUDA_CASES = [
    (dtype, head_dim, nbits, axis_key, (1, 3, 4, 8)[i % 4])
    for i, (dtype, head_dim, (nbits, axis_key)) in enumerate(
        (dtype, head_dim, quantization)
        for dtype in (torch.float16, torch.bfloat16)
        for head_dim in (64, 128)
        for quantization in ((8, "token"), (4, "channel"), (4, "token"), (3, "channel"), (2, "channel"))
    )
]


def _cuda_shapes(head_dim: int, num_heads: int, block_length: int = 32, **layout):
    """(index, shape) for each of CUDA_LENGTHS: 3 rows, 2 KV heads, the third row left-padded in the sink (middle
    lengths in blocks of ``block_length``: CUDA_LENGTHS' counts of 32-token blocks)."""
    for i, (num_sink, num_stored, num_recent) in enumerate(CUDA_LENGTHS):
        num_stored = num_stored // 32 * block_length
        padding = [0, num_sink - 4, 1] if num_sink > 4 else None
        yield (
            i,
            dict(
                batch_size=3,
                num_kv_heads=2,
                num_heads=num_heads,
                head_dim=head_dim,
                q_group_size=min(64, head_dim),
                block_length=block_length,
                num_sink=num_sink,
                num_stored=num_stored,
                num_recent=num_recent,
                row_padding=padding,
                **layout,
            ),
        )


@cuda_only
@pytest.mark.parametrize("dtype,head_dim,nbits,axis_key,ratio", CUDA_CASES)
def test_cuda_matches_references(dtype, head_dim, nbits, axis_key, ratio):
    module = kernel_module()
    seed = fresh_seed()
    for i, shape in _cuda_shapes(head_dim, 2 * ratio, nbits=nbits, axis_key=axis_key):
        for device_lengths in (False, True):
            check_case(module, "cuda", dtype, seed + i, device_lengths=device_lengths, **shape)


# (key bits, value bits, key axis, rotation): the rotated defaults and split widths, compiled for CUDA.
CUDA_ROTATED_CASES = [
    (4, 4, "channel", "hadamard-signs"),
    (2, 2, "channel", "hadamard-signs"),
    (3, 3, "channel", "hadamard-signs"),
    (3, 2, "channel", "hadamard-signs"),
    (4, 2, "channel", "hadamard-signs"),
    (4, 4, "token", "hadamard"),
    (8, 4, "token", "none"),
]


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("nbits,value_nbits,axis_key,rotate", CUDA_ROTATED_CASES)
def test_cuda_rotated_keys_and_split_bit_widths(nbits, value_nbits, axis_key, rotate, head_dim):
    """The compiled kernel on rotated middle keys and on key/value codes of their own widths (bf16, GQA 4)."""
    module = kernel_module()
    seed = fresh_seed()
    for i, shape in _cuda_shapes(head_dim, 8, nbits=nbits, value_nbits=value_nbits, axis_key=axis_key, rotate=rotate):
        check_case(module, "cuda", torch.bfloat16, seed + i, device_lengths=i % 2 == 1, **shape)


# (key bits, value bits, key axis, key rotation, value rotation): values stored rotated, compiled for CUDA.
CUDA_ROTATED_VALUE_CASES = [  # (kbits, vbits, key axis, rotate, vrotate[, block_length]: 32 if not given)
    (3, 3, "channel", "hadamard", "hadamard"),
    (2, 2, "channel", "hadamard-signs", "hadamard"),  # the int2 default before 2026-12-06 (key blocks of 32)
    (2, 2, "channel", "hadamard-signs", "hadamard", 64),  # the int2 default of 2026-12-06: key blocks of 64 ...
    (3, 2, "channel", "hadamard-signs", "hadamard", 64),  # ... and its later half, 3-bit keys
    (2, 2, "channel", "hadamard", "hadamard", 128),  # the int2 default since 2026-12-07: key blocks of 128 ...
    (3, 2, "channel", "hadamard", "hadamard", 128),  # ... and its last 3/4 of the layers, 3-bit keys
    (3, 3, "channel", "hadamard", "hadamard", 128),  # 3-bit keys in blocks of 128 ...
    (4, 3, "channel", "hadamard", "hadamard", 128),  # ... and 4-bit keys with 3-bit values (docs/eval_results.md)
    (4, 4, "channel", "hadamard-signs", "hadamard-signs"),
    (8, 8, "token", "none", "hadamard"),
    (4, 2, "channel", "hadamard", "hadamard-signs"),
]

# (kbits, vbits, key axis, rotate, vrotate, block_length): symmetric value groups with no zero stored (vsym).
CUDA_SYMMETRIC_VALUE_CASES = [
    (3, 2, "channel", "hadamard", "hadamard", 128),
    (3, 3, "channel", "hadamard", "hadamard", 128),
    (2, 2, "channel", "hadamard", "hadamard", 128),
    (4, 3, "channel", "hadamard", "hadamard", 128),
    (4, 4, "channel", "hadamard-signs", "none", 64),
    (8, 8, "token", "none", "none", 32),
]


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CUDA_SYMMETRIC_VALUE_CASES)
def test_cuda_symmetric_values(case, head_dim):
    """The compiled kernel on value groups that store no zero (bf16, GQA 4), host and device lengths, padding."""
    module = kernel_module()
    seed = fresh_seed()
    nbits, value_nbits, axis_key, rotate, vrotate, block = case
    layout = dict(nbits=nbits, value_nbits=value_nbits, axis_key=axis_key, rotate=rotate, vrotate=vrotate, vsym=True)
    for i, shape in _cuda_shapes(head_dim, 8, block_length=block, **layout):
        for device_lengths in (False, True):
            check_case(module, "cuda", torch.bfloat16, seed + i, device_lengths=device_lengths, **shape)


@cuda_only
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", CUDA_ROTATED_VALUE_CASES)
def test_cuda_rotated_values(case, head_dim):
    """The compiled kernel on middle values stored rotated (the merge rotates the middle's output back; bf16,
    GQA 4), host and device lengths, padding, one split up to many."""
    module = kernel_module()
    seed = fresh_seed()
    nbits, value_nbits, axis_key, rotate, vrotate, *block = case
    layout = dict(nbits=nbits, value_nbits=value_nbits, axis_key=axis_key, rotate=rotate, vrotate=vrotate)
    layout["block_length"] = block[0] if block else 32
    for i, shape in _cuda_shapes(head_dim, 8, **layout):
        for device_lengths in (False, True):
            check_case(module, "cuda", torch.bfloat16, seed + i, device_lengths=device_lengths, **shape)


PRECISION_RMS = (1.0, 0.1, 0.02, 0.005)

PRECISION_QUANT = [(8, "token"), (8, "channel"), (4, "token"), (4, "channel"), (2, "token"), (2, "channel")]


def _outlier_key_gain(gen: torch.Generator, head_dim: int) -> torch.Tensor:
    """[head_dim] channel gains: 1, except three channels x10, x20, x30."""
    gain = torch.ones(head_dim)
    gain[torch.randperm(head_dim, generator=gen)[:3]] = torch.tensor([10.0, 20.0, 30.0])
    return gain


def kernel_error(
    module, device: str, dtype: torch.dtype, seed: int, value_rms: float, config=None, value_gain_log2=None, **shape
) -> float:
    """Relative L2 error of the kernel against float64 attention over the same dequantized cache.

    ``value_gain_log2(num_tokens) -> [num_tokens]`` int exponents: middle token n's value scale and
    zero are multiplied by 2 ** exponent[n] (exact: its values scale by the same power of two).
    """
    gen = torch.Generator().manual_seed(seed)  # the same draws at every value_rms: only magnitudes change
    num_heads = shape.pop("num_heads")
    key_gain = _outlier_key_gain(gen, shape["head_dim"])
    storage = make_storage(gen, dtype=dtype, device=device, key_gain=key_gain, value_rms=value_rms, **shape)
    if value_gain_log2 is not None:
        factor = torch.exp2(value_gain_log2(storage.middle.value_scale.shape[2]).double())[:, None]  # [capacity, 1]
        gained = {
            name: (getattr(storage.middle, name).double().cpu() * factor).to(torch.float16).to(device)
            for name in ("value_scale", "value_zero")
        }
        storage = dataclasses.replace(storage, middle=storage.middle._replace(**gained))
    query = torch.randn(shape["batch_size"], num_heads, 1, shape["head_dim"], generator=gen).to(dtype).to(device)
    scaling = shape["head_dim"] ** -0.5
    out = module.selective_decode_attention(query, storage, scaling=scaling, config=config)
    assert torch.isfinite(out).all(), f"non-finite output: seed={seed} value_rms={value_rms} {shape}"
    return relative_error(out, float64_reference(query, storage, scaling, round_middle=False))


def check_precision_grid(module, device: str, dtype: torch.dtype, config=None, **shape) -> dict:
    """Errors at each value RMS (PRECISION_RMS): at most twice the error at RMS 1 (or a tenth of
    max_relative_error), so the error does not grow as values shrink; and within 4 x max_relative_error (x30
    key channels make scores large, and 16-bit operands round them coarsely: up to 8e-3 seen in float16
    with per-channel keys, at every value RMS)."""
    seed = fresh_seed()
    errors = {rms: kernel_error(module, device, dtype, seed, rms, config, **dict(shape)) for rms in PRECISION_RMS}
    budget = 4 * max_relative_error(dtype)
    where = f"seed={seed} dtype={dtype} {shape}; rel. error by value RMS: " + ", ".join(
        f"{rms}: {err:.1e}" for rms, err in errors.items()
    )
    for rms, err in errors.items():
        assert err < budget, f"error {err:.1e} over {budget:.0e} at value RMS {rms}: {where}"
        assert err <= max(2 * errors[1.0], max_relative_error(dtype) / 10), f"the error grows as values shrink: {where}"
    return errors


# The value dot once took p * value_scale rounded to float16, where int8's small value scales fall among
# float16's subnormals (value_dot="fp16"; error 4.8e-2 at value RMS 0.005 on the H200). These tests failed
# then; the default value_dot="dequant" passes them.

INTERPRETER_PRECISION = dict(
    batch_size=1,
    num_kv_heads=1,
    num_heads=4,
    q_group_size=16,
    block_length=64,
    num_sink=4,
    num_stored=256,
    num_recent=16,
)


@interpreter_only
@pytest.mark.parametrize(
    "dtype,nbits,axis_key",
    [(torch.float16, *q) for q in PRECISION_QUANT] + [(torch.float32, 8, "token"), (torch.float32, 4, "channel")],
)
def test_interpreter_precision_on_small_values(dtype, nbits, axis_key):
    """float16 and float32 (the interpreter computes bfloat16 wrongly: bfloat16 runs in the CUDA tests)."""
    module = kernel_module()
    config = module.DecodeConfig(block_n=64, block_exact=32, num_splits=2)
    check_precision_grid(
        module,
        "cpu",
        dtype,
        config,
        head_dim=64 if nbits == 2 else 32,
        nbits=nbits,
        axis_key=axis_key,
        **INTERPRETER_PRECISION,
    )


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_interpreter_precision_of_rotated_values_on_small_values(dtype):
    """Rotated 3-bit keys and values on the precision grid: rotating the middle's output back (in float32, in
    the merge) does not grow the error as values shrink."""
    module = kernel_module()
    config = module.DecodeConfig(block_n=64, block_exact=32, num_splits=2)
    shape = dict(INTERPRETER_PRECISION, head_dim=64, nbits=3, axis_key="channel", rotate="hadamard")
    check_precision_grid(module, "cpu", dtype, config, vrotate="hadamard", **shape)


def _gain_steps(num_tokens: int) -> torch.Tensor:
    """Exponents that change every 16 tokens, over 2^-8 .. 2^2 (the kernel's tiles see new gains)."""
    steps = torch.tensor([0, -8, -3, 2, -6, -1, -8, 1, -4])
    return steps[(torch.arange(num_tokens) // 16) % len(steps)]


@interpreter_only
@pytest.mark.parametrize("scale_prefetch", [True, False])
def test_interpreter_value_magnitudes_changing_between_tiles(scale_prefetch):
    """Small values (RMS 0.002) whose magnitude jumps by up to 2^10 from one 16-token tile to the next
    (the accumulators are rescaled exactly when a tile's gain differs from theirs)."""
    module = kernel_module()
    config = module.DecodeConfig(block_n=16, block_exact=16, num_splits=2, scale_prefetch=scale_prefetch)
    shape = dict(INTERPRETER_PRECISION, head_dim=32, nbits=8, axis_key="token", block_length=16, num_stored=160)
    err = kernel_error(module, "cpu", torch.float16, fresh_seed(), 0.002, config, value_gain_log2=_gain_steps, **shape)
    assert err < max_relative_error(torch.float16) / 5, err


@interpreter_only
def test_interpreter_fp16_value_dot_loses_small_values():
    """The grid can fail: the scale-folded value dot (value_dot="fp16") loses precision on small int8 values."""
    module = kernel_module()
    config = module.DecodeConfig(block_n=64, block_exact=32, num_splits=2, value_dot="fp16")
    with pytest.raises(AssertionError, match="grows as values shrink"):
        check_precision_grid(
            module, "cpu", torch.float16, config, head_dim=32, nbits=8, axis_key="token", **INTERPRETER_PRECISION
        )


def test_unknown_value_dot_is_refused():
    with pytest.raises(ValueError, match="allowed: dequant, fp16"):
        kernel_module().DecodeConfig(value_dot="tf32")


@interpreter_only
def test_interpreter_refuses_bfloat16():
    """Triton's CPU interpreter computes bfloat16 wrongly: the launcher says so instead of returning garbage."""
    module = kernel_module()
    assert "interpreter" in module.check_supported(32, 2, 8, 16, torch.bfloat16)
    gen = torch.Generator().manual_seed(fresh_seed())
    storage = make_storage(
        gen,
        batch_size=1,
        num_kv_heads=1,
        head_dim=32,
        num_sink=2,
        num_stored=16,
        num_recent=3,
        nbits=8,
        q_group_size=16,
        axis_key="token",
        block_length=16,
        dtype=torch.bfloat16,
        device="cpu",
    )
    with pytest.raises(ValueError, match="interpreter"):
        module.selective_decode_attention(torch.randn(1, 2, 1, 32).bfloat16(), storage)


CUDA_PRECISION = dict(
    batch_size=2,
    num_kv_heads=8,
    num_heads=32,
    head_dim=128,
    q_group_size=64,
    block_length=32,
    num_sink=4,
    num_stored=8192,
    num_recent=128,
)


@cuda_only
@pytest.mark.parametrize("nbits,axis_key", PRECISION_QUANT)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_precision_on_small_values(dtype, nbits, axis_key):
    """Llama-3-8B's attention shape (32 query / 8 KV heads, head_dim 128), 8k tokens, default launch."""
    check_precision_grid(kernel_module(), "cuda", dtype, nbits=nbits, axis_key=axis_key, **CUDA_PRECISION)


@cuda_only
@pytest.mark.parametrize("nbits", [4, 3, 2])
def test_cuda_precision_of_rotated_keys_on_small_values(nbits):
    """The rotated int4 / int3 / int2 defaults on the precision grid: the query is rotated outside the kernel."""
    check_precision_grid(
        kernel_module(),
        "cuda",
        torch.bfloat16,
        nbits=nbits,
        axis_key="channel",
        rotate="hadamard-signs",
        **CUDA_PRECISION,
    )


@cuda_only
@pytest.mark.parametrize("nbits", [4, 3, 2])
def test_cuda_precision_of_rotated_values_on_small_values(nbits):
    """Rotated keys and values on the precision grid: the merge rotates the middle's output back in float32."""
    check_precision_grid(
        kernel_module(),
        "cuda",
        torch.bfloat16,
        nbits=nbits,
        axis_key="channel",
        rotate="hadamard",
        vrotate="hadamard",
        **CUDA_PRECISION,
    )


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_value_magnitudes_changing_between_tiles(dtype):
    shape = dict(CUDA_PRECISION, nbits=8, axis_key="token")
    err = kernel_error(kernel_module(), "cuda", dtype, fresh_seed(), 0.002, value_gain_log2=_gain_steps, **shape)
    assert err < max_relative_error(dtype) / 5, err


def _half(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.float16).item()


def _run_ptx(ptx: str, inputs: list[int]) -> list[int]:
    """Emulate the few PTX instructions of the code conversions; ``inputs`` are $2, $3, ...; -> [$0, $1]."""
    regs = {f"${2 + i}": word for i, word in enumerate(inputs)}

    def value(x: str) -> int:
        return regs[x] if x in regs else int(x, 0)

    ops = {
        "shr.b32": lambda a, b: a >> b,
        "and.b32": lambda a, b: a & b,
        "or.b32": lambda a, b: a | b,
        "add.u32": lambda a, b: (a + b) & 0xFFFFFFFF,
    }
    for line in ptx.strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        if op == "prmt.b32":  # result byte i = byte (selector nibble i) of {src1, src0}
            pool = (value(src[1]) << 32) | value(src[0])
            selector = value(src[2])
            regs[dst] = sum(((pool >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "shf.r.wrap.b32":  # funnel shift right of {src1, src0} by src2 mod 32, low word kept
            pool, amount = (value(src[1]) << 32) | value(src[0]), value(src[2]) & 31
            regs[dst] = (pool >> amount) & 0xFFFFFFFF
        elif op in ops:
            regs[dst] = ops[op](*(value(x) for x in src))
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return [regs["$0"], regs["$1"]]


def _halves(registers: list[int]) -> list[float]:
    return [_half((r >> (16 * j)) & 0xFFFF) for r in registers for j in range(2)]


@pytest.mark.parametrize("nbits,shift", [(8, 0), (4, 0), (4, 4), (2, 0), (2, 2), (2, 4), (2, 6)])
def test_ptx_code_conversion_gives_1024_plus_code(nbits, shift):
    """The CUDA-only inline PTX: four packed bytes -> four float16 1024 + code of one bit plane."""
    kernel_module()  # Triton imported the way this process runs the kernels
    from selkv.kernels.triton_decode import _plane_ptx

    ptx = _plane_ptx(nbits, shift)
    gen = random.Random(fresh_seed())
    for _ in range(200):
        packed = [gen.randrange(256) for _ in range(4)]
        word = sum(b << (8 * i) for i, b in enumerate(packed))
        got = _halves(_run_ptx(ptx, [word]))
        assert got == [1024.0 + ((b >> shift) & ((1 << nbits) - 1)) for b in packed], (nbits, shift, packed)


@pytest.mark.parametrize("shift", [0, 2, 4, 6])
def test_ptx_three_bit_conversion_gives_1024_plus_code(shift):
    """3-bit codes: a low 2-bit plane and a high bit at one position of the four high bytes, rotated into bit 2
    (a rotation right by the position - 2, mod 32, in each byte of the third operand)."""
    kernel_module()
    from selkv.kernels.triton_decode import _three_bit_ptx

    ptx = _three_bit_ptx(shift)
    gen = random.Random(fresh_seed())
    for _ in range(300):
        low, high = [gen.randrange(256) for _ in range(4)], [gen.randrange(256) for _ in range(4)]
        bit = gen.randrange(8)
        rotation = (bit - 2) % 32
        words = [sum(b << (8 * i) for i, b in enumerate(x)) for x in (low, high, [rotation] * 4)]
        codes = [(lo >> shift) & 3 | (4 if hi >> bit & 1 else 0) for lo, hi in zip(low, high, strict=True)]
        assert _halves(_run_ptx(ptx, words)) == [1024.0 + c for c in codes], (shift, low, high, bit)


def _trimmed(storage, num_stored: int):
    """``storage`` with its middle cut to ``num_stored`` tokens of capacity (whole blocks): nothing allocated past
    it."""
    layout = storage.layout
    trimmed = (t[:, :, : layout.rows(name, num_stored)].contiguous() for name, t in storage.middle._asdict().items())
    return dataclasses.replace(storage, middle=MiddleTensors(*trimmed))


def test_launch_choices_follow_the_layout():
    """block_n and the scale prefetch, chosen by layout where the config leaves them open; given ones are kept."""
    module = kernel_module()
    default = module.DecodeConfig()
    chosen = {
        (axis, block): (c.block_n, c.scale_prefetch)
        for axis, block in [("token", 32), ("channel", 32), ("channel", 64), ("channel", 48)]
        for c in [module._resolve(default, axis, block)]
    }
    # per-token keys (int8): 32-token tiles, prefetch; int2's 32-token key blocks: two per 64-token tile,
    # prefetch; int4/int3's 64-token blocks: one per tile, no prefetch; blocks that do not nest: per-token rows
    assert chosen == {
        ("token", 32): (32, True),
        ("channel", 32): (64, True),
        ("channel", 64): (64, False),
        ("channel", 48): (32, False),
    }
    given = module.DecodeConfig(block_n=32, scale_prefetch=True)
    assert module._resolve(given, "channel", 64) == given
    # per-channel keys' scale rows loaded whole where a chunk's slice is too narrow to prefetch: 3-bit keys at
    # head_dim 128 (16 channels a chunk), 2-bit (32); not 4-bit (64) or 8-bit; a given choice is kept
    chunks = {(nbits, dim): module._key_chunk(dim, nbits, 64, "channel") for nbits in (2, 3, 4, 8) for dim in (64, 128)}
    rows = {key: module._key_scale_rows(default, chunk) for key, chunk in chunks.items()}
    assert rows == {(2, 64): True, (2, 128): True, (3, 64): True, (3, 128): True,
                    (4, 64): True, (4, 128): False, (8, 64): False, (8, 128): False}  # fmt: skip
    assert not module._key_scale_rows(module.DecodeConfig(key_scale_rows=False), 16)


@pytest.mark.parametrize("nbits,value_nbits", [(4, 4), (2, 2), (4, 2), (3, 3)])
@pytest.mark.parametrize("rotate", ["none", "hadamard-signs"])
@pytest.mark.parametrize("device_lengths", [False, True])
def test_tiles_of_two_key_blocks(nbits, value_nbits, rotate, device_lengths):
    """Per-channel keys in blocks of half a tile (int2's 32-token blocks under 64-token tiles): two key scale
    rows and two value-code blocks per tile. The middle holds an odd number of blocks and nothing past them,
    so the last tile's second block lies past the allocation; row 1's padding ends inside the middle.
    On CUDA the compiled kernel, elsewhere Triton's interpreter."""
    module = kernel_module()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    block_length, num_stored = 16, 5 * 16
    shape = dict(
        batch_size=2,
        num_kv_heads=2,
        head_dim=64,
        q_group_size=32,
        block_length=block_length,
        num_sink=4,
        num_stored=num_stored,
        num_recent=9,
        nbits=nbits,
        value_nbits=value_nbits,
        axis_key="channel",
        rotate=rotate,
    )
    storage = _trimmed(make_storage(gen, dtype=dtype, device=device, row_padding=[0, 27], **shape), num_stored)
    query = torch.randn(2, 8, 1, 64, generator=gen).to(dtype).to(device)
    ref64 = float64_reference(query, storage, 64**-0.5)
    if device_lengths:
        storage = with_device_lengths(storage, gen)
    twin = reference.selective_decode_attention(query, storage)
    config = module.DecodeConfig(block_n=2 * block_length, block_exact=16, num_splits=2)
    assert module._key_rows(config.block_n, block_length) == 2
    out = module.selective_decode_attention(query, storage, config=config)
    where = f"seed={seed}"
    assert torch.isfinite(out).all(), where
    assert relative_error(out, ref64) < max_relative_error(dtype), f"kernel vs float64: {where}"
    tol = TOLERANCES["kernel_bf16"]
    torch.testing.assert_close(out.float().cpu(), twin.float().cpu(), **tol, msg=lambda m: f"{where}\n{m}")


def test_rotation_signs_are_the_transposed_rotation_times_sqrt_dim():
    """The operand with which the kernel rotates the query: R^T * sqrt(D), every entry +-1, shared."""
    from selkv import quant

    for rotate in ("hadamard", "hadamard-signs"):
        rotation = quant.rotation_matrix(rotate, 64)
        signs = quant.rotation_signs(rotate, 64, torch.bfloat16)
        assert signs.dtype == torch.bfloat16 and bool((signs.abs() == 1).all())
        torch.testing.assert_close(signs.double() / 8.0, rotation.T.double(), atol=1e-7, rtol=0)
        assert quant.rotation_signs(rotate, 64, torch.bfloat16) is signs
    assert quant.rotation_signs("none", 64, torch.bfloat16) is None


def test_a_static_cache_hands_the_kernel_its_rotation_signs(monkeypatch):
    """A static cache's storage carries the +-1 rotation built when the layer was initialized (shared by
    all layers), so a captured step builds nothing for it and launches no matmul."""
    from selkv import make_cache

    module = kernel_module()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernel on CUDA, else the interpreter
    config = tiny_llama_config()
    cache = make_cache("quant:bits=4,sink=4,window=16,block=8", config, max_cache_len=96)
    cache.enable_fused_decode()
    gen = torch.Generator().manual_seed(fresh_seed())
    shape = (2, config.num_key_value_heads, 40, config.head_dim)
    for layer_idx in range(len(cache.layers)):
        keys, values = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        cache.update(keys.to(device), values.to(device), layer_idx)
    storages = [layer.decode_storage() for layer in cache.layers]
    assert storages[0].key_rotation_signs is not None and storages[0].lengths is not None
    assert all(s.key_rotation_signs is storages[0].key_rotation_signs for s in storages)

    def no_matmul(*args, **kwargs):
        raise AssertionError("the launcher rotated the query outside the kernel")

    monkeypatch.setattr(module.torch, "matmul", no_matmul)
    query = torch.randn(2, config.num_attention_heads, 1, config.head_dim, generator=gen).to(device)
    out = module.selective_decode_attention(query, storages[0])
    monkeypatch.undo()
    want = reference.selective_decode_attention(query, storages[0])
    torch.testing.assert_close(out, want, **TOLERANCES["kernel_fp32"])


@pytest.mark.parametrize("rotate_in_kernel", [True, False])
def test_rotated_query_in_the_kernel_or_the_launcher(rotate_in_kernel):
    """Both ways of rotating the query give the references' output: a Hadamard rotation (rotated in the
    kernel from its +-1 form unless switched off) and a dense orthogonal one (no +-1 form: the launcher's
    float32 matmul). On CUDA the compiled kernel, elsewhere Triton's interpreter."""
    module = kernel_module()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    shape = dict(
        batch_size=2,
        num_kv_heads=2,
        head_dim=64,
        q_group_size=32,
        block_length=32,
        num_sink=4,
        num_stored=96,
        num_recent=9,
        nbits=4,
        axis_key="channel",
        rotate="hadamard-signs",
    )
    storage = make_storage(gen, dtype=dtype, device=device, **shape)
    dense, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    config = module.DecodeConfig(block_exact=16, num_splits=2, rotate_in_kernel=rotate_in_kernel)
    query = torch.randn(2, 8, 1, 64, generator=gen).to(dtype).to(device)
    assert storage.key_rotation_signs is not None
    for rotation, signs in ((storage.key_rotation, storage.key_rotation_signs), (dense.float(), None)):
        # the codes were quantized under another rotation for the dense matrix: the references read them
        # with the same matrix as the kernel, so they must still agree
        case = dataclasses.replace(storage, key_rotation=rotation, key_rotation_signs=signs)
        out = module.selective_decode_attention(query, case, config=config)
        ref64 = float64_reference(query, case, 64**-0.5)
        assert relative_error(out, ref64) < max_relative_error(dtype), f"seed={seed}"


@pytest.mark.parametrize(
    "nbits,num_sink,num_stored,num_recent,padding,launch",
    [
        (8, 4, 48, 21, [0, 30, 60], (16, 3)),  # row 1: padding ends in the middle; row 2: in the window
        (4, 2, 64, 9, [66, 5, 17], (16, 4)),  # row 0: every middle tile is padding (an empty partial)
        (8, 0, 32, 16, [40, 0, 33], None),
        (8, 4, 40, 21, [0, 49, 60], (16, 3)),  # row 1: padding covers the middle, whose last tile is partial
    ],
)
@pytest.mark.parametrize("device_lengths", [False, True])
def test_kernel_masks_padding_past_the_sink(nbits, num_sink, num_stored, num_recent, padding, launch, device_lengths):
    """On CUDA the compiled kernel, elsewhere Triton's interpreter."""
    module = kernel_module()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    shape = dict(
        SMALL,
        batch_size=3,
        num_sink=num_sink,
        num_stored=num_stored,
        num_recent=num_recent,
        nbits=nbits,
        axis_key="token",
    )
    storage = make_storage(gen, dtype=torch.float16, device=device, row_padding=padding, **shape)
    for b, pad in enumerate(padding):  # junk in the padded middle and window: it would dominate if read
        middle = slice(0, max(0, min(pad - num_sink, num_stored)))
        if num_stored:
            storage.middle.key_zero[b, :, middle] = 30.0
            storage.middle.value_zero[b, :, middle] = 1000.0
        storage.recent_keys[b, :, : max(0, pad - num_sink - num_stored)] = 30.0
        storage.recent_values[b, :, : max(0, pad - num_sink - num_stored)] = 1000.0
    query = torch.randn(3, 4, 1, SMALL["head_dim"], generator=gen).half().to(device)
    config = None if launch is None else module.DecodeConfig(block_n=launch[0], block_exact=16, num_splits=launch[1])
    ref64 = float64_reference(query, storage, SMALL["head_dim"] ** -0.5)
    if device_lengths:  # the same tokens as a static cache holds them (ring window, lengths on the device)
        storage = with_device_lengths(storage, gen)
    twin = reference.selective_decode_attention(query, storage)
    out = module.selective_decode_attention(query, storage, config=config)
    assert torch.isfinite(out).all(), f"seed={seed}"
    assert relative_error(twin, ref64) < max_relative_error(torch.float16) / 4, f"twin, seed={seed}"
    assert relative_error(out, ref64) < max_relative_error(torch.float16), f"kernel, seed={seed}"


@pytest.mark.parametrize("nbits,axis_key", [(8, "token"), (4, "channel"), (3, "channel"), (2, "token")])
@pytest.mark.parametrize("num_stored", [64, 70])  # whole blocks (decode) and a partial block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_middle_dequantized_into_a_slice_equals_the_plain_formula(nbits, axis_key, num_stored, dtype):
    """Codes read in place (block-major values seen in token order) give exactly code * scale + zero."""
    from selkv import quant
    from selkv.middle import MiddleLayout, MiddleTensors, dequantize_middle

    B, H, D, G, T, capacity = 2, 3, 64, 32, 32, 128
    keys, values = torch.randn(B, H, capacity, D), torch.randn(B, H, capacity, D)
    if axis_key == "channel":
        key_codes, key_scale, key_zero = quant.quantize(keys, nbits, T, dim=-2)
    else:
        key_codes, key_scale, key_zero = quant.quantize(keys, nbits, G)
    value_codes, value_scale, value_zero = quant.quantize(values, nbits, G)

    def plain(codes, scale, zero, group, dim):  # scales repeated per element along ``dim``, then the first tokens
        scale = scale.float().repeat_interleave(group, dim=dim)[:, :, :num_stored]
        zero = zero.float().repeat_interleave(group, dim=dim)[:, :, :num_stored]
        return torch.addcmul(zero, codes[:, :, :num_stored].float(), scale).to(dtype)

    expected_keys = plain(key_codes, key_scale, key_zero, *((T, 2) if axis_key == "channel" else (G, 3)))
    expected_values = plain(value_codes, value_scale, value_zero, G, 3)
    stored = MiddleTensors(
        quant.pack(key_codes, nbits),
        key_scale,
        key_zero,
        quant.to_block_major(quant.pack(value_codes, nbits), T),
        value_scale,
        value_zero,
    )
    layout = MiddleLayout(nbits, nbits, G, axis_key, T)
    returned = dequantize_middle(stored, layout, num_stored, dtype=dtype)
    buffers = [torch.full((B, H, num_stored + 9, D), float("nan"), dtype=dtype) for _ in range(2)]
    dequantize_middle(
        stored,
        layout,
        num_stored,
        dtype=dtype,
        out_keys=buffers[0][:, :, 4 : 4 + num_stored],
        out_values=buffers[1][:, :, 4 : 4 + num_stored],
    )
    for got in (returned, (buffers[0][:, :, 4 : 4 + num_stored], buffers[1][:, :, 4 : 4 + num_stored])):
        assert torch.equal(got[0], expected_keys) and torch.equal(got[1], expected_values)
    assert buffers[0][:, :, :4].isnan().all() and buffers[1][:, :, 4 + num_stored :].isnan().all()


def test_offsets_go_wide_at_two_to_the_31_elements():
    """The launcher asks for 64-bit offsets exactly when a tensor's storage has more than 2^31 elements, so that
    an offset can pass 2^31 - 1 (meta tensors: sizes only, no memory)."""
    module = kernel_module()
    narrow = torch.empty(2**31, dtype=torch.uint8, device="meta")
    assert not module._wide_offsets(narrow)
    assert module._wide_offsets(torch.empty(2**31 + 1, dtype=torch.uint8, device="meta"))
    # a view's storage counts, not its element count: 2 rows 2^31 apart
    assert module._wide_offsets(torch.empty(2**31 + 1, dtype=torch.uint8, device="meta").as_strided((2,), (2**31,)))


@cuda_only
def test_cuda_batch_past_two_to_the_31_code_bytes():
    """A batch whose key codes pass 2^31 bytes (the last row starts at exactly 2^31): its last row reads what
    the same row alone reads. With 32-bit offsets the last row's address wraps (an illegal access, or the
    codes of another row)."""
    module = kernel_module()
    gen = torch.Generator().manual_seed(fresh_seed())
    shape = dict(
        batch_size=1,
        num_kv_heads=8,
        head_dim=128,
        num_sink=4,
        num_stored=32768 - 64,
        num_recent=60,
        nbits=8,
        q_group_size=64,
        axis_key="token",
        block_length=64,
    )
    alone = make_storage(gen, dtype=torch.bfloat16, device="cuda", **shape)
    assert alone.middle.key_codes[0].numel() == 2**31 // 64  # one row of key codes: 2^25 bytes
    batch = 65

    def widen(t):
        t = t.expand(batch, *t.shape[1:]).contiguous()
        if t.dtype == torch.uint8:  # the other rows hold other codes
            t[:-1] ^= 0x5A
        return t

    wide = dataclasses.replace(
        alone,
        sink_keys=widen(alone.sink_keys),
        sink_values=widen(alone.sink_values),
        recent_keys=widen(alone.recent_keys),
        recent_values=widen(alone.recent_values),
        middle=alone.middle.map(widen),
    )
    assert module._wide_offsets(wide.middle.key_codes)
    query = torch.randn(batch, 32, 1, 128, generator=gen).to("cuda", torch.bfloat16)
    got = module.selective_decode_attention(query, wide)[-1:]
    want = module.selective_decode_attention(query[-1:], alone)  # split otherwise: not bit-equal
    assert relative_error(got, want.double().cpu()) < 1e-2
