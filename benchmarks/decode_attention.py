"""Decode attention over a selective cache: fused Triton kernel vs bf16 SDPA vs dequantize + SDPA.

    PYTHONPATH=src python benchmarks/decode_attention.py [--out results.json] [--sweep]

Caches are filled directly with random data (storage tensors, no model): 32 query / 8 KV
heads, head_dim 128, bf16, sink 4 tokens, window 128 tokens, the rest quantized.
Times are medians of ``triton.testing.do_bench`` (warm-up excluded). GB/s counts every byte
each method must read (query, 16-bit tokens, codes, scales/zeros); the device-to-device copy
of the same run (bytes read + written) is the bandwidth ceiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from selkv import quant  # noqa: E402
from selkv.kernels import decode_attention as kernels  # noqa: E402
from selkv.kernels import reference  # noqa: E402
from selkv.middle import MiddleLayout  # noqa: E402
from selkv.storage import DecodeStorage  # noqa: E402
from selkv.testing import random_middle  # noqa: E402

SHAPES = [(1, 32768), (8, 32768), (1, 131072), (32, 8192)]  # (batch, context)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
SINK, WINDOW, BLOCK = 4, 128, 32
# name -> (nbits, key axis, q_group_size)
FUSED = {  # name: (nbits or (kbits, vbits), axis_key, q_group_size, block_length[, rotate[, vrotate]])
    "fused int8": (8, "token", 64, BLOCK),
    "fused int4": (4, "channel", 64, BLOCK),
    "fused int4 tok": (4, "token", 64, BLOCK),
    "fused int2": (2, "channel", 64, BLOCK),
    "fused int4 spec": (4, "channel", 32, 64),  # the int4 spec's defaults: groups of 32, key blocks of 64
    # rotated keys (rotate=hadamard-signs, the 4-bit spec default): the query is rotated once per call in the
    # launcher, which the times include
    "fused int4 spec rot": (4, "channel", 32, 64, "hadamard-signs"),
    # quant:bits=2,block=32,late_kbits=2,rotate=hadamard-signs,vrotate=none
    "fused int2 rot": (2, "channel", 64, 32, "hadamard-signs"),
    "fused int3 spec rot": (3, "channel", 64, 64, "hadamard-signs"),  # the int3 default before 2026-12-07
    # rotated keys and values: the merge rotates the middle's output back
    # quant:bits=2,block=32,late_kbits=2,rotate=hadamard-signs
    "fused int2 spec vrot": (2, "channel", 64, 32, "hadamard-signs", "hadamard"),
    "fused int3 vrot": (3, "channel", 64, 64, "hadamard", "hadamard"),  # quant:bits=3,block=64,late_kbits=3
    "fused int4 tok rot": (4, "token", 64, 32, "hadamard-signs"),
    # the int2 default's layers on 2026-12-06 (docs/eval_results.md): keys in blocks of 64 (one scale row per
    # tile), half of the layers with 3-bit keys
    "fused int2 b64 vrot": (2, "channel", 64, 64, "hadamard-signs", "hadamard"),
    "fused k3v2 b64 vrot": ((3, 2), "channel", 64, 64, "hadamard-signs", "hadamard"),
    # the int3 default's layers (since 2026-12-07): key blocks of 128, plain-Hadamard keys and values, 4-bit keys in
    # the last 2/5 of the layers
    "fused int3 b128 vrot": (3, "channel", 64, 128, "hadamard", "hadamard"),
    "fused k4v3 b128 vrot": ((4, 3), "channel", 64, 128, "hadamard", "hadamard"),
    # the same layout at other widths, to see what each side's width costs (docs/performance.md, 2026-12-07)
    "fused int4 b128 vrot": (4, "channel", 64, 128, "hadamard", "hadamard"),
    "fused k3v4 b128 vrot": ((3, 4), "channel", 64, 128, "hadamard", "hadamard"),
    "fused k3v2 b128 vrot": ((3, 2), "channel", 64, 128, "hadamard", "hadamard"),
    "fused k2v3 b128 vrot": ((2, 3), "channel", 64, 128, "hadamard", "hadamard"),
    "fused int2 b128 vrot": (2, "channel", 64, 128, "hadamard", "hadamard"),
    "fused int3 b128": (3, "channel", 64, 128),  # no rotations
    # symmetric value groups with no zero stored (vsym): the int2 default's layers since 2026-12-07 (3-bit keys,
    # 2-bit values), and the same at other widths
    "fused k3v2 b128 vrot vsym": ((3, 2), "channel", 64, 128, "hadamard", "hadamard", "vsym"),
    "fused int2 b128 vrot vsym": (2, "channel", 64, 128, "hadamard", "hadamard", "vsym"),
    "fused k4v3 b128 vrot vsym": ((4, 3), "channel", 64, 128, "hadamard", "hadamard", "vsym"),
    "fused int3 b128 vrot vsym": (3, "channel", 64, 128, "hadamard", "hadamard", "vsym"),
}
ACCURACY_RMS = (1.0, 0.02)  # value RMS of the accuracy column


def random_storage(
    batch: int,
    context: int,
    nbits: int | tuple[int, int],
    axis_key: str,
    group: int,
    block: int = BLOCK,
    rotate: str = "none",
    device="cuda",
    dtype=torch.bfloat16,
    device_lengths: bool = False,
    vrotate: str = "none",
    vsym: bool = False,
) -> DecodeStorage:
    """A cache of ``context`` tokens filled with random codes and scales (``rotate`` / ``vrotate``: the middle's
    keys / values are read as rotated by that matrix, as a layer stores them; ``vsym``: value groups store no zero).

    ``device_lengths``: the lengths on the device, as a static cache holds them (the kernel reads
    them; its grid comes from the capacities, here equal to the filled lengths).
    """
    num_stored = (context - SINK - WINDOW) // block * block
    num_recent = context - SINK - num_stored
    B, H, D = batch, NUM_KV_HEADS, HEAD_DIM
    key_nbits, value_nbits = (nbits, nbits) if isinstance(nbits, int) else nbits
    layout = MiddleLayout(key_nbits, value_nbits, group, axis_key, block, rotate, vrotate=vrotate, vsym=vsym)
    lengths = None
    if device_lengths:
        lengths = torch.tensor([SINK, num_stored, num_recent, 0], dtype=torch.int32, device=device)
    return DecodeStorage(
        sink_keys=torch.randn(B, H, SINK, D, device=device, dtype=dtype),
        sink_values=torch.randn(B, H, SINK, D, device=device, dtype=dtype),
        middle=random_middle(layout, B, H, D, num_stored, device),
        recent_keys=torch.randn(B, H, WINDOW + block, D, device=device, dtype=dtype),
        recent_values=torch.randn(B, H, WINDOW + block, D, device=device, dtype=dtype),
        num_sink=SINK,
        num_stored=num_stored,
        num_recent=num_recent,
        layout=layout,
        row_padding=None,
        lengths=lengths,
        key_rotation=quant.rotation_matrix(rotate, D, device),
        key_rotation_signs=quant.rotation_signs(rotate, D, dtype, device),
        value_rotation=quant.rotation_matrix(vrotate, D, device),
        value_rotation_signs=quant.rotation_signs(vrotate, D, dtype, device),
    )


def layout_options(rotate: list[str]) -> dict[str, str | bool]:
    """``rotate``, ``vrotate`` and ``vsym`` keywords from what follows a FUSED row's block length."""
    return dict(
        rotate=rotate[0] if rotate else "none",
        vrotate=rotate[1] if len(rotate) > 1 else "none",
        vsym="vsym" in rotate[2:],
    )


def parse_method(name: str, config=None, baseline=None):
    """(FUSED key, DecodeConfig or None, kernel module) of a row name.

    ``"fused int2 rot {block_n=32}"``: launch parameters of this row over ``config``; ``"... (before)"``:
    the row runs the ``--baseline`` kernel module (with its default launch parameters).
    """
    module = kernels
    if name.endswith(" (before)"):
        name, module, config = name.removesuffix(" (before)"), baseline, None
    if name.endswith("}"):
        name, _, fields = name[:-1].partition(" {")
        base = config or kernels.DecodeConfig()
        config = dataclasses.replace(
            base, **{k: _parse_field(k, v) for k, v in (item.split("=") for item in fields.split(",") if item)}
        )
    key = name.replace("dequant+SDPA ", "fused ").removesuffix(" dev")
    return key, config, module


def _parse_field(name: str, text: str):
    """A DecodeConfig field from text; a field whose default is None (``scale_prefetch``) reads as a bool."""
    default = getattr(kernels.DecodeConfig, name)
    if default is None or isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    return type(default)(text)


def layout_errors(name: str, device: str = "cuda", shape: dict | None = None, baseline=None) -> dict[str, float]:
    """The fused kernel's attention error for layout ``name`` against float64 attention over the keys and
    values *before* quantization (the layout's whole cost), on ``benchmarks/kernel_precision.py``'s cache:
    keys with three outlier channels (x10, x20, x30), values of RMS 1 and 0.02; 8 x 32k by default."""
    import kernel_precision

    key, config, module = parse_method(name, baseline=baseline)
    nbits, axis_key, group, block, *rotate = FUSED[key]
    shape = dict(kernel_precision.CUDA_SHAPE if shape is None else shape)
    errors = {}
    for rms in ACCURACY_RMS:
        gen = torch.Generator(device).manual_seed(0)
        storage, middle = kernel_precision.make_cache(
            gen, nbits, axis_key, group, block, rms, device=device, **layout_options(rotate), **shape
        )
        query = torch.randn(
            shape["batch_size"], shape["num_heads"], 1, shape["head_dim"], generator=gen, device=device
        ).to(shape["dtype"])
        scaling = shape["head_dim"] ** -0.5
        out = module.selective_decode_attention(query, storage, scaling=scaling, config=config).double()
        exact = kernel_precision.float64_attention(query, storage, scaling, middle)
        errors[f"error_rms_{rms}"] = ((out - exact).norm() / exact.norm()).item()
        del storage, middle, out, exact
    return errors


def bench(fn, warmup: int = 50, rep: int = 300) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_graph(fn) -> float:
    """Median ms of CUDA-graph replays: no per-launch CPU overhead (what a captured decode step pays)."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, GB/s counting bytes read plus written (2 GiB buffer)."""
    src = torch.randn(2**29, device="cuda")  # 2 GiB float32
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def dequantize_sdpa(query, storage: DecodeStorage, scaling):
    """The reference path: dequantize the middle to bf16, concatenate, SDPA."""
    s = storage
    keys, values = s.dequantize()
    k = torch.cat([s.sink_keys, keys.to(query.dtype), s.recent_keys[:, :, : s.num_recent]], dim=-2)
    v = torch.cat([s.sink_values, values.to(query.dtype), s.recent_values[:, :, : s.num_recent]], dim=-2)
    return F.scaled_dot_product_attention(query, k, v, scale=scaling, enable_gqa=True)


def run(shapes, methods, config=None, check=True, baseline=None) -> list[dict]:
    rows = []
    for batch, context in shapes:
        torch.manual_seed(0)
        query = torch.randn(batch, NUM_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        scaling = HEAD_DIM**-0.5
        k = torch.randn(batch, NUM_KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        sdpa = functools.partial(F.scaled_dot_product_attention, query, k, v, scale=scaling, enable_gqa=True)
        sdpa_bytes = 2 * k.numel() * 2 + query.numel() * 2
        rows.append(
            dict(
                batch=batch,
                context=context,
                method="bf16 SDPA",
                ms=bench(sdpa),
                ms_graph=bench_graph(sdpa),
                bytes=sdpa_bytes,
            )
        )
        k = v = sdpa = None  # frees the tensors (sdpa holds them too)
        for name in methods:
            # "... dev": the lengths on the device, as a static cache's captured decode step reads them
            device_lengths = name.endswith(" dev")
            key, row_config, module = parse_method(name, config, baseline)
            nbits, axis_key, group, block, *rotate = FUSED[key]
            args = random_storage(
                batch,
                context,
                nbits,
                axis_key,
                group,
                block,
                **layout_options(rotate),
                device_lengths=device_lengths,
            )
            nbytes = kernels.bytes_read(
                batch,
                NUM_HEADS,
                NUM_KV_HEADS,
                HEAD_DIM,
                SINK + args.num_recent,
                args.num_stored,
                args.layout.key_nbits,
                group,
                axis_key,
                block,
                value_nbits=args.layout.value_nbits,
                value_sym=args.layout.vsym,
            )
            if name.startswith("dequant"):
                fn = functools.partial(dequantize_sdpa, query, args, scaling)
                ms, ms_graph = bench(fn), bench_graph(fn)
            else:
                fn = functools.partial(
                    module.selective_decode_attention, query, args, scaling=scaling, config=row_config
                )
                if check:
                    out = fn().float()
                    want = reference.selective_decode_attention(query, args, scaling=scaling).float()
                    err = ((out - want).norm() / want.norm()).item()
                    assert err < 2e-2, f"{name} at {batch}x{context}: relative error {err:.2e} vs the twin"
                ms, ms_graph = bench(fn), bench_graph(fn)
            rows.append(dict(batch=batch, context=context, method=name, ms=ms, ms_graph=ms_graph, bytes=nbytes))
            args = fn = None  # frees the storage before the next method (fn holds it too)
            torch.cuda.empty_cache()
    for row in rows:
        base = next(
            r["ms"]
            for r in rows
            if (r["batch"], r["context"], r["method"]) == (row["batch"], row["context"], "bf16 SDPA")
        )
        base_graph = next(
            r["ms_graph"]
            for r in rows
            if (r["batch"], r["context"], r["method"]) == (row["batch"], row["context"], "bf16 SDPA")
        )
        row["gb_per_s"] = row["bytes"] / row["ms"] / 1e6
        row["speedup_vs_sdpa"] = base / row["ms"]
        row["speedup_vs_sdpa_graph"] = base_graph / row["ms_graph"]
    return rows


def sweep(shapes) -> list[dict]:
    """Launch parameters per (shape, quantization): prints the best of a small grid."""
    found = []
    for name in ("fused int8", "fused int4", "fused int4 tok"):
        nbits, axis_key, group, block = FUSED[name]
        for batch, context in shapes:
            query = torch.randn(batch, NUM_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            args = random_storage(batch, context, nbits, axis_key, group, block)
            results = []
            for block_n in (16, 32, 64):
                for num_warps in (2, 4, 8):
                    for num_stages in (2, 3):
                        for waves in (0, 16):
                            splits = 0
                            if waves:
                                splits = max(1, waves * 132 // (batch * NUM_KV_HEADS))
                            cfg = kernels.DecodeConfig(
                                block_n=block_n, num_warps=num_warps, num_stages=num_stages, num_splits=splits
                            )
                            try:
                                fn = functools.partial(kernels.selective_decode_attention, query, args, config=cfg)
                                ms = bench(fn, 10, 40)
                            except Exception as e:  # noqa: BLE001 (a config that does not compile: skip it)
                                print(f"  {cfg}: {type(e).__name__}")
                                continue
                            results.append((ms, cfg))
            results.sort(key=lambda r: r[0])
            default = kernels.DecodeConfig()
            default_ms = bench(functools.partial(kernels.selective_decode_attention, query, args, config=default))
            best_ms, best = results[0]
            print(f"sweep {name} {batch}x{context}: default {default_ms:.4f} ms, best {best_ms:.4f} ms {best}")
            found.append(
                dict(
                    method=name,
                    batch=batch,
                    context=context,
                    default_ms=default_ms,
                    best_ms=best_ms,
                    best=best.__dict__,
                    top5=[(ms, c.__dict__) for ms, c in results[:5]],
                )
            )
            args = fn = None
    return found


def table(rows, copy_gbs) -> str:
    lines = [
        "| batch x context | method | median ms | GB/s | % of copy | speed-up vs SDPA | graph ms | graph speed-up | "
        "error vs float64, value RMS 1 / 0.02 (8 x 32k) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        errors = " / ".join(f"{r[f'error_rms_{rms}']:.1e}" for rms in ACCURACY_RMS) if "error_rms_1.0" in r else "-"
        lines.append(
            f"| {r['batch']} x {r['context'] // 1024}k | {r['method']} | {r['ms']:.4f} | {r['gb_per_s']:.0f} | "
            f"{100 * r['gb_per_s'] / copy_gbs:.0f} % | {r['speedup_vs_sdpa']:.2f}x | {r['ms_graph']:.4f} | "
            f"{r['speedup_vs_sdpa_graph']:.2f}x | {errors} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="decode_attention.json")
    parser.add_argument(
        "--shapes",
        default=",".join(f"{b}x{c}" for b, c in SHAPES),
        metavar="BATCHxCONTEXT,...",
        help="shapes to time (default: %(default)s)",
    )
    parser.add_argument("--sweep", action="store_true", help="only sweep launch parameters at (1, 32k) and (8, 32k)")
    parser.add_argument(
        "--methods", default="dequant+SDPA int8,fused int8,fused int4,fused int4 tok,fused int2,fused int4 spec"
    )
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="add each fused layout's error vs float64 on keys with outlier channels (8 x 32k)",
    )
    parser.add_argument(
        "--config",
        default="",
        metavar="FIELD=VALUE,...",
        help="DecodeConfig fields for the fused rows, e.g. programs_per_sm=10,block_n=64; one row's "
        "own fields follow its name in braces: 'fused int2 rot {block_n=32}'",
    )
    parser.add_argument(
        "--baseline",
        metavar="FILE",
        help="another kernel module (e.g. the file before a change, "
        "benchmarks/kernel_precision.py --kernel): rows named '... (before)' run it, in the same process",
    )
    args = parser.parse_args()
    from decode_e2e import parse_shapes  # the end-to-end benchmark's BATCHxCONTEXT list

    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as error:
        parser.error(str(error))
    import triton

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    props = torch.cuda.get_device_properties(0)
    if args.sweep:
        swept = sweep([(1, 32768), (8, 32768)])
        with open(args.out, "w") as f:
            json.dump(dict(date=datetime.date.today().isoformat(), gpu=props.name, sweep=swept), f, indent=1)
        return
    copy_gbs = copy_bandwidth()
    fields = dict(item.split("=") for item in args.config.split(",") if item)
    config = kernels.DecodeConfig(**{k: _parse_field(k, v) for k, v in fields.items()})
    baseline = None
    if args.baseline:
        import kernel_precision

        baseline = kernel_precision.load_kernels(args.baseline)
    rows = run(shapes, methods, config, baseline=baseline)
    if args.accuracy:
        errors = {m: layout_errors(m, baseline=baseline) for m in methods if not m.startswith("dequant")}
        for row in rows:
            row.update(errors.get(row["method"], {}))
    result = dict(
        date=datetime.date.today().isoformat(),
        gpu=props.name,
        torch=torch.__version__,
        triton=triton.__version__,
        command="PYTHONPATH=src python " + " ".join(sys.argv),
        copy_gb_per_s=copy_gbs,
        baseline=args.baseline,
        shape=dict(
            num_heads=NUM_HEADS,
            num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM,
            dtype="bfloat16",
            sink=SINK,
            window=WINDOW,
            block=BLOCK,
            q_group_size=64,
        ),
        config=vars(config),
        rows=rows,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"\n{props.name}, torch {torch.__version__}, triton {triton.__version__}; "
        f"device-to-device copy {copy_gbs:.0f} GB/s (read + write)\n"
    )
    print(table(rows, copy_gbs))


if __name__ == "__main__":
    main()
