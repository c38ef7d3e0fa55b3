"""Left-padded batches without the padding hook, and caches reused after ``reset()``.

Models here are built fresh (``make_tiny_llama``), never through ``selkv.load_model``, so no
``track_padding`` hook tells the cache about padding: selkv's attention must read it from the mask.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, make_tiny_llama
from test_decode_attention import (
    REL_ERROR,
    SMALL,
    _relative_error,
    _seed,
    float64_reference,
    kernel_module,
    make_storage,
    with_device_lengths,
)

import selkv
from selkv.kernels import reference
from selkv.models import cache_kwarg, forward_with_cache

LOSSLESS = "quant:bits=8,sink=4,window=300"  # nothing leaves the window: equal to the full cache
LOSSY = "quant:bits=4,sink=4,window=8,block=4"  # most tokens read back from 4-bit codes


@pytest.fixture(scope="module")
def selkv_llama():
    return make_tiny_llama("selkv")


@pytest.fixture(scope="module")
def sdpa_llama():
    return make_tiny_llama("sdpa")


def left_pad(rows: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    length = length or max(len(r) for r in rows)
    input_ids = torch.zeros((len(rows), length), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row)
        attention_mask[i, length - len(row) :] = 1
    return input_ids, attention_mask


def random_rows(*lengths: int) -> list[list[int]]:
    return [torch.randint(3, 256, (n,)).tolist() for n in lengths]


@torch.no_grad()
def decode_logits(model, cache, input_ids, attention_mask=None, steps: int = 6) -> torch.Tensor:
    """Prefill, then ``steps`` greedy one-token steps with the growing 2D mask: ``[batch, steps + 1, vocab]``.

    Without ``attention_mask`` no step is given one (unpadded rows, as many callers run them).
    """
    out = forward_with_cache(model, cache, input_ids, attention_mask=attention_mask)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=-1)
        logits.append(forward_with_cache(model, cache, token, attention_mask=attention_mask).logits[:, -1])
    return torch.stack(logits, dim=1)


# ------------------------------------------------------- defect: mask ignored


def test_selkv_attention_reads_padding_from_the_mask(selkv_llama):
    """Padding (21 positions) spills past the sink (4): each row decodes as it does alone."""
    assert not getattr(selkv_llama, "_selkv_tracks_padding", False)
    rows = random_rows(30, 9, 17)
    input_ids, attention_mask = left_pad(rows)
    cache = selkv.make_cache(LOSSLESS, selkv_llama.config)
    batch = decode_logits(selkv_llama, cache, input_ids, attention_mask)
    for i, row in enumerate(rows):
        alone = decode_logits(selkv_llama, selkv.make_cache(LOSSLESS, selkv_llama.config), torch.tensor([row]),
                              torch.ones(1, len(row), dtype=torch.long))
        torch.testing.assert_close(batch[i], alone[0], **TOLERANCES["lossless_fp32"], msg=lambda m: f"row {i}\n{m}")


@pytest.mark.parametrize("track", [False, True])
def test_padding_over_the_quantized_middle_matches_sdpa(track, sdpa_llama):
    """Padding reaches into the 4-bit middle and the window: the fused path equals SDPA over the same cache."""
    rows = random_rows(40, 12)
    input_ids, attention_mask = left_pad(rows)
    logits = {}
    for attn in ("sdpa", "selkv"):
        model = make_tiny_llama(attn)
        if track:
            selkv.track_padding(model)
        cache = selkv.make_cache(LOSSY, model.config)
        logits[attn] = decode_logits(model, cache, input_ids, attention_mask, steps=10)
        layer = cache.layers[0]
        assert layer.num_stored > 0 and layer.sink_capacity == (4 + 28 if track else 4)
    torch.testing.assert_close(logits["selkv"], logits["sdpa"], **TOLERANCES["lossless_fp32"])


def test_generate_with_padding_and_selkv_attention(selkv_llama, sdpa_llama):
    rows = random_rows(25, 7)
    input_ids, attention_mask = left_pad(rows)
    tokens = {}
    for name, model in (("selkv", selkv_llama), ("sdpa", sdpa_llama)):
        cache = selkv.make_cache(LOSSY, model.config)
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=attention_mask, **{cache_kwarg(model): cache}, max_new_tokens=12,
                                 do_sample=False, pad_token_id=0)
        tokens[name] = out[:, input_ids.shape[1] :]
    assert torch.equal(tokens["selkv"], tokens["sdpa"])


def test_drop_refuses_padding_it_cannot_mask(selkv_llama):
    rows = random_rows(30, 9)
    input_ids, attention_mask = left_pad(rows)
    cache = selkv.make_cache("drop:sink=4,window=16", selkv_llama.config)
    with pytest.raises(NotImplementedError, match="left-padded"):
        decode_logits(selkv_llama, cache, input_ids, attention_mask)
    # Unpadded batches still run (an all-ones mask).
    input_ids, attention_mask = left_pad(random_rows(20, 20))
    decode_logits(selkv_llama, selkv.make_cache("drop:sink=4,window=16", selkv_llama.config), input_ids, attention_mask)


def test_row_padding_from_a_float_mask():
    from selkv.attention import _row_padding_from_mask

    allowed = torch.tensor([[False, False, True, True], [True, True, True, True]])[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for mask in (allowed, additive):
        assert _row_padding_from_mask(mask).tolist() == [2, 0]
    assert _row_padding_from_mask(None) is None


@pytest.mark.parametrize("nbits,num_sink,num_stored,num_recent,padding,launch", [
    (8, 4, 48, 21, [0, 30, 60], (16, 3)),  # row 1: padding ends in the middle; row 2: in the window
    (4, 2, 64, 9, [66, 5, 17], (16, 4)),  # row 0: every middle tile is padding (an empty partial)
    (8, 0, 32, 16, [40, 0, 33], None),
])
@pytest.mark.parametrize("device_lengths", [False, True])
def test_kernel_masks_padding_past_the_sink(
    nbits, num_sink, num_stored, num_recent, padding, launch, device_lengths
):
    """On CUDA the compiled kernel, elsewhere Triton's interpreter."""
    module = kernel_module()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    shape = dict(SMALL, batch_size=3, num_sink=num_sink, num_stored=num_stored, num_recent=num_recent, nbits=nbits,
                 axis_key="token")
    storage = make_storage(gen, dtype=torch.float16, device=device, row_padding=padding, **shape)
    for b, pad in enumerate(padding):  # junk in the padded middle and window: it would dominate if read
        middle = slice(0, max(0, min(pad - num_sink, num_stored)))
        if num_stored:
            storage.key_zero[b, :, middle] = 30.0
            storage.value_zero[b, :, middle] = 1000.0
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
    assert _relative_error(twin, ref64) < REL_ERROR[torch.float16] / 4, f"twin, seed={seed}"
    assert _relative_error(out, ref64) < REL_ERROR[torch.float16], f"kernel, seed={seed}"


# ---------------------------------------------------------- defect: reset()


@pytest.mark.parametrize("attn", ["sdpa", "selkv"])
def test_reset_cache_behaves_like_a_new_one(attn):
    model = make_tiny_llama(attn)
    selkv.track_padding(model)  # the hook gives the first batch sink room and row padding that reset() must forget
    spec = "quant:bits=8,sink=4,window=8,block=4"
    cache = selkv.make_cache(spec, model.config)
    decode_logits(model, cache, *left_pad(random_rows(30, 9)))
    # Another batch size without a mask (the hook sees nothing), the first size without padding, other padding.
    batches = [(torch.randint(3, 256, (3, 20)), None), (torch.randint(3, 256, (2, 25)), None),
               left_pad(random_rows(14, 26))]
    for input_ids, attention_mask in batches:
        cache.reset()
        reused = decode_logits(model, cache, input_ids, attention_mask)
        fresh = decode_logits(model, selkv.make_cache(spec, model.config), input_ids, attention_mask)
        torch.testing.assert_close(reused, fresh, **TOLERANCES["lossless_fp32"])


# ------------------------------------- dequantizing the middle in place (CPU decode)


@pytest.mark.parametrize("nbits,axis_key", [(8, "token"), (4, "channel"), (2, "token")])
@pytest.mark.parametrize("num_stored", [64, 70])  # whole blocks (decode) and a partial block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_middle_dequantized_into_a_slice_equals_the_plain_formula(nbits, axis_key, num_stored, dtype):
    """Codes read in place (block-major values seen in token order) give exactly code * scale + zero."""
    from selkv import quant
    from selkv.storage import dequantize_middle

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
    stored = (quant.pack(key_codes, nbits), key_scale, key_zero,
              quant.to_block_major(quant.pack(value_codes, nbits), T), value_scale, value_zero)
    settings = dict(nbits=nbits, q_group_size=G, axis_key=axis_key, block_length=T, dtype=dtype)
    returned = dequantize_middle(*stored, num_stored, **settings)
    buffers = [torch.full((B, H, num_stored + 9, D), float("nan"), dtype=dtype) for _ in range(2)]
    dequantize_middle(*stored, num_stored, **settings, out_keys=buffers[0][:, :, 4 : 4 + num_stored],
                      out_values=buffers[1][:, :, 4 : 4 + num_stored])
    for got in (returned, (buffers[0][:, :, 4 : 4 + num_stored], buffers[1][:, :, 4 : 4 + num_stored])):
        assert torch.equal(got[0], expected_keys) and torch.equal(got[1], expected_values)
    assert buffers[0][:, :, :4].isnan().all() and buffers[1][:, :, 4 + num_stored :].isnan().all()
