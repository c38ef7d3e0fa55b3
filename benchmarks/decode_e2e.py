"""End-to-end decode speed and memory of a Llama-3-8B-shaped model with random bf16 weights.

    PYTHONPATH=src python benchmarks/decode_e2e.py [--batch 8] [--context 32768] [--out decode_e2e.json]

The caches are filled directly with random data (no prefill: a 32k prefill at batch 8 would
take most of the time budget and measures nothing about decode). Then ``--steps`` greedy
decode steps run through ``model(...)`` (the same forward ``generate()`` calls each step),
timed with CUDA synchronization; tokens/s = batch * steps / seconds of the median of ``--rounds``
rounds. All caches are filled first and take turns, one round each (the host's speed bounds these
steps and drifts; taking turns spreads a slow stretch over every row); the slow reference row runs
alone at the end. The default 64 steps include the evictions a long decode pays (a block of 32
tokens leaves the int8 window every 32 steps, 64 for int4). "host ms" is the time the Python side
took to issue a step's work; when it is close to the step's wall time, the step waits on the host,
not on the GPU. Rows:

- ``full``: transformers' ``DynamicCache`` + SDPA (what ``generate()`` uses by default);
- ``quant int8`` / ``quant int4`` + ``attn_implementation="selkv"``: the fused kernel;
- ``quant int8 (reference)``: the same cache + SDPA, i.e. dequantize + SDPA every step;
- ``hf-quanto:bits=4``: only if optimum-quanto is installed on the machine;
- ``--extra SPEC``: more selkv specs with the fused kernel (e.g. other key layouts or groups).

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
from tqdm.auto import tqdm

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


def fill_selective(cache, config, batch: int, context: int, device, dtype, room: int = 256) -> None:
    """Write random sink, middle (codes + scales) and window into every layer's storage.

    The middle gets spare capacity for ``room`` more tokens, so that the timed steps' evictions
    append without the store growing.
    """
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    for layer in cache.layers:
        sink, window, block = layer.num_sink_tokens, layer.window_length, layer.block_length
        num_stored = (context - sink - window) // block * block
        num_recent = context - sink - num_stored
        probe = torch.zeros(batch, heads, 1, head_dim, device=device, dtype=dtype)
        layer.lazy_initialization(probe, probe)
        layer.sink_keys.normal_()
        layer.sink_values.normal_()
        # the window buffer as a decode step finds it (the layer grows it with the tokens it holds)
        layer.recent_keys = torch.randn(batch, heads, window + block, head_dim, device=device, dtype=dtype)
        layer.recent_values = torch.randn_like(layer.recent_keys)
        capacity = num_stored + (-(-room // block) + 1) * block
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


class Decoder:
    """Greedy decode steps of ``model`` over one filled cache; ``round`` times ``steps`` of them."""

    def __init__(self, model, cache, attention: str, batch: int):
        self.model, self.cache, self.attention = model, cache, attention
        self.tokens = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def round(self, steps: int) -> dict:
        """Seconds for ``steps`` steps, host seconds spent issuing them, bytes allocated on top of the start."""
        self.model.set_attn_implementation(self.attention)
        cuda = self.model.device.type == "cuda"
        self._sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        host = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            issued = time.perf_counter()
            logits = forward_with_cache(self.model, self.cache, self.tokens, logits_to_keep=1).logits
            self.tokens = logits[:, -1].argmax(-1, keepdim=True)
            host += time.perf_counter() - issued
        self._sync()
        seconds = time.perf_counter() - start
        transient = torch.cuda.max_memory_allocated() - before if cuda else 0
        return dict(seconds=seconds, host_seconds=host, transient=transient)


def speedup(row: dict, full: dict) -> float:
    """tokens/s over the full cache's: the median of the per-round ratios when both took turns (each
    round's pair ran back to back, so host drift cancels), else the ratio of the medians."""
    if row["rounds"] == full["rounds"] > 1:
        ratios = sorted(a / b for a, b in zip(row["round_tokens_per_s"], full["round_tokens_per_s"]))
        return ratios[len(ratios) // 2]
    return row["tokens_per_s"] / full["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=64, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per cache; the median counts")
    parser.add_argument("--reference-steps", type=int, default=6, help="steps of the slow reference row")
    parser.add_argument("--extra", action="append", default=[], metavar="SPEC",
                        help="another selkv spec to run with the fused kernel (repeatable)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (a smoke test of this script)")
    parser.add_argument("--out", default="decode_e2e.json")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.reference_steps < 1:
        parser.error("--steps, --rounds and --reference-steps must be at least 1")

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
    ] + [(f"{spec} (fused)", spec, "selkv") for spec in args.extra]
    notes = []
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        notes.append("hf-quanto:bits=4 skipped: a prefilled 32k QuantizedCache cannot be filled directly")
    else:
        notes.append("hf-quanto:bits=4 not run: optimum-quanto is not installed on this machine")
    def start(spec: str, attention: str) -> Decoder:
        model.set_attn_implementation(attention)
        cache = make_cache(spec, model.config)
        if spec == "full":
            fill_full(cache, model.config, args.batch, args.context, device, dtype)
        else:
            room = 2 + args.rounds * max(args.steps, args.reference_steps)
            fill_selective(cache, model.config, args.batch, args.context, device, dtype, room)
        if spec != "full":
            assert all(layer.fused_decode == (attention == "selkv") for layer in cache.layers)
        decoder = Decoder(model, cache, attention, args.batch)
        decoder.round(2)  # warm-up: compiles the kernels
        return decoder

    def row(name: str, spec: str, attention: str, steps: int, timings: list[dict], cache) -> dict:
        median = sorted(timings, key=lambda t: -t["seconds"])[len(timings) // 2]  # by tokens/s, as speedup()
        counted = kv_bytes(cache)
        per_sequence = counted["total"] / args.batch
        transient = max(t["transient"] for t in timings)
        fits = math.floor((total_memory - weights) / (per_sequence + transient / args.batch)) if device == "cuda" else 0
        result = dict(
            name=name, spec=spec, attention=attention, steps=steps, rounds=len(timings), seconds=median["seconds"],
            tokens_per_s=args.batch * steps / median["seconds"], ms_per_step=1000 * median["seconds"] / steps,
            host_ms_per_step=1000 * median["host_seconds"] / steps,
            round_tokens_per_s=[args.batch * steps / t["seconds"] for t in timings],
            peak_gib=(weights + counted["allocated"] + transient) / 2**30, kv_gib=counted["total"] / 2**30,
            kv_allocated_gib=counted["allocated"] / 2**30, kv_bytes_per_sequence=per_sequence, max_batch_computed=fits,
        )
        print(f"{name}: {result['tokens_per_s']:.1f} tokens/s (rounds: "
              f"{', '.join(f'{t:.1f}' for t in result['round_tokens_per_s'])}), {result['ms_per_step']:.1f} ms/step, "
              f"host {result['host_ms_per_step']:.1f} ms/step, peak {result['peak_gib']:.1f} GiB", flush=True)
        return result

    # The fused rows and the full cache take turns, one round each, so that a slow stretch of the
    # host (whose speed bounds these steps) falls on all of them alike.
    interleaved = [run for run in runs if "reference" not in run[0]]
    decoders = [start(spec, attention) for _, spec, attention in tqdm(interleaved, desc="filling caches")]
    timings = [[] for _ in interleaved]
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for decoder, times in zip(decoders, timings):
            times.append(decoder.round(args.steps))
    rows = [row(*run, args.steps, times, decoder.cache) for run, times, decoder in zip(interleaved, timings, decoders)]
    del decoders, decoder
    torch.cuda.empty_cache() if device == "cuda" else None
    for name, spec, attention in runs:
        if "reference" in name:  # dequantize + SDPA: slow, run alone for a few steps
            decoder = start(spec, attention)
            rows.append(row(name, spec, attention, args.reference_steps, [decoder.round(args.reference_steps)],
                            decoder.cache))
            del decoder
            torch.cuda.empty_cache() if device == "cuda" else None

    full = rows[0]
    for row in rows:
        row["speedup_vs_full"] = speedup(row, full)
        row["batch_ratio_vs_full"] = row["max_batch_computed"] / full["max_batch_computed"] if full["max_batch_computed"] else 0
    import transformers

    result = dict(
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__, transformers=transformers.__version__,
        command="PYTHONPATH=src python " + " ".join(sys.argv), batch=args.batch, context=args.context,
        weights_gib=weights / 2**30, total_memory_gib=total_memory / 2**30, rows=rows, notes=notes,
        method="caches filled directly with random data (no prefill); greedy steps through model(), "
        "median of timed rounds; "
        "max batch computed from measured KV bytes per sequence + measured decode transients; "
        "rows take turns round by round; vs full = median of per-round ratios",
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['gpu']}, batch {args.batch} x {args.context} context, weights {weights / 2**30:.1f} GiB\n")
    print("| cache | attention | tokens/s | vs full | ms/step | host ms/step | peak GiB | KV GiB | "
          "max batch (computed) | vs full |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['spec']} | {r['attention']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_full']:.2f}x | "
              f"{r['ms_per_step']:.1f} | {r['host_ms_per_step']:.1f} | "
              f"{r['peak_gib']:.1f} | {r['kv_gib']:.1f} | {r['max_batch_computed']} | {r['batch_ratio_vs_full']:.2f}x |")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
