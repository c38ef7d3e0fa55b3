"""lm-evaluation-harness tasks, cache by cache, side by side: ``selkv eval harness --cache A --cache B --tasks ...``.

Each cache answers each task through the harness (``lm_eval.simple_evaluate``) with the ``selkv`` model type
(:mod:`selkv.eval.harness_model`): the context is fed in chunks of ``--chunk`` tokens, so answers read the
compressed cache. The default tasks are selkv's own offline ones (``selkv_needle_*``, ``selkv_kv_*``,
``selkv_topic_*``: passkey needle, key-value retrieval and L-Eval topic retrieval at 1k / 2k / 4k tokens of
the model's tokenizer, built from ``../shared/data`` or the file ``--metadata '{"data_file": ...}'`` names);
any harness task name works too. Needs ``pip install 'selkv[harness]'``.

Metrics per cache: each task's main metric (``acc`` for selkv's tasks) under the task's name, its ``n``,
``mean`` over the tasks, ``mean_vs_full`` (difference to the full cache), and the KV memory held at the end
of each request (mean over requests and tasks).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import SelKVError
from ..specs import CacheSpec
from .arguments import non_negative_int, positive_int
from .data import json_object
from .runner import progress

TASK = "harness"
DEFAULTS = {
    "tasks": ["selkv_needle_1k", "selkv_kv_1k", "selkv_topic_1k"],
    "limit": 10,
    "chunk": 64,
    "batch_size": 1,
    "include_path": None,
    "metadata": None,
}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=DEFAULTS["tasks"],
        help="harness task names (default: " + " ".join(DEFAULTS["tasks"]) + "); selkv's own: "
        "selkv_needle_1k|2k|4k, selkv_kv_1k|2k|4k, selkv_topic_1k|2k|4k, tag selkv_long",
    )
    parser.add_argument(
        "--limit", type=non_negative_int, default=DEFAULTS["limit"], help="examples per task (default 10; 0 = all)"
    )
    parser.add_argument(
        "--chunk",
        type=non_negative_int,
        default=DEFAULTS["chunk"],
        help="prefill chunk: tokens per forward call; answers read the compressed cache (default 64; "
        "0 = one pass, which never reads it)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULTS["batch_size"],
        help="prompts generated together, left-padded (default 1)",
    )
    parser.add_argument(
        "--include-path", default=None, help="another folder of task YAMLs (selkv's are always included)"
    )
    parser.add_argument(
        "--metadata",
        default=None,
        help='JSON object handed to the tasks, e.g. \'{"data_file": "my_essays.jsonl"}\' or RULER\'s '
        "'{\"max_seq_lengths\": [1024]}'",
    )


def settings_from_args(args) -> dict:
    return {
        "tasks": list(args.tasks),
        "limit": args.limit,
        "chunk": args.chunk,
        "batch_size": args.batch_size,
        "include_path": args.include_path,
        "metadata": args.metadata,
    }


def check(settings: dict) -> None:
    """Input errors found before the model loads: lm-eval missing, bad numbers, a metadata string that is not JSON."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise SelKVError(
            "selkv eval harness needs lm-evaluation-harness: pip install 'selkv[harness]' (lm-eval==0.4.13)"
        )
    if settings["limit"] < 0 or settings["chunk"] < 0 or settings["batch_size"] < 1:
        raise SelKVError(
            f"--limit and --chunk must be >= 0 and --batch-size >= 1, got {settings['limit']}, "
            f"{settings['chunk']} and {settings['batch_size']}"
        )
    check_task_data(settings["tasks"], _metadata(settings["metadata"]))


def check_task_data(tasks: list[str], metadata: dict) -> None:
    """The data file of each of selkv's tasks in ``tasks`` exists (``metadata["data_file"]`` or the YAML's)."""
    for task in tasks:
        data_files = selkv_task_data_files(task)
        if data_files is not None:
            _task_data().data_file(metadata, data_files)


def _task_data():
    """selkv's task dataset builder (a plain file beside the YAMLs, where the harness loads it from)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "harness_tasks" / "selkv_task_data.py"
    spec = importlib.util.spec_from_file_location("selkv_task_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def selkv_task_data_files(task: str) -> str | None:
    """The ``data_files`` test file that selkv's task YAML ``task`` names (None: not one of selkv's tasks)."""
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parent / "harness_tasks" / f"{task}.yaml"
    if not path.is_file():
        return None
    found = re.search(r"data_files:\s*\{\s*test:\s*([^}\s]+)\s*\}", path.read_text(encoding="utf-8"))
    return found.group(1) if found else None


def _metadata(text: str | None) -> dict:
    return json_object(text, f"--metadata {text!r}") if text else {}


def main_metric(task_results: dict) -> tuple[str, float] | None:
    """(name, value) of a harness task's first numeric metric (``acc,none`` -> ``acc``), stderr left out."""
    for key, value in task_results.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return key.split(",")[0], float(value)
    return None


def run(
    model,
    tokenizer,
    specs: Mapping[str, CacheSpec],
    writer,
    tasks: list[str],
    limit: int,
    chunk: int,
    batch_size: int = 1,
    include_path: str | None = None,
    metadata: str | None = None,
) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .harness_model import TASKS_DIR, SelkvLM

    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    # The task builders tokenize with the model's own tokenizer (they find it by name, as RULER's do).
    task_metadata = {"tokenizer": getattr(tokenizer, "name_or_path", None), **_metadata(metadata)}
    writer.data = ", ".join(tasks)
    todo = [(name, task) for name in specs for task in tasks if writer.get(name, task) is None]
    for name, task in progress(todo, desc="harness tasks", unit="run"):
        lm = SelkvLM(model=model, tokenizer=tokenizer, cache=specs[name], prefill_chunk=chunk, batch_size=batch_size)
        # Only selkv's folder is indexed when every task is selkv's: the harness's own index takes a minute.
        own = all(selkv_task_data_files(t) is not None for t in tasks) and not include_path
        manager = TaskManager(include_path=paths, include_defaults=not own, metadata=task_metadata)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[task], limit=limit or None, task_manager=manager, log_samples=False, verbosity="WARNING"
        )
        for harness_task, task_results in out["results"].items():
            found = main_metric(task_results)
            kv = lm.kv_summary().get(harness_task) or {}
            n = out.get("n-samples", {}).get(harness_task, {}).get("effective")
            writer.add(
                name,
                harness_task if len(out["results"]) > 1 else task,
                {
                    "metric": found[0] if found else None,
                    "value": found[1] if found else None,
                    "n": n,
                    "harness_task": harness_task,
                    "chunking": lm.get_model_info()["selkv"]["chunking"],
                    **kv,
                },
            )


def aggregate(records: list[dict]) -> dict:
    values = [r["value"] for r in records if r.get("value") is not None]
    held = [r["kv_bytes"] for r in records if r.get("kv_bytes") is not None]
    full16 = [r["kv_bytes_full16"] for r in records if r.get("kv_bytes_full16") is not None]
    metrics = {
        "by_task": {r["key"]: r.get("value") for r in records},
        "n": sum(r.get("n") or 0 for r in records),
        "metric": ", ".join(sorted({r["metric"] for r in records if r.get("metric")})),
        "mean": sum(values) / len(values) if values else None,
    }
    if held:
        metrics.update(
            kv_bytes=sum(held) / len(held),
            kv_bytes_full16=sum(full16) / len(full16),
            compression=sum(full16) / sum(held),
        )
    return metrics


def compare(metrics: dict, full: dict) -> dict:
    if metrics.get("mean") is None or full.get("mean") is None:
        return {}
    return {"mean_vs_full": metrics["mean"] - full["mean"]}
