"""benchmarks/lowbit_sweep.py: the fake-quantization sweep of low-bit candidates (issue 23), small and on the CPU."""

import math
import sys
from pathlib import Path

import pytest
import torch
from support.models import make_tiny_llama, tiny_llama_config

from selkv import quant
from selkv.generation import prefill

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")


@pytest.fixture(scope="module")
def sweep():
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    import lowbit_sweep

    return lowbit_sweep


def _logits(model, cache, ids, chunk=8):
    out = []
    prefill(model, ids, cache, chunk, on_logits=lambda start, logits: out.append(logits))
    return torch.cat(out, dim=1)


@torch.inference_mode()
def test_lossless_candidate_equals_full(sweep):
    from selkv.cache import make_cache

    torch.set_num_threads(1)
    model = make_tiny_llama()
    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    full = _logits(model, make_cache("full", model.config), ids)
    # 16-bit keys and values (float16-rounded), no rotation: the middle holds the tokens as given
    cand = sweep.Candidate.parse("kbits=16,vbits=16,rotate=none,sink=2,window=16,block=8")
    model.float()
    fake = _logits(model, sweep.make_fake_cache(cand, model), ids)
    torch.testing.assert_close(fake, full, atol=2e-3, rtol=0)
    # float16 rounding aside, the same: with keys kept exact through pre-RoPE and back, and the sweep's attention
    cand = sweep.Candidate.parse("kbits=16,vbits=16,rotate=none,prerope=1,sink=2,window=16,block=8")
    model.set_attn_implementation(sweep.register_attention())
    try:
        torch.testing.assert_close(_logits(model, sweep.make_fake_cache(cand, model), ids), fake, atol=2e-3, rtol=0)
        # the sweep's attention records probabilities for `retain` and answers as SDPA does
        recorder = sweep.AttentionRecorder()
        sweep.AttentionRecorder.active = recorder
        torch.testing.assert_close(_logits(model, make_cache("full", model.config), ids), full, atol=1e-5, rtol=0)
        seen = recorder.seen[0]
        assert seen[0] == 96 and seen[-1] == 1  # queries that could attend to the first and the last position
        torch.testing.assert_close(recorder.received[0].sum(), torch.tensor(96.0 * 4), atol=1e-3, rtol=0)
    finally:
        sweep.AttentionRecorder.active = None
        model.set_attn_implementation("sdpa")


@torch.inference_mode()
@pytest.mark.parametrize(
    "extra,fields",
    [
        # the int2 default: symmetric values (no zero), 3-bit keys in every layer, keys and values rotated
        ("", ",vsym=1,vrotate=hadamard,layer_bits=0-1:3/2"),
        # value zeros stored: 3-bit keys in the last 3/4 of the layers (layer 1 of 2)
        (",vsym=0", ",vrotate=hadamard,layer_bits=1:3/2"),
        (",vrotate=none", ",vsym=1,layer_bits=0-1:3/2"),  # the candidate's vrotate default is none
    ],
)
def test_fake_int2_matches_library_int2(sweep, extra, fields):
    from selkv.cache import make_cache

    model = make_tiny_llama()
    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(1))
    spec = f"quant:bits=2,sink=2,window=16,block=8,group=32{extra}"
    library = _logits(model, make_cache(spec, model.config), ids)
    cand = sweep.Candidate.parse(f"kbits=2,vbits=2,rotate=hadamard,sink=2,window=16,block=8,group=32{fields}")
    torch.testing.assert_close(_logits(model, sweep.make_fake_cache(cand, model), ids), library, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_fake_int3_matches_library_int3(sweep):
    """The sweep's 3-bit candidate and the library's bits=3 (packed codes, read back) are the same cache: the
    library's defaults are plain-Hadamard keys and values, symmetric values and 4-bit keys in the last 2/3 of the
    layers (layers 1-2 of 3)."""
    from selkv.cache import make_cache

    model = make_tiny_llama(layers=3)
    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(2))
    spec = "quant:bits=3,sink=2,window=16,block=8,group=32"
    library = _logits(model, make_cache(spec, model.config), ids)
    fields = "sink=2,window=16,block=8,group=32,rotate=hadamard,vrotate=hadamard,vsym=1,layer_bits=1-2:4/3"
    cand = sweep.Candidate.parse(f"kbits=3,vbits=3,{fields}")
    torch.testing.assert_close(_logits(model, sweep.make_fake_cache(cand, model), ids), library, atol=1e-4, rtol=0)


@torch.inference_mode()
@pytest.mark.parametrize("rotate", ["hadamard", "hadamard-signs"])
def test_fake_value_rotation_matches_library_vrotate(sweep, rotate):
    """The sweep's ``vrotate`` candidate and the library's ``vrotate`` (codes of the rotated values, read back
    rotated back) are the same cache, with the keys' rotation the same matrix or another."""
    from selkv.cache import make_cache

    model = make_tiny_llama()
    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(3))
    spec = f"quant:bits=3,sink=2,window=16,block=8,group=32,vsym=0,rotate={rotate},vrotate=hadamard"
    library = _logits(model, make_cache(spec, model.config), ids)
    cand = sweep.Candidate.parse(f"kbits=3,vbits=3,sink=2,window=16,block=8,group=32,rotate={rotate},vrotate=hadamard")
    torch.testing.assert_close(_logits(model, sweep.make_fake_cache(cand, model), ids), library, atol=1e-4, rtol=0)
    unrotated = _logits(model, make_cache(spec.replace(",vrotate=hadamard", ",vrotate=none"), model.config), ids)
    assert not torch.allclose(unrotated, library, atol=1e-4, rtol=0)  # the value rotation changes the cache


@torch.inference_mode()
def test_fake_layer_bits_match_library_layer_bits(sweep):
    """The sweep's ``layer_bits`` candidate and the library's ``layer_bits`` spec are the same cache: a listed
    layer keeps the spec's block, group, key axis and rotations and takes only its widths."""
    from selkv.cache import make_cache

    model = make_tiny_llama(layers=3)
    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(4))
    fields = "sink=2,window=16,block=8,group=32,rotate=hadamard,vrotate=hadamard"
    spec = f"quant:bits=3,{fields},vsym=0,layer_bits=1:4/3+2:8/2"
    library = _logits(model, make_cache(spec, model.config), ids)
    cand = sweep.Candidate.parse(f"kbits=3,vbits=3,{fields},layer_bits=1:4/3+2:8/2")
    torch.testing.assert_close(_logits(model, sweep.make_fake_cache(cand, model), ids), library, atol=1e-4, rtol=0)
    uniform = _logits(model, make_cache(spec.partition(",layer_bits=")[0], model.config), ids)
    assert not torch.allclose(uniform, library, atol=1e-4, rtol=0)  # the other widths change the cache


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
def test_fake_quantize_is_quant_quantize(sweep, nbits):
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(nbits)) * 3
    for group, dim in ((32, -2), (16, -1)):
        codes, scale, zero = quant.quantize(x, nbits, group, dim=dim)
        expected = quant.dequantize(codes, scale, zero, group, dim=dim)
        torch.testing.assert_close(sweep.fake_quantize(x, nbits, group, dim=dim), expected, atol=0, rtol=0)


def test_three_bit_error_is_between_two_and_four(sweep):
    x = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(3))
    errors = [(sweep.fake_quantize(x, bits, 32, dim=-2) - x).abs().max() for bits in (2, 3, 4)]
    assert errors[0] > errors[1] > errors[2]
    scale = (x.amax(-2) - x.amin(-2)) / 7  # per channel over the 32-token groups: within half a step
    assert bool(
        ((sweep.fake_quantize(x[:, :, :32], 3, 32, dim=-2) - x[:, :, :32]).abs() <= scale[:, :, None] * 0.51).all()
    )


def test_prerope_round_trips(sweep):
    model = make_tiny_llama()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rope = sweep.Rope(model.model.rotary_emb)
    k = torch.randn(1, 2, 40, 32, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(100, 140)
    cos, sin = model.model.rotary_emb(k, positions[None])
    rotated, _ = apply_rotary_pos_emb(k, k, cos, sin)  # what the model caches
    torch.testing.assert_close(rope.apply(k, positions), rotated, atol=1e-5, rtol=0)
    torch.testing.assert_close(rope.invert(rotated, positions), k, atol=1e-5, rtol=0)
    torch.testing.assert_close(rope.apply(rope.invert(rotated, positions), positions), rotated, atol=1e-5, rtol=0)


def test_dense_and_sparse_keeps_exactly_the_chosen_outliers(sweep):
    x = torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(5))
    x[0, 0, 3, 7] = 40.0  # a planted outlier
    count = 10
    mask = sweep.outlier_mask(x, count, block=32)
    assert mask.reshape(1, 2, 2, 32 * 32).sum(-1).eq(count).all()  # exactly `count` per block of each head
    assert bool(mask[0, 0, 3, 7])
    # they are the largest deviations from the channel's median in the block
    blocks = x.reshape(1, 2, 2, 32, 32)
    score = (blocks - blocks.median(dim=-2, keepdim=True).values).abs().reshape(1, 2, 2, -1)
    kept = mask.reshape(1, 2, 2, -1)
    assert bool((score.masked_fill(~kept, -1).amax(-1) >= score.masked_fill(~kept, math.inf).amin(-1)).all())
    assert bool((score.masked_fill(kept, -1).amax(-1) <= score.masked_fill(~kept, math.inf).amin(-1)).all())
    out = sweep.fake_quantize(x, 2, 32, dim=-2, keep=mask)
    torch.testing.assert_close(out[mask], x[mask].half().float(), atol=0, rtol=0)  # kept: 16-bit
    assert (out[~mask] - x[~mask]).abs().max() < 2.0  # the rest no longer quantized over the planted range
    cand = sweep.Candidate.parse("kbits=2,vbits=2,rotate=none,outliers=0.01")
    assert cand.outliers_per_block(64) == 20


@pytest.mark.parametrize(
    "spec,fields",
    [
        # the 2-bit default: key blocks of 128, symmetric values (no zero stored), 3-bit keys in every layer, one
        # plain Hadamard matrix for keys and values
        (
            "quant:bits=2,sink=4,window=124",
            "kbits=2,vbits=2,block=128,rotate=hadamard,vrotate=hadamard,vsym=1,layer_bits=0-2:3/2",
        ),
        (
            "quant:bits=2,sink=4,window=124,vrotate=none",
            "kbits=2,vbits=2,block=128,rotate=hadamard,vsym=1,layer_bits=0-2:3/2",
        ),
        # with value zeros stored: 3-bit keys in the last 3/4 (layers 1-2 of 3)
        (
            "quant:bits=2,sink=4,window=124,vsym=0",
            "kbits=2,vbits=2,block=128,rotate=hadamard,vrotate=hadamard,layer_bits=1-2:3/2",
        ),
        # the 2-bit default of 2026-12-06: the values' plain matrix beside the keys' signed one (its bytes)
        (
            "quant:bits=2,sink=4,window=124,vsym=0,block=64,late_kbits=2,rotate=hadamard-signs,layer_bits=2:3/2",
            "kbits=2,vbits=2,block=64,vrotate=hadamard,layer_bits=2:3/2",
        ),
        (
            "quant:bits=2,sink=4,window=124,vsym=0,block=32,late_kbits=2,rotate=hadamard-signs",
            "kbits=2,vbits=2,vrotate=hadamard",
        ),
        ("quant:bits=4,sink=4,window=124", "kbits=4,vbits=4,block=64,group=32"),
        ("quant:bits=8,sink=4,window=124", "kbits=8,vbits=8,key_axis=token,rotate=none"),
        ("quant:kbits=4,vbits=2,sink=4,window=124", "kbits=4,vbits=2,block=64,vrotate=hadamard,vsym=1"),
        (
            "quant:bits=2,sink=4,window=60,block=16",
            "kbits=2,vbits=2,window=60,block=16,rotate=hadamard,vrotate=hadamard,vsym=1,layer_bits=0-2:3/2",
        ),
        # the 3-bit default: key blocks of 128, symmetric values, 4-bit keys in the last 2/3 (layers 1-2 of 3), one
        # plain Hadamard matrix for keys and values; with value zeros stored the last 2/5 (layer 2)
        (
            "quant:bits=3,sink=4,window=124",
            "kbits=3,vbits=3,block=128,rotate=hadamard,vrotate=hadamard,vsym=1,layer_bits=1-2:4/3",
        ),
        (
            "quant:bits=3,sink=4,window=124,vsym=0",
            "kbits=3,vbits=3,block=128,rotate=hadamard,vrotate=hadamard,layer_bits=2:4/3",
        ),
        # value rotations: the keys' matrix (no extra bytes), another one (its bytes), values only
        (
            "quant:bits=3,sink=4,window=124,vsym=0,block=64,late_kbits=3",
            "kbits=3,vbits=3,block=64,rotate=hadamard,vrotate=hadamard",
        ),
        (
            "quant:bits=3,sink=4,window=124,vsym=0,block=64,late_kbits=3,rotate=hadamard-signs",
            "kbits=3,vbits=3,block=64,vrotate=hadamard",
        ),
        (
            "quant:bits=3,sink=4,window=124,vsym=0,block=64,late_kbits=3,rotate=none",
            "kbits=3,vbits=3,block=64,rotate=none,vrotate=hadamard",
        ),
        # symmetric values at another width
        ("quant:bits=4,sink=4,window=124,vsym=1", "kbits=4,vbits=4,block=64,group=32,vsym=1"),
        # per-layer widths: each layer's own tensors (the library) and bytes (the sweep)
        (
            "quant:bits=3,sink=4,window=124,vsym=0,block=64,late_kbits=3,layer_bits=0:4/3+2:8/2",
            "kbits=3,vbits=3,block=64,rotate=hadamard,vrotate=hadamard,layer_bits=0:4/3+2:8/2",
        ),
    ],
)
def test_held_bytes_match_kv_bytes(sweep, spec, fields):
    from selkv.sizing import cache_size

    config = tiny_llama_config(head_dim=64, layers=3)
    expected = cache_size(spec, config, 700)
    counted = sweep.held_bytes(sweep.Candidate.parse(fields), config, 700)
    assert counted["allocated"] == expected["allocated"]
    assert counted["full16"] == expected["full16"]


def test_layer_bits_count_each_layer(sweep):
    config = tiny_llama_config(head_dim=64, layers=3)
    cand = sweep.Candidate.parse("kbits=3,vbits=3,block=64,layer_bits=0-1:4/4")
    assert cand.layer_widths() == {0: (4, 4), 1: (4, 4)}
    assert (cand.for_layer(0).kbits, cand.for_layer(2).kbits) == (4, 3)
    mixed = sweep.held_bytes(cand, config, 700)
    three = sweep.held_bytes(sweep.Candidate.parse("kbits=3,vbits=3,block=64"), config, 700)
    four = sweep.held_bytes(sweep.Candidate.parse("kbits=4,vbits=4,block=64"), config, 700)
    # two layers as the 4-bit cache holds them, one as the 3-bit cache (the rotation matrix once)
    assert 3 * mixed["allocated"] == 2 * four["allocated"] + three["allocated"]
    model = make_tiny_llama()
    layers = sweep.make_fake_cache(sweep.Candidate.parse("kbits=3,vbits=3,layer_bits=1:4/2"), model).layers
    assert [(layer.cand.kbits, layer.cand.vbits) for layer in layers][:2] == [(3, 3), (4, 2)]


def test_symmetric_groups_and_clipping(sweep):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6)) + 0.5
    x[0, 0, 5, 3] = 30.0
    sym = sweep.fake_quantize(x, 3, 64, dim=-1, sym=True)
    step = x.abs().amax(-1, keepdim=True) / 3.5  # range [-m, m] in 7 steps
    assert bool(((sym - x).abs() <= step * 0.51).all())
    assert all(row.unique().numel() <= 8 for row in sym.reshape(-1, 64))  # 8 levels a group
    torch.testing.assert_close(sym[0, 0, 5].amax(), torch.tensor(30.0), atol=0.05, rtol=0)  # the top level is m
    for dim in (-1, -2):
        plain = sweep.fake_quantize(x, 3, 64, dim=dim)
        clipped = sweep.fake_quantize(x, 3, 64, dim=dim, clip=0.7)
        assert (clipped - x).square().sum() < (plain - x).square().sum()  # the squared error only falls
    # bytes: a float16 scale per group, no zero
    config = tiny_llama_config(head_dim=64, layers=3)
    asym = sweep.held_bytes(sweep.Candidate.parse("kbits=3,vbits=3,block=64"), config, 700)
    half = sweep.held_bytes(sweep.Candidate.parse("kbits=3,vbits=3,block=64,ksym=1,vsym=1"), config, 700)
    assert half["scales"] * 2 == asym["scales"]


@torch.inference_mode()
def test_value_rotation_is_undone(sweep):
    model = make_tiny_llama().float()
    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(7))
    plain = sweep.Candidate.parse("kbits=16,vbits=16,rotate=none,sink=2,window=16,block=8")
    rotated = sweep.Candidate.parse("kbits=16,vbits=16,rotate=none,vrotate=hadamard-signs,sink=2,window=16,block=8")
    torch.testing.assert_close(
        _logits(model, sweep.make_fake_cache(rotated, model), ids),
        _logits(model, sweep.make_fake_cache(plain, model), ids),
        atol=2e-3,
        rtol=0,
    )


def test_normal_levels(sweep):
    table = sweep.normal_levels(8)
    assert table[0] == -1 and table[-1] == 1 and bool((table.diff() > 0).all())
    torch.testing.assert_close(table, -table.flip(0))
    # Lloyd-Max for a standard normal, 8 levels: +-0.2451, 0.7560, 1.3439, 2.1520 (Max, 1960)
    torch.testing.assert_close(table[4:] * 2.1520, torch.tensor([0.2451, 0.7560, 1.3439, 2.1520]), atol=2e-3, rtol=0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    for dim in (-1, -2):
        out = sweep.fake_quantize(x, 3, 64, dim=dim, levels="normal")
        assert all(row.unique().numel() <= 8 for row in out.movedim(dim, -1).reshape(-1, 64))
        assert (out - x).square().mean() < (sweep.fake_quantize(x, 3, 64, dim=dim) - x).square().mean()
