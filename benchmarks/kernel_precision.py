"""The fused decode kernel's own error against float64 attention, by value magnitude, and its time.

    PYTHONPATH=src python benchmarks/kernel_precision.py --out precision.json            # CUDA
    PYTHONPATH=src python benchmarks/kernel_precision.py --cpu --out smoke.json          # CPU smoke test
    PYTHONPATH=src python benchmarks/kernel_precision.py --kernel OLD.py --out old.json  # another kernel file

On CUDA: 8 x 32k tokens at Llama-3-8B's attention shape (32 query / 8 KV heads, head_dim 128,
bfloat16; sink 4, window 128, the rest quantized). Keys have three outlier channels (x10, x20,
x30), which makes attention peaked; values are Gaussian with RMS 1, 0.1, 0.02 and 0.005. For each
quantization and value RMS it prints the relative L2 error of the kernel against float64 attention
over the same dequantized cache (codes * scale + zero, not rounded: the kernel's own error), against
float64 attention over the keys and values before quantization (the layout's whole error: "vs
unquantized"), and the kernel's median time
over CUDA-graph replays (``triton.testing.do_bench_cudagraph``). ``--cpu`` runs a small float16
case in Triton's CPU interpreter, without times. ``--kernel FILE`` loads the launcher from another
copy of ``decode_attention.py`` (for example the file before a change) instead of selkv's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import inspect
import json
import os
import sys
import types
from pathlib import Path

CPU = "--cpu" in sys.argv
if CPU:  # the interpreter must be chosen before Triton's first import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from selkv import quant  # noqa: E402
from selkv.middle import MiddleLayout, MiddleTensors, quantize_middle  # noqa: E402
from selkv.storage import DecodeStorage  # noqa: E402

VALUE_RMS = (1.0, 0.1, 0.02, 0.005)
QUANT = {  # name: (nbits, axis_key, q_group_size, block_length[, rotate[, vrotate]]), as benchmarks/decode_attention.py
    "int8": (8, "token", 64, 32),
    "int4": (4, "channel", 64, 32),
    "int4 tok": (4, "token", 64, 32),
    "int2": (2, "channel", 64, 32),
    "int4 spec": (4, "channel", 32, 64),
    # rotated keys (quant.rotation_matrix): the int4 spec default, int2 with its keys rotated only
    # (quant:bits=2,block=32,late_kbits=2,rotate=hadamard-signs,vrotate=none), and the per-token layout; the
    # kernel's time includes rotating the query
    "int4 spec rot": (4, "channel", 32, 64, "hadamard-signs"),
    "int2 rot": (2, "channel", 64, 32, "hadamard-signs"),
    "int4 tok rot": (4, "token", 64, 32, "hadamard-signs"),
    # rotated keys and values: the merge rotates the middle's output back
    # (quant:bits=2,block=32,late_kbits=2,rotate=hadamard-signs; quant:bits=3,block=64,late_kbits=3)
    "int2 spec vrot": (2, "channel", 64, 32, "hadamard-signs", "hadamard"),
    "int3 vrot": (3, "channel", 64, 64, "hadamard", "hadamard"),
}
CUDA_SHAPE = dict(batch_size=8, num_heads=32, num_kv_heads=8, head_dim=128, context=32768, dtype=torch.bfloat16)
CPU_SHAPE = dict(batch_size=1, num_heads=4, num_kv_heads=1, head_dim=64, context=388, dtype=torch.float16)
SINK, WINDOW = 4, 128


def load_kernels(path: str | None):
    """selkv's decode_attention module, or the one in ``path`` (loaded inside selkv.kernels).

    A file from before the kernels moved to ``triton_decode.py`` (``git show REV:src/selkv/kernels/decode_attention.py``
    at 5dc1fe8 or earlier) holds its own kernels; a later ``decode_attention.py`` launches selkv's current ones.
    """
    if path is None:
        from selkv.kernels import decode_attention

        return decode_attention
    spec = importlib.util.spec_from_file_location("selkv.kernels._decode_attention_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    if "s.key_codes" in Path(path).read_text(encoding="utf-8"):  # a launcher from before DecodeStorage.middle
        launch = module.selective_decode_attention
        module.selective_decode_attention = functools.wraps(launch)(
            lambda query, storage, **kwargs: launch(query, flat_view(storage), **kwargs)
        )
    return module


def flat_view(storage: DecodeStorage) -> types.SimpleNamespace:
    """``storage`` with the middle's tensors and layout as its own attributes (``key_codes``, ``key_nbits``, ...),
    as launchers read it before ``DecodeStorage`` carried a ``MiddleTensors`` and a ``MiddleLayout``."""
    s = storage
    fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in ("middle", "layout")}
    middle = s.middle._asdict() if s.middle is not None else dict.fromkeys(MiddleTensors._fields)
    return types.SimpleNamespace(
        **fields, **middle, **dataclasses.asdict(s.layout), num_key_value_heads=s.num_key_value_heads
    )


def make_cache(
    gen: torch.Generator,
    nbits: int | tuple[int, int],
    axis_key: str,
    q_group_size: int,
    block_length: int,
    value_rms: float,
    batch_size: int,
    num_kv_heads: int,
    head_dim: int,
    context: int,
    dtype: torch.dtype,
    device: str,
    rotate: str = "none",
    vrotate: str = "none",
    vsym: bool = False,
    **_,
) -> DecodeStorage:
    """Random keys (3 outlier channels) and values (RMS ``value_rms``), quantized as a layer stores them
    (middle keys / values rotated first when ``rotate`` / ``vrotate`` is not "none"; ``vsym``: value groups
    store no zero)."""
    num_stored = (context - SINK - WINDOW) // block_length * block_length
    num_recent = context - SINK - num_stored
    B, H, D = batch_size, num_kv_heads, head_dim
    key_gain = torch.ones(D, device=device)
    # The outlier channels from a CPU generator with gen's seed: the same channels on every device (how many
    # of them share a quantization group decides much of a layout's error).
    outliers = torch.randperm(D, generator=torch.Generator().manual_seed(gen.initial_seed()))[:3]
    key_gain[outliers.to(device)] = torch.tensor([10.0, 20.0, 30.0], device=device)

    def states(count):  # [B, H, count, D] keys and values in dtype, drawn on the device (gen's)
        keys = torch.randn(B, H, count, D, generator=gen, device=device) * key_gain
        values = torch.randn(B, H, count, D, generator=gen, device=device) * value_rms
        return keys.to(dtype), values.to(dtype)

    sink_keys, sink_values = states(SINK)
    recent_keys, recent_values = states(num_recent)
    keys, values = states(num_stored)  # the middle as it was before quantization
    rotation, value_rotation = quant.rotation_matrix(rotate, D, device), quant.rotation_matrix(vrotate, D, device)
    key_nbits, value_nbits = (nbits, nbits) if isinstance(nbits, int) else nbits  # (kbits, vbits): a mixed layout
    layout = MiddleLayout(
        key_nbits, value_nbits, q_group_size, axis_key, block_length, rotate, vrotate=vrotate, vsym=vsym
    )
    storage = DecodeStorage(
        sink_keys=sink_keys,
        sink_values=sink_values,
        middle=quantize_middle(keys, values, layout, rotation, value_rotation),
        recent_keys=recent_keys,
        recent_values=recent_values,
        num_sink=SINK,
        num_stored=num_stored,
        num_recent=num_recent,
        layout=layout,
        row_padding=None,
        key_rotation=rotation,
        key_rotation_signs=quant.rotation_signs(rotate, D, dtype, device),
        value_rotation=value_rotation,
        value_rotation_signs=quant.rotation_signs(vrotate, D, dtype, device),
    )
    return storage, (keys, values)


def run_kernel(
    kernels, query: torch.Tensor, storage: DecodeStorage, scaling: float, value_dot: str | None = None
) -> torch.Tensor:
    """The launcher of ``kernels`` on ``storage`` (``value_dot``: that DecodeConfig.value_dot); a kernel
    file from before the DecodeStorage view (``--kernel``) takes the storage's fields as keyword arguments."""
    if value_dot is not None:
        config = kernels.DecodeConfig(value_dot=value_dot)
        return kernels.selective_decode_attention(query, storage, scaling=scaling, config=config)
    if "storage" in inspect.signature(kernels.selective_decode_attention).parameters:
        return kernels.selective_decode_attention(query, storage, scaling=scaling)
    fields = {
        name: value
        for name, value in vars(flat_view(storage)).items()
        if name not in ("lengths", "rotate", "sym", "num_key_value_heads")
    }
    return kernels.selective_decode_attention(query, **fields, scaling=scaling)


def float64_attention(query: torch.Tensor, storage: DecodeStorage, scaling: float, middle=None) -> torch.Tensor:
    """[B, 1, Hq, D] float64 attention over the sink, the dequantized middle (not rounded) and the window;
    ``middle``: (keys, values) to use instead of the dequantized middle (the states before quantization)."""
    keys, values = storage.dequantize() if middle is None else middle
    recent = slice(0, storage.num_recent)
    k = torch.cat([storage.sink_keys.double(), keys.double(), storage.recent_keys[:, :, recent].double()], dim=-2)
    v = torch.cat([storage.sink_values.double(), values.double(), storage.recent_values[:, :, recent].double()], dim=-2)
    B, Hq, _, D = query.shape
    H = k.shape[1]
    q = query.double().reshape(B, H, Hq // H, D)  # [B, H, G, D]
    out = torch.softmax(q @ k.transpose(-1, -2) * scaling, dim=-1) @ v  # [B, H, G, D]
    return out.reshape(B, Hq, 1, D).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--cpu", action="store_true", help="small float16 case in Triton's CPU interpreter, no times")
    parser.add_argument("--kernel", default=None, help="a decode_attention.py to load instead of selkv's")
    parser.add_argument("--quant", nargs="+", default=list(QUANT), choices=list(QUANT))
    parser.add_argument(
        "--value-dot",
        nargs="+",
        default=[None],
        metavar="DOT",
        help="DecodeConfig.value_dot variants to compare (default: the kernel's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not CPU and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --cpu for the interpreter smoke test")
    kernels = load_kernels(args.kernel)
    shape = CPU_SHAPE if CPU else CUDA_SHAPE
    device = "cpu" if CPU else "cuda"
    scaling = shape["head_dim"] ** -0.5
    rows = []
    for name, value_dot in [(n, d) for n in args.quant for d in args.value_dot]:
        nbits, axis_key, q_group_size, block_length, *rotate = QUANT[name]
        label = name if value_dot is None else f"{name} {value_dot}"
        for value_rms in VALUE_RMS:
            gen = torch.Generator(device).manual_seed(args.seed)  # the same draws at every RMS
            cache, middle = make_cache(
                gen,
                nbits,
                axis_key,
                q_group_size,
                block_length,
                value_rms,
                device=device,
                rotate=rotate[0] if rotate else "none",
                vrotate=rotate[1] if len(rotate) > 1 else "none",
                **shape,
            )
            query = torch.randn(
                shape["batch_size"], shape["num_heads"], 1, shape["head_dim"], generator=gen, device=device
            ).to(shape["dtype"])
            out = run_kernel(kernels, query, cache, scaling, value_dot)
            want = float64_attention(query, cache, scaling)
            error = ((out.double() - want).norm() / want.norm()).item()
            exact = float64_attention(query, cache, scaling, middle)  # over the keys and values before quantization
            error_quant = ((out.double() - exact).norm() / exact.norm()).item()
            ms = None
            if not CPU:
                from triton.testing import do_bench_cudagraph

                step = functools.partial(run_kernel, kernels, query, cache, scaling, value_dot)
                ms = do_bench_cudagraph(step, rep=200, return_mode="median")
                del step  # it holds the cache, freed below
            rows.append(
                dict(
                    quant=label,
                    value_dot=value_dot,
                    rotate=rotate[0] if rotate else "none",
                    vrotate=rotate[1] if len(rotate) > 1 else "none",
                    nbits=nbits,
                    axis_key=axis_key,
                    q_group_size=q_group_size,
                    block_length=block_length,
                    value_rms=value_rms,
                    rel_l2=error,
                    rel_l2_vs_unquantized=error_quant,
                    ms=ms,
                    finite=bool(torch.isfinite(out).all()),
                )
            )
            del cache, middle, out, want, exact  # free the 8 x 32k cache and the float64 copies before the next one
            print(
                f"{label:18s} value RMS {value_rms:<6} rel. L2 {error:.2e} (vs unquantized {error_quant:.2e})"
                + (f"  {ms:.4f} ms" if ms else ""),
                flush=True,
            )
    meta = dict(
        shape={k: str(v) for k, v in shape.items()},
        sink=SINK,
        window=WINDOW,
        seed=args.seed,
        kernel=args.kernel or "selkv",
        device=torch.cuda.get_device_name() if not CPU else "cpu (interpreter)",
        torch=torch.__version__,
        triton=__import__("triton").__version__,
    )
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nrel. L2 error vs float64 ({meta['device']}; {args.kernel or 'selkv kernel'}):")
    print("| quantization | " + " | ".join(f"RMS {r}" for r in VALUE_RMS) + " | ms (median) |")
    print("|---" * (len(VALUE_RMS) + 2) + "|")
    for name in dict.fromkeys(r["quant"] for r in rows):
        mine = [r for r in rows if r["quant"] == name]
        times = sorted(r["ms"] for r in mine if r["ms"] is not None)
        ms = f"{times[len(times) // 2]:.4f}" if times else "-"
        print(f"| {name} | " + " | ".join(f"{r['rel_l2']:.1e}" for r in mine) + f" | {ms} |")


if __name__ == "__main__":
    main()
