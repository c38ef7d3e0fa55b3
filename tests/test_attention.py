"""selkv's attention function: equal to sdpa in generate(), padding read from masks, caches reused after ``reset()``.

Models here are built fresh (``make_tiny_llama``), never through ``selkv.load_model``, so no
``track_padding`` hook tells the cache about padding: selkv's attention must read it from the mask.
"""

from __future__ import annotations

import pytest
import torch
from support.markers import cuda_only
from support.models import make_tiny_llama, tiny_llama_config
from support.storages import fresh_seed
from support.tolerances import TOLERANCES

import selkv
from selkv.models import cache_kwarg, forward_with_cache


def _greedy(attn_implementation: str, spec: str, device: str, dtype: torch.dtype, prompts: torch.Tensor, mask=None):
    import selkv  # noqa: F401  (registers "selkv")
    from selkv import make_cache

    model = make_tiny_llama(attn_implementation).to(device=device, dtype=dtype)
    cache = make_cache(spec, model.config)
    with torch.no_grad():
        out = model.generate(
            prompts.to(device),
            attention_mask=None if mask is None else mask.to(device),
            **{cache_kwarg(model): cache},
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=0,
        )
    layer = cache.layers[0]
    return out.cpu(), layer


SPECS = [
    "quant:bits=4,sink=2,window=8,block=4",
    "quant:bits=8,sink=3,window=5,block=2,key_axis=token",
    "quant:kbits=4,vbits=2,sink=2,window=8,block=4",
    "quant:kbits=2,vbits=8,sink=2,window=8,block=4,key_axis=token",
    "quant:bits=4,sink=2,window=8,block=4,key_axis=token,group=16,rotate=hadamard",
    "quant:bits=3,sink=2,window=8,block=4",
    "quant:kbits=3,vbits=2,sink=2,window=8,block=4",
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_generate_selkv_matches_sdpa(spec, device):
    prompts = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(fresh_seed()))
    expected, ref_layer = _greedy("sdpa", spec, device, torch.float32, prompts)
    got, layer = _greedy("selkv", spec, device, torch.float32, prompts)
    assert layer.fused_decode and not ref_layer.fused_decode
    assert layer.num_stored > 0, "the test must reach the quantized middle"
    assert torch.equal(got, expected), f"{spec} on {device}:\n{got}\n{expected}"


def test_selkv_attention_registered_for_from_config():
    from transformers import AutoModelForCausalLM

    import selkv  # noqa: F401

    model = AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="selkv")
    assert model.config._attn_implementation == "selkv"


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


def test_selkv_attention_reads_padding_from_the_mask(selkv_llama):
    """Padding (21 positions) spills past the sink (4): each row decodes as it does alone."""
    from selkv.models import _TRACKED

    assert selkv_llama not in _TRACKED  # no padding hook: attention reads the padding from the mask alone
    rows = random_rows(30, 9, 17)
    input_ids, attention_mask = left_pad(rows)
    cache = selkv.make_cache(LOSSLESS, selkv_llama.config)
    batch = decode_logits(selkv_llama, cache, input_ids, attention_mask)
    for i, row in enumerate(rows):
        alone = decode_logits(
            selkv_llama,
            selkv.make_cache(LOSSLESS, selkv_llama.config),
            torch.tensor([row]),
            torch.ones(1, len(row), dtype=torch.long),
        )
        torch.testing.assert_close(
            batch[i], alone[0], **TOLERANCES["lossless_fp32"], msg=lambda m, i=i: f"row {i}\n{m}"
        )


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
            out = model.generate(
                input_ids,
                attention_mask=attention_mask,
                **{cache_kwarg(model): cache},
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
            )
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


@pytest.mark.parametrize("attn", ["sdpa", "selkv"])
def test_reset_cache_behaves_like_a_new_one(attn):
    model = make_tiny_llama(attn)
    selkv.track_padding(model)  # the hook gives the first batch sink room and row padding that reset() must forget
    spec = "quant:bits=8,sink=4,window=8,block=4"
    cache = selkv.make_cache(spec, model.config)
    decode_logits(model, cache, *left_pad(random_rows(30, 9)))
    # Another batch size without a mask (the hook sees nothing), the first size without padding, other padding.
    batches = [
        (torch.randint(3, 256, (3, 20)), None),
        (torch.randint(3, 256, (2, 25)), None),
        left_pad(random_rows(14, 26)),
    ]
    for input_ids, attention_mask in batches:
        cache.reset()
        reused = decode_logits(model, cache, input_ids, attention_mask)
        fresh = decode_logits(model, selkv.make_cache(spec, model.config), input_ids, attention_mask)
        torch.testing.assert_close(reused, fresh, **TOLERANCES["lossless_fp32"])
