"""Where one decode step's time goes: full cache vs selkv int8 and int4 (fused), Llama-3-8B shape, random weights.

    PYTHONPATH=src python benchmarks/profile_e2e.py [--out DIR] [--tiny] [--captured] [--caches int4,...]

Same setup as ``decode_e2e.py``, from the same module (``e2e_model.py``: caches filled directly, batch 8 x 32k).
For each cache, two warm-up steps, then ``--steps`` steps under ``torch.profiler`` (CPU + CUDA activities).
Prints the wall time per step, the summed device time of all kernels per step, and the top operators by device time and
by CPU time; writes the tables, a Chrome trace per cache and ``summary.json`` under ``--out``.
The summary lists every gap over 1 ms in which no CPU operator ran (a kernel compile, say), read
off the trace. Then the same steps again under ``cProfile`` (``python_<cache>.txt``): which Python
functions the host time goes to, since a decode step of this size is bound by the host.

``--captured`` profiles the compiled steps instead: the full ``StaticCache`` with flex_attention and
selkv's static int8 / int4 / int2 caches, each step compiled as ``decode_e2e.py`` compiles it but
without CUDA graphs, so that the profiler sees every kernel of the step (a graph replays the same
kernels without the host's launches). The device time by kernel is what the captured step costs.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from e2e_model import (  # noqa: E402
    LLAMA3_8B,
    TINY,
    build_model,
    captured_selkv,
    compile_step,
    fill_full,
    fill_selective,
    fill_static,
)

import selkv  # noqa: E402,F401  (registers attn_implementation="selkv")
from selkv import make_cache  # noqa: E402
from selkv.models import forward_with_cache  # noqa: E402


def idle_gaps(trace_path: str, min_ms: float = 1.0) -> list[dict]:
    """Stretches of over ``min_ms`` in a Chrome trace during which no CPU operator ran."""
    with gzip.open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    gaps, end, last = [], ops[0]["ts"] + ops[0]["dur"], ops[0]
    for op in ops[1:]:
        if op["ts"] - end > 1000 * min_ms:
            gaps.append(dict(ms=round((op["ts"] - end) / 1000, 1), after=last["name"], before=op["name"]))
        if op["ts"] + op["dur"] > end:
            end, last = op["ts"] + op["dur"], op
    return gaps


# Kinds of kernels, by family, matched on lower-cased kernel names in this order (first match wins).
# Inductor names its generated kernels after the ops they fused ("triton_poi_fused_..._flex_attention_mul",
# "triton_red_fused_..._bmm_..."), so its pointwise and reduction kernels are "other" whatever ops they name;
# its templates ("triton_tem_") are flex_attention's kernels (without max-autotune the matrix multiplies stay
# in cuBLAS). "other" is the rest: norms, RoPE, activations, cache writes, the window's quantization.
KERNEL_KINDS = (
    ("other", ("triton_poi_", "triton_red_", "triton_per_")),
    ("attention", ("selective_decode", "merge_partials", "triton_tem_", "fmha", "flash")),
    ("matmul", ("gemm", "gemv", "nvjet", "xmma", "splitkreduce", "cutlass")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key in lowered for key in keys)), "other")


def kernel_ms(events, steps: int) -> dict[str, float]:
    """Device ms per step of every kernel, by full name, most first. Operator rows (``aten::mm``, a custom
    op) are left out: their device time is their kernels', which have rows of their own."""
    totals: dict[str, float] = {}
    for event in events:
        us = getattr(event, "self_device_time_total", 0)
        if us > 0 and getattr(event, "device_type", None) != torch.autograd.DeviceType.CPU:
            totals[event.key] = totals.get(event.key, 0.0) + us
    return {key: round(us / 1000 / steps, 4) for key, us in sorted(totals.items(), key=lambda item: -item[1])}


def device_ms_by_kind(kernels: dict[str, float]) -> dict[str, float]:
    """:func:`kernel_ms`'s times summed by :func:`kernel_kind`."""
    totals = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    for key, ms in kernels.items():
        totals[kernel_kind(key)] += ms
    return {kind: round(ms, 3) for kind, ms in totals.items()}


def python_profile(step, tokens, steps: int, device: str, name: str, out: str) -> float:
    """Run ``steps`` steps under cProfile; write the top functions to ``python_<name>.txt``; wall ms/step."""
    profiler = cProfile.Profile()
    with torch.no_grad():
        start = time.perf_counter()
        profiler.enable()
        for _ in range(steps):
            tokens = step(tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        profiler.disable()
        wall = (time.perf_counter() - start) / steps
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    with open(os.path.join(out, f"python_{name}.txt"), "w") as f:
        f.write(f"{name}: {1000 * wall:.1f} ms per step under cProfile ({steps} steps)\n" + text.getvalue())
    return round(1000 * wall, 1)


def eager_runs(model, args, device, dtype):
    """``(name, step(tokens) -> tokens)`` for the full cache (sdpa) and selkv int8 / int4, eager; each step
    holds its cache."""
    runs = (
        ("full", "full", "sdpa"),
        ("int8", "quant:bits=8,sink=4,window=124", "selkv"),
        ("int4", "quant:bits=4,sink=4,window=124", "selkv"),
    )
    for name, spec, attention in runs:
        if name not in args.caches:
            continue
        model.set_attn_implementation(attention)
        cache = make_cache(spec, model.config)
        (fill_full if spec == "full" else fill_selective)(cache, model.config, args.batch, args.context, device, dtype)

        def step(tokens, cache=cache):
            logits = forward_with_cache(model, cache, tokens, logits_to_keep=1).logits
            return logits[:, -1].argmax(-1, keepdim=True)

        yield name, step


def compiled_runs(model, args, device, dtype):
    """The compiled static-cache steps without CUDA graphs: full ``StaticCache`` + flex (CUDA only), selkv int8 /
    int4 / int2."""
    from transformers import StaticCache

    room = 2 * args.steps + 8  # warm-up, profiled and cProfiled steps all fit
    if device == "cuda" and "static-flex" in args.caches:  # inductor's CPU flex_attention cannot lower this step
        model.set_attn_implementation("flex_attention")
        cache = StaticCache(config=model.config, max_cache_len=args.context + room)
        fill_static(cache, model.config, args.batch, args.context, device, dtype)
        flex = compile_step(model, None, False)
        position = torch.tensor([args.context], device=device)
        yield "static-flex", lambda tokens, cache=cache: flex(tokens, cache, position).argmax(-1, keepdim=True)
    for bits in (8, 4, 2):
        if f"int{bits}" not in args.caches:
            continue
        cache, step, _ = captured_selkv(
            model, f"quant:bits={bits}", args.batch, args.context, room, device, dtype, graphs=False
        )
        yield (
            f"int{bits}-compiled",
            lambda tokens, cache=cache, step=step: step(tokens, cache, None).argmax(-1, keepdim=True),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (a smoke test of this script)")
    parser.add_argument("--out", default="profile_e2e")
    parser.add_argument(
        "--captured",
        action="store_true",
        help="profile the compiled static-cache steps (flex full cache, selkv int8/int4/int2)",
    )
    parser.add_argument(
        "--caches",
        default=None,
        help="caches to profile, comma-separated (default: all; full,int8,int4 eager; "
        "static-flex,int8,int4,int2 with --captured)",
    )
    args = parser.parse_args()
    known = ("static-flex", "int8", "int4", "int2") if args.captured else ("full", "int8", "int4")
    args.caches = known if args.caches is None else tuple(args.caches.split(","))
    if unknown := sorted(set(args.caches) - set(known)):
        parser.error(f"unknown cache(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    os.makedirs(args.out, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build_model(TINY if args.tiny else LLAMA3_8B, device, dtype)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort_device = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    summary = dict(
        command="PYTHONPATH=src python " + " ".join(sys.argv),
        batch=args.batch,
        context=args.context,
        steps=args.steps,
        caches={},
    )
    runs = eager_runs(model, args, device, dtype) if not args.captured else compiled_runs(model, args, device, dtype)
    for name, step in runs:  # the generator builds the next cache as the loop moves on
        tokens = torch.randint(0, model.config.vocab_size, (args.batch, 1), device=device)
        with torch.no_grad():
            for _ in range(2):
                tokens = step(tokens)
            if device == "cuda":
                torch.cuda.synchronize()
            with torch.profiler.profile(activities=activities) as prof:
                start = time.perf_counter()
                for _ in range(args.steps):
                    tokens = step(tokens)
                if device == "cuda":
                    torch.cuda.synchronize()
                wall = (time.perf_counter() - start) / args.steps
        events = prof.key_averages()
        kernels = kernel_ms(events, args.steps)
        by_kind = device_ms_by_kind(kernels)
        device_ms = sum(kernels.values())
        lines = [f"{name}: wall {1000 * wall:.1f} ms per step, kernels {device_ms:.1f} ms per step (device)"]
        try:
            lines.append(events.table(sort_by=sort_device, row_limit=15))
        except (AttributeError, KeyError):
            lines.append(events.table(sort_by="self_cpu_time_total", row_limit=15))
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=12))
        text = "\n".join(lines)
        print(text, flush=True)
        with open(os.path.join(args.out, f"profile_{name}.txt"), "w") as f:
            f.write(text)
        trace = os.path.join(args.out, f"trace_{name}.json.gz")
        prof.export_chrome_trace(trace)
        gaps = idle_gaps(trace)
        summary["caches"][name] = dict(
            wall_ms_per_step=round(1000 * wall, 1),
            idle_gaps_over_1ms=gaps,
            wall_ms_per_step_without_gaps=round(1000 * wall - sum(g["ms"] for g in gaps) / args.steps, 1),
            device_ms_per_step=round(device_ms, 3),
            device_ms_per_step_by_kind=by_kind,
            kernels_ms_per_step=kernels,
        )
        print(f"{name}: idle gaps over 1 ms (no CPU operator running): {gaps}", flush=True)
        summary["caches"][name]["python_ms_per_step"] = python_profile(step, tokens, args.steps, device, name, args.out)
        if device == "cuda":
            torch.cuda.empty_cache()
        with open(os.path.join(args.out, "summary.json"), "w") as f:  # after every cache: a cut-off run keeps these
            json.dump(summary, f, indent=1)
    if not summary["caches"]:
        sys.exit(
            f"profile_e2e.py: nothing profiled: {', '.join(args.caches)} ran nowhere here (static-flex needs CUDA)"
        )


if __name__ == "__main__":
    main()
