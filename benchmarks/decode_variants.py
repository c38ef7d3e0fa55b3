"""Kernel variants side by side in one process: correctness vs float64, then median times.

    PYTHONPATH=src python benchmarks/decode_variants.py --out variants.json      (CUDA)
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/decode_variants.py --cpu  (interpreter smoke test)

Every variant is checked first: its output (every buffer the launcher allocates poisoned with
NaN) against a float64 attention over the dequantized cache, relative error < 2e-2. Then each
is timed with ``triton.testing.do_bench`` (median) next to bf16 SDPA over a full cache of the
same length and a device-to-device copy. "v1" is the kernel in src (selkv.kernels.decode_attention);
"v3" the experimental kernel of round 4 (benchmarks/decode_v3_kernel.py, see NOTES.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import decode_v3_kernel as kernels  # noqa: E402
from selkv.kernels import decode_attention as v1  # noqa: E402
from selkv.kernels import reference  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, SINK, WINDOW, BLOCK = 32, 8, 128, 4, 128, 32
SHAPES = [(1, 32768), (8, 32768), (1, 131072), (32, 8192)]
QUANTS = {"int8": (8, "token", 64), "int4": (4, "channel", 64), "int4 tok": (4, "token", 64), "int2": (2, "channel", 64)}
C = kernels.DecodeConfig
VARIANTS = {  # name -> (module, config or None for the module's default)
    "v1 default": (v1, None),
    "v3 bn32 w4": (kernels, C(block_n=32, num_warps=4, num_stages=1)),
    "v3 bn64 w4": (kernels, C(block_n=64, num_warps=4, num_stages=1)),
    "v3 bn64 w8": (kernels, C(block_n=64, num_warps=8, num_stages=1)),
    "v3 bn128 w8": (kernels, C(block_n=128, num_warps=8, num_stages=1)),
    "v3 bn32 w4 pps4": (kernels, C(block_n=32, num_warps=4, num_stages=1, programs_per_sm=4)),
    "v3 bn32 w4 pps16": (kernels, C(block_n=32, num_warps=4, num_stages=1, programs_per_sm=16)),
    "v3 bn32 w4 no-prefetch s3": (kernels, C(block_n=32, num_warps=4, num_stages=3, prefetch=False)),
    "v3 bn32 w4 fast1": (kernels, C(block_n=32, num_warps=4, num_stages=1, fast_codes=1)),
    "v3 bn32 w4 fast0": (kernels, C(block_n=32, num_warps=4, num_stages=1, fast_codes=0)),
    "v3 bn64 w4 no-prefetch s3": (kernels, C(block_n=64, num_warps=4, num_stages=3, prefetch=False)),
    "v3 default": (kernels, None),
}
INT2_VARIANTS = ("v1 default", "v3 bn32 w4", "v3 bn64 w4", "v3 default")


def random_storage(batch, context, nbits, axis_key, group, device, dtype):
    num_stored = (context - SINK - WINDOW) // BLOCK * BLOCK
    num_recent = context - SINK - num_stored
    B, H, D = batch, NUM_KV_HEADS, HEAD_DIM
    packed = D * nbits // 8

    def codes():
        return torch.randint(0, 256, (B, H, num_stored, packed), dtype=torch.uint8, device=device)

    def scales(*shape):
        return (torch.rand(*shape, device=device) * 0.02 + 0.01).half()

    def zeros(*shape):
        return (-torch.rand(*shape, device=device)).half()

    key_rows, key_cols = (num_stored // BLOCK, D) if axis_key == "channel" else (num_stored, D // group)
    return dict(
        sink_keys=torch.randn(B, H, SINK, D, device=device, dtype=dtype),
        sink_values=torch.randn(B, H, SINK, D, device=device, dtype=dtype),
        num_sink=SINK,
        key_codes=codes(), key_scale=scales(B, H, key_rows, key_cols), key_zero=zeros(B, H, key_rows, key_cols),
        value_codes=codes(), value_scale=scales(B, H, num_stored, D // group),
        value_zero=zeros(B, H, num_stored, D // group), num_stored=num_stored,
        recent_keys=torch.randn(B, H, WINDOW + BLOCK, D, device=device, dtype=dtype),
        recent_values=torch.randn(B, H, WINDOW + BLOCK, D, device=device, dtype=dtype),
        num_recent=num_recent,
        nbits=nbits, q_group_size=group, axis_key=axis_key, block_length=BLOCK, row_padding=None,
    )


def float64_attention(query, a, scaling):
    keys, values = reference.dequantize_middle(
        a["key_codes"], a["key_scale"], a["key_zero"], a["value_codes"], a["value_scale"], a["value_zero"],
        a["num_stored"], nbits=a["nbits"], q_group_size=a["q_group_size"], axis_key=a["axis_key"],
        block_length=a["block_length"])
    k = torch.cat([a["sink_keys"].double(), keys.double(), a["recent_keys"][:, :, : a["num_recent"]].double()], -2)
    v = torch.cat([a["sink_values"].double(), values.double(), a["recent_values"][:, :, : a["num_recent"]].double()], -2)
    del keys, values
    B, Hq = query.shape[:2]
    q = query.double().reshape(B, NUM_KV_HEADS, Hq // NUM_KV_HEADS, HEAD_DIM)
    out = torch.softmax(q @ k.transpose(-1, -2) * scaling, -1) @ v
    return out.reshape(B, Hq, 1, HEAD_DIM).transpose(1, 2)


def poisoned_call(module, query, a, scaling, config):
    real_empty = torch.empty

    def poisoned_empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    module.torch.empty = poisoned_empty
    try:
        return module.selective_decode_attention(query, **a, scaling=scaling, config=config)
    finally:
        module.torch.empty = real_empty


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="decode_variants.json")
    parser.add_argument("--cpu", action="store_true", help="interpreter smoke test at a small shape")
    parser.add_argument("--rep", type=int, default=100)
    parser.add_argument("--graph", action="store_true", help="time CUDA-graph replays (GPU time without launch overhead)")
    parser.add_argument("--rounds", type=int, default=1, help="time every variant this many times, interleaved")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    device = "cpu" if args.cpu else "cuda"
    shapes = [(2, 400)] if args.cpu else SHAPES
    dtype = torch.float16 if args.cpu else torch.bfloat16
    scaling = HEAD_DIM**-0.5
    result = dict(date=str(datetime.date.today()), command=" ".join(sys.argv), rows=[], errors=[])
    if not args.cpu:
        import triton
        from triton.testing import do_bench

        def bench(fn):
            if args.graph:
                from triton.testing import do_bench_cudagraph

                return do_bench_cudagraph(fn, rep=args.rep, return_mode="median")
            return do_bench(fn, warmup=25, rep=args.rep, return_mode="median")

        result.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
        src = torch.randn(2**29, device="cuda")
        dst = torch.empty_like(src)
        result["copy_gb_per_s"] = 2 * src.numel() * 4 / bench(lambda: dst.copy_(src)) / 1e6
        del src, dst
        print(f"copy {result['copy_gb_per_s']:.0f} GB/s", flush=True)
    for batch, context in shapes:
        torch.manual_seed(0)
        query = torch.randn(batch, NUM_HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
        if not args.cpu:
            k = torch.randn(batch, NUM_KV_HEADS, context, HEAD_DIM, device=device, dtype=dtype)
            v = torch.randn_like(k)
            ms = bench(lambda: F.scaled_dot_product_attention(query, k, v, scale=scaling, enable_gqa=True))
            result["rows"].append(dict(batch=batch, context=context, quant="bf16", variant="SDPA", ms=ms,
                                       bytes=2 * k.numel() * 2 + query.numel() * 2))
            print(f"{batch}x{context} SDPA {ms:.4f}", flush=True)
            del k, v
        for quant, (nbits, axis_key, group) in QUANTS.items():
            a = random_storage(batch, context, nbits, axis_key, group, device, dtype)
            want = float64_attention(query, a, scaling)
            nbytes = kernels.bytes_read(batch, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, SINK + a["num_recent"],
                                        a["num_stored"], nbits, group, axis_key, BLOCK)
            todo = []
            for name, (module, config) in VARIANTS.items():
                if quant == "int2" and name not in INT2_VARIANTS:
                    continue
                if args.only and name not in args.only.split(","):
                    continue
                todo.append((name, module, config))
            for name, module, config in todo * args.rounds:
                if args.cpu and config is not None:  # small tiles, a few splits in the interpreter
                    config = kernels.DecodeConfig(**{**config.__dict__, "block_n": 16, "block_exact": 16})
                row = dict(batch=batch, context=context, quant=quant, variant=name, bytes=nbytes, graph=args.graph)
                try:
                    out = poisoned_call(module, query, a, scaling, config)
                    err = ((out.double() - want).norm() / want.norm()).item()
                    row["rel_error"] = err
                    ok = bool(torch.isfinite(out).all()) and err < 2e-2
                    row["ok"] = ok
                    if ok and not args.cpu:
                        row["ms"] = bench(lambda: module.selective_decode_attention(query, **a, scaling=scaling,
                                                                                    config=config))
                except Exception as e:  # noqa: BLE001 (record and go on: one failing variant must not end the run)
                    row["ok"] = False
                    row["exception"] = f"{type(e).__name__}: {str(e)[:300]}"
                result["rows"].append(row)
                print(f"{batch}x{context} {quant:8s} {name:28s} err {row.get('rel_error', float('nan')):.2e} "
                      f"ok {row['ok']} ms {row.get('ms', float('nan')):.4f} {row.get('exception', '')}", flush=True)
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
            del a, want
            if not args.cpu:
                torch.cuda.empty_cache()
    for row in result["rows"]:
        if "ms" in row:
            base = min(r["ms"] for r in result["rows"] if (r["batch"], r["context"], r["variant"]) ==
                        (row["batch"], row["context"], "SDPA"))
            row["speedup_vs_sdpa"] = base / row["ms"]
            row["gb_per_s"] = row["bytes"] / row["ms"] / 1e6
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
