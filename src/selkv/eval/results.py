"""Results I/O of a run folder: a resumable per-example JSONL and an always-valid ``results.json``.

Output contract of a run folder ``DIR``::

    DIR/results.json    {"task", "model", "data", "settings", "resolved", "complete",
                         "results": [{"cache", "metrics"}, ...]}
    DIR/examples.jsonl  one line per finished (cache, example): {"cache", "key", ...}; appended while running

``results.json`` is rewritten (tmp file + ``os.replace``) after every example, so it is never truncated
and always reflects what has finished. A rerun with the same ``--out`` reads ``examples.jsonl``, skips
what is done and continues; a torn last line (a run killed mid-write) is dropped. ``resolved`` maps each
cache's name to its spec with the model's defaults filled in: a rerun whose library resolves a name
differently (its defaults changed) is refused rather than mixing the two caches' examples.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import SelKVError

RESULTS = "results.json"
EXAMPLES = "examples.jsonl"


class SettingsMismatch(SelKVError):
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
        resolved: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.task, self.model, self.settings, self.specs, self.data = task, model, _clean(settings), list(specs), data
        self.aggregate, self.compare = aggregate, compare
        self.extra: dict = {}
        # name -> the spec as resolved for the model (defaults filled in): a folder whose results were written
        # under other defaults (a library update that changed what a default-spelled spec means) is refused
        self.resolved = dict(resolved or {})
        previous = self._check_previous()
        self.records: dict[str, dict[str, dict]] = {spec: {} for spec in self.specs}
        self.resumed = self._load_examples()
        if previous is not None:
            self._check_resolved(previous)

    @property
    def results_path(self) -> Path:
        return self.out_dir / RESULTS

    @property
    def examples_path(self) -> Path:
        return self.out_dir / EXAMPLES

    def _check_previous(self) -> dict | None:
        """The folder's previous ``results.json`` (None: a fresh folder), refused if it holds another run."""
        if not self.results_path.exists():
            if self.examples_path.exists():  # examples without a header: not ours to mix with
                raise SettingsMismatch(f"{self.examples_path} exists without {RESULTS}; use a fresh --out folder")
            return None
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
        return previous

    def _check_resolved(self, previous: dict) -> None:
        """Refuse a name whose finished examples were written when it resolved to another cache; keep the record of
        what each name meant. Names with examples from a folder that recorded no resolution (written before
        2026-12-07) cannot be checked: they stay unrecorded rather than be vouched for."""
        if "resolved" in previous and not isinstance(previous["resolved"], dict):
            raise SettingsMismatch(f"{self.results_path}: 'resolved' is not an object; use a fresh --out folder")
        before = previous.get("resolved")
        for name, now in list(self.resolved.items()):
            if not self.records.get(name):
                continue  # nothing finished under this name: nothing to mix
            if before is None:
                del self.resolved[name]
            elif name in before and before[name] != now:
                raise SettingsMismatch(
                    f"{self.out_dir}: cache {name!r} now resolves to {now!r}, but its results there were written as "
                    f"{before[name]!r} (the library's defaults changed); use a fresh --out folder"
                )
        self.resolved = {**(before or {}), **self.resolved}

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
                raise SettingsMismatch(
                    f"{self.examples_path}:{number}: not valid JSON; use a fresh --out folder"
                ) from None
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
            **({"resolved": self.resolved} if self.resolved else {}),
            "complete": complete,
            **_clean(self.extra),
            "results": _clean(results),
        }

    def flush(self, complete: bool = False) -> dict:
        payload = self.payload(complete)
        write_json_atomic(self.results_path, payload)
        return payload
