"""What every evaluation task shares: the results writer (resumable), chunked prefill, greedy decoding,
KV-memory measurement and the task runner.

Output contract of a run folder ``DIR``::

    DIR/results.json    {"task", "model", "data", "settings", "complete", "results": [{"cache", "metrics"}, ...]}
    DIR/examples.jsonl  one line per finished (cache, example): {"cache", "key", ...}; appended while running

``results.json`` is rewritten (tmp file + ``os.replace``) after every example, so it is never truncated
and always reflects what has finished. A rerun with the same ``--out`` reads ``examples.jsonl``, skips
what is done and continues; a torn last line (a run killed mid-write) is dropped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from ..cache import kv_bytes, resolve_spec
from ..config import parse_spec
from ..generation import eos_token_ids, greedy_decode  # noqa: F401  (the tasks import them from here)
from ..models import forward_with_cache

RESULTS = "results.json"
EXAMPLES = "examples.jsonl"


class SettingsMismatch(ValueError):
    """A run folder that holds results of a different task, model or settings."""


def write_json_atomic(path: str | Path, payload) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=False, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _clean(value):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class ResultsWriter:
    """Per-example JSONL plus an always-valid ``results.json`` for one run folder.

    ``aggregate(records)`` turns one cache's finished example records (in order) into its metrics.
    """

    def __init__(
        self,
        out_dir: str | Path,
        task: str,
        model: str,
        settings: dict,
        specs: list[str],
        aggregate: Callable[[list[dict]], dict],
        data: str = "",
        compare: Callable[[dict, dict], dict] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.task, self.model, self.settings, self.specs, self.data = task, model, _clean(settings), list(specs), data
        self.aggregate, self.compare = aggregate, compare
        self.extra: dict = {}
        self._check_previous()
        self.records: dict[str, dict[str, dict]] = {spec: {} for spec in self.specs}
        self.resumed = self._load_examples()

    @property
    def results_path(self) -> Path:
        return self.out_dir / RESULTS

    @property
    def examples_path(self) -> Path:
        return self.out_dir / EXAMPLES

    def _check_previous(self) -> None:
        if not self.results_path.exists():
            if self.examples_path.exists():  # examples without a header: not ours to mix with
                raise SettingsMismatch(f"{self.examples_path} exists without {RESULTS}; use a fresh --out folder")
            return
        try:
            previous = json.loads(self.results_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise SettingsMismatch(f"{self.results_path} is not valid JSON ({err}); use a fresh --out folder") from None
        mine = {"task": self.task, "model": self.model, "settings": self.settings}
        theirs = {k: previous.get(k) for k in mine}
        if json.loads(json.dumps(mine, default=_json_default)) != theirs:
            diff = [k for k in mine if json.loads(json.dumps(mine[k], default=_json_default)) != theirs[k]]
            raise SettingsMismatch(
                f"{self.out_dir} holds a run with a different {', '.join(diff)} "
                f"({json.dumps(theirs[diff[0]])[:200]}); resume with the same options or use a fresh --out folder"
            )

    def _load_examples(self) -> int:
        """Read finished examples; drop a torn last line. Returns how many records for our caches were found."""
        if not self.examples_path.exists():
            return 0
        raw = self.examples_path.read_bytes()
        lines = raw.split(b"\n")
        kept, found, torn = [], 0, False
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the last line, cut short by an interruption
                    torn = True
                    break
                raise SettingsMismatch(f"{self.examples_path}:{number}: not valid JSON; use a fresh --out folder") from None
            kept.append(line)
            if record.get("cache") in self.records:
                self.records[record["cache"]][str(record["key"])] = record
                found += 1
        if torn or (raw and not raw.endswith(b"\n")):
            tmp = self.examples_path.with_name(f".{EXAMPLES}.tmp{os.getpid()}")
            tmp.write_bytes(b"".join(line + b"\n" for line in kept))
            os.replace(tmp, self.examples_path)
        return found

    def get(self, spec: str, key: str) -> dict | None:
        """The finished record of ``(spec, key)``, or None."""
        return self.records[spec].get(str(key))

    def add(self, spec: str, key: str, record: dict) -> dict:
        """Store one finished example (appended and fsynced), then refresh ``results.json``."""
        record = _clean({"cache": spec, "key": str(key), **record})
        with open(self.examples_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[spec][str(key)] = record
        self.flush()
        return record

    def payload(self, complete: bool = False) -> dict:
        results = []
        for spec in self.specs:
            records = list(self.records[spec].values())
            metrics = self.aggregate(records) if records else {}
            results.append({"cache": spec, "metrics": metrics})
        full = next((r["metrics"] for r in results if r["cache"] == "full" and r["metrics"]), None)
        if self.compare is not None and full is not None:
            for r in results:
                if r["metrics"]:
                    r["metrics"].update(self.compare(r["metrics"], full))
        return {
            "task": self.task,
            "model": self.model,
            "data": self.data,
            "settings": self.settings,
            "complete": complete,
            **_clean(self.extra),
            "results": _clean(results),
        }

    def flush(self, complete: bool = False) -> dict:
        payload = self.payload(complete)
        write_json_atomic(self.results_path, payload)
        return payload


# ------------------------------------------------------------------ model steps


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_ids(tokenizer, user_text: str, use_chat: bool | None = None) -> list[int]:
    """The prompt ids of one user turn: the chat template with a generation prompt when the tokenizer has one."""
    if use_chat is None:
        use_chat = bool(getattr(tokenizer, "chat_template", None))
    if use_chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
        )
        return encode(tokenizer, text)
    return encode(tokenizer, user_text)


def prefill(model, input_ids: torch.Tensor, cache, chunk: int, on_logits: Callable | None = None) -> torch.Tensor:
    """Feed ``input_ids`` ``[batch, seq]`` into ``cache`` in chunks of ``chunk`` tokens (0: one pass).

    Each chunk attends to the cache the earlier chunks left behind, so compressed tokens are read back
    as stored. ``on_logits(start, logits)`` sees every chunk's logits ``[batch, chunk_len, vocab]``.
    Returns the last position's logits ``[batch, vocab]``.
    """
    seq_len = input_ids.shape[-1]
    step = chunk if chunk and chunk > 0 else seq_len
    last = None
    for start in range(0, seq_len, step):
        out = forward_with_cache(model, cache, input_ids[:, start : start + step])
        if on_logits is not None:
            on_logits(start, out.logits)
        last = out.logits[:, -1]
    return last


def measure_cache(cache) -> dict:
    """KV memory of a cache after an example: ``kv_bytes``, ``kv_bytes_full16``, ``compression`` (+ breakdown).

    ``kv_bytes`` is the memory the cache really holds (``kv_bytes(cache)["allocated"]``, spare room
    included); ``kv_bytes_filled`` the filled part (16-bit + codes + scales).
    """
    counted = kv_bytes(cache)
    return {
        "kv_bytes": counted["allocated"],
        "kv_bytes_filled": counted["total"],
        "kv_bytes_full16": counted["full16"],
        "compression": counted["compression"],
        "kv_bytes_16bit": counted["bytes_16bit"],
        "kv_bytes_codes": counted["bytes_codes"],
        "kv_bytes_scales": counted["bytes_scales"],
        "kv_tokens": counted["tokens"],
    }


def aggregate_kv(records: list[dict]) -> dict:
    """Mean KV bytes over examples (each measured at the example's end) and the ratio of the means."""
    kv = [r["kv_bytes"] for r in records if r.get("kv_bytes") is not None]
    full = [r["kv_bytes_full16"] for r in records if r.get("kv_bytes_full16") is not None]
    if not kv:
        return {}
    mean_kv, mean_full = sum(kv) / len(kv), sum(full) / len(full)
    return {"kv_bytes": mean_kv, "kv_bytes_full16": mean_full, "compression": mean_full / mean_kv if mean_kv else 1.0}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def progress(iterable=None, **kwargs):
    """tqdm progress bar (stderr); quiet when SELKV_NO_PROGRESS is set."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=bool(os.environ.get("SELKV_NO_PROGRESS")), dynamic_ncols=True, **kwargs)


def spec_label(spec: str) -> str:
    return str(spec)


# ----------------------------------------------------------------- the runner


@contextlib.contextmanager
def maybe_profile(profile_dir: str | None):
    """Profile the block with torch.profiler when ``profile_dir`` is given (see :mod:`selkv.eval.profile`)."""
    if not profile_dir:
        yield
        return
    from .profile import profiled

    with profiled(profile_dir):
        yield


def run_task(module, model, tokenizer, model_name: str, specs: list[str], out_dir: str, settings: dict,
             profile_dir: str | None = None) -> dict:
    """Run one task module over ``specs`` into ``out_dir``; returns the final ``results.json`` payload."""
    specs = _unique(specs)
    started = time.time()
    writer = ResultsWriter(out_dir, module.TASK, model_name, settings, specs, module.aggregate,
                           compare=getattr(module, "compare", None))
    if writer.resumed:
        print(f"resuming {out_dir}: {writer.resumed} finished example(s) found")
    with maybe_profile(profile_dir):
        module.run(model, tokenizer, specs, writer, **settings)
    writer.extra.setdefault("environment", environment(model))
    writer.extra["default_groups"] = default_groups(specs, model.config)
    writer.extra["seconds_this_run"] = round(time.time() - started, 1)
    return writer.flush(complete=True)


def default_groups(specs: list[str], config) -> dict[str, int]:
    """The group size each spec that does not set one gets on this model (it depends on head_dim)."""
    groups = {}
    for spec in specs:
        parsed = parse_spec(spec)
        if parsed.kind in ("quant", "hf-quanto", "hf-hqq") and not parsed.q_group_size:
            groups[spec] = resolve_spec(parsed, config).q_group_size
    return groups


def _unique(specs: list[str]) -> list[str]:
    seen, out = set(), []
    for spec in specs:
        if spec not in seen:
            seen.add(spec)
            out.append(spec)
    return out


def environment(model) -> dict:
    import platform

    import transformers

    device = getattr(model, "device", torch.device("cpu"))
    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
