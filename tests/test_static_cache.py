"""The static selective cache (``make_cache(spec, config, max_cache_len=N)``) and its captured decode step.

The static layer must give what the dynamic layer gives for the same spec (same tokens, same
attention), with every decode step on fixed shapes: ``torch.compile(fullgraph=True)`` traces one
graph for a whole decode, evictions included, and CUDA graphs replay it.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from support.markers import cuda_only
from support.models import make_tiny_llama, tiny_llama_config
from support.storages import fresh_seed
from support.tolerances import TOLERANCES

import selkv
from selkv import SpecError, make_cache
from selkv.generation import decode_tokens, forward_with_cache, prefill
from selkv.kernels import reference
from selkv.layers import StaticSinkWindowLayer
from selkv.models import cache_kwarg
from selkv.storage import take_published

cuda = pytest.mark.cuda


# Lossy specs whose windows are short enough that a short decode crosses several evictions.
LOSSY = [
    "quant:bits=8,sink=4,window=16,block=8",
    "quant:bits=4,sink=2,window=8,block=8",  # per-channel keys (the int4 default)
    "quant:bits=4,sink=4,window=12,block=4,key_axis=token,group=16",
    "quant:bits=2,sink=3,window=10,block=8",
    "quant:kbits=4,vbits=2,sink=3,window=10,block=8",  # keys and values of their own bit widths
    "quant:bits=4,sink=3,window=10,block=8,key_axis=token,group=16,rotate=hadamard",  # rotated middle keys
    "quant:bits=3,sink=3,window=10,block=8,rotate=hadamard,vrotate=hadamard",  # rotated middle keys and values
    "quant:bits=3,sink=3,window=10,block=8,rotate=hadamard,vrotate=hadamard,layer_bits=1:4/2",  # per-layer widths
]


def _greedy(model, cache, prompts: torch.Tensor, steps: int, step_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [batch, steps] after an eager prefill (each fed back), and the last step's logits."""
    with torch.inference_mode():
        return decode_tokens(model, cache, prefill(model, prompts, cache), steps, step=step_fn, feed_last=True)


@pytest.fixture(scope="module")
def selkv_llama():
    return make_tiny_llama("selkv")


@pytest.mark.parametrize("spec", LOSSY)
def test_static_cache_decodes_like_the_dynamic_cache(selkv_llama, spec):
    prompts = torch.randint(3, 256, (2, 29), generator=torch.Generator().manual_seed(fresh_seed()))
    steps = 50
    dynamic = make_cache(spec, selkv_llama.config)
    static = make_cache(spec, selkv_llama.config, max_cache_len=29 + steps + 5)
    expected, expected_logits = _greedy(selkv_llama, dynamic, prompts, steps)
    got, logits = _greedy(selkv_llama, static, prompts, steps)
    layer, reference_layer = static.layers[0], dynamic.layers[0]
    assert isinstance(layer, StaticSinkWindowLayer) and layer.fused_decode
    assert reference_layer.num_stored >= 3 * reference_layer.block_length, "the test must cross several evictions"
    assert (layer.num_sink, layer.num_stored, layer.num_recent) == (
        reference_layer.num_sink,
        reference_layer.num_stored,
        reference_layer.num_recent,
    )
    assert torch.equal(got, expected), f"{spec}:\n{got}\n{expected}"
    # The window is a ring in the static layer, so float32 sums run in another order; over 50 steps such
    # differences reach the keys being quantized and can move a code that sits on a rounding boundary
    # (2.9e-4 seen in about one run of eight). A wrong eviction or length moves logits by far more.
    torch.testing.assert_close(logits, expected_logits, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("steps", [[1] * 45, [13, 1, 1, 40, 1, 7, 1, 1, 1, 1, 30, 1], [3, 1, 1, 1, 60, 1, 1]])
@pytest.mark.parametrize("bits", ["bits=4", "kbits=8,vbits=2", "bits=3", "bits=4,vrotate=hadamard-signs"])
def test_static_layer_stores_what_the_dynamic_layer_stores(axis, steps, bits):
    """Same tokens in, any mix of chunks and single tokens: the same attention over the storage after
    each one-token step (the static layer's captured-style step quantizes the window's oldest block with the
    store's own write, rotated values included), and what a chunk's update returns is identical."""
    spec = f"quant:{bits},sink=3,window=9,block=4,key_axis={axis},group=16"
    config = tiny_llama_config()
    dynamic = make_cache(spec, config)
    static = make_cache(spec, config, max_cache_len=sum(steps))
    dynamic.enable_fused_decode()
    static.enable_fused_decode()
    gen = torch.Generator().manual_seed(fresh_seed())
    shape = (2, config.num_key_value_heads, config.head_dim)
    for count in steps:
        keys = torch.randn(shape[0], shape[1], count, shape[2], generator=gen)
        values = torch.randn(shape[0], shape[1], count, shape[2], generator=gen)
        out_dynamic = dynamic.update(keys, values, 0)
        out_static = static.update(keys, values, 0)
        if count > 1:
            torch.testing.assert_close(out_static, out_dynamic, **TOLERANCES["lossless_fp32"])
            continue
        query = torch.randn(shape[0], config.num_attention_heads, 1, shape[2], generator=gen)
        want = reference.selective_decode_attention(query, dynamic.layers[0].decode_storage())
        got = reference.selective_decode_attention(query, static.layers[0].decode_storage())
        torch.testing.assert_close(got, want, **TOLERANCES["kernel_fp32"])
    assert int(static.get_seq_length()) == dynamic.get_seq_length() == sum(steps)
    take_published(0)  # no attention call took the last step's storage here


def test_left_padded_batch_matches_the_dynamic_cache(selkv_llama):
    """Left padding goes to the sink's extra room as in the dynamic cache; generate() runs eagerly on CPU."""
    spec = "quant:bits=8,sink=2,window=6,block=2"
    prompts = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(fresh_seed()))
    mask = torch.ones_like(prompts)
    prompts[1, :4], mask[1, :4] = 0, 0
    outputs = []
    for max_cache_len in (None, 12 + 20):
        cache = make_cache(spec, selkv_llama.config, max_cache_len=max_cache_len)
        selkv.track_padding(selkv_llama)
        with torch.inference_mode():
            outputs.append(
                selkv_llama.generate(
                    prompts,
                    attention_mask=mask,
                    max_new_tokens=20,
                    do_sample=False,
                    pad_token_id=0,
                    **{cache_kwarg(selkv_llama): cache},
                )
            )
        assert cache.layers[0].sink_capacity == 2 + 4
    assert torch.equal(outputs[1], outputs[0])


def test_static_cache_is_compileable_only_with_selkv_attention():
    config = tiny_llama_config()
    cache = make_cache("quant:bits=8,sink=4,window=16", config, max_cache_len=64)
    assert not cache.is_compileable, "without selkv's attention a one-token step assembles dense keys"
    cache.enable_fused_decode()
    assert cache.is_compileable
    assert not make_cache("quant:bits=8,sink=4,window=16", config).is_compileable
    from transformers import StaticCache

    assert isinstance(make_cache("full", config, max_cache_len=64), StaticCache)


@pytest.mark.parametrize(
    "spec,max_cache_len", [("drop:sink=4,window=16", 64), ("quant:bits=8", 0), ("quant:bits=8", "64")]
)
def test_bad_static_requests_say_what_to_do(spec, max_cache_len):
    with pytest.raises(SpecError, match="max_cache_len"):
        make_cache(spec, tiny_llama_config(), max_cache_len=max_cache_len)


def test_prefill_past_the_capacity_is_refused_clearly():
    config = tiny_llama_config()
    cache = make_cache("quant:bits=8,sink=4,window=16,block=8", config, max_cache_len=40)
    keys = torch.randn(1, config.num_key_value_heads, 64, config.head_dim)
    with pytest.raises(ValueError, match="larger max_cache_len"):
        cache.update(keys, keys, 0)


def test_storage_is_found_without_tagging_tensors(selkv_llama):
    """selkv's attention takes the storage its cache published for the layer; a plain key tensor
    (another cache) falls back to SDPA: no attribute on tensors, nothing stale left behind."""
    from selkv.storage import _PUBLISHED

    cache = make_cache("quant:bits=8,sink=4,window=16,block=8", selkv_llama.config, max_cache_len=80)
    _greedy(selkv_llama, cache, torch.randint(3, 256, (1, 30)), 3)
    assert not _PUBLISHED, "every published storage must be taken by the attention call that follows"
    layer = cache.layers[0]
    assert not hasattr(layer.recent_keys, "selkv_layer")


def test_compiled_decode_step_has_two_graphs_for_a_whole_decode(selkv_llama):
    """fullgraph=True: the captured step (twin attention on CPU) traces twice, a step that commits a block to
    the middle and one that does not (the host plans which); evictions and the ring wrapping around never
    recompile; the tokens equal the eager static path's, and the host's copy of the lengths the device's."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    spec = "quant:bits=4,sink=2,window=8,block=4,key_axis=token,group=16"
    prompts = torch.randint(3, 256, (2, 21), generator=torch.Generator().manual_seed(fresh_seed()))
    steps = 30
    eager = make_cache(spec, selkv_llama.config, max_cache_len=21 + steps)
    expected, _ = _greedy(selkv_llama, eager, prompts, steps)
    for plan_commits, graphs in ((True, 2), (False, 1)):
        torch._dynamo.reset()
        counter = CompileCounter()
        step = selkv.compile_decode_step(selkv_llama, mode=None, backend=counter, plan_commits=plan_commits)
        cache = make_cache(spec, selkv_llama.config, max_cache_len=21 + steps)
        got, _ = _greedy(selkv_llama, cache, prompts, steps, step_fn=step)
        assert torch.equal(got, expected), f"plan_commits={plan_commits}"
        assert counter.frame_count == graphs, f"plan_commits={plan_commits}: {counter.frame_count} graphs"
        layer = cache.layers[0]
        assert layer.lengths.tolist() == eager.layers[0].lengths.tolist() and cache.dropped_tokens == 0
        # An unplanned compiled step cannot follow the lengths on the host: it says so (None).
        assert layer.host_lengths == (tuple(layer.lengths.tolist()) if plan_commits else None)


@pytest.mark.parametrize("spec", ["quant:bits=4,sink=2,window=8,block=4", "quant:bits=3,sink=3,window=6,block=8"])
def test_a_decode_step_quantizes_only_when_it_commits_a_block(selkv_llama, spec):
    """The host's copy of the lengths follows the device's at every step (no sync needed to plan), and the
    window's oldest block is quantized once, by the step that moves it to the middle."""
    cache = make_cache(spec, selkv_llama.config, max_cache_len=80)
    cache.enable_fused_decode()
    layer = cache.layers[1]
    writes = []
    write = layer.middle.write
    layer.middle.write = lambda *args: writes.append(int(layer.lengths[1])) or write(*args)
    prompts = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(fresh_seed()))
    with torch.inference_mode():
        last = prefill(selkv_llama, prompts, cache)
        assert layer.host_lengths == tuple(layer.lengths.tolist())
        commits = []
        for _ in range(60):
            stored = layer.num_stored
            last = forward_with_cache(selkv_llama, cache, last.argmax(-1, keepdim=True)).logits[:, -1]
            assert layer.host_lengths == tuple(layer.lengths.tolist())
            if layer.num_stored > stored:
                commits.append(stored)
    assert len(commits) >= 4, "the test must cross several commits"
    assert writes == commits


def test_a_wrong_plan_drops_a_token_and_never_corrupts_the_middle(selkv_llama):
    """A plan that misses a commit (host lengths set wrong by hand) cannot write a half block: the steps keep
    the middle as it was, and once the ring is full drop the window's oldest token, counted in
    ``dropped_tokens``."""
    spec = "quant:bits=4,sink=2,window=8,block=4"
    cache = make_cache(spec, selkv_llama.config, max_cache_len=60)
    cache.enable_fused_decode()
    prompts = torch.randint(3, 256, (1, 21), generator=torch.Generator().manual_seed(fresh_seed()))
    with torch.inference_mode():
        last = prefill(selkv_llama, prompts, cache)
        layer = cache.layers[0]
        num_sink, num_stored, num_recent, start = layer.lengths.tolist()
        assert num_recent + 1 >= layer.ring_length, "the next step must commit"
        middle = [tensor.clone() for tensor in layer.middle.tensors]
        torch._dynamo.reset()
        step = selkv.compile_decode_step(selkv_llama, mode=None, backend="eager")  # an eager CPU step would raise
        for dropped in (0, 1):  # the first step fills the ring's last slot, the second overflows it
            layer.host_lengths = (num_sink, num_stored, 0, start)  # wrong: plans no commit
            last = step(last.argmax(-1, keepdim=True), cache)
            assert layer.num_stored == num_stored and layer.num_recent == layer.ring_length
            assert cache.dropped_tokens == dropped
    for before, after in zip(middle, layer.middle.tensors, strict=True):
        assert torch.equal(before, after)


@pytest.mark.slow
def test_inductor_compiles_the_reference_decode_step(selkv_llama):
    """The compiled reference path (inductor on CPU: dequantization fused into attention) runs and agrees."""
    import torch._dynamo

    spec = "quant:bits=8,sink=4,window=16,block=8"
    prompts = torch.randint(3, 256, (1, 25), generator=torch.Generator().manual_seed(fresh_seed()))
    steps = 20
    tokens, _ = _greedy(selkv_llama, make_cache(spec, selkv_llama.config, max_cache_len=25 + steps), prompts, steps)
    # Teacher forcing on the eager path's tokens: inductor rounds differently from eager (logits within ~4e-3
    # here; a rounding can flip a code), and on this random-weight model two logits can tie within that, so
    # greedy tokens may part (a clean-clone run, 2026-12-06); a wrong cache moves logits by whole units.
    want = _forced_logits(selkv_llama, make_cache(spec, selkv_llama.config, max_cache_len=25 + steps), prompts, tokens)
    torch._dynamo.reset()
    step = selkv.compile_decode_step(selkv_llama, mode=None, fullgraph=True)
    cache = make_cache(spec, selkv_llama.config, max_cache_len=25 + steps)
    got = _forced_logits(selkv_llama, cache, prompts, tokens, step)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)


# Inductor rounds a float16 model's other ops (norms, projections) differently from eager, so a compiled
# decode's logits differ from eager ones by a few float16 steps: measured on the H200 (2026-12-02), at most
# 0.018 (int8) and 0.081 (int4, whose per-channel codes can flip) on logits of magnitude ~7, while the
# static cache run eagerly equals the dynamic one exactly. Greedy tokens then part where two logits are
# within that distance (gaps of 0.002-0.016 were seen), so the captured path is compared on the eager
# path's own tokens (teacher forcing), step by step. A wrong cache (a lost eviction, a stale length)
# moves logits by whole units.
CAPTURED_LOGITS_ATOL = 0.25


def _forced_logits(model, cache, prompts: torch.Tensor, tokens: torch.Tensor, step_fn=None) -> torch.Tensor:
    """[batch, steps, vocab] float32 logits before each of ``tokens`` [batch, steps], each token fed in turn."""
    logits = []
    with torch.inference_mode():
        last = prefill(model, prompts, cache)
        for t in range(tokens.shape[1]):
            logits.append(last.float().clone())
            if t + 1 < tokens.shape[1]:
                token = tokens[:, t : t + 1]
                last = (
                    forward_with_cache(model, cache, token).logits[:, -1] if step_fn is None else step_fn(token, cache)
                )
    return torch.stack(logits, 1)


def _assert_logits_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    worst = (got - want).abs().max().item()
    assert worst <= CAPTURED_LOGITS_ATOL, f"{what}: logits off by {worst:.3f} (> {CAPTURED_LOGITS_ATOL})"


@cuda
@cuda_only
@pytest.mark.parametrize("spec", ["quant:bits=8,sink=4,window=16,block=8", "quant:bits=4,sink=2,window=8,block=8"])
def test_cuda_captured_decode_matches_the_eager_selkv_path(spec):
    """CUDA graphs (mode="reduce-overhead") replaying the fused kernel give the eager dynamic path's logits
    on its tokens, through several evictions (run eagerly, the static cache gives them to float16 rounding)."""
    import torch._dynamo

    model = make_tiny_llama("selkv").to("cuda", torch.float16)
    prompts = torch.randint(3, 256, (3, 27), generator=torch.Generator().manual_seed(fresh_seed())).cuda()
    steps = 60
    tokens, _ = _greedy(model, make_cache(spec, model.config), prompts, steps)
    want = _forced_logits(model, make_cache(spec, model.config), prompts, tokens)
    static = _forced_logits(model, make_cache(spec, model.config, max_cache_len=27 + steps), prompts, tokens)
    torch.testing.assert_close(static, want, atol=1e-2, rtol=0, msg=f"{spec}: the static cache run eagerly differs")
    torch._dynamo.reset()
    step = selkv.compile_decode_step(model)
    # Two graphs: a step that commits a block to the middle and one that does not; a third compile fails.
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        got = _forced_logits(model, make_cache(spec, model.config, max_cache_len=27 + steps), prompts, tokens, step)
    _assert_logits_close(got, want, spec)


@cuda
@cuda_only
def test_cuda_generate_compiles_the_static_cache_by_itself():
    """model.generate with a static selkv cache takes transformers' compiled path (as for StaticCache);
    its logits equal the eager dynamic path's on the tokens it chose."""
    import torch._dynamo

    spec = "quant:bits=8,sink=4,window=16,block=8"
    model = make_tiny_llama("selkv").to("cuda", torch.float16)
    prompts = torch.randint(3, 256, (2, 19), generator=torch.Generator().manual_seed(fresh_seed())).cuda()
    torch._dynamo.reset()
    cache = make_cache(spec, model.config, max_cache_len=19 + 40)
    with torch.inference_mode():
        out = model.generate(
            prompts,
            max_new_tokens=40,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **{cache_kwarg(model): cache},
        )
    assert hasattr(model, "_compiled_call"), "generate did not compile the decode step"
    got = torch.stack(out.logits, 1).float()
    want = _forced_logits(model, make_cache(spec, model.config), prompts, out.sequences[:, prompts.shape[1] :])
    _assert_logits_close(got, want, spec)


class _Tokenizer:
    """What generation.generate needs from a tokenizer."""

    eos_token_id = None

    def decode(self, tokens, skip_special_tokens=True):
        return " ".join(map(str, tokens))


@pytest.mark.parametrize("spec", ["quant:bits=4,sink=2,window=8,block=8", "full"])
def test_generate_static_gives_the_dynamic_text(selkv_llama, spec):
    from selkv.generation import generate

    inputs = {"input_ids": torch.randint(3, 256, (1, 23), generator=torch.Generator().manual_seed(fresh_seed()))}
    dynamic = generate(selkv_llama, _Tokenizer(), inputs, spec, 40)
    static = generate(selkv_llama, _Tokenizer(), inputs, spec, 40, static=True)
    assert static.text == dynamic.text and static.cache == f"{spec} (static)"
    assert static.kv["tokens"] == dynamic.kv["tokens"]


def _padded_batch(rows: int, width: int, padding: list[int], seed: int):
    prompts = torch.randint(3, 256, (rows, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(prompts)
    for row, pad in enumerate(padding):
        prompts[row, :pad], mask[row, :pad] = 0, 0
    return prompts, mask


def _generate(model, cache, prompts, mask):
    selkv.track_padding(model)
    with torch.inference_mode():
        return model.generate(
            prompts,
            attention_mask=mask,
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=0,
            **{cache_kwarg(model): cache},
        )


def test_reset_static_cache_serves_the_next_batch_as_a_fresh_one(selkv_llama):
    """After reset() the padding of the next batch, not of the first, sets the sink's room; the tokens and the
    logits equal a fresh static cache's."""
    spec = "quant:bits=8,sink=2,window=6,block=2"
    first = _padded_batch(2, 12, [0, 5], fresh_seed())
    second = _padded_batch(2, 12, [1, 0], fresh_seed() + 1)
    reused = make_cache(spec, selkv_llama.config, max_cache_len=12 + 16)
    _generate(selkv_llama, reused, *first)
    assert reused.layers[0].sink_capacity == 2 + 5
    reused.reset()
    got = _generate(selkv_llama, reused, *second)
    assert reused.layers[0].sink_capacity == 2 + 1
    expected = _generate(selkv_llama, make_cache(spec, selkv_llama.config, max_cache_len=12 + 16), *second)
    assert torch.equal(got, expected)


def test_static_cache_takes_another_batch_size_only_after_reset(selkv_llama):
    spec = "quant:bits=8,sink=2,window=6,block=2"
    cache = make_cache(spec, selkv_llama.config, max_cache_len=12 + 16)
    _generate(selkv_llama, cache, *_padded_batch(2, 12, [0, 0], fresh_seed()))
    three = _padded_batch(3, 12, [0, 3, 0], fresh_seed() + 2)
    with (
        pytest.raises(ValueError, match="holds a batch of 2 sequences; a batch of 3 needs cache.reset"),
        torch.inference_mode(),
    ):
        forward_with_cache(selkv_llama, cache, three[0])
    cache.reset()
    got = _generate(selkv_llama, cache, *three)
    assert torch.equal(got, _generate(selkv_llama, make_cache(spec, selkv_llama.config, max_cache_len=28), *three))


def test_speed_task_reuses_one_static_cache(selkv_llama):
    """--static: one preallocated cache per spec, reset between repeats (a compiled step keeps its graph)."""
    from selkv.eval import speed

    input_ids = torch.randint(3, 256, (2, 20), generator=torch.Generator().manual_seed(fresh_seed()))
    cache = make_cache("quant:bits=8,sink=4,window=8,block=4", selkv_llama.config, max_cache_len=20 + 12)
    sink_keys = None
    for _ in range(2):
        _, _, used = speed.time_once(selkv_llama, input_ids, "unused", 12, 0, cache=cache)
        assert used is cache and int(cache.get_seq_length()) == 20 + 12
        assert sink_keys is None or cache.layers[0].sink_keys is sink_keys, "reset must keep the tensors"
        sink_keys = cache.layers[0].sink_keys


def test_decoding_past_the_capacity_is_refused_on_the_cpu_and_counted_when_compiled(selkv_llama):
    """Past its capacity the eager CPU step raises, as a prefill does; a compiled step (which cannot
    stop) keeps decoding as a sliding window and counts the dropped tokens instead of hiding them."""
    spec, prompts = "quant:bits=8,sink=4,window=16,block=8", torch.randint(3, 256, (1, 20))
    cache = make_cache(spec, selkv_llama.config, max_cache_len=40)
    capacity = 4 + 24 + 16 + 8  # sink, middle (40 - 4 - 16 rounded up to blocks), window + the ring's spare block
    with pytest.raises(
        ValueError, match=f"holds up to {capacity} positions .* needs {capacity + 1}: .*larger max_cache_len"
    ):
        _greedy(selkv_llama, cache, prompts, capacity)
    assert cache.dropped_tokens == 0
    cache = make_cache(spec, selkv_llama.config, max_cache_len=40)
    _greedy(selkv_llama, cache, prompts, capacity - 20)  # fills it exactly: nothing dropped, nothing raised
    assert cache.dropped_tokens == 0 and int(cache.get_seq_length()) == capacity
    torch._dynamo.reset()
    step = selkv.compile_decode_step(selkv_llama, mode=None, fullgraph=True, backend="eager")
    cache = make_cache(spec, selkv_llama.config, max_cache_len=40)
    _greedy(selkv_llama, cache, prompts, capacity - 20 + 5, step_fn=step)
    assert cache.dropped_tokens == 5
    with torch.inference_mode():  # the cache's tensors were made under inference mode
        cache.reset()
    assert cache.dropped_tokens == 0
