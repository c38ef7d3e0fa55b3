"""CPU decode speed of the embedded model: full cache vs selkv int8, as in ``selkv demo``.

    PYTHONPATH=src python benchmarks/cpu_decode.py [--steps 48] [--rounds 7] [--attn sdpa selkv] [--profile]

One process, the demo's prompt (a CNN/DailyMail article in the chat template, ~800 tokens) and
its caches. Each round prefills every cache once and then times ``--steps`` greedy decode steps;
the caches take turns within a round, so a slow stretch of a shared machine hits every row. The
first round is warm-up and is dropped. Reported per clock: tokens/s of the median round, the
spread (min-max over the rounds), and the median of the per-round ratios to the full cache's
tokens/s (the target is int8 >= 0.9x). Two clocks: wall time, and the process's CPU time, which
on a machine shared with other jobs counts only this process's work (use ``--threads 1`` there:
with more threads than free cores, OpenMP's waiting dominates both clocks). ``--profile`` prints
torch.profiler's op table for a few decode steps of each cache instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import selkv  # noqa: E402
from selkv.cli import DEMO_CACHES, demo_prompt  # noqa: E402
from selkv.generation import encode_prompt  # noqa: E402
from selkv.models import forward_with_cache  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@torch.inference_mode()
def decode_seconds(model, input_ids, spec: str, steps: int) -> dict[str, float]:
    """Seconds (per clock) of ``steps`` greedy one-token steps after a prefill with a fresh cache of ``spec``."""
    cache = selkv.make_cache(spec, model.config)
    token = forward_with_cache(model, cache, input_ids).logits[:, -1:].argmax(-1)
    start = {name: clock() for name, clock in CLOCKS.items()}
    for _ in range(steps):
        token = forward_with_cache(model, cache, token).logits[:, -1:].argmax(-1)
    return {name: clock() - start[name] for name, clock in CLOCKS.items()}


@torch.inference_mode()
def profile_step(model, input_ids, spec: str, steps: int = 8) -> None:
    from torch.profiler import ProfilerActivity, profile

    cache = selkv.make_cache(spec, model.config)
    token = forward_with_cache(model, cache, input_ids).logits[:, -1:].argmax(-1)
    token = forward_with_cache(model, cache, token).logits[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            token = forward_with_cache(model, cache, token).logits[:, -1:].argmax(-1)
    print(f"=== {spec}: {steps} decode steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=48, help="decode steps per measurement (the demo's 48)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds, the first one warm-up (default 7)")
    parser.add_argument(
        "--attn",
        nargs="+",
        default=["sdpa"],
        choices=["sdpa", "selkv"],
        help="attention implementations of the int8 rows (the full row always uses sdpa)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="print an op profile instead of timing")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 2:
        parser.error("--steps must be >= 1 and --rounds >= 2 (the first round is warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {"sdpa": selkv.load_model("smollm2-135m", device="cpu", attn_implementation="sdpa")}
    if "selkv" in args.attn:
        models["selkv"], _ = selkv.load_model("smollm2-135m", device="cpu", attn_implementation="selkv")
    models["sdpa"], tokenizer = models["sdpa"]
    prompt, _ = demo_prompt()
    input_ids = encode_prompt(tokenizer, prompt)["input_ids"]
    full_spec, int8_spec = DEMO_CACHES
    rows = [("full", models["sdpa"], full_spec)] + [(f"int8 {attn}", models[attn], int8_spec) for attn in args.attn]
    print(
        f"prompt {input_ids.shape[-1]} tokens, {args.steps} steps, {torch.get_num_threads()} threads, "
        f"{models['sdpa'].dtype}"
    )
    if args.profile:
        for _, model, spec in rows:
            profile_step(model, input_ids, spec)
        return

    seconds = {name: [] for name, _, _ in rows}
    for round_idx in range(args.rounds):
        for name, model, spec in rows:
            seconds[name].append(decode_seconds(model, input_ids, spec, args.steps))
        print(
            f"round {round_idx}: "
            + ", ".join(
                f"{n} {args.steps / s[-1]['wall']:.1f} tok/s (cpu clock {args.steps / s[-1]['cpu']:.1f})"
                for n, s in seconds.items()
            ),
            flush=True,
        )
    for clock in CLOCKS:
        print(f"--- {clock} clock, rounds 1-{args.rounds - 1}")
        full = [args.steps / t[clock] for t in seconds["full"][1:]]
        for name, times in seconds.items():
            speeds = [args.steps / t[clock] for t in times[1:]]
            ratios = [s / f for s, f in zip(speeds, full, strict=True)]
            print(
                f"{name:12s} {statistics.median(speeds):6.1f} tok/s (spread {min(speeds):.1f}-{max(speeds):.1f}), "
                f"{statistics.median(ratios):.2f}x full (per-round ratios {min(ratios):.2f}-{max(ratios):.2f})"
            )


if __name__ == "__main__":
    main()
