"""Needle in a haystack: a passkey hidden at several depths of essay text of several lengths, plus
Lost-in-the-Middle key-value retrieval.

The haystack is Paul Graham essays (``niah/paul_graham_essays.jsonl``). A needle sentence carrying a
random 5-digit number is inserted at ``depth`` (share of the haystack before it); the prompt ends by
restating the needle's own words, so a model that can find the sentence completes it with the number
(the small embedded model can do this at 1-4k tokens with the full cache; open-ended questions it cannot).
The context is prefilled in chunks of ``chunk`` tokens, so the question attends to the compressed cache;
a one-pass prefill would let the question see every token exactly and hide what a cache forgot.

A sink+window eviction cache fails once the needle has left its window; a quantized cache keeps it.

Metrics per cache: ``accuracy`` and ``n`` (passkey), ``by_length``, ``by_depth`` and ``by_length_depth``
(accuracy per cell), and with ``--kv-data``: ``kv_accuracy``, ``kv_n``, ``kv_by_depth``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import torch

from ..cache import make_cache
from ..errors import SelKVError
from ..generation import eos_token_ids, greedy_decode, prefill
from ..specs import CacheSpec
from .arguments import fraction, non_negative_int, positive_int
from .data import check_essays, check_kv_retrieval, load_essays, load_kv_retrieval
from .kv_metrics import aggregate_kv, measure_cache
from .prompts import encode
from .runner import progress

TASK = "needle"
DEFAULTS = {
    "lengths": [1024, 2048],
    "depths": [0.1, 0.3, 0.5, 0.7, 0.9],
    "trials": 2,
    "chunk": 64,
    "seed": 0,
    "haystack": None,
    "kv_data": None,
    "kv_limit": 10,
    "kv_pairs": 20,
}

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
)
NEEDLE = (
    "\n\nThe special magic number of the blue elephant is {key}. "
    "Remember: the special magic number of the blue elephant is {key}.\n\n"
)
QUESTION = "\n\nWhat is the special magic number of the blue elephant? The special magic number of the blue elephant is"
PASSKEY_NEW_TOKENS = 8

KV_INTRO = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n"
KV_QUESTION = '\n\nKey: "{key}"\nCorresponding value: "{key}": "'
KV_NEW_TOKENS = 40


def add_arguments(parser) -> None:
    parser.add_argument(
        "--lengths",
        type=positive_int,
        nargs="+",
        default=DEFAULTS["lengths"],
        help="context lengths in tokens (default 1024 2048)",
    )
    parser.add_argument(
        "--depths",
        type=fraction,
        nargs="+",
        default=DEFAULTS["depths"],
        help="needle depths, 0 = start, 1 = end (default 0.1 0.3 0.5 0.7 0.9)",
    )
    parser.add_argument(
        "--trials",
        type=positive_int,
        default=DEFAULTS["trials"],
        help="passkeys (and haystack offsets) per length x depth cell (default 2)",
    )
    parser.add_argument(
        "--chunk",
        type=non_negative_int,
        default=DEFAULTS["chunk"],
        help="prefill chunk; the question reads the compressed cache (default 64)",
    )
    parser.add_argument("--haystack", default=None, help="essays JSONL with 'text' (default: the shared NIAH essays)")
    parser.add_argument(
        "--kv-data", default=None, help="also run key-value retrieval: kv75, kv140 or a JSONL file (default: off)"
    )
    parser.add_argument(
        "--kv-limit", type=positive_int, default=DEFAULTS["kv_limit"], help="KV-retrieval records (default 10)"
    )
    parser.add_argument(
        "--kv-pairs",
        type=non_negative_int,
        default=DEFAULTS["kv_pairs"],
        help="key-value pairs shown per record, a window around the gold pair that keeps its "
        "relative position; 0 = all (default 20)",
    )


def check(settings: dict) -> None:
    """Input errors found before the model loads."""
    check_essays(settings["haystack"])
    if settings["kv_data"]:
        check_kv_retrieval(settings["kv_data"])


def settings_from_args(args) -> dict:
    return {
        "lengths": args.lengths,
        "depths": args.depths,
        "trials": args.trials,
        "chunk": args.chunk,
        "seed": DEFAULTS["seed"],
        "haystack": args.haystack,
        "kv_data": args.kv_data,
        "kv_limit": args.kv_limit,
        "kv_pairs": args.kv_pairs,
    }


def passkey_examples(tokenizer, lengths, depths, trials: int, seed: int, haystack: str | None) -> list[dict]:
    """One example per (length, depth, trial): prompt ids, the key and where the needle starts."""
    essays, _ = load_essays(haystack)
    hay_ids = encode(tokenizer, " ".join(essays))
    intro_ids, question_ids = encode(tokenizer, INTRO), encode(tokenizer, QUESTION)
    rng = random.Random(seed)
    examples = []
    for length in lengths:
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise SelKVError(f"--depths must lie in [0, 1], got {depth}")
            for trial in range(trials):
                key = rng.randint(10000, 99999)
                needle_ids = encode(tokenizer, NEEDLE.format(key=key))
                body = length - len(intro_ids) - len(needle_ids) - len(question_ids)
                if body < 0 or body > len(hay_ids):
                    raise SelKVError(f"length {length} does not fit the needle prompt and the haystack")
                offset = rng.randrange(0, len(hay_ids) - body + 1)
                hay = hay_ids[offset : offset + body]
                at = int(round(body * depth))
                prompt = intro_ids + hay[:at] + needle_ids + hay[at:] + question_ids
                examples.append(
                    {
                        "key": f"L{length}-d{depth:g}-t{trial}",
                        "length": length,
                        "depth": depth,
                        "answer": str(key),
                        "prompt": prompt,
                        "needle_start": len(intro_ids) + at,
                        "needle_end": len(intro_ids) + at + len(needle_ids),
                    }
                )
    return examples


def kv_examples(tokenizer, data: str, limit: int, pairs: int) -> tuple[list[dict], str]:
    import json

    records, source = load_kv_retrieval(data, limit)
    examples = []
    for record in records:
        kv = record["ordered_kv_records"]
        gold = record.get("gold_index")
        gold = gold if gold is not None else [k for k, _ in kv].index(record["key"])
        if pairs and pairs < len(kv):
            # A window of `pairs` records that keeps the gold pair at its relative depth.
            start = min(max(0, gold - round(gold / len(kv) * pairs)), len(kv) - pairs)
            kv, gold = kv[start : start + pairs], gold - start
        body = json.dumps({k: v for k, v in kv}, indent=1)
        prompt = encode(tokenizer, KV_INTRO + body + KV_QUESTION.format(key=record["key"]))
        examples.append(
            {
                "key": f"kv-{record['id']}",
                "answer": record["value"],
                "prompt": prompt,
                "depth": round(gold / max(1, len(kv) - 1), 2),
                "length": len(prompt),
            }
        )
    return examples, source


@torch.inference_mode()
def answer(model, tokenizer, prompt: list[int], spec: str | CacheSpec, chunk: int, max_new_tokens: int, eos) -> dict:
    cache = make_cache(spec, model.config)
    last = prefill(model, torch.tensor([prompt], device=model.device), cache, chunk)
    tokens = greedy_decode(model, cache, last, max_new_tokens, eos)
    return {"output": tokenizer.decode(tokens, skip_special_tokens=True), **measure_cache(cache)}


def run(
    model,
    tokenizer,
    specs: Mapping[str, CacheSpec],
    writer,
    lengths,
    depths,
    trials: int,
    chunk: int,
    seed: int = 0,
    haystack: str | None = None,
    kv_data: str | None = None,
    kv_limit: int = 10,
    kv_pairs: int = 20,
) -> None:
    examples = passkey_examples(tokenizer, lengths, depths, trials, seed, haystack)
    sources = [load_essays(haystack)[1]]
    for example in examples:
        example["kind"], example["new_tokens"] = "passkey", PASSKEY_NEW_TOKENS
    if kv_data:
        kv, source = kv_examples(tokenizer, kv_data, kv_limit, kv_pairs)
        for example in kv:
            example["kind"], example["new_tokens"] = "kv", KV_NEW_TOKENS
        examples += kv
        sources.append(source)
    writer.data = " + ".join(sources)
    eos = eos_token_ids(model, tokenizer)
    todo = [(e, name) for e in examples for name in specs if writer.get(name, e["key"]) is None]
    for example, name in progress(todo, desc="needle", unit="prompt"):
        out = answer(model, tokenizer, example["prompt"], specs[name], chunk, example["new_tokens"], eos)
        fields = {k: example[k] for k in ("kind", "length", "depth", "answer")}
        if "needle_start" in example:
            fields["needle_tokens_from_end"] = len(example["prompt"]) - example["needle_start"]
        writer.add(name, example["key"], {**fields, "correct": example["answer"] in out["output"], **out})


def _accuracy(records: list[dict], field: str) -> dict:
    cells: dict[str, list[bool]] = {}
    for r in records:
        cells.setdefault(f"{r[field]:g}" if isinstance(r[field], float) else str(r[field]), []).append(r["correct"])
    return {k: sum(v) / len(v) for k, v in cells.items()}


def aggregate(records: list[dict]) -> dict:
    passkey = [r for r in records if r["kind"] == "passkey"]
    metrics: dict = {}
    if passkey:
        metrics.update(
            {
                "accuracy": sum(r["correct"] for r in passkey) / len(passkey),
                "n": len(passkey),
                "by_length": _accuracy(passkey, "length"),
                "by_depth": _accuracy(passkey, "depth"),
                "by_length_depth": {
                    length: _accuracy([r for r in passkey if str(r["length"]) == length], "depth")
                    for length in _accuracy(passkey, "length")
                },
            }
        )
    kv = [r for r in records if r["kind"] == "kv"]
    if kv:
        metrics.update(
            {
                "kv_accuracy": sum(r["correct"] for r in kv) / len(kv),
                "kv_n": len(kv),
                "kv_by_depth": _accuracy(kv, "depth"),
            }
        )
    metrics.update(aggregate_kv(records))
    return metrics
