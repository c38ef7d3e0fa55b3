"""Summarization: greedy summaries with each cache, ROUGE-L against references and against ``full``.

For every document the prompt (the model's chat template around an instruction and the document) is
prefilled in chunks of ``chunk`` tokens, each chunk reading the cache the earlier ones left, then
``max_new_tokens`` are decoded greedily one step at a time (every step reads the compressed cache).

Metrics per cache: ``rougeL`` (F1 against the reference, rouge-score with stemming), ``rougeL_vs_full``
(F1 against the ``full`` cache's own summary of the same document), ``token_match_vs_full`` (share of
generated token positions equal to ``full``'s, over the longer of the two), ``n`` and KV memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..cache import make_cache
from ..generation import eos_token_ids, greedy_decode, prefill
from ..specs import CacheSpec
from .arguments import non_negative_int, positive_int
from .data import check_summarization, load_summarization
from .kv_metrics import aggregate_kv, measure_cache
from .prompts import chat_ids
from .runner import progress

TASK = "summarization"
DEFAULTS = {
    "data": "cnn_dailymail",
    "limit": 20,
    "max_new_tokens": 64,
    "chunk": 64,
    "max_doc_tokens": 3072,
    "instruction": None,
}

INSTRUCTIONS = {
    "xsum": "Summarize the following article in one sentence.",
    "default": "Summarize the following article in 3 sentences.",
}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--data",
        default=DEFAULTS["data"],
        help="JSONL with 'document' and 'summary', or a named set: cnn_dailymail, xsum, govreport",
    )
    parser.add_argument("--limit", type=positive_int, default=DEFAULTS["limit"], help="first N documents (default 20)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULTS["max_new_tokens"], help="default 64")
    parser.add_argument(
        "--chunk",
        type=non_negative_int,
        default=DEFAULTS["chunk"],
        help="prefill chunk; each chunk reads the cache left by earlier ones (default 64, 0 = one pass)",
    )
    parser.add_argument(
        "--max-doc-tokens",
        type=non_negative_int,
        default=DEFAULTS["max_doc_tokens"],
        help="truncate documents to this many tokens (default 3072)",
    )
    parser.add_argument(
        "--instruction",
        default=None,
        help="instruction before the document (default: one sentence for xsum, 3 sentences otherwise)",
    )


def check(settings: dict) -> None:
    """Input errors found before the model loads."""
    check_summarization(settings["data"])


def settings_from_args(args) -> dict:
    return {
        "data": args.data,
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "chunk": args.chunk,
        "max_doc_tokens": args.max_doc_tokens,
        "instruction": args.instruction,
    }


def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("summarization needs the 'rouge-score' package: pip install 'selkv[eval]'") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(scorer, reference: str, prediction: str) -> float:
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def token_match(tokens: list[int], reference_tokens: list[int]) -> tuple[int, int]:
    """(positions where both agree, the longer length)."""
    same = sum(a == b for a, b in zip(tokens, reference_tokens, strict=False))
    return same, max(len(tokens), len(reference_tokens))


def build_prompt(tokenizer, document: str, instruction: str, max_doc_tokens: int) -> list[int]:
    doc_ids = tokenizer.encode(document, add_special_tokens=False)
    if max_doc_tokens and len(doc_ids) > max_doc_tokens:
        document = tokenizer.decode(doc_ids[:max_doc_tokens])
    return chat_ids(tokenizer, f"{instruction}\n\nArticle: {document.strip()}")


@torch.inference_mode()
def summarize(
    model, tokenizer, prompt_ids: list[int], spec: str | CacheSpec, chunk: int, max_new_tokens: int, eos
) -> dict:
    cache = make_cache(spec, model.config)
    input_ids = torch.tensor([prompt_ids], device=model.device)
    last = prefill(model, input_ids, cache, chunk)
    tokens = greedy_decode(model, cache, last, max_new_tokens, eos)
    text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True).strip()
    return {"tokens": tokens, "text": text, "prompt_tokens": len(prompt_ids), **measure_cache(cache)}


def run(
    model,
    tokenizer,
    specs: Mapping[str, CacheSpec],
    writer,
    data: str,
    limit: int,
    max_new_tokens: int,
    chunk: int,
    max_doc_tokens: int,
    instruction: str | None = None,
) -> None:
    records, source = load_summarization(data, limit)
    writer.data = source
    instruction = instruction or INSTRUCTIONS.get(data, INSTRUCTIONS["default"])
    scorer = _scorer()
    eos = eos_token_ids(model, tokenizer)
    ordered = sorted(specs, key=lambda name: name != "full")  # full first: the others compare against it
    bar = progress(total=len(records) * len(ordered), desc=f"summarization ({data})", unit="gen")
    for record in records:
        key = str(record["id"])
        prompt_ids = None
        for name in ordered:
            bar.update()
            if writer.get(name, key) is not None:
                continue
            if prompt_ids is None:
                prompt_ids = build_prompt(tokenizer, record["document"], instruction, max_doc_tokens)
            out = summarize(model, tokenizer, prompt_ids, specs[name], chunk, max_new_tokens, eos)
            out["rougeL"] = rouge_l(scorer, record["summary"], out["text"])
            full = writer.get("full", key) if name != "full" else out
            if full is not None:
                out["rougeL_vs_full"] = rouge_l(scorer, full["text"], out["text"]) if name != "full" else 1.0
                out["match"], out["match_of"] = token_match(out["tokens"], full["tokens"])
            writer.add(name, key, out)
    bar.close()


def aggregate(records: list[dict]) -> dict:
    n = len(records)
    metrics = {
        "rougeL": sum(r["rougeL"] for r in records) / n,
        "n": n,
        "new_tokens": sum(len(r["tokens"]) for r in records) / n,
    }
    compared = [r for r in records if r.get("rougeL_vs_full") is not None]
    if compared:
        metrics["rougeL_vs_full"] = sum(r["rougeL_vs_full"] for r in compared) / len(compared)
        metrics["token_match_vs_full"] = sum(r["match"] for r in compared) / max(
            1, sum(r["match_of"] for r in compared)
        )
    metrics.update(aggregate_kv(records))
    return metrics


def compare(metrics: dict, full: dict) -> dict:
    return {"rougeL_diff_vs_full": metrics["rougeL"] - full["rougeL"]} if metrics.get("n") == full.get("n") else {}
