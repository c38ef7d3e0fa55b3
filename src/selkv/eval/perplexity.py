"""Chunked perplexity that reads the compressed cache.

A perplexity computed in one forward pass never reads the cache, so every strategy would score the
same. Here the text is fed in chunks of ``chunk`` tokens: each chunk's predictions attend to the
cache the earlier chunks left behind (``chunk=1`` is token-by-token decoding). Within a chunk the
new tokens attend to each other exactly, as in a real prefill.

Metrics per cache: ``ppl``, ``nll`` (mean, nats/token), ``tokens`` (predicted tokens), the KV memory
at the end of each segment, and ``ppl_vs_full`` / ``nll_vs_full`` (relative / absolute difference
to the ``full`` cache on the same tokens).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..cache import make_cache
from ..errors import SelKVError
from ..generation import prefill
from ..specs import CacheSpec
from .arguments import at_least, positive_int
from .data import check_text, load_text
from .kv_metrics import aggregate_kv, measure_cache
from .prompts import encode
from .runner import progress

TASK = "perplexity"
DEFAULTS = {"data": "pg19", "max_tokens": 2048, "chunk": 64, "segments": 1}
# Why a chunk must hold fewer tokens than the text: every cache would score the full cache's perplexity.
ONE_PASS = " (a one-pass perplexity never reads the compressed cache)"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--data",
        default=DEFAULTS["data"],
        help="text file, or a named set: wikitext2, pg19, pg19-dragons-blood, pg19-morocco, "
        "hf:PATH[:CONFIG] (default pg19)",
    )
    parser.add_argument(
        "--max-tokens", type=at_least(2), default=DEFAULTS["max_tokens"], help="tokens per segment (default 2048)"
    )
    parser.add_argument(
        "--chunk",
        type=at_least(1, ONE_PASS),
        default=DEFAULTS["chunk"],
        help="tokens per forward pass; each chunk reads the cache left by earlier ones (default 64; "
        "1 = token by token)",
    )
    parser.add_argument(
        "--segments",
        type=positive_int,
        default=DEFAULTS["segments"],
        help="consecutive non-overlapping segments of --max-tokens, each with a fresh cache (default 1)",
    )


def settings_from_args(args) -> dict:
    return {"data": args.data, "max_tokens": args.max_tokens, "chunk": args.chunk, "segments": args.segments}


def check(settings: dict) -> None:
    """Input errors found before the model loads."""
    _check_lengths(settings["max_tokens"], settings["segments"], settings["chunk"])
    check_text(settings["data"])


def _check_lengths(max_tokens: int, segments: int, chunk: int = 1) -> None:
    if max_tokens < 2 or segments < 1:
        raise SelKVError(f"--max-tokens must be >= 2 and --segments >= 1, got {max_tokens} and {segments}")
    if chunk < 1:
        raise SelKVError(f"--chunk must be >= 1{ONE_PASS}, got {chunk}")


def load_segments(tokenizer, data: str, max_tokens: int, segments: int) -> tuple[list[list[int]], str]:
    """``segments`` consecutive token segments of ``max_tokens`` from the start of the text."""
    _check_lengths(max_tokens, segments)
    text, source = load_text(data)
    needed = max_tokens * segments
    # Tokenize a prefix first (large files take seconds); fall back to the whole text if it is too short.
    ids = encode(tokenizer, text[: needed * 12])
    if len(ids) < needed:
        ids = encode(tokenizer, text)
    if len(ids) < needed:
        raise SelKVError(f"{source} has {len(ids)} tokens; {segments} x {max_tokens} were asked for")
    return [ids[i * max_tokens : (i + 1) * max_tokens] for i in range(segments)], source


@torch.inference_mode()
def score(model, ids: list[int], spec: str | CacheSpec, chunk: int) -> tuple[float, int, dict]:
    """(summed NLL over positions 1..n-1, predicted tokens, KV memory at the end) with a fresh ``spec`` cache."""
    scored = score_tokens(model, ids, spec, chunk)
    return scored.nll_sum, scored.tokens, scored.kv


@dataclass
class Scored:
    """What :func:`score_tokens` measured: summed NLL (nats), predicted tokens, whether every one of them was the
    argmax, and the KV memory at the end (:func:`~selkv.eval.kv_metrics.measure_cache`)."""

    nll_sum: float
    tokens: int
    greedy: bool
    kv: dict


@torch.inference_mode()
def score_tokens(
    model, ids: list[int], spec: str | CacheSpec, chunk: int, first_target: int = 1, feed_last: bool = True
) -> Scored:
    """Score ``ids[first_target:]`` given the tokens before them, feeding all of ``ids`` in chunks of ``chunk``.

    A fresh ``spec`` cache; chunks start at ``ids[0]``, so each chunk's predictions attend to the cache the
    earlier chunks left behind (``chunk=0``: one pass, which never reads a compressed cache).
    ``first_target=1`` scores every position, as perplexity does; a harness request scores only its
    continuation (``first_target`` = the context's length). The last token predicts nothing: ``feed_last=False``
    leaves it out of the cache (what a harness model feeds), which scores the same.
    """
    if not 1 <= first_target < len(ids):
        raise SelKVError(f"first_target must be in 1..{len(ids) - 1}, got {first_target}")
    device = model.device
    targets = torch.tensor(ids[1:], device=device)  # position p predicts targets[p]
    input_ids = torch.tensor([ids if feed_last else ids[:-1]], device=device)
    cache = make_cache(spec, model.config)
    total = torch.zeros((), dtype=torch.float64, device=device)
    mismatches = torch.zeros((), dtype=torch.long, device=device)
    seq_len = len(ids)

    def add_nll(start: int, logits: torch.Tensor) -> None:  # logits: [1, chunk_len, vocab_size]
        first = max(start, first_target - 1)  # the first position whose prediction is scored
        end = min(start + logits.shape[1], seq_len - 1)  # positions first..end-1 predict tokens first+1..end
        if end > first:
            scored = logits[0, first - start : end - start].float()
            total.add_(torch.nn.functional.cross_entropy(scored, targets[first:end], reduction="sum").double())
            mismatches.add_((scored.argmax(-1) != targets[first:end]).sum())

    prefill(model, input_ids, cache, chunk, on_logits=add_nll)
    return Scored(float(total), seq_len - first_target, int(mismatches) == 0, measure_cache(cache))


def run(
    model,
    tokenizer,
    specs: Mapping[str, CacheSpec],
    writer,
    data: str,
    max_tokens: int,
    chunk: int,
    segments: int = 1,
) -> None:
    _check_lengths(max_tokens, segments, chunk)
    segment_ids, source = load_segments(tokenizer, data, max_tokens, segments)
    writer.data = source
    todo = [(name, i) for name in specs for i in range(len(segment_ids)) if writer.get(name, f"segment{i}") is None]
    for name, i in progress(todo, desc=f"perplexity ({max_tokens} tokens, chunk {chunk})", unit="run"):
        nll_sum, tokens, kv = score(model, segment_ids[i], specs[name], chunk)
        writer.add(name, f"segment{i}", {"nll_sum": nll_sum, "tokens": tokens, **kv})


def aggregate(records: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in records)
    nll = sum(r["nll_sum"] for r in records) / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "segments": len(records), **aggregate_kv(records)}


def compare(metrics: dict, full: dict) -> dict:
    if metrics.get("tokens") != full.get("tokens"):
        return {}
    return {"ppl_vs_full": metrics["ppl"] / full["ppl"] - 1.0, "nll_vs_full": metrics["nll"] - full["nll"]}
