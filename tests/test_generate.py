"""model.generate() with selkv caches: equivalence, batches with padding, beam search, the embedded model."""

from __future__ import annotations

import pytest
import torch
from support.data import read_book
from support.markers import needs_quanto, needs_shared_data
from support.tolerances import TOLERANCES

import selkv
from selkv.generation import decode_tokens, eos_token_ids, greedy_decode, prefill
from selkv.models import cache_kwarg, forward_with_cache

ALL_KINDS = [
    "full",
    "drop:sink=4,window=16",
    "quant:bits=8,sink=4,window=16",
    "quant:bits=4,sink=4,window=16,key_axis=channel,block=8",
    "quant:bits=2,sink=0,window=0",
    pytest.param("hf-quanto:bits=4,residual=16", marks=needs_quanto),
]


def greedy(model, input_ids, spec, max_new_tokens=24, **kwargs):
    cache = selkv.make_cache(spec, model.config)
    with torch.no_grad():
        out = model.generate(
            input_ids,
            **{cache_kwarg(model): cache},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[:, input_ids.shape[1] :], cache


@pytest.mark.parametrize("spec", ALL_KINDS)
def test_generate_runs_with_every_kind(tiny_llama, spec):
    input_ids = torch.randint(3, 256, (1, 40))
    tokens, cache = greedy(tiny_llama, input_ids, spec)
    assert tokens.shape == (1, 24)
    assert cache.get_seq_length() == 40 + 24 - 1  # the last token is never fed back
    assert selkv.kv_bytes(cache)["total"] > 0


@pytest.mark.parametrize(
    "spec", ["quant:bits=8,sink=4,window=200", "drop:sink=4,window=200", "quant:bits=2,sink=1,window=200"]
)
def test_lossless_settings_generate_the_full_cache_tokens(tiny_llama, spec):
    input_ids = torch.randint(3, 256, (1, 50))
    reference, _ = greedy(tiny_llama, input_ids, "full", max_new_tokens=40)
    tokens, _ = greedy(tiny_llama, input_ids, spec, max_new_tokens=40)
    assert torch.equal(tokens, reference)


def _left_pad(rows, pad_id=0):
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row)
        attention_mask[i, length - len(row) :] = 1
    return input_ids, attention_mask


def test_left_padded_batch_matches_rows_run_alone(tiny_llama):
    selkv.track_padding(tiny_llama)
    rows = [torch.randint(3, 256, (n,)).tolist() for n in (21, 34, 9)]
    input_ids, attention_mask = _left_pad(rows)
    spec = "quant:bits=8,sink=4,window=300"
    batch, _ = greedy(tiny_llama, input_ids, spec, attention_mask=attention_mask)
    for i, row in enumerate(rows):
        alone, _ = greedy(tiny_llama, torch.tensor([row]), spec)
        assert torch.equal(batch[i], alone[0]), i


def test_padding_never_takes_a_rows_sink(tiny_llama):
    selkv.track_padding(tiny_llama)
    rows = [torch.randint(3, 256, (n,)).tolist() for n in (40, 25)]
    input_ids, attention_mask = _left_pad(rows)
    spec = "quant:bits=4,sink=4,window=8,block=4"
    _, cache = greedy(tiny_llama, input_ids, spec, max_new_tokens=4, attention_mask=attention_mask)
    layer = cache.layers[0]
    assert layer.sink_capacity == 4 + 15 and layer.row_padding.tolist() == [0, 15]
    # Row 1's first 4 real tokens sit in its sink, in 16-bit: the same keys as when it runs alone.
    _, alone = greedy(tiny_llama, torch.tensor([rows[1]]), spec, max_new_tokens=4)
    torch.testing.assert_close(
        layer.sink_keys[1, :, 15:19], alone.layers[0].sink_keys[0, :, :4], **TOLERANCES["lossless_fp32"]
    )


def test_eviction_refuses_left_padding_clearly(tiny_llama):
    selkv.track_padding(tiny_llama)
    input_ids, attention_mask = _left_pad([[5, 6, 7, 8], [9, 10]])
    with pytest.raises(NotImplementedError, match="left-padded"):
        greedy(tiny_llama, input_ids, "drop:sink=4,window=16", attention_mask=attention_mask)


def test_beam_search_reorders_the_cache(tiny_llama):
    input_ids = torch.randint(3, 256, (1, 30))
    reference, _ = greedy(tiny_llama, input_ids, "full", num_beams=3, max_new_tokens=12)
    lossless, _ = greedy(tiny_llama, input_ids, "quant:bits=4,sink=4,window=100", num_beams=3, max_new_tokens=12)
    assert torch.equal(lossless, reference)
    lossy, cache = greedy(tiny_llama, input_ids, "quant:bits=8,sink=2,window=4,block=2", num_beams=3, max_new_tokens=12)
    assert lossy.shape == reference.shape and cache.layers[0].num_stored > 0


@pytest.mark.parametrize("spec", ["full", "quant:bits=4,sink=2,window=8,block=4", "drop:sink=4,window=16,block=8"])
def test_prefill_and_greedy_loop_give_transformers_greedy_tokens(tiny_llama, spec):
    """generation.prefill + greedy_decode (the loop generate and the eval tasks use) pick model.generate's tokens,
    stopping at EOS as it does."""
    input_ids = torch.randint(3, 256, (1, 37))
    expected, _ = greedy(tiny_llama, input_ids, spec, max_new_tokens=30)
    cache = selkv.make_cache(spec, tiny_llama.config)
    with torch.inference_mode():
        last = prefill(tiny_llama, input_ids, cache)
        tokens = greedy_decode(tiny_llama, cache, last, 30, eos_token_ids(tiny_llama, None))
    assert tokens == expected[0].tolist()


def test_chunked_prefill_feeds_every_token_once(tiny_llama):
    input_ids = torch.randint(3, 256, (2, 30))
    seen = []
    cache = selkv.make_cache("full", tiny_llama.config)
    with torch.inference_mode():
        last = prefill(
            tiny_llama, input_ids, cache, chunk=7, on_logits=lambda start, logits: seen.append((start, logits))
        )
        one_pass = tiny_llama(input_ids).logits
    assert [start for start, _ in seen] == [0, 7, 14, 21, 28] and int(cache.get_seq_length()) == 30
    torch.testing.assert_close(torch.cat([logits for _, logits in seen], dim=1), one_pass, **TOLERANCES["kernel_fp32"])
    torch.testing.assert_close(last, one_pass[:, -1], **TOLERANCES["kernel_fp32"])


@pytest.mark.parametrize("chunk", [0, 16])
def test_prefill_holds_only_the_last_positions_logits(tiny_llama, chunk):
    """The returned logits own their own small storage, and the model computed no more (logits_to_keep)."""
    input_ids = torch.randint(3, 256, (2, 40))
    computed = []
    hook = tiny_llama.lm_head.register_forward_hook(lambda module, args, out: computed.append(out.shape[1]))
    try:
        with torch.inference_mode():
            last = prefill(
                tiny_llama,
                input_ids,
                selkv.make_cache("quant:bits=4,sink=4,window=8,block=4", tiny_llama.config),
                chunk=chunk,
            )
            one_pass = tiny_llama(input_ids).logits[:, -1]
    finally:
        hook.remove()
    assert last.untyped_storage().nbytes() == last.numel() * last.element_size() == 2 * 256 * last.element_size()
    assert computed[:-1] == [1] * (len(computed) - 1)  # each chunk's last position only (the last call: one pass)
    if chunk == 0:
        torch.testing.assert_close(last, one_pass, **TOLERANCES["kernel_fp32"])


@pytest.mark.parametrize("feed_last", [False, True])
def test_greedy_loop_feeds_the_last_token_only_when_asked(tiny_llama, feed_last):
    input_ids = torch.randint(3, 256, (2, 12))
    cache = selkv.make_cache("full", tiny_llama.config)
    steps = []
    with torch.inference_mode():
        tokens, logits = decode_tokens(
            tiny_llama,
            cache,
            prefill(tiny_llama, input_ids, cache),
            5,
            on_step=lambda: steps.append(int(cache.get_seq_length())),
            feed_last=feed_last,
        )
        expected = tiny_llama(torch.cat([input_ids, tokens], dim=1)).logits[:, -1 if feed_last else -2]
    assert tokens.shape == (2, 5) and steps == list(range(13, 13 + len(steps)))
    assert int(cache.get_seq_length()) == 12 + 5 - (not feed_last)
    torch.testing.assert_close(logits, expected, **TOLERANCES["kernel_fp32"])


@pytest.mark.slow
def test_embedded_model_int8_matches_full_greedy_text(smollm):
    model, tokenizer = smollm
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which planet is known as the red planet, and why? Answer briefly."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    # A small window, so that most of the prompt and the answer are read back from int8 codes.
    spec = "quant:bits=8,sink=4,window=16,block=8"
    full, _ = greedy(model, prompt["input_ids"], "full", max_new_tokens=32)
    int8, cache = greedy(model, prompt["input_ids"], spec, max_new_tokens=32)
    assert cache.layers[0].num_stored >= prompt["input_ids"].shape[1] - 4 - 16
    assert tokenizer.decode(int8[0]) == tokenizer.decode(full[0])


@pytest.mark.slow
@needs_shared_data  # a PG-19 book
def test_embedded_model_int8_agrees_with_full_when_teacher_forced(smollm):
    # Over a long prompt, feed both caches the full cache's greedy tokens and compare each step's choice.
    model, tokenizer = smollm
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Summarize in two sentences: " + read_book(1500)}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    caches = {spec: selkv.make_cache(spec, model.config) for spec in ("full", "quant:bits=8,sink=4,window=124")}
    agree, steps, token = 0, 32, None
    with torch.no_grad():
        logits = {spec: forward_with_cache(model, c, prompt).logits[:, -1] for spec, c in caches.items()}
        for _ in range(steps):
            token = logits["full"].argmax(-1, keepdim=True)
            agree += int(logits["quant:bits=8,sink=4,window=124"].argmax()) == int(token)
            logits = {spec: forward_with_cache(model, c, token).logits[:, -1] for spec, c in caches.items()}
    assert caches["quant:bits=8,sink=4,window=124"].layers[0].num_stored > 0
    assert agree >= steps - 1, agree  # at most one near-tie flips


@pytest.mark.slow
@needs_shared_data  # a PG-19 book
def test_embedded_model_logits_stay_close_to_full(smollm):
    model, tokenizer = smollm
    input_ids = tokenizer(read_book(8000), return_tensors="pt").input_ids[:, :768]

    def logits(spec):
        cache = selkv.make_cache(spec, model.config)
        with torch.no_grad():
            return torch.cat(
                [forward_with_cache(model, cache, input_ids[:, s : s + 64]).logits for s in range(0, 768, 64)], 1
            )

    full = logits("full")
    relative = {}
    for spec in ["quant:bits=8,sink=4,window=124", "quant:bits=4,sink=4,window=124", "drop:sink=4,window=124"]:
        got = logits(spec)
        relative[spec] = float((got - full).norm() / full.norm())
    assert relative["quant:bits=8,sink=4,window=124"] < 0.01, relative
    assert relative["quant:bits=4,sink=4,window=124"] < 0.05, relative
    # eviction forgets: far larger error than either quantized cache
    assert relative["drop:sink=4,window=124"] > 2 * relative["quant:bits=4,sink=4,window=124"], relative
