"""`selkv` command line: parse and dispatch only.

    selkv generate --cache full --cache quant:bits=8,sink=4,window=124 --prompt "..."
    selkv size [--cache SPEC ...] [--tokens N]
    selkv eval TASK --cache SPEC [--cache SPEC ...] --out DIR
    selkv report DIR [DIR ...]
    selkv calibrate --cache QUANT_SPEC --upgrade K/V (--min-ratio R | --layers N) --out DIR
    selkv demo
    selkv lm-eval --model selkv --model_args '{"cache": "SPEC", "prefill_chunk": 64}' --tasks ... [harness flags]

The work lives below: ``generation`` (generate), ``sizing`` (size), ``eval`` (the tasks, the report,
``eval.calibrate`` (calibrate), and the default cache sets in ``eval.suite``); the dependency order is in
tests/test_import_order.py.

Input that cannot be used (a missing model, file or device, a bad spec, an empty prompt) ends with one
line on stderr and exit code 2; ``SELKV_DEBUG=1`` shows the traceback instead. Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_help import (
    CALIBRATE_EPILOG,
    CALIBRATE_HELP,
    DEMO_EPILOG,
    EVAL_EPILOG,
    GENERATE_EPILOG,
    LM_EVAL_HELP,
    MAIN_EPILOG,
    REPORT_EPILOG,
    SIZE_EPILOG,
    SPEC_HELP,
)
from .errors import SelKVError
from .eval import report
from .eval.arguments import at_least, positive_int, positive_number
from .eval.runner import run_task
from .eval.suite import (
    DEFAULT_CACHES,
    DEMO_CACHES,
    DEMO_PROMPT,
    QUICK,
    SIZE_CACHES,
    SUITE,
    TASKS,
    check_suite,
    check_task,
    demo_comparison,
    demo_prompt,
    run_suite,
)

if TYPE_CHECKING:
    from .specs import CacheSpec

__all__ = ["DEMO_CACHES", "DEMO_PROMPT", "SIZE_CACHES", "add_eval_commands", "build_parser", "demo_prompt", "main"]


class HelpFormatter(argparse.HelpFormatter):
    """Text with line breaks (examples, module docstrings) is kept as written; one-line text is wrapped."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="'smollm2-135m' (embedded default), a Hugging Face model id or a local path",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="model dtype (default: bfloat16 on CUDA and bf16-capable CPUs, else float32)",
    )
    parser.add_argument(
        "--attn",
        default=None,
        choices=["sdpa", "eager", "selkv"],
        help="attention implementation; 'selkv' reads quantized caches in a fused kernel on CUDA "
        "(default sdpa; selkv for generate --static where the model takes it)",
    )


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``selkv eval perplexity: error: argument --chunk: must be >= 1, got 0``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="selkv",
        description="Selective KV-cache quantization: 16-bit sinks and window, quantized middle.",
        formatter_class=HelpFormatter,
        epilog=MAIN_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate text with one or more caches, side by side, with speed and KV memory",
        description="Greedy generation with each --cache in turn; prints the text, decode tokens/s and the KV "
        "memory breakdown (16-bit regions, codes, scales) against a 16-bit full cache.",
        formatter_class=HelpFormatter,
        epilog=GENERATE_EPILOG,
    )
    add_model_args(gen)
    gen.add_argument("--cache", action="append", metavar="SPEC", help=SPEC_HELP + " (default: full)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the model's chat template")
    gen.add_argument(
        "--static",
        action="store_true",
        help="preallocate each cache for the prompt and the new tokens (make_cache max_cache_len) and, "
        "on CUDA, capture the decode step (torch.compile + CUDA graphs; the first steps compile); "
        "without --attn, selkv's attention where the model takes it, which that capture needs",
    )
    gen.set_defaults(handler=cmd_generate)

    size = sub.add_parser(
        "size",
        help="KV bytes of each cache at N tokens for a model's shape (no forward pass)",
        description="Pushes random states of the model's shape through each cache and counts the bytes of the "
        "tensors it holds: 16-bit regions, codes, scales, and the ratio to a 16-bit full cache.",
        formatter_class=HelpFormatter,
        epilog=SIZE_EPILOG,
    )
    size.add_argument(
        "--model", default="smollm2-135m", help="model whose config gives the shape (default smollm2-135m)"
    )
    size.add_argument("--cache", action="append", metavar="SPEC", help=SPEC_HELP)
    size.add_argument("--tokens", type=positive_int, default=4096, help="sequence length (default 4096)")
    size.add_argument("--batch-size", type=positive_int, default=1, help="batch size (default 1)")
    size.add_argument(
        "--chunk", type=positive_int, default=64, help="tokens per update, as in chunked scoring (default 64)"
    )
    size.set_defaults(handler=cmd_size)

    demo = sub.add_parser(
        "demo",
        help="the main job on the embedded model: side-by-side generation, then a short real comparison",
        description="Generates with 'full' and 'quant:bits=8,sink=4,window=124' side by side, then runs a short "
        "perplexity/needle/memory comparison of the default cache set and prints the table.",
        formatter_class=HelpFormatter,
        epilog=DEMO_EPILOG,
    )
    add_model_args(demo)
    demo.add_argument(
        "--out", default="results/demo", help="folder for the comparison's results (default results/demo)"
    )
    demo.add_argument("--max-new-tokens", type=positive_int, default=48, help="tokens to generate (default 48)")
    demo.set_defaults(handler=cmd_demo)

    add_eval_commands(sub)
    add_calibrate_command(sub)
    sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the 'selkv' model type: the harness's own flags, unchanged",
        description=LM_EVAL_HELP,
        formatter_class=HelpFormatter,
        add_help=False,
    )
    return parser


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument(
        "--cache",
        action="append",
        metavar="SPEC",
        help=SPEC_HELP + " (default: the comparison set " + ", ".join(DEFAULT_CACHES) + ")",
    )
    parser.add_argument("--out", required=True, help="results folder; rerun with the same folder to resume")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="write a torch.profiler Chrome trace and top-operator tables to DIR",
    )


def add_eval_commands(subparsers) -> None:
    """Register ``eval`` (one subcommand per task, plus ``all``) and ``report`` on an argparse subparsers object."""
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
        parser = tasks.add_parser(
            name,
            help=doc,
            description=module.__doc__,
            formatter_class=HelpFormatter,
            epilog=f"example:\n  selkv eval {name} --cache full --cache "
            f"quant:bits=4,sink=4,window=124 --out results/{name}\n"
            f"Rerun the same command to resume an interrupted run.",
        )
        _add_eval_args(parser)
        module.add_arguments(parser)
        parser.set_defaults(handler=cmd_eval)
    suite = tasks.add_parser(
        "all",
        help="the full suite (every task, default caches) into sub-folders of --out, then the report",
        description="Runs every task with the suite's settings into sub-folders of --out, then writes --out/report.md.",
        formatter_class=HelpFormatter,
        epilog="examples:\n  selkv eval all --quick --out results/quick   (a few minutes)\n"
        "  selkv eval all --out results/suite           (half an hour on 2 CPU cores)",
    )
    _add_eval_args(suite)
    suite.add_argument("--quick", action="store_true", help="the short demo-sized suite instead")
    suite.set_defaults(handler=cmd_eval_all)

    rep = subparsers.add_parser(
        "report",
        help="turn results folders into a Markdown table and PNG plots",
        description="Reads DIR/results.json (recursively) and writes report.md + PNGs.",
        formatter_class=HelpFormatter,
        epilog=REPORT_EPILOG,
    )
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="a results folder of `selkv eval` (searched recursively)")
    rep.add_argument("--out", default=None, help="where report.md and the PNGs go (default: the first DIR)")
    rep.add_argument("--image-prefix", default=None, help="path prefix for the images inside report.md")
    rep.set_defaults(handler=cmd_report)


def add_calibrate_command(subparsers) -> None:
    """Register ``calibrate``: per-layer widths (``layer_bits``) chosen on a calibration text."""
    from .eval.calibrate import DEFAULTS

    cal = subparsers.add_parser(
        "calibrate",
        help="choose per-layer widths (layer_bits) of a quant: spec for a model on a calibration text",
        description=CALIBRATE_HELP,
        formatter_class=HelpFormatter,
        epilog=CALIBRATE_EPILOG,
    )
    add_model_args(cal)
    cal.add_argument(
        "--cache",
        required=True,
        metavar="SPEC",
        help="the base: a quant: spec without layer_bits, e.g. quant:bits=3,sink=4,window=124,block=64,late_kbits=3",
    )
    cal.add_argument(
        "--upgrade",
        required=True,
        metavar="K/V",
        help="key/value widths of an upgraded layer, at least the base's on both and wider on one (e.g. 4/3)",
    )
    budget = cal.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--min-ratio",
        type=positive_number,
        metavar="R",
        help="choose as many first-ranked layers as keep the bytes held at --size-tokens tokens at least R times "
        "less than a 16-bit full cache",
    )
    budget.add_argument("--layers", type=positive_int, metavar="N", help="choose the N first-ranked layers")
    cal.add_argument(
        "--size-tokens",
        type=positive_int,
        default=DEFAULTS["size_tokens"],
        help=f"tokens at which --min-ratio counts the bytes held, as `selkv size` (default {DEFAULTS['size_tokens']})",
    )
    cal.add_argument(
        "--data",
        default=DEFAULTS["data"],
        help="the calibration text: a text file, or a named set: wikitext2, pg19, pg19-dragons-blood, "
        f"pg19-morocco, hf:PATH[:CONFIG] (default {DEFAULTS['data']})",
    )
    cal.add_argument(
        "--max-tokens",
        type=at_least(2),
        default=DEFAULTS["max_tokens"],
        help=f"tokens of the text scored, from its start (default {DEFAULTS['max_tokens']})",
    )
    cal.add_argument(
        "--chunk",
        type=at_least(1, " (a one-pass perplexity never reads the compressed cache)"),
        default=DEFAULTS["chunk"],
        help=f"tokens per forward pass; each chunk reads the cache left by earlier ones, and --min-ratio counts "
        f"bytes for updates of this size (default {DEFAULTS['chunk']})",
    )
    cal.add_argument("--out", required=True, help="results folder; rerun with the same folder to resume")
    cal.set_defaults(handler=cmd_calibrate)


def parsed_specs(specs: list[str] | None, default) -> list[tuple[str, CacheSpec]]:
    """The ``--cache`` specs (``default`` when none were given) as (text as written, spec), each parsed once, now:
    a bad spec fails before the model loads. The commands pass these pairs on; results and tables are named by
    the text, caches built from the spec."""
    from .specs import named_specs

    return named_specs(list(specs or default))


def _load(args):
    """The model and tokenizer of ``--model``, ``--device``, ``--dtype`` and ``--attn``."""
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn or "sdpa")


def print_generations(results) -> None:
    from .cache import compression_words
    from .generation import format_bytes

    for r in results:
        kv = r.kv
        print(f"=== {r.cache}")
        print(r.text.strip())
        print(
            f"--- {r.new_tokens} new tokens, prefill {r.prefill_s * 1000:.0f} ms, decode {r.decode_tok_s:.1f} tok/s | "
            f"KV held {format_bytes(kv['allocated'])} vs {format_bytes(kv['full16'])} for a 16-bit full cache "
            f"({compression_words(kv['compression'])}) at {kv['tokens']} tokens | filled {format_bytes(kv['total'])} = "
            f"16-bit {format_bytes(kv['bytes_16bit'])} + codes {format_bytes(kv['bytes_codes'])} + scales "
            f"{format_bytes(kv['bytes_scales'])}\n"
        )


def read_prompt_file(path: str) -> str:
    """The text of ``--prompt-file``; a missing, unreadable or non-UTF-8 file is a one-line error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SelKVError(f"--prompt-file {path!r} does not exist; give a UTF-8 text file or use --prompt") from None
    except UnicodeDecodeError as err:
        raise SelKVError(f"--prompt-file {path!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise SelKVError(f"cannot read --prompt-file {path!r}: {err.strerror or err}") from None


def prepare_out_dir(path: str, option: str = "--out") -> None:
    """Create the output folder (and its parents) now, so that a bad path fails before the model loads."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SelKVError(f"{option} {path!r} is a file; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SelKVError(f"cannot create the {option} folder {path!r}: {err.strerror or err}") from None


def cmd_generate(args) -> int:
    from .generation import encode_prompt, generate

    specs = parsed_specs(args.cache, ["full"])
    if args.static:
        bad = [text for text, spec in specs if not spec.supports_static]
        if bad:
            raise SelKVError(f"--static takes 'full' and 'quant' caches, not {bad[0]!r}")
        if args.attn is None:  # a captured step needs selkv's attention; other attention decodes eagerly
            from .models import load_config, takes_selkv_attention

            args.attn = "selkv" if takes_selkv_attention(load_config(args.model)) else "sdpa"
    prompt = args.prompt if args.prompt is not None else read_prompt_file(args.prompt_file)
    model, tokenizer = _load(args)
    inputs = encode_prompt(tokenizer, prompt, chat=False if args.no_chat else None)
    if inputs["input_ids"].shape[-1] == 0:  # the model needs at least one token to predict from
        hint = " or drop --no-chat (the chat template adds tokens)" if args.no_chat else ""
        raise SelKVError(f"the prompt {prompt[:40]!r} gives no tokens; give a non-empty --prompt{hint}")
    print(f"prompt: {inputs['input_ids'].shape[-1]} tokens, model {args.model} ({model.dtype}, {model.device})\n")
    print_generations(
        [
            generate(model, tokenizer, inputs, spec, args.max_new_tokens, static=args.static, label=text)
            for text, spec in specs
        ]
    )
    return 0


def cmd_size(args) -> int:
    from .models import load_config
    from .sizing import size_table

    specs = parsed_specs(args.cache, SIZE_CACHES)
    print(size_table(specs, load_config(args.model), args.tokens, args.batch_size, args.chunk))
    return 0


def cmd_demo(args) -> int:
    from .generation import encode_prompt, generate

    prepare_out_dir(args.out)
    model, tokenizer = _load(args)
    prompt, source = demo_prompt()
    inputs = encode_prompt(tokenizer, prompt)
    print(f"# 1. Side by side: {' vs '.join(DEMO_CACHES)}")
    print(f"prompt: {source} ({inputs['input_ids'].shape[-1]} tokens)\n")
    print_generations([generate(model, tokenizer, inputs, spec, args.max_new_tokens) for spec in DEMO_CACHES])
    print("# 2. A short comparison of the default cache set")
    demo_comparison(args.out, model=model, tokenizer=tokenizer, model_name=args.model)
    return 0


def _prepare_eval_dirs(args) -> None:
    """Check the output folders before the model loads (a bad --out fails in a second, not after the load)."""
    prepare_out_dir(args.out)
    if args.profile:
        prepare_out_dir(args.profile, "--profile")


def cmd_eval(args) -> int:
    module = TASKS[args.task]
    specs = parsed_specs(args.cache, DEFAULT_CACHES)
    settings = module.settings_from_args(args)
    check_task(args.task, settings)  # a bad --data fails in a second, not after the model loads
    _prepare_eval_dirs(args)
    model, tokenizer = _load(args)
    payload = run_task(module, model, tokenizer, args.model, specs, args.out, settings, profile_dir=args.profile)
    print("\n".join(report.table_lines(payload)))
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def cmd_eval_all(args) -> int:
    specs = parsed_specs(args.cache, DEFAULT_CACHES)
    suite = QUICK if args.quick else SUITE
    check_suite(suite)
    _prepare_eval_dirs(args)
    model, tokenizer = _load(args)
    text = run_suite(args.out, suite, model, tokenizer, args.model, specs, args.profile)
    print(text)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def calibrate_command(args) -> str:
    """The ``selkv calibrate`` command of ``args``, every option written out."""
    import shlex

    words = ["selkv", "calibrate", "--model", args.model, "--cache", args.cache, "--upgrade", args.upgrade]
    words += ["--min-ratio", f"{args.min_ratio:g}"] if args.layers is None else ["--layers", str(args.layers)]
    words += ["--size-tokens", str(args.size_tokens), "--data", args.data, "--max-tokens", str(args.max_tokens)]
    words += ["--chunk", str(args.chunk)]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype), ("--attn", args.attn)):
        words += [flag, value] if value else []
    return shlex.join([*words, "--out", args.out])


def cmd_calibrate(args) -> int:
    from .eval import calibrate, perplexity
    from .models import load_config

    # Bad input fails before the model loads: the spec and widths, the text and counts, then the model's layers
    # and the budget (its config only).
    calibrate.check_upgrade(calibrate.base_spec(args.cache), calibrate.parse_upgrade(args.upgrade))
    perplexity.check({"data": args.data, "max_tokens": args.max_tokens, "chunk": args.chunk, "segments": 1})
    plan = calibrate.make_plan(
        args.cache, args.upgrade, load_config(args.model), args.min_ratio, args.layers, args.size_tokens, args.chunk
    )
    skipped = f"; {len(plan.skipped)} sliding-window layers stay 16-bit" if plan.skipped else ""
    print(f"screening {len(plan.layers)} layers with {plan.upgrade_text} codes, one at a time{skipped}")
    prepare_out_dir(args.out)
    model, tokenizer = _load(args)
    result = calibrate.calibrate(
        model,
        tokenizer,
        args.cache,
        args.upgrade,
        args.out,
        data=args.data,
        max_tokens=args.max_tokens,
        chunk=args.chunk,
        min_ratio=args.min_ratio,
        layers=args.layers,
        size_tokens=args.size_tokens,
        model_name=args.model,
        command=calibrate_command(args),
    )
    print("\n".join(calibrate.table_lines(result)))
    out = Path(args.out)
    plot = out / calibrate.PLOT
    print(f"results: {out / calibrate.RESULTS}" + (f", {plot}" if plot.exists() else ""))
    print("spec:")
    print(result["spec"])
    return 0


def cmd_report(args) -> int:
    if args.out:
        prepare_out_dir(args.out)
    print(report.run(args.dirs, args.out, args.image_prefix))
    return 0


def is_user_error(err: BaseException) -> bool:
    """Errors that mean "this input cannot be used", printed as one line; everything else is a bug."""
    import torch

    if isinstance(err, SelKVError):  # every check selkv makes on its input raises one
        return True
    if isinstance(err, torch.OutOfMemoryError):  # the model, batch or context does not fit on the device
        return True
    # Files and folders the user named, and optional packages that are not installed (the message names them).
    return isinstance(err, (OSError, ImportError))


def error_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def cmd_lm_eval(harness_args: list[str]) -> int:
    """Run lm-evaluation-harness's own CLI with the 'selkv' model registered; its arguments pass unchanged."""
    if harness_args[:1] in (["-h"], ["--help"]) and len(harness_args) == 1:
        print(LM_EVAL_HELP)
    from lm_eval.__main__ import cli_evaluate

    from .eval import harness_model  # registers --model selkv (an ImportError names the extra)
    from .eval.harness import check_task_data

    # Bad model args and missing data files of selkv's tasks fail now, not after the harness indexes its tasks.
    model, model_args = harness_model.model_args_from_argv(harness_args)
    if model == harness_model.MODEL_NAME:
        harness_model.check_model_args(model_args)
    tasks = [t for words in harness_model.flag_values(harness_args, "--tasks", "-t") or [] for t in words.split(",")]
    check_task_data(
        tasks, {**model_args, **harness_model.dict_argument(harness_model.flag_values(harness_args, "--metadata"))}
    )
    args = list(harness_args)
    if "--include_path" not in args and not any(a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(harness_model.TASKS_DIR)]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as stop:  # the harness's argparse (--help, bad flags) exits
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # before argparse: the harness parses its own flags
        return _run_handled("selkv lm-eval", lambda: cmd_lm_eval(argv[1:]), "lm-eval")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or a bad argument (2, its one line already printed)
        return done.code if isinstance(done.code, int) else 2
    handler = args.handler  # every subcommand's parser names its handler (set_defaults)
    prog = " ".join(["selkv", args.command, *([args.task] if getattr(args, "task", None) else [])])
    return _run_handled(prog, lambda: handler(args), args.command)


def _run_handled(prog: str, run, command: str) -> int:
    """``run()``'s exit code; input errors end with one line on stderr and exit code 2."""
    try:
        return run() or 0
    except KeyboardInterrupt:
        resume = " (rerun with the same --out to resume)" if command in ("eval", "calibrate") else ""
        print(f"{prog}: interrupted{resume}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `selkv size | head`: the reader left; stay quiet at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, NotImplementedError, OSError, ImportError, RuntimeError) as err:
        if not is_user_error(err) or os.environ.get("SELKV_DEBUG"):
            raise
        print(f"{prog}: error: {error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
