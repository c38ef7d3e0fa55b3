"""Prefill and decode throughput of every cache, side by side in one process.

This is a benchmark, not a test: for each repeat, caches take turns (round robin, so that drift in
machine speed hits all of them alike); the first ``warmup`` repeats are discarded and the median of
the rest is reported. Inputs are random token ids (speed does not depend on content); decoding runs
exactly ``new_tokens`` steps with no early stop.

Metrics per cache: ``prefill_tok_s`` (batch x context / prefill time), ``decode_tok_s``
(batch x new_tokens / decode time), the per-repeat times, and KV memory at the end.

``--static``: each cache is preallocated once for context + new tokens (``make_cache(...,
max_cache_len=...)``, reset between repeats) and, on CUDA, its decode step is compiled and replayed
as a CUDA graph (:func:`selkv.compile_decode_step`; the warm-up repeats compile it). Quant caches
need ``--attn selkv`` for that; ``full`` becomes transformers' ``StaticCache``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch

from ..cache import make_cache
from ..errors import SelKVError
from ..generation import compile_decode_step, decode_tokens, prefill, synchronize
from ..specs import CacheSpec
from .arguments import at_least, non_negative_int, positive_int
from .kv_metrics import measure_cache
from .runner import progress

TASK = "speed"
DEFAULTS = {
    "batch": 1,
    "context": 1024,
    "new_tokens": 64,
    "repeats": 5,
    "warmup": 1,
    "chunk": 0,
    "seed": 0,
    "static": False,
}


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=positive_int, default=DEFAULTS["batch"], help="batch size (default 1)")
    parser.add_argument(
        "--context", type=positive_int, default=DEFAULTS["context"], help="prompt tokens (default 1024)"
    )
    parser.add_argument(
        "--new-tokens",
        type=at_least(2, " (decode speed times the steps after the first)"),
        default=DEFAULTS["new_tokens"],
        help="decode steps (default 64)",
    )
    parser.add_argument("--repeats", type=positive_int, default=DEFAULTS["repeats"], help="timed repeats (default 5)")
    parser.add_argument(
        "--warmup", type=non_negative_int, default=DEFAULTS["warmup"], help="untimed repeats first (default 1)"
    )
    parser.add_argument(
        "--chunk", type=non_negative_int, default=DEFAULTS["chunk"], help="prefill chunk (default 0 = one pass)"
    )
    parser.add_argument(
        "--static",
        action="store_true",
        help="static caches (max_cache_len) and, on CUDA, a captured decode step (see the module doc)",
    )


def settings_from_args(args) -> dict:
    return {
        "batch": args.batch,
        "context": args.context,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "chunk": args.chunk,
        "seed": DEFAULTS["seed"],
        "static": args.static,
    }


@torch.inference_mode()
def time_once(
    model, input_ids: torch.Tensor, spec: str | CacheSpec, new_tokens: int, chunk: int, cache=None, step=None
) -> tuple[float, float, object]:
    """(prefill seconds, decode seconds, cache) of one run with a fresh cache (or ``cache``, reset).

    ``step``: a compiled decode step (:func:`selkv.compile_decode_step`) for the decode.
    """
    device = model.device
    if cache is None:
        cache = make_cache(spec, model.config)
    else:
        cache.reset()
    synchronize(device)
    start = time.perf_counter()
    last = prefill(model, input_ids, cache, chunk)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    decode_tokens(model, cache, last, new_tokens, step=step, feed_last=True)
    synchronize(device)
    return prefill_s, time.perf_counter() - start, cache


def run(
    model,
    tokenizer,
    specs: Mapping[str, CacheSpec],
    writer,
    batch: int,
    context: int,
    new_tokens: int,
    repeats: int,
    warmup: int,
    chunk: int,
    seed: int = 0,
    static: bool = False,
) -> None:
    if batch < 1 or context < 1 or new_tokens < 1 or repeats < 1 or warmup < 0:
        raise SelKVError("--batch, --context, --new-tokens and --repeats must be >= 1 and --warmup >= 0")
    todo = [name for name in specs if writer.get(name, "timing") is None]
    if not todo:
        return
    generator = torch.Generator().manual_seed(seed)
    vocab = (
        model.config.get_text_config().vocab_size
        if hasattr(model.config, "get_text_config")
        else model.config.vocab_size
    )
    input_ids = torch.randint(0, vocab, (batch, context), generator=generator).to(model.device)
    writer.data = f"random token ids (seed {seed})"
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in todo}
    caches, steps = {}, {}
    if static:  # one preallocated cache per spec, reset between repeats: the compiled step keeps its graph
        step = compile_decode_step(model) if model.device.type == "cuda" else None
        for name in todo:
            caches[name] = make_cache(specs[name], model.config, max_cache_len=context + new_tokens)
            steps[name] = step if step is not None and caches[name].is_compileable else None
    for repeat in progress(range(warmup + repeats), desc="speed (repeats)", unit="round"):
        for name in todo:
            prefill_s, decode_s, caches[name] = time_once(
                model, input_ids, specs[name], new_tokens, chunk, cache=caches.get(name), step=steps.get(name)
            )
            if repeat >= warmup:
                times[name].append((prefill_s, decode_s))
    for name in todo:
        prefill_s = statistics.median(t[0] for t in times[name])
        decode_s = statistics.median(t[1] for t in times[name])
        writer.add(
            name,
            "timing",
            {
                "prefill_tok_s": batch * context / prefill_s,
                "decode_tok_s": batch * new_tokens / decode_s,
                "prefill_s": [t[0] for t in times[name]],
                "decode_s": [t[1] for t in times[name]],
                "static": static,
                "captured": steps.get(name) is not None,
                **measure_cache(caches[name]),
            },
        )


def aggregate(records: list[dict]) -> dict:
    record = records[-1]
    keys = ("prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s", "kv_bytes", "kv_bytes_full16", "compression")
    return {k: record[k] for k in keys if k in record}


def compare(metrics: dict, full: dict) -> dict:
    return {
        "decode_speedup_vs_full": metrics["decode_tok_s"] / full["decode_tok_s"],
        "prefill_speedup_vs_full": metrics["prefill_tok_s"] / full["prefill_tok_s"],
    }
