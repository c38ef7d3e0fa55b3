"""End-to-end decode speed and memory of a Llama-3-8B-shaped model with random bf16 weights.

    PYTHONPATH=src python benchmarks/decode_e2e.py [--batch 8] [--context 32768] [--out decode_e2e.json]

The caches are filled directly with random data (no prefill: a 32k prefill at batch 8 would
take most of the time budget and measures nothing about decode). Then ``--steps`` greedy
decode steps run through ``model(...)`` (the same forward ``generate()`` calls each step),
timed with CUDA synchronization; tokens/s = batch * steps / seconds. Rows:

- ``full``: transformers' ``DynamicCache`` + SDPA (what ``generate()`` uses by default);
- ``quant int8`` / ``quant int4`` + ``attn_implementation="selkv"``: the fused kernel;
- ``quant int8 (reference)``: the same cache + SDPA, i.e. dequantize + SDPA every step;
- ``hf-quanto:bits=4``: only if optimum-quanto is installed on the machine.

The largest batch that fits at the context length is *computed*, not tried: GPU memory minus
the model's weights, over the KV bytes each sequence needs (measured from the cache tensors
with ``selkv.kv_bytes``) plus the per-sequence decode transients measured here.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import selkv  # noqa: E402  (registers attn_implementation="selkv")
from selkv import kv_bytes, make_cache  # noqa: E402
from selkv.models import forward_with_cache  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
)
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=512, max_position_embeddings=4096)


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def fill_full(cache, config, batch: int, context: int, device, dtype) -> None:
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    for layer_idx in range(config.num_hidden_layers):
        keys = torch.randn(batch, heads, context, head_dim, device=device, dtype=dtype)
        cache.update(keys, torch.randn_like(keys), layer_idx)


def fill_selective(cache, config, batch: int, context: int, device, dtype) -> None:
    """Write random sink, middle (codes + scales) and window into every layer's storage."""
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    for layer in cache.layers:
        sink, window, block = layer.num_sink_tokens, layer.window_length, layer.block_length
        num_stored = (context - sink - window) // block * block
        num_recent = context - sink - num_stored
        probe = torch.zeros(batch, heads, 1, head_dim, device=device, dtype=dtype)
        layer.lazy_initialization(probe, probe)
        layer.sink_keys.normal_()
        layer.sink_values.normal_()
        layer.recent_keys.normal_()
        layer.recent_values.normal_()
        capacity = num_stored + 8 * block  # room for the evictions of the timed steps, no doubling
        packed = head_dim * layer.nbits // 8
        groups = head_dim // layer.q_group_size
        key_rows, key_cols = (capacity // block, head_dim) if layer.axis_key == "channel" else (capacity, groups)
        shape = (batch, heads)
        layer.key_codes = torch.randint(0, 256, shape + (capacity, packed), dtype=torch.uint8, device=device)
        layer.value_codes = torch.randint(0, 256, shape + (capacity, packed), dtype=torch.uint8, device=device)
        layer.key_scale = (torch.rand(shape + (key_rows, key_cols), device=device) * 0.02 + 0.01).half()
        layer.key_zero = (-torch.rand(shape + (key_rows, key_cols), device=device)).half()
        layer.value_scale = (torch.rand(shape + (capacity, groups), device=device) * 0.02 + 0.01).half()
        layer.value_zero = (-torch.rand(shape + (capacity, groups), device=device)).half()
        layer.num_sink, layer._num_stored, layer.num_recent = sink, num_stored, num_recent
        layer.num_evicted = num_stored
        layer.cumulative_length = context


def decode(model, cache, batch: int, steps: int, warmup: int) -> tuple[float, int]:
    """(seconds for ``steps`` greedy steps after ``warmup`` ones, peak bytes allocated during them)."""
    device = model.device
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    def step(tokens):
        logits = forward_with_cache(model, cache, tokens, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    with torch.no_grad():
        for _ in range(warmup):
            tokens = step(tokens)
        torch.cuda.synchronize() if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            tokens = step(tokens)
        torch.cuda.synchronize() if device.type == "cuda" else None
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--reference-steps", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (a smoke test of this script)")
    parser.add_argument("--out", default="decode_e2e.json")
    args = parser.parse_args()

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build_model(TINY if args.tiny else LLAMA3_8B, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total_memory = torch.cuda.mem_get_info()[1] if device == "cuda" else 0
    runs = [  # (name, cache spec, attention)
        ("full", "full", "sdpa"),
        ("quant int8 (fused)", "quant:bits=8,sink=4,window=124", "selkv"),
        ("quant int4 (fused)", "quant:bits=4,sink=4,window=124", "selkv"),
        ("quant int8 (reference: dequantize + SDPA)", "quant:bits=8,sink=4,window=124", "sdpa"),
    ]
    notes = []
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        notes.append("hf-quanto:bits=4 skipped: a prefilled 32k QuantizedCache cannot be filled directly")
    else:
        notes.append("hf-quanto:bits=4 not run: optimum-quanto is not installed on this machine")
    rows = []
    for name, spec, attention in runs:
        model.set_attn_implementation(attention)
        cache = make_cache(spec, model.config)
        fill = fill_full if spec == "full" else fill_selective
        fill(cache, model.config, args.batch, args.context, device, dtype)
        if spec != "full":
            assert all(layer.fused_decode == (attention == "selkv") for layer in cache.layers)
        steps = args.reference_steps if "reference" in name else args.steps
        seconds, peak = decode(model, cache, args.batch, steps, warmup=2)
        counted = kv_bytes(cache)
        per_sequence = counted["total"] / args.batch
        transient = max(0, peak - weights - counted["allocated"]) / args.batch
        fits = math.floor((total_memory - weights) / (per_sequence + transient)) if device == "cuda" else 0
        rows.append(dict(
            name=name, spec=spec, attention=attention, steps=steps, seconds=seconds,
            tokens_per_s=args.batch * steps / seconds, ms_per_step=1000 * seconds / steps,
            peak_gib=peak / 2**30, kv_gib=counted["total"] / 2**30, kv_allocated_gib=counted["allocated"] / 2**30,
            kv_bytes_per_sequence=per_sequence, max_batch_computed=fits,
        ))
        print(f"{name}: {rows[-1]['tokens_per_s']:.1f} tokens/s, peak {rows[-1]['peak_gib']:.1f} GiB", flush=True)
        del cache
        torch.cuda.empty_cache() if device == "cuda" else None

    full = rows[0]
    for row in rows:
        row["speedup_vs_full"] = row["tokens_per_s"] / full["tokens_per_s"]
        row["batch_ratio_vs_full"] = row["max_batch_computed"] / full["max_batch_computed"] if full["max_batch_computed"] else 0
    import transformers

    result = dict(
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__, transformers=transformers.__version__,
        command="PYTHONPATH=src python " + " ".join(sys.argv), batch=args.batch, context=args.context,
        weights_gib=weights / 2**30, total_memory_gib=total_memory / 2**30, rows=rows, notes=notes,
        method="caches filled directly with random data (no prefill); greedy steps through model(); "
        "max batch computed from measured KV bytes per sequence + measured decode transients",
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['gpu']}, batch {args.batch} x {args.context} context, weights {weights / 2**30:.1f} GiB\n")
    print("| cache | attention | tokens/s | vs full | peak GiB | KV GiB | max batch (computed) | vs full |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['spec']} | {r['attention']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_full']:.2f}x | "
              f"{r['peak_gib']:.1f} | {r['kv_gib']:.1f} | {r['max_batch_computed']} | {r['batch_ratio_vs_full']:.2f}x |")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
