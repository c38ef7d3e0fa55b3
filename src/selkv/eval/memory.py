"""KV memory against tokens: bytes each cache holds while a prompt is prefilled and tokens are generated.

Counted from the tensors the cache holds (``selkv.kv_bytes``), against what a 16-bit full cache of
the same tokens would hold. On CUDA the peak allocated device memory of each run is recorded too.

Metrics per cache: ``kv_bytes`` (the memory held, spare room included), ``kv_bytes_filled``,
``kv_bytes_full16``, ``compression`` at the end (prompt + all new tokens), ``peak_device_bytes``
(CUDA only) and ``series``: ``[{"new_tokens", "tokens", "kv_bytes", "kv_bytes_full16"}, ...]`` every
``every`` new tokens, for the "memory vs new tokens" plot.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..cache import kv_bytes, make_cache
from ..errors import SelKVError
from ..generation import decode_tokens, prefill
from ..specs import CacheSpec
from .arguments import non_negative_int, positive_int
from .data import check_text, load_text
from .kv_metrics import measure_cache
from .prompts import encode
from .runner import progress

TASK = "memory"
DEFAULTS = {"data": "pg19", "prompt_tokens": 1024, "new_tokens": 256, "every": 16, "chunk": 64}


def add_arguments(parser) -> None:
    parser.add_argument("--data", default=DEFAULTS["data"], help="text the prompt is taken from (default pg19)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=DEFAULTS["prompt_tokens"], help="default 1024")
    parser.add_argument(
        "--new-tokens", type=positive_int, default=DEFAULTS["new_tokens"], help="tokens to generate (default 256)"
    )
    parser.add_argument(
        "--every", type=positive_int, default=DEFAULTS["every"], help="measure every N new tokens (default 16)"
    )
    parser.add_argument(
        "--chunk", type=non_negative_int, default=DEFAULTS["chunk"], help="prefill chunk (default 64, 0 = one pass)"
    )


def check(settings: dict) -> None:
    """Input errors found before the model loads."""
    check_text(settings["data"])


def settings_from_args(args) -> dict:
    return {
        "data": args.data,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "every": args.every,
        "chunk": args.chunk,
    }


def _point(cache, new_tokens: int) -> dict:
    counted = kv_bytes(cache)
    return {
        "new_tokens": new_tokens,
        "tokens": counted["tokens"],
        "kv_bytes": counted["allocated"],
        "kv_bytes_full16": counted["full16"],
    }


@torch.inference_mode()
def measure(model, prompt_ids: list[int], spec: str | CacheSpec, new_tokens: int, every: int, chunk: int) -> dict:
    """Prefill ``prompt_ids``, then decode ``new_tokens`` greedily (no stop at EOS), measuring as it goes."""
    device = model.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    cache = make_cache(spec, model.config)
    last = prefill(model, torch.tensor([prompt_ids], device=device), cache, chunk)
    series = [_point(cache, 0)]
    steps = 0

    def after_step() -> None:
        nonlocal steps
        steps += 1
        if steps % every == 0 or steps == new_tokens:
            series.append(_point(cache, steps))

    decode_tokens(model, cache, last, new_tokens, on_step=after_step, feed_last=True)
    record = {"series": series, **measure_cache(cache)}
    if cuda:
        torch.cuda.synchronize(device)
        record["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        record["peak_device_bytes_above_start"] = record["peak_device_bytes"] - base
    return record


def run(
    model,
    tokenizer,
    specs: Mapping[str, CacheSpec],
    writer,
    data: str,
    prompt_tokens: int,
    new_tokens: int,
    every: int,
    chunk: int,
) -> None:
    text, source = load_text(data)
    prompt_ids = encode(tokenizer, text[: prompt_tokens * 12])[:prompt_tokens]
    if len(prompt_ids) < prompt_tokens:
        raise SelKVError(f"{source} gives only {len(prompt_ids)} prompt tokens; {prompt_tokens} were asked for")
    writer.data = source
    for name in progress([n for n in specs if writer.get(n, "run") is None], desc="memory", unit="cache"):
        writer.add(name, "run", measure(model, prompt_ids, specs[name], new_tokens, max(1, every), chunk))


def aggregate(records: list[dict]) -> dict:
    record = records[-1]
    keys = (
        "kv_bytes",
        "kv_bytes_filled",
        "kv_bytes_full16",
        "compression",
        "kv_bytes_16bit",
        "kv_bytes_codes",
        "kv_bytes_scales",
        "kv_tokens",
        "peak_device_bytes",
        "peak_device_bytes_above_start",
        "series",
    )
    return {k: record[k] for k in keys if k in record}
