"""`selkv` command line: parse and dispatch only.

    selkv generate --cache full --cache quant:bits=8,sink=4,window=124 --prompt "..."
    selkv eval TASK --cache SPEC [--cache SPEC ...] --out DIR
    selkv report DIR [DIR ...]
    selkv demo
"""

from __future__ import annotations

import argparse
import sys

SPEC_HELP = (
    "cache spec; repeat to compare. Kinds: full | drop:sink=S,window=W | "
    "quant:bits=2|4|8,sink=S,window=W[,group=G][,key_axis=token|channel][,sym=0|1][,block=T] | "
    "hf-quanto:bits=2|4,residual=R | hf-hqq:bits=B,residual=R"
)
DEMO_CACHES = ("full", "quant:bits=8,sink=4,window=124")
SIZE_CACHES = (
    "full",
    "drop:sink=4,window=124",
    "quant:bits=8,sink=4,window=124",
    "quant:bits=4,sink=4,window=124",
    "quant:bits=2,sink=4,window=124",
    "hf-quanto:bits=4,residual=128",
)
DEMO_PROMPT = (
    "Explain in a few sentences why the key/value cache of a language model grows with the context length, "
    "and one way to make it smaller."
)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="'smollm2-135m' (embedded default), a Hugging Face model id or a local path")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="model dtype (default: bfloat16 on CUDA and bf16-capable CPUs, else float32)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "selkv"],
                        help="attention implementation; 'selkv' reads quantized caches in a fused kernel on CUDA")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selkv",
        description="Selective KV-cache quantization: 16-bit sinks and window, quantized middle.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'selkv COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate text with one or more caches, side by side, with speed and KV memory",
        description="Greedy generation with each --cache in turn; prints the text, decode tokens/s and the KV "
        "memory breakdown (16-bit regions, codes, scales) against a 16-bit full cache.",
    )
    add_model_args(gen)
    gen.add_argument("--cache", action="append", metavar="SPEC", help=SPEC_HELP + " (default: full)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the model's chat template")
    gen.add_argument("--static", action="store_true",
                     help="preallocate each cache for the prompt and the new tokens (make_cache max_cache_len) and, "
                     "on CUDA, capture the decode step (torch.compile + CUDA graphs; the first steps compile); "
                     "quant specs then use --attn selkv")

    size = sub.add_parser(
        "size",
        help="KV bytes of each cache at N tokens for a model's shape (no forward pass)",
        description="Pushes random states of the model's shape through each cache and counts the bytes of the "
        "tensors it holds: 16-bit regions, codes, scales, and the ratio to a 16-bit full cache.",
    )
    size.add_argument("--model", default="smollm2-135m", help="model whose config gives the shape (default smollm2-135m)")
    size.add_argument("--cache", action="append", metavar="SPEC", help=SPEC_HELP)
    size.add_argument("--tokens", type=int, default=4096, help="sequence length (default 4096)")
    size.add_argument("--batch-size", type=int, default=1, help="batch size (default 1)")
    size.add_argument("--chunk", type=int, default=64, help="tokens per update, as in chunked scoring (default 64)")

    demo = sub.add_parser(
        "demo",
        help="the main job on the embedded model: side-by-side generation, then a short real comparison",
        description="Generates with 'full' and 'quant:bits=8,sink=4,window=124' side by side, then runs a short "
        "perplexity/needle/memory comparison of the default cache set and prints the table.",
    )
    add_model_args(demo)
    demo.add_argument("--out", default="results/demo", help="folder for the comparison's results (default results/demo)")
    demo.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default 48)")

    try:
        from .eval.cli import add_commands
    except ImportError:  # the evaluation suite's optional dependencies are missing
        add_commands = None
    if add_commands is not None:
        add_commands(sub)
    return parser


def _load(args):
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation=args.attn)


def print_generations(results) -> None:
    from .generation import format_bytes

    for r in results:
        kv = r.kv
        print(f"=== {r.cache}")
        print(r.text.strip())
        print(
            f"--- {r.new_tokens} new tokens, prefill {r.prefill_s * 1000:.0f} ms, decode {r.decode_tok_s:.1f} tok/s | "
            f"KV {format_bytes(kv['total'])} = 16-bit {format_bytes(kv['bytes_16bit'])} + codes "
            f"{format_bytes(kv['bytes_codes'])} + scales {format_bytes(kv['bytes_scales'])} | 16-bit full cache "
            f"{format_bytes(kv['full16'])} ({kv['compression']:.2f}x smaller) at {kv['tokens']} tokens\n"
        )


def cmd_generate(args) -> int:
    from .config import parse_spec
    from .generation import encode_prompt, generate

    specs = args.cache or ["full"]
    for spec in specs:
        parse_spec(spec)  # fail before loading the model
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.static:
        static_kinds = ("full", "quant")
        bad = [spec for spec in specs if parse_spec(spec).kind not in static_kinds]
        if bad:
            raise ValueError(f"--static takes 'full' and 'quant' caches, not {bad[0]!r}")
        if args.attn == "eager":
            raise ValueError("--static reads quantized caches with selkv's attention; use --attn selkv (or leave it out)")
        args.attn = "selkv"  # a static quant cache's decode step reads its storage in place
    prompt = args.prompt if args.prompt is not None else open(args.prompt_file, encoding="utf-8").read()
    model, tokenizer = _load(args)
    inputs = encode_prompt(tokenizer, prompt, chat=False if args.no_chat else None)
    print(f"prompt: {inputs['input_ids'].shape[-1]} tokens, model {args.model} ({model.dtype}, {model.device})\n")
    print_generations([generate(model, tokenizer, inputs, spec, args.max_new_tokens, static=args.static)
                       for spec in specs])
    return 0


def cmd_size(args) -> int:
    from .config import parse_spec
    from .sizing import load_config, size_table

    specs = args.cache or list(SIZE_CACHES)
    for spec in specs:
        parse_spec(spec)
    print(size_table(specs, load_config(args.model), args.tokens, args.batch_size, args.chunk))
    return 0


def demo_prompt() -> tuple[str, str]:
    """(prompt, where it came from): a CNN/DailyMail article to summarize, long enough that the middle is quantized."""
    import json

    from .eval.data import data_root

    path = data_root() / "summarization" / "cnn_dailymail_test.jsonl"
    if path.exists():
        with open(path, encoding="utf-8") as f:
            article = json.loads(f.readline())["document"]
        return f"Summarize this article in three sentences.\n\n{article}", f"the first article of {path}"
    return DEMO_PROMPT, "a built-in prompt (no CNN/DailyMail file found; set SELKV_DATA)"


def cmd_demo(args) -> int:
    from .generation import encode_prompt, generate

    model, tokenizer = _load(args)
    prompt, source = demo_prompt()
    inputs = encode_prompt(tokenizer, prompt)
    print(f"# 1. Side by side: {' vs '.join(DEMO_CACHES)}")
    print(f"prompt: {source} ({inputs['input_ids'].shape[-1]} tokens)\n")
    print_generations([generate(model, tokenizer, inputs, spec, args.max_new_tokens) for spec in DEMO_CACHES])
    try:
        from .eval.cli import demo_comparison
    except ImportError as err:
        print(f"(skipping the comparison: {err})")
        return 0
    print("# 2. A short comparison of the default cache set")
    demo_comparison(args.out, model=model, tokenizer=tokenizer, model_name=args.model)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"generate": cmd_generate, "size": cmd_size, "demo": cmd_demo}
    handler = handlers.get(args.command) or getattr(args, "handler", None)
    if handler is None:
        parser.error(f"unknown command {args.command!r}")
    try:
        return handler(args) or 0
    except (ValueError, FileNotFoundError, ImportError, NotImplementedError) as err:
        print(f"selkv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
