"""Evaluation inputs: local text and JSONL files, named sets in ``../shared/data``, Hugging Face datasets.

Every loader returns plain Python objects (strings, dicts) so that the metric modules never
care where the data came from. A malformed JSONL line raises :class:`DataError` naming the
file and the 1-based line number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SelKVError


class DataError(SelKVError):
    """An input file or record that cannot be used; the message names the file and line."""


def data_root() -> Path:
    """Where the shared evaluation data lives: ``$SELKV_DATA``, else ``../shared/data`` next to the repository."""
    env = os.environ.get("SELKV_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


# Named text sets: name -> (path under data_root, Hugging Face (path, config, split, field) fallback).
TEXT_SETS = {
    "wikitext2": ("lm/wikitext2_raw/wiki.test.raw", ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text")),
    "pg19": ("lm/books/pg19_test_10146.txt", ("deepmind/pg19", None, "test", "text")),
    "pg19-dragons-blood": ("lm/books/pg10321_dragons_blood.txt", None),
    "pg19-morocco": ("lm/books/pg10356_travels_in_morocco_vol2.txt", None),
}

SUMMARIZATION_SETS = {
    "cnn_dailymail": ("summarization/cnn_dailymail_test.jsonl", ("abisee/cnn_dailymail", "3.0.0", "test")),
    "xsum": ("summarization/xsum_test.jsonl", ("EdinburghNLP/xsum", None, "test")),
    "govreport": ("summarization/govreport_long.jsonl", None),
}

NIAH_ESSAYS = "niah/paul_graham_essays.jsonl"
KV_RETRIEVAL_SETS = {
    "kv75": "longctx_qa/kv_retrieval_75keys.jsonl",
    "kv140": "longctx_qa/kv_retrieval_140keys.jsonl",
}


def _resolve(name_or_path: str, named: dict) -> tuple[Path | None, tuple | None]:
    """A local file for ``name_or_path`` (a path, or a named set found under data_root) and an HF fallback."""
    if name_or_path in named:
        entry = named[name_or_path]
        relative, hf = (entry, None) if isinstance(entry, str) else entry
        path = data_root() / relative
        return (path if path.exists() else None), hf
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path, None
    return None, None


def _found(name_or_path: str, named: dict, what: str) -> tuple[Path | None, tuple | None]:
    """:func:`_resolve`, or FileNotFoundError naming the sets when neither a file nor a download is there."""
    path, hf = _resolve(name_or_path, named)
    if path is None and hf is None:
        raise FileNotFoundError(
            f"no {what} file or named set {name_or_path!r}; named sets: {', '.join(named)} (looked under {data_root()})"
        )
    return path, hf


def check_text(name_or_path: str) -> None:
    """Raise what :func:`load_text` would for a missing source, without reading it."""
    if not name_or_path.startswith("hf:"):
        _found(name_or_path, TEXT_SETS, "text")


def check_summarization(name_or_path: str) -> None:
    """Raise what :func:`load_summarization` would for a missing source, without reading it."""
    _found(name_or_path, SUMMARIZATION_SETS, "summarization")


def check_kv_retrieval(name_or_path: str) -> None:
    """Raise what :func:`load_kv_retrieval` would for a missing source, without reading it."""
    _found(name_or_path, KV_RETRIEVAL_SETS, "KV-retrieval")


def describe(path: str | Path) -> str:
    """How results name an input file: ``shared/data/...`` for the shared sets, else the path as given."""
    path = Path(path)
    try:
        return str(Path("shared/data") / path.resolve().relative_to(data_root().resolve()))
    except ValueError:
        return str(path)


def json_object(text: str, where: str) -> dict:
    """``text`` parsed as one JSON object; a :class:`DataError` starting with ``where`` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file; blank lines are skipped. Errors name ``path:line``."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json_object(line, f"{path}:{number}")
            missing = [key for key in required if key not in record]
            if missing:
                raise DataError(f"{path}:{number}: missing field {missing[0]!r} (required: {', '.join(required)})")
            record.setdefault("id", f"{Path(path).stem}-{number}")
            record["_line"] = number
            records.append(record)
    return records


def _hf_load(spec: tuple):
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "loading a Hugging Face dataset needs the 'datasets' package: pip install 'selkv[hf]'"
        ) from None
    path, config, split = spec[:3]
    return datasets.load_dataset(path, config, split=split)


def load_text(name_or_path: str) -> tuple[str, str]:
    """(text, description) of a text file, a named set (``wikitext2``, ``pg19``, ...) or ``hf:PATH[:CONFIG]``.

    CRLF line endings are normalized to LF (the shared WikiText-2 and PG-19 files use CRLF).
    """
    if name_or_path.startswith("hf:"):
        parts = name_or_path[3:].split(":")
        rows = _hf_load((parts[0], parts[1] if len(parts) > 1 else None, "test"))
        return "\n\n".join(rows["text"]), name_or_path
    path, hf = _found(name_or_path, TEXT_SETS, "text")
    if path is not None:
        if path.suffix == ".jsonl":
            rows = read_jsonl(path, required=("text",))
            return "\n\n".join(r["text"] for r in rows), describe(path)
        return path.read_text(encoding="utf-8").replace("\r\n", "\n"), describe(path)
    rows = _hf_load(hf)
    return "\n\n".join(rows[hf[3]][:50] if hf[0] == "deepmind/pg19" else rows[hf[3]]), f"hf:{hf[0]}"


def load_summarization(name_or_path: str, limit: int | None = None) -> tuple[list[dict], str]:
    """(records with ``id``, ``document``, ``summary``; description) of a JSONL file or named set."""
    path, hf = _found(name_or_path, SUMMARIZATION_SETS, "summarization")
    if path is not None:
        records = read_jsonl(path, required=("document", "summary"))
        source = describe(path)
    else:
        rows = _hf_load(hf)
        doc_key, sum_key = ("article", "highlights") if "cnn" in hf[0] else ("document", "summary")
        records = [
            {"id": str(r.get("id", i)), "document": r[doc_key], "summary": r[sum_key]} for i, r in enumerate(rows)
        ]
        source = f"hf:{hf[0]}"
    return (records[:limit] if limit else records), source


def check_essays(path: str | None = None) -> Path:
    """The needle-in-a-haystack essays' file, or FileNotFoundError saying what to pass."""
    path = Path(path) if path else data_root() / NIAH_ESSAYS
    if not path.exists():
        raise FileNotFoundError(f"haystack essays not found at {path}; pass --haystack FILE (JSONL with 'text')")
    return path


def load_essays(path: str | None = None) -> tuple[list[str], str]:
    """The needle-in-a-haystack essays (texts, in file order) and their file."""
    path = check_essays(path)
    records = read_jsonl(path, required=("text",))
    return [r["text"] for r in records if len(r["text"]) > 500], describe(path)


def load_kv_retrieval(name_or_path: str, limit: int | None = None) -> tuple[list[dict], str]:
    """Lost-in-the-Middle key-value retrieval records (``ordered_kv_records``, ``key``, ``value``)."""
    path, _ = _found(name_or_path, KV_RETRIEVAL_SETS, "KV-retrieval")
    records = read_jsonl(path, required=("ordered_kv_records", "key", "value"))
    return (records[:limit] if limit else records), describe(path)
