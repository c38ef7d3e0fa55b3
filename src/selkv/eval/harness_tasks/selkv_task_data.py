"""Datasets of selkv's harness tasks, built offline from local JSONL files at a length in tokens.

The YAMLs name their file the harness's way (``dataset_path: json``, ``dataset_kwargs.data_files``), relative
to selkv's data folder (``SELKV_DATA``, else ``../shared/data`` next to the repository) unless absolute;
``--metadata '{"data_file": "PATH"}'`` points a run at another file of the same schema. The harness hands
``custom_dataset`` its metadata (the model args too), so prompts are cut to ``length`` tokens of the
model's own tokenizer (``tokenizer``, else ``pretrained``, else the embedded default).

- ``needle``: a passkey sentence in Paul Graham essays at five depths, two keys each (:mod:`selkv.eval.needle`);
  the prompt ends by restating the needle's words; the answer is the number.
- ``kv``: Lost-in-the-Middle key-value retrieval: the JSON records around the gold pair that fit ``length``
  tokens, keeping its relative position; the answer is the value.
- ``topic``: L-Eval LongChat topic retrieval: the conversation's first ``length`` tokens and the question
  about the first topic, which sits at the start (where sinks and windows matter).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import datasets

from selkv.errors import SelKVError
from selkv.eval import needle
from selkv.eval.data import data_root, read_jsonl
from selkv.eval.prompts import encode
from selkv.models import DEFAULT_MODEL, resolve_model


@cache
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name)[0])


def tokenizer_from(metadata: dict):
    return _tokenizer(str(metadata.get("tokenizer") or metadata.get("pretrained") or DEFAULT_MODEL))


def data_file(metadata: dict, data_files) -> Path:
    """The task's file: ``metadata["data_file"]``, else the YAML's ``data_files`` (under selkv's data folder)."""
    named = metadata.get("data_file") or (data_files.get("test") if isinstance(data_files, dict) else data_files)
    path = Path(str(named)).expanduser()
    if not path.is_absolute() and not path.exists():
        path = data_root() / path
    if not path.is_file():
        raise SelKVError(
            f"selkv harness task data file {str(named)!r} not found (looked at {path}); set SELKV_DATA "
            f'to the data folder or pass --metadata \'{{"data_file": "PATH"}}\''
        )
    return path


def _dataset(docs: list[dict]) -> dict:
    return {"test": datasets.Dataset.from_list(docs, split=datasets.Split.TEST)}


def _length(metadata: dict) -> int:
    return int(metadata["length"])


def needle_dataset(data_files=None, **metadata) -> dict:
    length = _length(metadata)
    path = data_file(metadata, data_files)
    tokenizer = tokenizer_from(metadata)
    examples = needle.passkey_examples(
        tokenizer,
        [length],
        depths=[0.1, 0.3, 0.5, 0.7, 0.9],
        trials=2,
        seed=int(metadata.get("seed", 0)),
        haystack=str(path),
    )
    examples = examples[0::2] + examples[1::2]  # every depth once, then again: --limit 5 still spans the depths
    return _dataset(
        [
            {"prompt": tokenizer.decode(e["prompt"]), "answer": e["answer"], "length": length, "depth": e["depth"]}
            for e in examples
        ]
    )


def kv_dataset(data_files=None, **metadata) -> dict:
    """Records whose shown pairs fit ``length`` tokens (pairs counted down from all until the prompt fits)."""
    length = _length(metadata)
    path = data_file(metadata, data_files)
    tokenizer = tokenizer_from(metadata)
    limit = int(metadata.get("limit_records", 20))
    all_pairs = len(read_jsonl(path)[0]["ordered_kv_records"])
    pairs, examples = all_pairs, []
    while pairs > 1:
        examples, _ = needle.kv_examples(tokenizer, str(path), limit, pairs)
        if max(e["length"] for e in examples) <= length:
            break
        pairs = int(pairs * 0.85)
    return _dataset(
        [
            {
                "prompt": tokenizer.decode(e["prompt"]),
                "answer": e["answer"],
                "length": e["length"],
                "depth": e["depth"],
                "pairs": pairs,
            }
            for e in examples
        ]
    )


TOPIC_QUESTION = (
    "\n\nThe conversation above is the start of a long chat. What is the first topic we discussed? "
    "Only give the topic name.\nAnswer: The first topic we discussed is"
)


def topic_dataset(data_files=None, **metadata) -> dict:
    length = _length(metadata)
    path = data_file(metadata, data_files)
    tokenizer = tokenizer_from(metadata)
    question_ids = encode(tokenizer, TOPIC_QUESTION)
    docs = []
    for row in read_jsonl(path, ("context", "qa")):
        first = next((qa for qa in row["qa"] if "first topic" in qa["question"].lower()), None)
        if first is None:
            continue
        context = encode(tokenizer, row["context"])[: length - len(question_ids)]
        docs.append(
            {
                "prompt": tokenizer.decode(context + question_ids),
                "answer": first["answers"][0],
                "length": len(context) + len(question_ids),
                "id": row["id"],
            }
        )
    return _dataset(docs)


def contains_answer(doc: dict, results: list[str]) -> dict:
    """1.0 when the generated text contains the answer (case and surrounding space ignored)."""
    return {"acc": float(doc["answer"].strip().lower() in results[0].strip().lower())}
