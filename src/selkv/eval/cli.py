"""The ``eval`` and ``report`` subcommands, the full suite (``eval all``) and ``demo_comparison``.

Parse and dispatch only: every task lives in its own module with ``TASK``, ``add_arguments``,
``settings_from_args``, ``run(model, tokenizer, specs, writer, **settings)`` and ``aggregate``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import memory, needle, perplexity, rouge, speed
from .common import run_task

TASKS = {m.TASK: m for m in (perplexity, rouge, needle, memory, speed)}

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
    ("summarization-cnn_dailymail", "summarization",
     {**rouge.DEFAULTS, "data": "cnn_dailymail", "limit": 10, "max_new_tokens": 48}),
)

QUICK = (
    ("perplexity-pg19-1024", "perplexity", {"data": "pg19", "max_tokens": 1024, "chunk": 64, "segments": 1}),
    ("needle", "needle", {**needle.DEFAULTS, "lengths": [1024], "depths": [0.1, 0.5, 0.9], "trials": 1}),
    ("memory", "memory", {**memory.DEFAULTS, "prompt_tokens": 512, "new_tokens": 128}),
)


EVAL_EPILOG = """\
examples:
  selkv eval perplexity --data pg19 --max-tokens 2048 --out results/ppl
  selkv eval needle --cache full --cache quant:bits=4,sink=4,window=124 --out results/needle
  selkv eval all --quick --out results/quick        (then: selkv report results/quick)
Rerun the same command to resume an interrupted run.
"""

REPORT_EPILOG = """\
examples:
  selkv report results/ppl                    writes results/ppl/report.md and PNG plots
  selkv report results/ppl results/needle --out docs/results --image-prefix results
"""


def _add_common(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    from ..cli import SPEC_HELP, add_model_args

    add_model_args(parser)
    parser.add_argument("--cache", action="append", metavar="SPEC",
                        help=SPEC_HELP + " (default: the comparison set " + ", ".join(DEFAULT_CACHES) + ")")
    parser.add_argument("--out", required=out_required, help="results folder; rerun with the same folder to resume")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="write a torch.profiler Chrome trace and top-operator tables to DIR")


def add_commands(subparsers) -> None:
    """Register ``eval`` (one subcommand per task, plus ``all``) and ``report`` on an argparse subparsers object."""
    from ..cli import HelpFormatter
    ev = subparsers.add_parser(
        "eval",
        help="compare caches on one task (perplexity, summarization, needle, memory, speed) or all of them",
        description="Run every --cache on the same inputs and write DIR/results.json (+ examples.jsonl while "
                    "running; a rerun with the same --out resumes).",
        formatter_class=HelpFormatter,
        epilog=EVAL_EPILOG,
    )
    tasks = ev.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, module in TASKS.items():
        doc = " ".join((module.__doc__ or name).strip().split("\n\n")[0].split())  # the first paragraph
        parser = tasks.add_parser(name, help=doc, description=module.__doc__,
                                  formatter_class=HelpFormatter,
                                  epilog=f"example:\n  selkv eval {name} --cache full --cache "
                                         f"quant:bits=4,sink=4,window=124 --out results/{name}\n"
                                         f"Rerun the same command to resume an interrupted run.")
        _add_common(parser)
        module.add_arguments(parser)
        parser.set_defaults(handler=cmd_eval)
    suite = tasks.add_parser("all", help="the full suite (every task, default caches) into sub-folders of --out, "
                                         "then the report",
                             description="Runs every task with the suite's settings into sub-folders of --out, "
                                         "then writes --out/report.md.",
                             formatter_class=HelpFormatter,
                             epilog="examples:\n  selkv eval all --quick --out results/quick   (a few minutes)\n"
                                    "  selkv eval all --out results/suite           (half an hour on 2 CPU cores)")
    _add_common(suite)
    suite.add_argument("--quick", action="store_true", help="the short demo-sized suite instead")
    suite.set_defaults(handler=cmd_eval_all)

    rep = subparsers.add_parser("report", help="turn results folders into a Markdown table and PNG plots",
                                description="Reads DIR/results.json (recursively) and writes report.md + PNGs.",
                                formatter_class=HelpFormatter, epilog=REPORT_EPILOG)
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="a results folder of `selkv eval` (searched recursively)")
    rep.add_argument("--out", default=None, help="where report.md and the PNGs go (default: the first DIR)")
    rep.add_argument("--image-prefix", default=None, help="path prefix for the images inside report.md")
    rep.set_defaults(handler=cmd_report)


def _specs(args) -> list[str]:
    from ..config import parse_spec

    specs = args.cache or list(DEFAULT_CACHES)
    for spec in specs:
        parse_spec(spec)  # fail before loading the model
    return specs


def _load(args):
    """Check the output folders, then load the model (so that a bad --out fails in a second, not after the load)."""
    from ..cli import prepare_out_dir
    from ..models import load_model

    prepare_out_dir(args.out)
    if args.profile:
        prepare_out_dir(args.profile, "--profile")
    return load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn)


def cmd_eval(args) -> int:
    module = TASKS[args.task]
    specs = _specs(args)
    settings = module.settings_from_args(args)
    model, tokenizer = _load(args)
    payload = run_task(module, model, tokenizer, args.model, specs, args.out, settings, profile_dir=args.profile)
    from .report import table_lines

    print("\n".join(table_lines(payload)))
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def run_suite(out_dir: str, suite, model, tokenizer, model_name: str, specs: list[str],
              profile_dir: str | None = None) -> str:
    """Run each (folder, task, settings) of ``suite`` into ``out_dir``/folder, then write and return the report."""
    from . import report

    for folder, task, settings in suite:
        print(f"== {task}: {folder}")
        profile = str(Path(profile_dir) / folder) if profile_dir else None
        run_task(TASKS[task], model, tokenizer, model_name, specs, str(Path(out_dir) / folder), dict(settings),
                 profile_dir=profile)
    return report.run([out_dir], out_dir)


def cmd_eval_all(args) -> int:
    specs = _specs(args)
    model, tokenizer = _load(args)
    text = run_suite(args.out, QUICK if args.quick else SUITE, model, tokenizer, args.model, specs, args.profile)
    print(text)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_report(args) -> int:
    from ..cli import prepare_out_dir
    from . import report

    if args.out:
        prepare_out_dir(args.out)
    print(report.run(args.dirs, args.out, args.image_prefix))
    return 0


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
