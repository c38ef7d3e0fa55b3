"""The GPU benchmark scripts, run small on CPU so that they cannot rot between GPU sessions.

The numbers they print here mean nothing (a tiny model on CPU); what is checked is that each
script runs end to end and writes the results it promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from support.markers import HAS_CUDA

# The accuracy columns run the compiled kernel on a GPU machine, Triton's interpreter elsewhere.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.path.join(BENCHMARKS, "..", "src"), SELKV_NO_PROGRESS="1")
    done = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), *args],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done.stdout


def test_speedup_is_the_median_of_paired_rounds():
    from decode_e2e import speedup

    full = dict(rounds=3, round_tokens_per_s=[100.0, 50.0, 80.0], tokens_per_s=80.0)
    row = dict(rounds=3, round_tokens_per_s=[300.0, 100.0, 200.0], tokens_per_s=200.0)
    assert speedup(row, full) == pytest.approx(2.5)  # ratios 3.0, 2.0, 2.5: the median
    alone = dict(rounds=1, round_tokens_per_s=[40.0], tokens_per_s=40.0)
    assert speedup(alone, full) == pytest.approx(0.5)  # not paired: ratio of medians


def test_speedup_pairs_rounds_by_id_across_groups():
    from decode_e2e import speedup

    # The baseline ran in two groups; the row only in the second: it pairs with rounds 1.0-1.2, not 0.x.
    base = dict(
        rounds=6,
        round_ids=["0.0", "0.1", "0.2", "1.0", "1.1", "1.2"],
        round_tokens_per_s=[10.0, 10.0, 10.0, 100.0, 50.0, 80.0],
        tokens_per_s=50.0,
    )
    row = dict(rounds=3, round_ids=["1.0", "1.1", "1.2"], round_tokens_per_s=[300.0, 100.0, 200.0], tokens_per_s=200.0)
    assert speedup(row, base) == pytest.approx(2.5)
    assert speedup(base, base) == pytest.approx(1.0)


@pytest.mark.parametrize("guess", [1, 2, 36, 37, 38, 60, 1000])
def test_search_max_batch_finds_the_largest_batch_that_fits(guess):
    from decode_e2e import search_max_batch

    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= 37

    found = search_max_batch(fits, guess, lambda: False)
    assert found["max_batch"] == 37 and found["fails_at"] == 38 and found["exact"]
    assert [p[0] for p in found["probes"]] == tried and len(tried) == len(set(tried)) <= 22


def test_throughput_ratios_compare_each_path_at_its_own_largest_batch():
    from decode_e2e import add_ratios_to_full

    found = {
        "full": dict(max_batch=30, throughput=dict(tokens_per_s=600.0)),
        "int4": dict(max_batch=102, throughput=dict(tokens_per_s=1500.0)),
        "int2": dict(max_batch=150, throughput=dict(error="out of memory")),
        "int8": dict(skipped="needs CUDA"),
    }
    add_ratios_to_full(found)
    assert found["int4"]["vs_full"] == 102 / 30 and found["int4"]["throughput_vs_full"] == 2.5
    assert found["full"]["throughput_vs_full"] == 1.0
    assert found["int2"]["vs_full"] == 5.0 and "throughput_vs_full" not in found["int2"]
    assert "vs_full" not in found["int8"]


def test_search_max_batch_reports_bounds_when_stopped_or_nothing_fits():
    from decode_e2e import search_max_batch

    nothing = search_max_batch(lambda batch: False, 8, lambda: False)
    assert nothing["max_batch"] == 0 and nothing["fails_at"] == 1 and nothing["exact"]
    calls = []
    stopped = search_max_batch(lambda batch: calls.append(batch) or batch <= 37, 10, lambda: len(calls) >= 2)
    assert stopped["max_batch"] == 11 and stopped["fails_at"] is None and not stopped["exact"]


def test_parse_shapes_and_bad_shapes_get_one_line():
    from decode_e2e import parse_shapes

    assert parse_shapes("8x32768,1X131072") == [(8, 32768), (1, 131072)]
    for bad in ("8", "8x", "0x100", "ax2"):
        with pytest.raises(ValueError, match="BATCHxCONTEXT|at least 1"):
            parse_shapes(bad)
    env = dict(os.environ, PYTHONPATH=os.path.join(BENCHMARKS, "..", "src"))
    done = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "decode_e2e.py"), "--tiny", "--shapes", "8by2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and "BATCHxCONTEXT" in done.stderr


def test_static_cache_fill_and_rewind():
    from e2e_model import TINY, build_model, fill_full, fill_static, rewind
    from transformers import DynamicCache, StaticCache

    from selkv.models import forward_with_cache

    model = build_model(TINY, "cpu", torch.float32)
    static = StaticCache(config=model.config, max_cache_len=40)
    fill_static(static, model.config, 2, 30, "cpu", torch.float32)
    assert int(static.get_seq_length()) == 30
    for layer in static.layers:
        assert layer.keys.shape[2] == 40 and bool((layer.keys[:, :, :30] != 0).all())
        assert bool((layer.values[:, :, 30:] == 0).all())  # nothing written past the context
    with torch.no_grad():
        for _ in range(3):
            forward_with_cache(model, static, torch.ones(2, 1, dtype=torch.long))
    assert int(static.get_seq_length()) == 33
    rewind(static, 30)
    assert int(static.get_seq_length()) == 30
    dynamic = DynamicCache(config=model.config)
    fill_full(dynamic, model.config, 2, 30, "cpu", torch.float32)
    rewind(dynamic, 25)
    assert dynamic.get_seq_length() == 25 and dynamic.layers[0].keys.shape[2] == 25


@pytest.mark.skipif(
    not hasattr(__import__("selkv"), "compile_decode_step"),
    reason="needs selkv's static selective cache (make_cache(..., max_cache_len=N))",
)
def test_captured_selkv_fill_and_rewind():
    from e2e_model import SPECS, TINY, build_model, captured_selkv

    from selkv.models import forward_with_cache

    model = build_model(TINY, "cpu", torch.float32)
    cache, step, rewind_lengths = captured_selkv(model, SPECS[8], 2, 300, 16, "cpu", torch.float32, graphs=False)
    start = [layer.lengths.tolist() for layer in cache.layers]
    for layer, (num_sink, num_stored, num_recent, ring_start) in zip(cache.layers, start, strict=True):
        assert num_sink + num_stored + num_recent == 300 and num_stored % layer.block_length == 0
        assert num_stored > 0 and ring_start == 0 and num_recent <= layer.ring_length
    assert int(cache.get_seq_length()) == 300
    with torch.no_grad():  # eager one-token steps (the captured step's work, uncompiled) move the lengths on
        for _ in range(40):
            logits = forward_with_cache(model, cache, torch.ones(2, 1, dtype=torch.long)).logits
    assert bool(torch.isfinite(logits).all()) and int(cache.get_seq_length()) == 340
    assert [layer.lengths.tolist() for layer in cache.layers] != start
    rewind_lengths()
    assert [layer.lengths.tolist() for layer in cache.layers] == start and int(cache.get_seq_length()) == 300


@pytest.mark.parametrize(
    "name",
    [
        "fused int4 spec",
        "fused int4 tok",
        "fused int4 spec rot",
        "fused int2 rot",
        "fused int2 spec vrot",
        "fused int3 vrot",
        "fused k3v2 b64 vrot",
    ],
)
def test_decode_attention_accuracy_column_runs_small(name):
    """The accuracy column of decode_attention.py (the compiled kernel on a GPU, else Triton's interpreter; float16,
    a small cache):
    each layout's error against the keys and values before quantization, per value RMS."""
    from decode_attention import ACCURACY_RMS, layout_errors

    shape = dict(batch_size=1, num_heads=4, num_kv_heads=1, head_dim=64, context=388, dtype=torch.float16)
    errors = layout_errors(name, device=KERNEL_DEVICE, shape=shape)
    assert set(errors) == {f"error_rms_{rms}" for rms in ACCURACY_RMS}
    assert all(0.0 < e < 2.0 for e in errors.values()), errors


def test_per_token_int4_keys_show_their_cost_in_the_accuracy_column():
    """Keys with outlier channels: per-token int4 keys err far more than per-channel ones (the column's point)."""
    from decode_attention import layout_errors

    shape = dict(batch_size=1, num_heads=4, num_kv_heads=1, head_dim=64, context=388, dtype=torch.float16)
    per_token = layout_errors("fused int4 tok", device=KERNEL_DEVICE, shape=shape)["error_rms_1.0"]
    per_channel = layout_errors("fused int4 spec", device=KERNEL_DEVICE, shape=shape)["error_rms_1.0"]
    assert per_token > 3 * per_channel, (per_token, per_channel)


def test_decode_e2e_runs_small(tmp_path):
    out = tmp_path / "e2e.json"
    log = _run(
        "decode_e2e.py",
        "--tiny",
        "--shapes",
        "2x300,1x200",
        "--steps",
        "3",
        "--rounds",
        "3",
        "--reference-steps",
        "2",
        "--rows",
        "static-flex,static-sdpa,dynamic,int8,int4,int8-captured,int8-reference",
        "--extra",
        "quant:bits=4,sink=4,window=124,key_axis=token",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert result["copy_bandwidth_bytes_per_s"] > 0
    assert [(s["batch"], s["context"]) for s in result["shapes"]] == [(2, 300), (1, 200)]
    for shape in result["shapes"]:
        keys = [row["key"] for row in shape["rows"]]
        assert keys == ["dynamic", "int8", "int4", "int8-reference", "quant:bits=4,sink=4,window=124,key_axis=token"]
        # on CPU the compiled rows skip with a reason, and the strongest full path that ran is the baseline
        assert set(shape["skipped"]) == {"static-flex", "static-sdpa", "int8-captured"}
        assert "needs CUDA" in shape["skipped"]["static-flex"]
        assert shape["baseline"] == "dynamic"
        for row in shape["rows"]:
            assert row["tokens_per_s"] > 0 and 0 < row["host_ms_per_step"] <= row["ms_per_step"] * 1.01
            assert len(row["round_tokens_per_s"]) == row["rounds"] == (1 if "reference" in row["key"] else 3)
            assert row["kv_gib"] > 0 and row["floor_ms"] > 0 and row["floor_pct"] > 0
            assert row["gpu_ms_per_step"] is None and row["peak_gib"] is None  # CUDA-only figures
        assert shape["rows"][0]["vs_baseline"] == 1.0
    assert all("needs CUDA" in found["skipped"] for found in result["max_batch"].values())
    assert "skipped static-flex: needs CUDA" in log and "vs dynamic" in log


def test_profile_e2e_runs_small(tmp_path):
    _run("profile_e2e.py", "--tiny", "--batch", "2", "--context", "300", "--steps", "2", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["caches"]) == {"full", "int8", "int4"}
    for name, cache in summary["caches"].items():
        assert cache["wall_ms_per_step"] > 0 and cache["python_ms_per_step"] > 0
        assert (tmp_path / f"python_{name}.txt").read_text().startswith(f"{name}: ")
        assert (tmp_path / f"trace_{name}.json.gz").exists()


def test_profile_e2e_kernel_kinds():
    from profile_e2e import kernel_kind

    assert kernel_kind("_selective_decode_partial_kernel") == kernel_kind("_merge_partials_kernel") == "attention"
    assert kernel_kind("triton_tem_fused_0") == "attention"  # inductor's flex_attention template
    assert kernel_kind("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"
    assert kernel_kind("nvjet_tst_128x64_64x4_1x2_h_bz_coopA_NTN") == kernel_kind("sm90_xmma_gemm_bf16") == "matmul"
    assert kernel_kind("void cublasLt::splitKreduce_kernel<32, 16, int>") == kernel_kind("gemv2T_kernel") == "matmul"
    # inductor's kernels are named after the ops they fused: they are "other" whatever they name
    assert kernel_kind("triton_poi_fused_add_mul_rsqrt_0") == "other"
    assert kernel_kind("triton_poi_fused__to_copy_bmm_cat_cos_flex_attention_mul_neg_0") == "other"
    assert kernel_kind("triton_red_fused__to_copy_argmax_bmm_cat_1") == "other"


def test_profile_e2e_counts_kernels_once_by_full_name():
    import torch
    from profile_e2e import device_ms_by_kind, kernel_ms

    class Row:  # a row of prof.key_averages()
        def __init__(self, key, us, device_type):
            self.key, self.self_device_time_total, self.device_type = key, us, device_type

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    long = "sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize64x64x8_stage3_warpsize1x4x1_ffma_"
    rows = [
        Row("aten::mm", 900.0, cpu),
        Row(long + "a", 600.0, cuda),
        Row(long + "b", 300.0, cuda),
        Row("_selective_decode_partial_kernel", 1000.0, cuda),
        Row("triton_poi_fused_add_0", 100.0, cuda),
    ]
    kernels = kernel_ms(rows, steps=2)
    assert kernels == {
        "_selective_decode_partial_kernel": 0.5,
        long + "a": 0.3,
        long + "b": 0.15,
        "triton_poi_fused_add_0": 0.05,
    }  # the operator row counted nothing; no name cut short
    assert device_ms_by_kind(kernels) == {"attention": 0.5, "matmul": 0.45, "other": 0.05}


@pytest.mark.parametrize("path", ["full", "int4"])
def test_throughput_rounds_stay_inside_the_cache_and_start_each_round_alike(path):
    """The throughput at the largest batch decodes rounds of steps on one cache: each round must start from the
    same state and write inside the cache's room (a full StaticCache counts positions on the device)."""
    from decode_e2e import decode_rounds
    from e2e_model import TINY, build_model, decode_step, fill_static, rewinder, static_selkv
    from transformers import StaticCache

    model = build_model(TINY, "cpu", torch.float32)
    context, steps = 30, 5
    if path == "full":
        cache = StaticCache(config=model.config, max_cache_len=context + steps + 2)
        fill_static(cache, model.config, 2, context, "cpu", torch.float32)
    else:
        cache = static_selkv(model, "quant:bits=4,sink=4,window=8", 2, context, steps + 2, "cpu", torch.float32)
    seen = []
    step = decode_step(model, positions=True)

    def recording(tokens, cache, position):
        seen.append((int(position), int(cache.get_seq_length())))
        return step(tokens, cache, position)

    first = torch.randint(0, model.config.vocab_size, (2, 1))
    result = decode_rounds(recording, cache, rewinder(cache, context), first, context, steps, rounds=3)
    assert result["steps"] == steps and result["tokens_per_s"] > 0 and len(result["round_seconds"]) == 3
    rounds = [seen[:2]] + [seen[2 + steps * r : 2 + steps * (r + 1)] for r in range(3)]
    for counted in rounds:  # warm-up, then every round: positions context, context + 1, ... from the same length
        assert counted == [(context + i, context + i) for i in range(len(counted))]


def test_run_shape_packs_rows_into_groups_next_to_the_baseline():
    """The grouping of one shape, with fake rows: a baseline that fails hands over to the next full path; a row
    out of memory next to others waits for the next group, one out of memory next to the baseline alone is
    skipped; the baseline takes part in every group, and each row's rounds are paired with its group's. The
    reference rows run alone: every other row's cache is freed, the baseline's too."""
    import argparse
    import types
    import weakref

    from decode_e2e import Bench, RowKind
    from e2e_model import TINY

    class FakeDecoder:
        def __init__(self, key):
            self.key, self.cache = key, None

        def round(self, steps):
            return dict(seconds=0.01 * steps * (2 if self.key == "dynamic" else 1), host_seconds=0.001, transient=0)

    out_of_memory = {"x2": [True, False], "x3": [True, True]}  # per start of that row
    started, decoders, alive_next_to_reference = [], {}, []

    def start(row, batch, context, shared):
        started.append(row.key)
        if row.kind == "reference":
            alive_next_to_reference.extend(key for key, decoder in decoders.items() if decoder() is not None)
            raise RuntimeError("the reference row needs a real cache")
        if row.key == "static-sdpa":
            raise RuntimeError("does not compile here")
        if row.key in out_of_memory and out_of_memory[row.key].pop(0):
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        info = dict(fill_s=0.0, first_step_s=0.0, graph_breaks={}, held_bytes=0, start_peak_bytes=0)
        decoder = FakeDecoder(row.key)
        decoders[row.key] = weakref.ref(decoder)
        return decoder, info

    bench = Bench.__new__(Bench)
    bench.args = argparse.Namespace(rounds=2, steps=4, gpu_steps=1, reference_steps=1, reserve_gib=0.0, progress=False)
    bench.device, bench.compile_ok, bench.config = "cpu", True, types.SimpleNamespace(**TINY)
    bench.weights = bench.weights_read = 1000
    bench.bandwidth = 1e9
    bench.start = start
    rows = [
        RowKind("static-flex", "flex", "static", "flex_attention"),
        RowKind("static-sdpa", "sdpa", "static", "sdpa"),
        RowKind("dynamic", "dynamic", "dynamic", "sdpa"),
    ] + [RowKind(k, k, "dynamic", "sdpa") for k in ("x1", "x2", "x3")]
    rows.append(RowKind("int8-reference", "reference", "reference", "sdpa"))
    shape = bench.run_shape(2, 100, rows)
    assert started == ["static-sdpa", "dynamic", "x1", "x2", "x2", "x3", "x3", "int8-reference"]
    assert alive_next_to_reference == []
    assert shape["baseline"] == "dynamic" and shape["groups"] == 2
    assert "needs CUDA" in shape["skipped"]["static-flex"] and "RuntimeError" in shape["skipped"]["static-sdpa"]
    assert shape["skipped"]["x3"] == "out of memory next to the baseline alone"
    assert shape["notes"] == [
        "x2: out of memory next to ['dynamic', 'x1']: next group",
        "x3: out of memory next to ['dynamic', 'x2']: next group",
    ]
    table = {row["key"]: row for row in shape["rows"]}
    assert list(table) == ["dynamic", "x1", "x2"]
    assert table["dynamic"]["round_ids"] == ["0.0", "0.1", "1.0", "1.1"]
    assert table["x1"]["round_ids"] == ["0.0", "0.1"] and table["x2"]["round_ids"] == ["1.0", "1.1"]
    assert table["x1"]["vs_baseline"] == pytest.approx(2.0) and table["dynamic"]["vs_baseline"] == 1.0


def test_decoder_rounds_restart_from_the_first_tokens_or_go_on():
    """``Decoder``: with ``restart`` every round decodes the same positions from the same first tokens (the
    throughput at the largest batch); without, each round goes on from the tokens and length the last one ended
    on (an eager selkv row), with the row's attention set before each round."""
    from decode_e2e import Decoder
    from e2e_model import TINY, build_model, decode_step, fill_selective, fill_static, rewinder
    from transformers import StaticCache

    from selkv import make_cache

    model = build_model(TINY, "cpu", torch.float32)
    context, seen = 30, []
    step = decode_step(model, positions=True)

    def recording(tokens, cache, position):
        logits = step(tokens, cache, position)
        seen.append((tokens.clone(), int(position), logits.argmax(-1, keepdim=True)))
        return logits

    first = torch.randint(0, model.config.vocab_size, (2, 1))
    static = StaticCache(config=model.config, max_cache_len=context + 8)
    fill_static(static, model.config, 2, context, "cpu", torch.float32)
    model.set_attn_implementation("sdpa")
    restarting = Decoder(recording, static, first, rewind=rewinder(static, context), restart=True, position=context)
    for _ in range(2):
        assert restarting.round(3)["seconds"] > 0
    assert [position for _, position, _ in seen] == [context, context + 1, context + 2] * 2
    assert all(torch.equal(seen[i][0], first) for i in (0, 3)) and torch.equal(seen[1][0], seen[0][2])
    assert torch.equal(seen[3][2], seen[0][2])  # the same cache state and tokens: the same next tokens

    seen.clear()
    cache = make_cache("quant:bits=8,sink=4,window=8", model.config)
    fill_selective(cache, model.config, 2, context, "cpu", torch.float32, room=16)
    going_on = Decoder(recording, cache, first, model=model, attention="selkv")
    model.set_attn_implementation("sdpa")
    going_on.round(2)
    assert model.config._attn_implementation == "selkv"
    going_on.round(2)
    assert [position for _, position, _ in seen] == [context + i for i in range(4)]
    assert torch.equal(seen[0][0], first) and torch.equal(seen[2][0], seen[1][2])  # round 2 goes on from round 1
    assert int(cache.get_seq_length()) == context + 4


def test_row_fields_parse_by_the_config_field_type():
    from decode_attention import parse_method

    key, config, _ = parse_method("fused int2 rot {block_n=32,scale_prefetch=0,value_dot=fp16,codes_asm=1}")
    assert key == "fused int2 rot"
    assert (config.block_n, config.scale_prefetch, config.value_dot, config.codes_asm) == (32, False, "fp16", True)
    assert parse_method("fused int4 spec rot {scale_prefetch=1}")[1].scale_prefetch is True
