"""Compile the decode kernel for an H100/H200 (sm_90) on a machine without a GPU and count its SASS.

    python benchmarks/inspect_kernel.py [--out DIR] [--quant int8 int4 ...] [--block-n 64 ...]

Reads what costs no device time (docs/kernel_notes.md): registers, spills, shared memory and an
instruction histogram (matrix, conversion, load widths, shared-memory, shuffle, barrier) for the
benchmark's shapes (32 query / 8 KV heads, head_dim 128, bf16). The launch arguments are captured
from the real launcher on CPU tensors and specialized the way Triton's runtime would (16-byte
alignment, ints divisible by 16, ints equal to 1), then compiled with Triton's own ptxas.
Use the Triton version of the GPU machine (3.6) for numbers that match it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import os
import re
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import triton  # noqa: E402
from decode_attention import FUSED, random_storage  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

from selkv.kernels import decode_attention as kernels  # noqa: E402

# SASS opcode families worth counting (first token of the opcode, before any '.')
FAMILIES = {
    "matrix": ("HMMA", "HGMMA", "IMMA"),
    "int->float": ("I2F", "I2FP"),
    "float->float": ("F2F", "F2FP"),
    "float->int": ("F2I",),
    "byte permute": ("PRMT",),
    "fma/mul/add fp32": ("FFMA", "FMUL", "FADD", "FMNMX"),
    "fp16x2": ("HFMA2", "HMUL2", "HADD2"),
    "mufu (exp2/rcp)": ("MUFU",),
    "shuffle": ("SHFL",),
    "shared load": ("LDS", "LDSM"),
    "shared store": ("STS", "STSM"),
    "barrier": ("BAR", "SYNCS"),
    "async copy": ("LDGSTS", "UBLKCP", "UTMALDG"),
    "local memory": ("LDL", "STL"),
}


class _Capture:
    """Stands in for a jitted kernel: records the arguments of one launch instead of running it."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))

        return launch


def capture_launch(kernel_name: str, launch, module=kernels):
    """(jit function, positional args, keyword args) of ``kernel_name`` in one call of ``launch()``.

    Every jitted kernel of ``module`` is replaced by a recorder for the call, so nothing runs.
    """
    jitted = {k: v for k, v in vars(module).items() if isinstance(v, triton.runtime.JITFunction)}
    captures = {k: _Capture(v) for k, v in jitted.items()}
    for k, c in captures.items():
        setattr(module, k, c)
    try:
        launch()
    finally:
        for k, v in jitted.items():
            setattr(module, k, v)
    _, args, kwargs = captures[kernel_name].calls[0]
    return jitted[kernel_name], args, kwargs


def compile_sm90(fn, args, kwargs, capability: int = 90):
    """Compile ``fn`` as Triton's runtime would specialize these arguments (honouring its
    ``do_not_specialize``), for ``capability``."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    names = fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip(names, args, strict=False), **kwargs)
    for i, name in enumerate(names):
        value = values[name]
        if name in kwargs:  # tl.constexpr meta-parameters are passed by keyword
            signature[name], constexprs[name] = "constexpr", value
            continue
        specialize = not fn.params[i].do_not_specialize
        kind, spec = native_specialize_impl(BaseBackend, value, False, specialize, specialize)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_of(compiled, path: str) -> str:
    with open(path + ".cubin", "wb") as f:
        f.write(compiled.asm["cubin"])
    return subprocess.run(
        [_tool("cuobjdump"), "-sass", path + ".cubin"], capture_output=True, text=True, check=True
    ).stdout


_INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+(?:\.[A-Z0-9_.]+)?)([^;]*);")


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of each SASS instruction."""
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_INSTRUCTION.match, sass.splitlines()) if m]


def loops(sass: str) -> list[list[tuple[int, str, str]]]:
    """The instructions of each loop (a branch back to an earlier address), innermost first."""
    code = instructions(sass)
    found = []
    for addr, op, args in code:
        target = re.search(r"0x([0-9a-f]+)", args)
        if op.startswith("BRA") and target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            found.append([ins for ins in code if start <= ins[0] <= addr])
    return sorted(found, key=len)


def histogram(sass: str | list) -> dict[str, int]:
    code = instructions(sass) if isinstance(sass, str) else sass
    ops = collections.Counter(op for _, op, _ in code)
    out = {}
    for family, names in FAMILIES.items():
        out[family] = sum(n for op, n in ops.items() if op.split(".")[0] in names)
    for width in ("", ".64", ".128", ".U8", ".U16"):
        out[f"LDG{width or '.32'}"] = sum(
            n
            for op, n in ops.items()
            if op.startswith("LDG")
            and (op.endswith(width) if width else not re.search(r"\.(64|128|U8|U16|S8|S16)$", op))
        )
    out["total"] = sum(ops.values())
    return out


def resources(compiled) -> str:
    meta = compiled.metadata
    ptx = compiled.asm["ptx"]
    regs = re.findall(r"\.maxnreg|\.reg \.b32 %r<(\d+)>", ptx)
    return f"shared={meta.shared}B ptx_b32_regs={max((int(r) for r in regs if r), default=0)}"


def config_fields(variant: str) -> dict:
    """'value_dot=fp16,num_stages=3' -> DecodeConfig keyword arguments (ints and booleans parsed)."""
    fields = {}
    for item in filter(None, variant.split(",")):
        key, _, value = item.partition("=")
        if value in ("True", "False"):
            fields[key] = value == "True"
        else:
            fields[key] = int(value) if value.lstrip("-").isdigit() else value
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/selkv_sass")
    parser.add_argument("--quant", nargs="+", default=list(FUSED), help="names from decode_attention.FUSED")
    parser.add_argument("--block-n", type=int, nargs="*", default=[], help="override the config's block_n")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument(
        "--config",
        nargs="*",
        default=[""],
        metavar="FIELD=VALUE[,...]",
        help="DecodeConfig variants to compile, e.g. '' value_dot=fp16 (default: the defaults)",
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.quant:
        nbits, axis_key, group, block, *rotate = FUSED[name]
        for block_n, variant in itertools.product(args.block_n or [None], args.config):
            storage = random_storage(
                1, args.context, nbits, axis_key, group, block, rotate=rotate[0] if rotate else "none", device="cpu"
            )
            query = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16)
            config = kernels.DecodeConfig(**config_fields(variant))
            if block_n:
                config = dataclasses.replace(config, block_n=block_n)
            config = kernels._resolve(config, axis_key, block)
            launch = functools.partial(kernels.selective_decode_attention, query, storage, config=config)
            fn, a, kw = capture_launch("_selective_decode_partial_kernel", launch)
            if "CODES_ASM" in kw:  # the launcher saw CPU tensors; a CUDA launch would take the PTX path
                kw["CODES_ASM"] = True
            compiled = compile_sm90(fn, a, kw)
            tag = f"{name.replace(' ', '_')}_bn{config.block_n}" + (f"_{variant.replace('=', '-')}" if variant else "")
            base = os.path.join(args.out, tag)
            for ext in ("ttgir", "ptx"):
                with open(f"{base}.{ext}", "w") as f:
                    f.write(compiled.asm[ext])
            sass = sass_of(compiled, base)
            with open(base + ".sass", "w") as f:
                f.write(sass)
            res = subprocess.run(
                [_tool("cuobjdump"), "-res-usage", base + ".cubin"], capture_output=True, text=True
            ).stdout
            regs = re.search(r"REG:(\d+)", res)
            stack = re.search(r"STACK:(\d+)", res)
            # the middle loop: the loop with the most instructions that reads uint8 codes
            body = max(loops(sass), key=len)
            hist = histogram(body)
            hist["warp-instr/token"] = round(hist["total"] * config.num_warps / config.block_n, 1)
            rows.append(
                (tag, regs.group(1) if regs else "?", stack.group(1) if stack else "?", compiled.metadata.shared, hist)
            )
    keys = list(rows[0][4])
    print("Instruction counts of the longest loop (the middle tiles), per warp and tile:")
    print("| kernel | regs | stack | smem | " + " | ".join(keys) + " |")
    print("|---" * (4 + len(keys)) + "|")
    for tag, regs, stack, smem, hist in rows:
        print(f"| {tag} | {regs} | {stack} | {smem} | " + " | ".join(str(hist[k]) for k in keys) + " |")
    print(f"(files in {args.out})")


if __name__ == "__main__":
    main()
