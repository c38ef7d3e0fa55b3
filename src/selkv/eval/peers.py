"""selkv's caches beside NVIDIA kvpress's presses at equal KV memory, under kvpress's evaluation protocol.

kvpress (``kvpress==0.5.5``) pins ``transformers<5.3`` while selkv needs 5.17+, so the two sides run in two
environments (``make peers-kvpress``), with this one module: the same model, the same token ids, the same
protocol and the same scoring on both sides, each side writing a ``selkv report`` results folder::

    python -m selkv.eval.peers --side selkv   --out results/peers-kvpress/selkv     # .venv (transformers 5.17+)
    python -m selkv.eval.peers --side kvpress --out results/peers-kvpress/kvpress   # .venv-kvpress (kvpress's own)
    selkv report results/peers-kvpress                                               # one table of both

This module imports only what works under both transformers versions: data loading, prompts, scoring,
byte counts (``selkv.sizing``); kvpress is imported by the kvpress side alone.

Protocol (kvpress's ``KVPressTextGenerationPipeline``): the context is prefilled once in one pass (a press
compresses it in its forward hooks; a selkv cache compresses what leaves its window), then each question is
fed after it and answered greedily, and the cache goes back to the context's state before the next question
(``SelectiveCache.snapshot``/``restore`` for selkv; the press's cache is truncated to its lengths, as the
pipeline does). The question and answer are never compressed by a press; in a selkv cache they enter the
window like any token.

Equal memory: each press's ``compression_ratio`` is set per context to what the matched selkv spec saved
there in the selkv side's run, ``1 - held / full16`` (``held``: the bytes the selkv cache holds after the
context, 16-bit sink and window included, counted by :func:`selkv.sizing.cache_size` as a bfloat16 model
holds them; ``full16``: a 16-bit full cache of the same tokens). selkv's cache modules need transformers
5.17+, so kvpress's side reads these bytes from the selkv side's ``examples.jsonl`` (``--match``), and checks
that its context token ids hash the same as the selkv side's. Every row reports that axis, kvpress's
``compression``, measured after the context: bytes held over 16-bit full bytes, whatever the dtype the model ran in.

Tasks: ``needle`` (selkv's passkey prompts, split before the question), ``qa`` (L-Eval Qasper papers, several
questions per paper, token F1), ``summarization`` (selkv's summarization prompts, ROUGE-L).
"""

from __future__ import annotations

import argparse
import re
import string
import sys
import time
from collections import Counter

import torch

TASK = "kvpress-peers"
SIDES = ("selkv", "kvpress")
# selkv's rows: the full cache, the two matched specs and selkv's own StreamingLLM baseline.
MATCHED = ("quant:bits=4,sink=4,window=124", "quant:bits=2,sink=4,window=124")
SELKV_ROWS = ("full", *MATCHED, "drop:sink=4,window=124")
PRESSES = {
    "snapkv": "SnapKVPress",
    "expected_attention": "ExpectedAttentionPress",
    "streaming_llm": "StreamingLLMPress",
    "knorm": "KnormPress",
}
NO_PRESS = "kvpress:none"
QA_SETS = {
    "scientific_qa": "longctx_qa/leval_scientific_qa.jsonl",
    "natural_question": "longctx_qa/leval_natural_question.jsonl",
}
# Sized for a 2-core CPU (1-3 minutes per row): 2 needle contexts, 2 papers x 2 questions, 2 articles.
DEFAULTS = {
    "needle_lengths": [1024, 2048],
    "needle_depths": [0.5],
    "needle_trials": 1,
    "qa_data": "scientific_qa",
    "qa_docs": 2,
    "qa_questions": 2,
    "qa_context_tokens": 1024,
    "qa_new_tokens": 16,
    "summ_data": "cnn_dailymail",
    "summ_docs": 2,
    "summ_new_tokens": 32,
    "summ_doc_tokens": 3072,
    "seed": 0,
}
QA_INTRO = "Read the paper below, then answer the question about it briefly.\n\n"
QA_QUESTION = "\n\nQuestion: {question}\nAnswer briefly."


def press_row(press: str, matched: str) -> str:
    """The row name of a press at the memory of selkv spec ``matched``: ``kvpress:snapkv@quant:bits=4,...``."""
    return f"kvpress:{press}@{matched}"


def parse_press_row(row: str) -> tuple[str, str | None]:
    """(press, matched spec or None) of a row name made by :func:`press_row` (or ``kvpress:none``)."""
    if not row.startswith("kvpress:"):
        raise ValueError(f"{row!r} is not a kvpress row (kvpress:<press>@<selkv spec> or {NO_PRESS})")
    press, _, matched = row[len("kvpress:") :].partition("@")
    if press != "none" and press not in PRESSES:
        raise ValueError(f"unknown press {press!r} in {row!r}; known: {', '.join(PRESSES)}")
    if press != "none" and not matched:
        raise ValueError(f"{row!r} names no selkv spec to match (kvpress:{press}@<spec>)")
    return press, (matched or None)


def default_rows(side: str) -> list[str]:
    if side == "selkv":
        return list(SELKV_ROWS)
    if side == "kvpress":
        return [NO_PRESS] + [press_row(p, m) for m in MATCHED for p in PRESSES]
    raise ValueError(f"--side must be one of {', '.join(SIDES)}, got {side!r}")


# ------------------------------------------------------------------ memory axis


def kvpress_compression(held: float, full16: float) -> float:
    """kvpress's axis: the share of a 16-bit full cache's bytes that a cache does not hold (0 = full, 0.75 = 4x)."""
    if not full16 or full16 <= 0:
        raise ValueError(f"full 16-bit bytes must be positive, got {full16!r}")
    return 1.0 - held / full16


def selkv_bytes(spec: str, config, tokens: int) -> dict:
    """Bytes a selkv cache holds after a one-pass prefill of ``tokens`` (16-bit parts counted as bfloat16)."""
    from ..sizing import cache_size

    counted = cache_size(spec, config, tokens, chunk=tokens)
    return {"held": counted["allocated"], "full16": counted["full16"]}


def matched_ratio(spec: str, config, tokens: int) -> float:
    """The press ``compression_ratio`` that holds what ``spec`` holds after ``tokens`` context tokens."""
    counted = selkv_bytes(spec, config, tokens)
    return max(0.0, kvpress_compression(counted["held"], counted["full16"]))


def full_bytes16(config, tokens: int) -> int:
    """Bytes a 16-bit full cache of ``tokens`` holds for a model without sliding-window layers (from its config
    alone, so that kvpress's side counts it under its own transformers)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(config, "sliding_window", None) and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise ValueError("the kvpress comparison counts full caches of models without sliding-window layers")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return tokens * config.num_hidden_layers * heads * 2 * head_dim * 2


def context_digest(context: list[int]) -> str:
    """A short hash of a context's token ids: both sides record it, and kvpress's side checks it against selkv's."""
    import hashlib

    return hashlib.sha1(",".join(map(str, context)).encode()).hexdigest()[:16]


def matched_bytes(selkv_dir: str) -> dict[tuple[str, str], dict]:
    """(spec, example key) -> {held, full16, digest} from the selkv side's ``examples.jsonl`` (what kvpress's side
    matches: selkv's cache modules need transformers 5.17+, so the bytes come from selkv's own run)."""
    import json
    from pathlib import Path

    from .results import EXAMPLES

    path = Path(selkv_dir) / EXAMPLES
    if not path.exists():
        raise FileNotFoundError(
            f"no {path}: run the selkv side first (python -m selkv.eval.peers --side selkv "
            f"--out {selkv_dir}); the presses match the bytes it records"
        )
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            found[(r["cache"], r["key"])] = {
                "held": r["kv_bytes16_held"],
                "full16": r["kv_bytes16_full"],
                "digest": r.get("context_digest"),
            }
    return found


def dense_bytes16(cache) -> int:
    """16-bit bytes of the keys and values a transformers ``DynamicCache`` holds (a press's compressed cache)."""
    return sum(2 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers if layer.keys is not None)


# --------------------------------------------------------------------- scoring


def _normalize(text: str) -> list[str]:
    """SQuAD/L-Eval answer normalization: lower case, no punctuation or articles, words."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def qa_f1(prediction: str, answers: list[str]) -> float:
    """Token F1 of ``prediction`` against the best of ``answers`` (L-Eval's ``f1`` metric)."""
    best = 0.0
    pred = _normalize(prediction)
    for answer in answers:
        gold = _normalize(answer)
        same = sum((Counter(pred) & Counter(gold)).values())
        if same:
            precision, recall = same / len(pred), same / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ---------------------------------------------------------------------- inputs


def _chat_parts(tokenizer, context_text: str) -> tuple[list[int], str]:
    """kvpress's split of one user turn: the ids of the chat template up to the end of ``context_text``, and
    the template's text after it (the question goes before that suffix)."""
    from .prompts import encode

    if not getattr(tokenizer, "chat_template", None):
        return encode(tokenizer, context_text), "\n"
    separator = "\x00" * 4 + "#" * 8
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": context_text + separator}], add_generation_prompt=True, tokenize=False
    )
    context, suffix = text.split(separator)
    return encode(tokenizer, context), suffix


def needle_items(tokenizer, lengths, depths, trials: int, seed: int) -> list[dict]:
    """selkv's passkey prompts (``selkv eval needle``), split before the question."""
    from .needle import PASSKEY_NEW_TOKENS, QUESTION, passkey_examples
    from .prompts import encode

    question = encode(tokenizer, QUESTION)
    items = []
    for example in passkey_examples(tokenizer, lengths, depths, trials, seed, None):
        prompt = example["prompt"]
        assert prompt[-len(question) :] == question
        items.append(
            {
                "task": "needle",
                "key": example["key"],
                "context": prompt[: -len(question)],
                "questions": [
                    {
                        "key": example["key"],
                        "ids": question,
                        "new_tokens": PASSKEY_NEW_TOKENS,
                        "answer": example["answer"],
                        "length": example["length"],
                        "depth": example["depth"],
                    }
                ],
            }
        )
    return items


def qa_items(tokenizer, data: str, docs: int, questions: int, context_tokens: int) -> list[dict]:
    """L-Eval papers (Qasper by default), the first ``context_tokens`` tokens of each, ``questions`` questions each."""
    from .data import _found, read_jsonl
    from .prompts import encode

    path, _ = _found(data, QA_SETS, "L-Eval QA")
    items = []
    for record in read_jsonl(path, required=("context", "qa"))[:docs]:
        doc_ids = encode(tokenizer, record["context"])[:context_tokens]
        context, suffix = _chat_parts(tokenizer, QA_INTRO + tokenizer.decode(doc_ids))
        qs = [
            {
                "key": f"{record['id']}-q{i}",
                "ids": encode(tokenizer, QA_QUESTION.format(question=qa["question"]) + suffix),
                "answers": list(qa["answers"]),
            }
            for i, qa in enumerate(record["qa"][:questions])
        ]
        items.append({"task": "qa", "key": str(record["id"]), "context": context, "questions": qs})
    return items


def summarization_items(tokenizer, data: str, docs: int, doc_tokens: int) -> list[dict]:
    """selkv's summarization prompts (``selkv eval summarization``), split before the chat template's closing."""
    from .data import load_summarization
    from .prompts import encode
    from .rouge import INSTRUCTIONS, build_prompt

    records, _ = load_summarization(data, docs)
    instruction = INSTRUCTIONS.get(data, INSTRUCTIONS["default"])
    _, suffix = _chat_parts(tokenizer, "")
    tail = encode(tokenizer, suffix)
    items = []
    for record in records:
        prompt = build_prompt(tokenizer, record["document"], instruction, doc_tokens)
        cut = len(prompt) - len(tail) if prompt[-len(tail) :] == tail else len(prompt)
        items.append(
            {
                "task": "summarization",
                "key": str(record["id"]),
                "context": prompt[:cut],
                "questions": [{"key": str(record["id"]), "ids": prompt[cut:], "summary": record["summary"]}],
            }
        )
    return items


def build_items(tokenizer, settings: dict, tasks=("needle", "qa", "summarization")) -> list[dict]:
    s = settings
    items = []
    if "needle" in tasks:
        items += needle_items(tokenizer, s["needle_lengths"], s["needle_depths"], s["needle_trials"], s["seed"])
    if "qa" in tasks:
        items += qa_items(tokenizer, s["qa_data"], s["qa_docs"], s["qa_questions"], s["qa_context_tokens"])
        for item in items:
            for q in item["questions"]:
                q.setdefault("new_tokens", s["qa_new_tokens"])
    if "summarization" in tasks:
        for item in summarization_items(tokenizer, s["summ_data"], s["summ_docs"], s["summ_doc_tokens"]):
            for q in item["questions"]:
                q["new_tokens"] = s["summ_new_tokens"]
            items.append(item)
    return items


# --------------------------------------------------------------------- protocol


@torch.inference_mode()
def answer(model, cache, question_ids: list[int], position: int, new_tokens: int, eos) -> list[int]:
    """Feed the question after a context of ``position`` tokens, then decode greedily (kvpress's
    ``generate_answer``: explicit positions, so a press's shortened cache keeps the context's numbering)."""
    from ..models import forward_with_cache

    device = model.device
    ids = torch.tensor([question_ids], device=device)
    positions = torch.arange(position, position + len(question_ids), device=device)[None]
    logits = forward_with_cache(model, cache, ids, position_ids=positions, logits_to_keep=1).logits[0, -1]
    tokens = []
    next_position = position + len(question_ids)
    for step in range(new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        if token in eos or step == new_tokens - 1:
            break
        out = forward_with_cache(
            model,
            cache,
            torch.tensor([[token]], device=device),
            position_ids=torch.tensor([[next_position]], device=device),
        )
        logits = out.logits[0, -1]
        next_position += 1
    return tokens


class SelkvSide:
    """Rows from selkv cache specs: one-pass context prefill, snapshot, restore before each question."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def prefill(self, row: str, context: list[int], key: str = "") -> tuple[object, dict]:
        from ..cache import make_cache
        from ..models import forward_with_cache

        cache = make_cache(row, self.model.config)
        forward_with_cache(self.model, cache, torch.tensor([context], device=self.model.device), logits_to_keep=1)
        counted = selkv_bytes(row, self.model.config, len(context))
        saved = cache.snapshot() if hasattr(cache, "snapshot") else dense_lengths(cache)
        return (cache, saved), {"held": counted["held"], "full16": counted["full16"]}

    def restore(self, state) -> None:
        cache, saved = state
        if isinstance(saved, list):  # a transformers DynamicCache (`full`)
            truncate_dense(cache, saved)
        else:
            cache.restore(saved)


class KvpressSide:
    """Rows from kvpress presses (kvpress's environment): the press compresses the context's prefill."""

    def __init__(self, model, matched: dict | None = None, kvpress_module=None):
        if kvpress_module is None:
            try:
                import kvpress as kvpress_module
            except ImportError:
                raise ImportError(
                    "the kvpress side runs in kvpress's own environment (kvpress 0.5.5 needs "
                    "transformers<5.3): `make peers-kvpress` builds .venv-kvpress and runs it"
                ) from None
        self.model, self.kvpress, self.matched = model, kvpress_module, matched or {}

    def ratio(self, spec: str, context: list[int], key: str) -> float:
        """The press ratio that holds what ``spec`` held on this context in the selkv side's run."""
        found = self.matched.get((spec, key))
        if found is None:
            raise KeyError(f"the selkv side has no {spec!r} record for {key!r}: run it with that row first")
        if found["digest"] != context_digest(context):
            raise ValueError(
                f"{key!r}: the selkv side's context has other token ids than this side's "
                "(another tokenizer or settings); both sides must run the same inputs"
            )
        if found["full16"] != full_bytes16(self.model.config, len(context)):
            raise ValueError(f"{key!r}: the selkv side counted another full-cache size for this context")
        return max(0.0, kvpress_compression(found["held"], found["full16"]))

    @torch.inference_mode()
    def prefill(self, row: str, context: list[int], key: str = "") -> tuple[object, dict]:
        import contextlib

        from transformers import DynamicCache

        press_name, matched = parse_press_row(row)
        ratio = self.ratio(matched, context, key) if matched else 0.0
        press = getattr(self.kvpress, PRESSES[press_name])(compression_ratio=ratio) if matched else None
        cache = DynamicCache()
        with press(self.model) if press is not None else contextlib.nullcontext():
            self.model.model(input_ids=torch.tensor([context], device=self.model.device), past_key_values=cache)
        full16 = full_bytes16(self.model.config, len(context))
        return (cache, dense_lengths(cache)), {
            "held": dense_bytes16(cache),
            "full16": full16,
            "compression_ratio": ratio,
        }

    def restore(self, state) -> None:
        truncate_dense(*state)


def dense_lengths(cache) -> list[int]:
    """Tokens each layer of a transformers ``DynamicCache`` holds (a press may have shortened them)."""
    return [layer.keys.shape[-2] for layer in cache.layers]


def truncate_dense(cache, lengths: list[int]) -> None:
    """Cut each layer of a ``DynamicCache`` back to ``lengths`` (kvpress's ``_remove_answer_from_cache``)."""
    for layer, length in zip(cache.layers, lengths, strict=True):
        layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]


def run(model, tokenizer, rows: list[str], writer, side, items: list[dict]) -> None:
    from ..generation import eos_token_ids
    from .rouge import _scorer, rouge_l
    from .runner import progress

    eos = set(eos_token_ids(model, tokenizer))
    scorer = None
    todo = [
        (item, row)
        for item in items
        for row in rows
        if any(writer.get(row, f"{item['task']}:{q['key']}") is None for q in item["questions"])
    ]
    for item, row in progress(todo, desc="kvpress peers", unit="context"):
        state, memory = side.prefill(row, item["context"], f"{item['task']}:{item['questions'][0]['key']}")
        compression = kvpress_compression(memory["held"], memory["full16"])
        for q in item["questions"]:
            key = f"{item['task']}:{q['key']}"
            if writer.get(row, key) is not None:
                continue
            tokens = answer(model, state[0], q["ids"], len(item["context"]), q["new_tokens"], eos)
            side.restore(state)
            text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True).strip()
            record = {
                "task": item["task"],
                "context_tokens": len(item["context"]),
                "question_tokens": len(q["ids"]),
                "context_digest": context_digest(item["context"]),
                "tokens": tokens,
                "text": text,
                "kv_bytes16_held": memory["held"],
                "kv_bytes16_full": memory["full16"],
                "compression_kvpress": compression,
            }
            if "compression_ratio" in memory:
                record["press_compression_ratio"] = memory["compression_ratio"]
            if item["task"] == "needle":
                record.update(correct=q["answer"] in text, length=q["length"], depth=q["depth"])
            elif item["task"] == "qa":
                record["f1"] = qa_f1(text, q["answers"])
            else:
                scorer = scorer or _scorer()
                record["rougeL"] = rouge_l(scorer, q["summary"], text)
            writer.add(row, key, record)


def aggregate(records: list[dict]) -> dict:
    """Per row: needle accuracy, QA F1, ROUGE-L (with their counts) and the mean kvpress compression."""

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    by_task = {task: [r for r in records if r.get("task") == task] for task in ("needle", "qa", "summarization")}
    return {
        "needle_accuracy": mean(float(r["correct"]) for r in by_task["needle"]),
        "needle_n": len(by_task["needle"]),
        "qa_f1": mean(r["f1"] for r in by_task["qa"]),
        "qa_n": len(by_task["qa"]),
        "rougeL": mean(r["rougeL"] for r in by_task["summarization"]),
        "summarization_n": len(by_task["summarization"]),
        "compression_kvpress": mean(r["compression_kvpress"] for r in records),
        "compression_kvpress_min": min((r["compression_kvpress"] for r in records), default=None),
        "compression_kvpress_max": max((r["compression_kvpress"] for r in records), default=None),
        "kv_bytes16_held": mean(r["kv_bytes16_held"] for r in records),
        "n": len(records),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selkv.eval.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--side",
        required=True,
        choices=SIDES,
        help="selkv: selkv's caches (transformers 5.17+); kvpress: the presses (kvpress's env)",
    )
    parser.add_argument("--out", required=True, help="results folder (resumable; `selkv report` reads it)")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="rows to run (default: every row of the side): selkv specs, or kvpress:<press>@<spec>",
    )
    parser.add_argument(
        "--tasks", nargs="+", default=["needle", "qa", "summarization"], choices=["needle", "qa", "summarization"]
    )
    parser.add_argument(
        "--match",
        default=None,
        help="kvpress side: the selkv side's results folder, whose recorded bytes the presses match "
        "(default: the 'selkv' folder beside --out)",
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="one needle length, one paper, two articles")
    args = parser.parse_args(argv)
    settings = dict(DEFAULTS, tasks=list(args.tasks))
    if args.quick:
        settings.update(needle_lengths=[1024], needle_depths=[0.5], qa_docs=1, qa_questions=2, summ_docs=2)
    rows = args.rows or default_rows(args.side)
    try:
        for row in rows:
            if args.side == "kvpress":
                parse_press_row(row)
            elif row.startswith("kvpress:"):
                raise ValueError(f"{row!r} is a kvpress row; run it with --side kvpress in kvpress's environment")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from ..models import load_model
    from .results import ResultsWriter
    from .runner import environment

    started = time.time()
    model, tokenizer = load_model(args.model, device="cpu" if not torch.cuda.is_available() else None)
    if args.side == "selkv":
        side = SelkvSide(model)
    else:
        from pathlib import Path

        side = KvpressSide(model, matched_bytes(args.match or str(Path(args.out).parent / "selkv")))
    items = build_items(tokenizer, settings, tuple(args.tasks))
    writer = ResultsWriter(args.out, TASK, args.model, settings, rows, aggregate)
    writer.data = (
        "shared/data: niah/paul_graham_essays.jsonl, "
        + QA_SETS.get(settings["qa_data"], settings["qa_data"])
        + f", summarization {settings['summ_data']}"
    )
    writer.extra["side"] = args.side
    env = environment(model)
    if args.side == "kvpress":
        from importlib.metadata import version

        env["kvpress"] = version("kvpress")
    writer.extra["environment"] = env
    run(model, tokenizer, rows, writer, side, items)
    writer.extra["seconds_this_run"] = round(time.time() - started, 1)
    writer.flush(complete=True)
    print(f"wrote {writer.results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
