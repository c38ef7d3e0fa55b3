"""The cache sets and task settings the commands use by default, in one place, and the suite runner.

``DEFAULT_CACHES``: the comparison set of ``selkv eval`` and the demo; ``SUITE``: ``selkv eval all``
(``make eval``); ``QUICK``: ``selkv eval all --quick`` and the demo's comparison; ``DEMO_CACHES`` and
``DEMO_PROMPT``: the demo's side-by-side generation; ``SIZE_CACHES``: ``selkv size``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..specs import NamedSpecs
from . import harness, memory, needle, perplexity, report, rouge, speed
from .data import data_root
from .runner import run_task, spec_dict

TASKS = {m.TASK: m for m in (perplexity, rouge, needle, memory, speed, harness)}

# The default comparison set (used by `make demo`). `quant:bits=4,sink=0,window=0` quantizes every token:
# with window 0 and block 32, 0-31 of the most recent tokens are still 16-bit (they leave in blocks of 32).
DEFAULT_CACHES = (
    "full",
    "drop:sink=4,window=124",
    "quant:bits=8,sink=4,window=124",
    "quant:bits=4,sink=4,window=124,key_axis=channel",
    "quant:bits=2,sink=4,window=124,key_axis=channel",
    "quant:bits=4,sink=0,window=0",
    "hf-quanto:bits=4,residual=128",
)

# `selkv eval all`: (sub-folder, task, settings) of the full suite (`make eval`), sized so that it finishes in
# about half an hour on a 2-core CPU; the tables in docs/eval_results.md come from it.
SUITE = (
    ("perplexity-pg19-2048", "perplexity", {"data": "pg19", "max_tokens": 2048, "chunk": 64, "segments": 1}),
    ("perplexity-wikitext2-2048", "perplexity", {"data": "wikitext2", "max_tokens": 2048, "chunk": 64, "segments": 1}),
    ("perplexity-pg19-4096", "perplexity", {"data": "pg19", "max_tokens": 4096, "chunk": 64, "segments": 1}),
    ("needle", "needle", {**needle.DEFAULTS, "lengths": [1024, 2048], "depths": [0.1, 0.5, 0.9, 1.0], "trials": 1}),
    ("memory", "memory", {**memory.DEFAULTS, "prompt_tokens": 512, "new_tokens": 64, "every": 8}),
    ("speed", "speed", {**speed.DEFAULTS, "context": 512, "new_tokens": 32, "repeats": 3, "warmup": 1}),
    (
        "summarization-cnn_dailymail",
        "summarization",
        {**rouge.DEFAULTS, "data": "cnn_dailymail", "limit": 10, "max_new_tokens": 48},
    ),
)

QUICK = (
    ("perplexity-pg19-1024", "perplexity", {"data": "pg19", "max_tokens": 1024, "chunk": 64, "segments": 1}),
    ("needle", "needle", {**needle.DEFAULTS, "lengths": [1024], "depths": [0.1, 0.5, 0.9], "trials": 1}),
    ("memory", "memory", {**memory.DEFAULTS, "prompt_tokens": 512, "new_tokens": 128}),
)

DEMO_CACHES = ("full", "quant:bits=8,sink=4,window=124")
DEMO_PROMPT = (
    "Explain in a few sentences why the key/value cache of a language model grows with the context length, "
    "and one way to make it smaller."
)

SIZE_CACHES = (
    "full",
    "drop:sink=4,window=124",
    "quant:bits=8,sink=4,window=124",
    "quant:bits=4,sink=4,window=124",
    "quant:bits=3,sink=4,window=124",
    "quant:bits=2,sink=4,window=124",
    "hf-quanto:bits=4,residual=128",
)


def demo_prompt() -> tuple[str, str]:
    """(prompt, where it came from): a CNN/DailyMail article to summarize, long enough that the middle is quantized."""
    path = data_root() / "summarization" / "cnn_dailymail_test.jsonl"
    if path.exists():
        with open(path, encoding="utf-8") as f:
            article = json.loads(f.readline())["document"]
        return f"Summarize this article in three sentences.\n\n{article}", f"the first article of {path}"
    return DEMO_PROMPT, "a built-in prompt (no CNN/DailyMail file found; set SELKV_DATA)"


def check_task(task: str, settings: dict) -> None:
    """The task's input errors (its module's ``check(settings)``, where it has one), before a model loads."""
    if hasattr(TASKS[task], "check"):
        TASKS[task].check(dict(settings))


def check_suite(suite) -> None:
    """:func:`check_task` for each (folder, task, settings) of ``suite``."""
    for _, task, settings in suite:
        check_task(task, settings)


def run_suite(
    out_dir: str, suite, model, tokenizer, model_name: str, specs: NamedSpecs, profile_dir: str | None = None
) -> str:
    """Run each (folder, task, settings) of ``suite`` into ``out_dir``/folder, then write and return the report.

    ``specs`` as :func:`~selkv.eval.runner.run_task` takes them, parsed here once for every task."""
    specs = spec_dict(specs)
    for folder, task, settings in suite:
        print(f"== {task}: {folder}")
        profile = str(Path(profile_dir) / folder) if profile_dir else None
        run_task(
            TASKS[task],
            model,
            tokenizer,
            model_name,
            specs,
            str(Path(out_dir) / folder),
            dict(settings),
            profile_dir=profile,
        )
    return report.run([out_dir], out_dir)


def demo_comparison(out_dir: str, model=None, tokenizer=None, model_name: str = "smollm2-135m") -> str:
    """The short comparison `selkv demo` runs: perplexity (PG-19, 1,024 tokens, chunk 64), a small needle grid
    and memory, for the default cache set; prints and returns the Markdown report."""
    if model is None or tokenizer is None:
        from ..models import load_model

        model, tokenizer = load_model(model_name)
    text = run_suite(out_dir, QUICK, model, tokenizer, model_name, list(DEFAULT_CACHES))
    print(text)
    print(f"report: {Path(out_dir) / 'report.md'}")
    return text
