"""End-to-end decode speed and memory of a Llama-3-8B-shaped model with random bf16 weights.

    PYTHONPATH=src python benchmarks/decode_e2e.py [--shapes 8x32768,1x131072,32x8192] [--rows ...]
        [--max-batch full,int8,int4] [--quick] [--out decode_e2e.json]

Every speed claim is measured against the strongest full-cache path a transformers user can pick
today: ``StaticCache`` + ``attn_implementation="flex_attention"`` with the decode step under
``torch.compile(mode="reduce-overhead")`` (row ``static-flex``). It cannot use ``fullgraph``:
dynamo does not trace the ``warnings.warn`` inside ``create_block_mask``, so the mask is built
between two captured graphs (the graph breaks are listed in the results). Rows (``--rows``):

- ``static-flex``: ``StaticCache`` + flex_attention + compile: the baseline of every "vs" column;
- ``static-sdpa``: ``StaticCache`` + sdpa + compile (sdpa gets a mask from a static cache, so
  transformers expands K/V per query head before it);
- ``dynamic``: ``DynamicCache`` + sdpa, eager (what ``generate()`` does by default);
- ``int8`` / ``int4``: selkv's dynamic cache + ``attn_implementation="selkv"``, eager;
- ``int8-captured`` / ``int4-captured`` / ``int2-captured``: selkv's static cache, the decode step
  captured (``selkv.compile_decode_step``);
- ``int8-captured-every`` / ...: the same with the window's oldest block quantized at every step
  (``compile_decode_step(plan_commits=False)``, the step before commits were planned on the host);
- ``int8-reference``: selkv int8 + sdpa (dequantize the middle every step), run alone, few steps;
- ``--extra SPEC``: more selkv specs, eager with the fused kernel.

Caches are filled directly with random data (a 32k prefill at batch 8 measures nothing about
decode). All rows of a shape are filled first and take turns, one round of ``--steps`` greedy steps
each, ``--rounds`` times (the host's speed bounds the eager steps and drifts; taking turns spreads a
slow stretch over every row). When the rows do not fit in device memory together, they run in
groups, one after the other; the baseline stays and takes part in every group, so every row's
"vs" ratio is the median of its per-round ratios to the baseline round run next to it. The full
and the captured caches are set back to the context length before each round (each round decodes
the same positions, evictions included); the eager selkv caches keep growing by ``--steps`` per round.

Per row: tokens/s (batch x steps / seconds of the median round), ms/step, host ms/step (the time
Python took to issue a step: near ms/step means the step waits on the host), GPU ms/step (CUDA
events around ``--gpu-steps`` steps queued behind a sleeping kernel, so the GPU never waits for
the host; where a step synchronizes with the device, so the queueing cannot run ahead, the summed
kernel time from ``torch.profiler`` instead, marked ``*``), the byte floor (weights read + KV bytes
held for the context, over the device-to-device copy bandwidth measured at the start of the run,
read + write bytes), the % of that floor reached, and the peak device memory of the row alone
(``torch.cuda.max_memory_allocated`` around its fill, warm-up and rounds, minus what the other rows
held: weights + its own cache + its transients). Weights read exclude the embedding table (a lookup
reads ``batch`` rows of it).

``--max-batch`` measures the largest batch that runs one decode step at ``--max-batch-context``
without running out of device memory: real caches, really filled, one real step, a search
starting from the estimate (memory left after the weights over one sequence's allocated cache bytes),
all memory freed between probes, stopped after ``--max-batch-budget-s`` seconds per path (then the
bounds found so far are reported). The steps are compiled without CUDA graphs (a capture that runs
out of memory leaves the graph tree unusable): the full cache's ``static-flex`` step with a dynamic
batch dimension (one compile for every probe; one compile per probe where that fails); selkv's
static cache (the one its captured step holds) with its eager fused step, since a captured step
would compile again for every batch probed. At each path's largest batch the same step then decodes
``--throughput-steps`` greedy steps per round, ``--rounds`` rounds after a warm-up: the tokens/s a
server gets from the card at that path's memory limit (``throughput`` in the results).

``--quick``: the first shape, 16 steps, no reference row, no max-batch search. ``--shapes none``:
only the max-batch search. ``--layers N`` and ``--hold-gib G`` try the script on fewer layers and
a "smaller card".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import selkv  # noqa: E402,F401  (registers attn_implementation="selkv")
from selkv import kv_bytes, make_cache  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from e2e_model import (  # noqa: E402
    GIB,
    LLAMA3_8B,
    SPECS,
    TINY,
    Unavailable,
    build_model,
    captured_selkv,
    compile_step,
    decode_step,
    fill_full,
    fill_selective,
    fill_static,
    full_kv_bytes,
    graph_breaks,
    rewind,
    rewinder,
    static_selkv,
)

DEFAULT_SHAPES = "8x32768,1x131072,32x8192"
# the headline comparison first: rows are packed into memory groups in this order
DEFAULT_ROWS = "static-flex,int8-captured,int4-captured,int2-captured,static-sdpa,dynamic,int8,int4"
BASELINES = ("static-flex", "static-sdpa", "dynamic")  # strongest first: the first that ran is the "vs" column


class Decoder:
    """Greedy decode steps over one filled cache; ``round`` times ``steps`` of them.

    ``step(tokens, cache, position)`` returns logits ``[batch, vocab]``; ``first`` ``[batch, 1]`` are the tokens
    of the first step. ``rewind()`` (or None) sets the cache back to where it started before each round, so that
    every round decodes the same positions: from ``position`` (default: the cache's length at the start) on.
    ``restart``: every round starts from ``first`` too (else from the tokens the last round ended on).
    ``captured`` steps begin a new CUDA-graph step each call. ``model`` and ``attention``: the rows that share one
    model set its attention implementation before each round (None: as it is).
    """

    def __init__(
        self,
        step,
        cache,
        first: torch.Tensor,
        *,
        rewind=None,
        restart: bool = False,
        position: int | None = None,
        captured: bool = False,
        model=None,
        attention: str | None = None,
    ):
        self.step, self.cache, self.first, self.tokens = step, cache, first, first
        self.rewind, self.restart, self.captured = rewind, restart, captured
        self.model, self.attention = model, attention
        self.start_position = int(cache.get_seq_length()) if position is None else position
        self.position = torch.zeros(1, dtype=torch.long, device=first.device)
        self.cuda = first.is_cuda
        self._start_round()

    def _start_round(self) -> None:
        if self.rewind is not None:
            self.rewind()
            self.position.fill_(self.start_position)
        else:
            self.position.fill_(int(self.cache.get_seq_length()))
        if self.restart:
            self.tokens = self.first

    def _set_attention(self) -> None:
        if self.attention is not None:
            self.model.set_attn_implementation(self.attention)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _one_step(self) -> None:
        if self.captured:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.step(self.tokens, self.cache, self.position)
        self.tokens = logits.argmax(-1, keepdim=True)
        self.position.add_(1)

    @torch.no_grad()
    def round(self, steps: int) -> dict:
        """Seconds for ``steps`` steps, host seconds spent issuing them, bytes allocated on top of the start."""
        self._set_attention()
        self._start_round()
        self._sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if self.cuda else 0
        host = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            issued = time.perf_counter()
            self._one_step()
            host += time.perf_counter() - issued
        self._sync()
        seconds = time.perf_counter() - start
        transient = torch.cuda.max_memory_allocated() - before if self.cuda else 0
        return dict(seconds=seconds, host_seconds=host, transient=transient)

    @torch.no_grad()
    def gpu_ms(self, steps: int, host_ms: float, cycles_per_ms: float) -> tuple[float, str]:
        """Device ms per step, and how it was measured.

        ``events``: CUDA events around ``steps`` steps queued behind a sleeping kernel (events around steps
        issued one after the other time the host too when the host is the bound). When the host had not
        queued every step before the sleep ended (a step that synchronizes with the device),
        ``profiler``: the summed device time of the kernels the profiler saw, over the same steps.
        """
        self._set_attention()
        self._start_round()
        self._sync()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(cycles_per_ms * (2 * host_ms * steps + 50)))
        begin.record()
        for _ in range(steps):
            self._one_step()
        end.record()
        clean = not begin.query()  # still asleep when the last step was queued
        self._sync()
        if clean:
            return begin.elapsed_time(end) / steps, "events"
        self._start_round()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            for _ in range(steps):
                self._one_step()
            self._sync()
        device_us = sum(getattr(e, "self_device_time_total", 0) for e in profile.key_averages())
        return device_us / 1000 / steps, "profiler"


def sleep_cycles_per_ms() -> float:
    """Clock cycles of ``torch.cuda._sleep`` per millisecond on this device."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    torch.cuda._sleep(cycles)  # warm-up
    begin.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / begin.elapsed_time(end)


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of 10 copies of 2 GiB."""
    size = 2 * GIB if device == "cuda" else 64 * 2**20
    source = torch.randint(0, 255, (size,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for i in range(12):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            target.copy_(source)
            end.record()
            torch.cuda.synchronize()
            seconds = begin.elapsed_time(end) / 1000
        else:
            start = time.perf_counter()
            target.copy_(source)
            seconds = time.perf_counter() - start
        if i >= 2:
            times.append(seconds)
    del source, target
    return 2 * size / sorted(times)[len(times) // 2]


def weights_read(model) -> int:
    """Bytes of the weights one decode step reads: all of them but the embedding table (a lookup reads ``batch``
    rows)."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding or tied)


def free_bytes() -> int:
    """Device memory a new allocation can still take (free + held by the caching allocator but unused)."""
    return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclasses.dataclass
class RowKind:
    key: str
    name: str
    kind: str  # "static", "dynamic", "selkv", "captured", "reference"
    attention: str
    spec: str = "full"
    plan_commits: bool = True  # captured rows: the host plans which steps commit a block

    @property
    def compiled(self) -> bool:
        return self.kind in ("static", "captured")

    def estimate_bytes(self, config, batch: int, context: int) -> int:
        """Rough device bytes of this row's cache (for packing rows into groups that fit)."""
        full = full_kv_bytes(config, batch, context)
        if self.kind in ("static", "dynamic"):
            return full
        bits = int(self.spec.split("bits=")[1].split(",")[0]) if "bits=" in self.spec else 16
        return int(full * (bits + 1.5) / 16)


def catalog(extra: list[str]) -> dict[str, RowKind]:
    rows = [
        RowKind("static-flex", "StaticCache + flex_attention + compile", "static", "flex_attention"),
        RowKind("static-sdpa", "StaticCache + sdpa + compile", "static", "sdpa"),
        RowKind("dynamic", "DynamicCache + sdpa, eager", "dynamic", "sdpa"),
    ]
    for bits in SPECS:
        rows.append(RowKind(f"int{bits}", f"selkv int{bits}, eager (fused kernel)", "selkv", "selkv", SPECS[bits]))
        rows.append(RowKind(f"int{bits}-captured", f"selkv int{bits}, captured", "captured", "selkv", SPECS[bits]))
        name = f"selkv int{bits}, captured, window block quantized every step"
        rows.append(RowKind(f"int{bits}-captured-every", name, "captured", "selkv", SPECS[bits], plan_commits=False))
    rows.append(RowKind("int8-reference", "selkv int8 + sdpa (dequantize every step)", "reference", "sdpa", SPECS[8]))
    rows += [RowKind(spec, f"{spec}, eager (fused kernel)", "selkv", "selkv", spec) for spec in extra]
    return {row.key: row for row in rows}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            batch, context = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {item!r} is not BATCHxCONTEXT (e.g. 8x32768)") from None
        if batch < 1 or context < 1:
            raise ValueError(f"shape {item!r}: batch and context must be at least 1")
        shapes.append((batch, context))
    return shapes


def speedup(row: dict, base: dict) -> float:
    """tokens/s over the baseline's: the median of the ratios of rounds run next to each other (same round id:
    each pair ran back to back, so host drift cancels), else the ratio of the medians."""
    ids = row.get("round_ids") or list(range(len(row["round_tokens_per_s"])))
    base_ids = base.get("round_ids") or list(range(len(base["round_tokens_per_s"])))
    paired = dict(zip(base_ids, base["round_tokens_per_s"], strict=True))
    if row["rounds"] > 1 and all(i in paired for i in ids):
        ratios = sorted(t / paired[i] for i, t in zip(ids, row["round_tokens_per_s"], strict=True))
        return ratios[len(ratios) // 2]
    return row["tokens_per_s"] / base["tokens_per_s"]


def search_max_batch(fits, guess: int, out_of_time) -> dict:
    """The largest batch ``fits(batch)`` accepts, searched from ``guess``: step outwards (doubling the step)
    until both sides are found, then bisect. ``out_of_time()`` stops early; the bounds found so far come back.

    Returns ``max_batch`` (the largest batch seen to fit, 0 if none), ``fails_at`` (smallest seen to fail, or
    None), ``exact`` (they are adjacent) and ``probes`` (``[batch, fits]`` in order).
    """
    probes, lo, hi = [], 0, None
    batch, step = max(1, guess), 1
    while not (hi is not None and hi == lo + 1) and not out_of_time():
        ok = fits(batch)
        probes.append([batch, ok])
        if ok:
            lo = max(lo, batch)
        else:
            hi = batch if hi is None else min(hi, batch)
        if hi is None:  # no failure yet: look higher
            batch, step = lo + step, step * 2
        elif lo == 0 and hi > 1:  # no success yet: look lower
            batch, step = max(1, hi - step), step * 2
        elif hi == 1:
            break
        else:
            batch = (lo + hi) // 2
    return dict(max_batch=lo, fails_at=hi, exact=hi is not None and hi == lo + 1, probes=probes)


def failure(error: BaseException) -> str:
    """One line for a row that failed (the traceback goes to stderr, for whoever reads the log)."""
    traceback.print_exception(error, file=sys.stderr)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"failed: {type(error).__name__}: {first}"[:300]


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower()


@dataclasses.dataclass
class ShapeRun:
    """What the run of one shape gathers: each row's results (``new_result``), the rows skipped and why, notes,
    and the ``StaticCache`` the static rows share (under ``shared["static"]``)."""

    batch: int
    context: int
    results: dict = dataclasses.field(default_factory=dict)
    skipped: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)
    shared: dict = dataclasses.field(default_factory=dict)


def new_result(info: dict) -> dict:
    """A row's results before its rounds: how it started (``Bench.start``), its round timings and their ids, its GPU
    ms/step and its cache's bytes (selkv rows)."""
    return dict(info=info, timings=[], ids=[], gpu=[], kv=None)


class Bench:
    """One process's runs: the model, the measured copy bandwidth and the rows' caches."""

    def __init__(self, args):
        self.args = args
        self.device = "cpu" if args.tiny else "cuda"
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        shape = dict(TINY if args.tiny else LLAMA3_8B)
        if args.layers:
            shape["num_hidden_layers"] = args.layers
        self.model = build_model(shape, self.device, self.dtype)
        self.config = self.model.config
        self.weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.weights_read = weights_read(self.model)
        self.bandwidth = copy_bandwidth(self.device)
        self.cycles_per_ms = sleep_cycles_per_ms() if self.device == "cuda" else 0.0
        self.compile_ok = self.device == "cuda" or args.compile_on_cpu
        # memory held for the whole run, to try the grouping and the max-batch search on a "smaller card"
        self.ballast = (
            torch.empty(int(args.hold_gib * GIB), dtype=torch.uint8, device=self.device) if args.hold_gib else None
        )
        torch._dynamo.config.cache_size_limit = 64  # every row and shape is one more specialization of the step
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 64

    # -- building rows ---------------------------------------------------------------------------------------
    def room(self) -> int:
        """Positions a cache needs past the context: warm-up, every round, the GPU-timing steps."""
        a = self.args
        return 4 + a.rounds * max(a.steps, a.reference_steps) + a.gpu_steps + 2

    def check_runnable(self, row: RowKind) -> None:
        if row.attention == "flex_attention" and self.device != "cuda":
            raise Unavailable("needs CUDA (flex_attention does not compile for this model on CPU)")
        if row.compiled and not self.compile_ok:
            raise Unavailable("needs CUDA (reduce-overhead captures CUDA graphs; --compile-on-cpu compiles on CPU)")

    def make_decoder(self, row: RowKind, batch: int, context: int, shared: dict) -> Decoder:
        """Build and fill ``row``'s cache and return its Decoder (not warmed up yet)."""
        model, config, device, dtype = self.model, self.config, self.device, self.dtype
        model.set_attn_implementation(row.attention)
        if row.kind == "static":
            from transformers import StaticCache

            cache = shared.get("static")
            if cache is None:  # the static rows share one cache (they are the same storage, read two ways)
                cache = StaticCache(config=config, max_cache_len=context + self.room())
                fill_static(cache, config, batch, context, device, dtype)
                shared["static"] = cache
            step = compile_step(model, "reduce-overhead" if device == "cuda" else None, False)
            return self._decoder(
                row, step, cache, batch, rewind=lambda: rewind(cache, context), captured=device == "cuda"
            )
        if row.kind == "captured":
            cache, step, rewind_lengths = captured_selkv(
                model, row.spec, batch, context, self.room(), device, dtype, plan_commits=row.plan_commits
            )
            return self._decoder(row, step, cache, batch, rewind=rewind_lengths, captured=device == "cuda")
        cache = make_cache(row.spec, config)
        if row.kind == "dynamic":
            fill_full(cache, config, batch, context, device, dtype)
            return self._decoder(row, decode_step(model), cache, batch, rewind=lambda: rewind(cache, context))
        fill_selective(cache, config, batch, context, device, dtype, self.room())
        assert all(layer.fused_decode == (row.attention == "selkv") for layer in cache.layers)
        return self._decoder(row, decode_step(model), cache, batch)

    def _decoder(self, row: RowKind, step, cache, batch: int, **options) -> Decoder:
        """``row``'s Decoder over its filled ``cache``, from random first tokens."""
        first = torch.randint(0, self.config.vocab_size, (batch, 1), device=self.device)
        return Decoder(step, cache, first, model=self.model, attention=row.attention, **options)

    def start(self, row: RowKind, batch: int, context: int, shared: dict) -> tuple[Decoder, dict]:
        """A filled, warmed-up Decoder and what its start cost: seconds, compile seconds, graph breaks, own bytes."""
        cuda = self.device == "cuda"
        base = torch.cuda.memory_allocated() if cuda else 0
        shared_before = shared.get("static")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        breaks = graph_breaks()
        started = time.perf_counter()
        decoder = self.make_decoder(row, batch, context, shared)
        filled = time.perf_counter()
        first = decoder.round(1)  # compiles
        decoder.round(2)  # CUDA-graph rows record on the second call and replay from the third
        info = dict(fill_s=filled - started, first_step_s=first["seconds"])
        new_breaks = {k: v - breaks.get(k, 0) for k, v in graph_breaks().items() if v != breaks.get(k, 0)}
        info["graph_breaks"] = new_breaks
        reused = 0  # a cache another row filled counts for this row too
        if shared_before is not None and decoder.cache is shared_before:
            reused = sum(
                t.numel() * t.element_size() for layer in decoder.cache.layers for t in (layer.keys, layer.values)
            )
        info["held_bytes"] = (torch.cuda.memory_allocated() - base + reused) if cuda else 0
        info["start_peak_bytes"] = (torch.cuda.max_memory_allocated() - base + reused) if cuda else 0
        print(
            f"{batch}x{context} {row.key}: filled in {info['fill_s']:.0f} s, first step {info['first_step_s']:.0f} s, "
            f"ready after {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        return decoder, info

    # -- one shape -------------------------------------------------------------------------------------------
    def run_shape(self, batch: int, context: int, rows: list[RowKind]) -> dict:
        """Every row of ``rows`` at ``batch`` x ``context``: rounds taken in turn, in groups that fit in memory."""
        run = ShapeRun(batch, context)
        runnable = self._runnable(rows, run)
        baseline, base_decoder = self._start_baseline(runnable, run)
        pending = [
            row for row in runnable if row is not baseline and row.key not in run.skipped and row.kind != "reference"
        ]
        group = 0
        while pending or group == 0:
            members = [(baseline, base_decoder)] if baseline is not None else []
            self._pack_group(pending, members, run)
            if group > 0 and len(members) == 1 and baseline is not None:
                members = None  # every row left was skipped: the baseline has had its rounds
                break
            self._run_group(members, group, run)
            if baseline is None or baseline.kind != "static":
                run.shared.pop("static", None)
            members = None  # frees every cache but the baseline's
            release()
            group += 1
        base_decoder = None
        run.shared.clear()
        release()
        self._run_references(runnable, run)
        return self._shape_result(rows, baseline, group, run)

    def _runnable(self, rows: list[RowKind], run: ShapeRun) -> list[RowKind]:
        """The rows this machine can run; the others are skipped, with the reason."""
        runnable = []
        for row in rows:
            try:
                self.check_runnable(row)
                runnable.append(row)
            except Unavailable as why:
                run.skipped[row.key] = str(why)
        return runnable

    def _start_baseline(self, runnable: list[RowKind], run: ShapeRun) -> tuple[RowKind | None, Decoder | None]:
        """The strongest full path of ``runnable`` (``BASELINES`` order) that starts, and its Decoder; the stronger
        ones that failed to start are skipped. ``(None, None)`` when none starts."""
        for candidate in [row for key in BASELINES for row in runnable if row.key == key]:
            try:
                decoder, info = self.start(candidate, run.batch, run.context, run.shared)
            except Exception as error:  # the next strongest full path becomes the baseline
                run.skipped[candidate.key] = failure(error)
                run.shared.clear()
                release()
                continue
            run.results[candidate.key] = new_result(info)
            return candidate, decoder
        return None, None

    def _room_for(self, row: RowKind, run: ShapeRun) -> bool:
        """Whether ``row``'s cache (estimated; the shared static cache counts once) fits in the device memory left
        with ``--reserve-gib`` to spare. Always on CPU (the rows there are tiny)."""
        if self.device != "cuda":
            return True
        shared = row.kind == "static" and "static" in run.shared
        need = 0 if shared else row.estimate_bytes(self.config, run.batch, run.context)
        return need + self.args.reserve_gib * GIB <= free_bytes()

    def _pack_group(self, pending: list[RowKind], members: list, run: ShapeRun) -> None:
        """Start rows from the front of ``pending`` and add them to ``members`` (which holds the baseline, if any)
        while they fit: a row that does not fit next to the others stays pending for the next group; a row that
        cannot start, or runs out of memory next to the baseline alone, is skipped."""
        first = len(members)
        while pending:
            row = pending[0]
            alone = len(members) == first
            if not alone and not self._room_for(row, run):
                break  # the next group takes it
            try:
                decoder, info = self.start(row, run.batch, run.context, run.shared)
            except Unavailable as why:
                run.skipped[pending.pop(0).key] = str(why)
                continue
            except Exception as error:  # out of memory: a group of its own, or skipped if alone already
                release()
                if not is_out_of_memory(error):
                    run.skipped[pending.pop(0).key] = failure(error)
                    continue
                if alone:
                    run.skipped[pending.pop(0).key] = "out of memory next to the baseline alone"
                    continue
                run.notes.append(f"{row.key}: out of memory next to {[m[0].key for m in members]}: next group")
                break
            pending.pop(0)
            run.results[row.key] = new_result(info)
            members.append((row, decoder))

    def _run_group(self, members: list, group: int, run: ShapeRun) -> None:
        """``--rounds`` rounds of ``--steps`` steps, the members taking turns; then each member's GPU ms/step (on
        CUDA, once per row) and the bytes of its cache (selkv rows)."""
        args, cuda = self.args, self.device == "cuda"
        desc = f"{run.batch}x{run.context} group {group}"
        for r in tqdm(range(args.rounds), desc=desc, disable=not args.progress):
            for row, decoder in members:
                run.results[row.key]["timings"].append(decoder.round(args.steps))
                run.results[row.key]["ids"].append(f"{group}.{r}")
        for row, decoder in members:
            result = run.results[row.key]
            if cuda and not result["gpu"]:
                host_ms = 1000 * max(t["host_seconds"] for t in result["timings"]) / args.steps
                result["gpu"].append(decoder.gpu_ms(args.gpu_steps, host_ms, self.cycles_per_ms))
            if row.kind not in ("static", "dynamic"):
                result["kv"] = kv_bytes(decoder.cache)

    def _run_references(self, runnable: list[RowKind], run: ShapeRun) -> None:
        """The slow reference rows: each alone (every other cache freed), one round of ``--reference-steps``."""
        for row in runnable:
            if row.kind != "reference":
                continue
            try:
                decoder, info = self.start(row, run.batch, run.context, run.shared)
            except Exception as error:
                run.skipped[row.key] = failure(error)
                release()
                continue
            timing = decoder.round(self.args.reference_steps)
            run.results[row.key] = dict(info=info, timings=[timing], ids=["alone"], gpu=[], kv=kv_bytes(decoder.cache))
            decoder = None
            release()

    def _shape_result(self, rows: list[RowKind], baseline: RowKind | None, groups: int, run: ShapeRun) -> dict:
        """The shape's entry in the results: one summary per row that ran (in ``rows`` order), each with its
        tokens/s over the baseline's."""
        batch, context = run.batch, run.context
        table = [self.summarize(row, run.results[row.key], batch, context) for row in rows if row.key in run.results]
        base_row = next((r for r in table if baseline is not None and r["key"] == baseline.key), None)
        for r in table:
            r["vs_baseline"] = speedup(r, base_row) if base_row else None
        return dict(
            batch=batch,
            context=context,
            baseline=baseline.key if baseline else None,
            baseline_name=baseline.name if baseline else None,
            rows=table,
            groups=groups,
            skipped=run.skipped,
            notes=run.notes,
        )

    def summarize(self, row: RowKind, result: dict, batch: int, context: int) -> dict:
        timings = result["timings"]
        steps = self.args.reference_steps if row.kind == "reference" else self.args.steps
        median = sorted(timings, key=lambda t: -t["seconds"])[len(timings) // 2]  # by tokens/s, as speedup()
        counted = result.get("kv")
        if counted is None:  # full caches: 16-bit K/V of the context (what attention must read)
            kv_read = full_kv_bytes(self.config, batch, context)
            kv_held = full_kv_bytes(self.config, batch, context + self.room()) if row.kind == "static" else kv_read
        else:
            kv_read, kv_held = counted["total"], counted["allocated"]
        floor_ms = 1000 * (self.weights_read + kv_read) / self.bandwidth
        ms = 1000 * median["seconds"] / steps
        info = result["info"]
        transient = max(t["transient"] for t in timings)
        peak = self.weights + max(info["start_peak_bytes"], info["held_bytes"] + transient)
        gpu = sorted(result["gpu"])[len(result["gpu"]) // 2] if result["gpu"] else (None, None)
        return dict(
            key=row.key,
            name=row.name,
            spec=row.spec,
            attention=row.attention,
            compiled=row.compiled,
            batch=batch,
            context=context,
            steps=steps,
            rounds=len(timings),
            round_ids=result["ids"],
            seconds=median["seconds"],
            tokens_per_s=batch * steps / median["seconds"],
            ms_per_step=ms,
            host_ms_per_step=1000 * median["host_seconds"] / steps,
            gpu_ms_per_step=gpu[0],
            gpu_timing=gpu[1],
            round_tokens_per_s=[batch * steps / t["seconds"] for t in timings],
            kv_read_bytes=kv_read,
            weights_read_bytes=self.weights_read,
            floor_ms=floor_ms,
            floor_pct=100 * floor_ms / ms,
            peak_gib=peak / GIB if self.device == "cuda" else None,
            kv_gib=kv_read / GIB,
            kv_allocated_gib=kv_held / GIB if kv_held is not None else None,
            fill_s=info["fill_s"],
            first_step_s=info["first_step_s"],
            graph_breaks=info["graph_breaks"],
        )

    # -- largest batch ---------------------------------------------------------------------------------------
    def max_batch(self, paths: list[str], context: int, budget_s: float) -> dict:
        """The measured largest batch per path (``full``, ``int8``, ``int4``, ``int2``) at ``context``."""
        out = {}
        if self.device != "cuda":
            return {path: dict(skipped="needs CUDA (probes run out of device memory on purpose)") for path in paths}
        for path in paths:
            release()
            started = time.perf_counter()
            try:
                notes: list[str] = []
                fits, per_sequence, how, measure = self._probe(path, context, notes)
            except Unavailable as why:
                out[path] = dict(skipped=str(why))
                continue
            guess = max(1, int((free_bytes() - 2 * GIB) // per_sequence))
            try:
                found = search_max_batch(fits, guess, lambda since=started: time.perf_counter() - since > budget_s)
            except Exception as error:  # a probe failed for another reason than memory: say so, go on
                out[path] = dict(error=failure(error))
                print(f"max batch at {context}: {path}: probe failed: {out[path]['error']}", flush=True)
                release()
                continue
            found.update(
                context=context,
                how=how,
                estimate=guess,
                seconds=time.perf_counter() - started,
                cache_bytes_per_sequence=per_sequence,
                notes=notes,
            )
            out[path] = found
            print(
                f"max batch at {context}: {path}: {found['max_batch']} (fails at {found['fails_at']}, "
                f"probes {found['probes']}, {found['seconds']:.0f} s; {how})",
                flush=True,
            )
            release()
            if found["max_batch"] and self.args.throughput_steps:
                try:
                    found["throughput"] = measure(found["max_batch"], self.args.throughput_steps, self.args.rounds)
                    print(
                        f"  throughput at batch {found['max_batch']}: "
                        f"{found['throughput']['tokens_per_s']:.0f} tokens/s",
                        flush=True,
                    )
                except Exception as error:
                    found["throughput"] = dict(error=failure(error))
                    print(f"  throughput at batch {found['max_batch']} not measured: {failure(error)}", flush=True)
                release()
        add_ratios_to_full(out)
        return out

    def _probe(self, path: str, context: int, notes: list[str]):
        """``fits(batch)`` for one path, the cache bytes of one sequence and how a probe runs."""
        model, config, device, dtype = self.model, self.config, self.device, self.dtype
        dynamic = {"batch": path == "full"}  # the full cache's step: one compile with a dynamic batch, if it works
        if path == "full":
            from transformers import StaticCache

            steps = {True: compile_step(model, None, None), False: compile_step(model, None, False)}
            how = (
                "StaticCache + flex_attention, compiled without CUDA graphs, batch dimension dynamic "
                "(unless the notes say)"
            )
            per_sequence = full_kv_bytes(config, 1, context + 8)

            def build(batch, room=8):
                model.set_attn_implementation("flex_attention")
                cache = StaticCache(config=config, max_cache_len=context + room)
                fill_static(cache, config, batch, context, device, dtype)
                if dynamic["batch"]:
                    for layer in cache.layers:
                        torch._dynamo.mark_dynamic(layer.keys, 0)
                        torch._dynamo.mark_dynamic(layer.values, 0)
                return cache, steps[dynamic["batch"]]
        else:
            spec = SPECS[int(path.removeprefix("int"))]
            # eager: a compiled step would compile again for every batch probed (minutes per probe); the
            # static cache it runs on is the one the captured step holds
            how = "selkv static cache, eager fused step"

            def build(batch, room=8):
                return static_selkv(model, spec, batch, context, room, device, dtype), decode_step(model)

            # the cache bytes of one sequence, as allocated, for the search's first guess
            cache = build(1)[0]
            per_sequence = kv_bytes(cache)["allocated"]
            del cache
            release()

        def attempt(batch: int) -> bool | None:
            """One probe: True (ran), False (out of memory), None (compile again without a dynamic batch)."""
            try:
                cache, step = build(batch)
                tokens = torch.randint(0, config.vocab_size, (batch, 1), device=device)
                if dynamic["batch"]:
                    torch._dynamo.mark_dynamic(tokens, 0)
                position = torch.full((1,), context, dtype=torch.long, device=device)
                with torch.no_grad():
                    step(tokens, cache, position).argmax(-1)
                torch.cuda.synchronize()
                return True
            except Exception as error:
                if is_out_of_memory(error):
                    return False
                if not dynamic["batch"]:
                    raise
                dynamic["batch"] = False
                notes.append(f"a dynamic batch did not compile ({failure(error)}); one compile per probe instead")
                return None

        def fits(batch: int) -> bool:
            ok = attempt(batch)  # its frame (the cache, the step's buffers) is gone once it returns
            release()
            if ok is None:
                ok = attempt(batch)
                release()
            return ok

        def measure(batch: int, steps: int, rounds: int) -> dict:
            """Decode tokens/s at ``batch`` on the probe's path, with room in the cache for a round's steps."""
            cache, step = build(batch, room=steps + 2)
            first = torch.randint(0, config.vocab_size, (batch, 1), device=device)
            if dynamic["batch"]:
                torch._dynamo.mark_dynamic(first, 0)
            return decode_rounds(step, cache, rewinder(cache, context), first, context, steps, rounds)

        return fits, per_sequence, how, measure


@torch.no_grad()
def decode_rounds(step, cache, rewind_cache, first, context: int, steps: int, rounds: int) -> dict:
    """Tokens/s of greedy decoding: ``rounds`` rounds of ``steps`` steps after a 2-step warm-up, median round.

    Every round starts from the same cache state (``rewind_cache()``) and the same tokens (``first``) and decodes
    positions ``context`` to ``context + steps - 1``, so ``cache`` needs room for ``steps`` tokens past ``context``.
    Each round is a ``Decoder.round``, the loop the rows of a shape are timed with.
    """
    decoder = Decoder(step, cache, first, rewind=rewind_cache, restart=True, position=context)
    decoder.round(2)  # warm-up (a compiled step may specialize once more on its first calls)
    times = sorted(decoder.round(steps)["seconds"] for _ in range(rounds))
    seconds = times[len(times) // 2]
    return dict(
        batch=first.shape[0],
        steps=steps,
        rounds=rounds,
        ms_per_step=1000 * seconds / steps,
        tokens_per_s=first.shape[0] * steps / seconds,
        round_seconds=times,
    )


def add_ratios_to_full(found: dict) -> None:
    """Per path of a max-batch result: ``vs_full`` (largest batch over full's) and ``throughput_vs_full``
    (tokens/s at its largest batch over full's at full's), where both sides were measured."""

    def value(result: dict, key: str) -> float | None:
        if key == "max_batch":
            return result.get("max_batch") or None
        return result.get("throughput", {}).get("tokens_per_s")

    for key, ratio in (("max_batch", "vs_full"), ("tokens_per_s", "throughput_vs_full")):
        full = value(found.get("full", {}), key)
        for result in found.values():
            mine = value(result, key)
            if full and mine:
                result[ratio] = mine / full


def print_table(shape: dict, bandwidth: float) -> None:
    base = shape["baseline_name"] or "none"
    print(
        f"\nbatch {shape['batch']} x {shape['context']} context; vs = tokens/s over {base} "
        f"(median of per-round ratios); floor at {bandwidth / 1e12:.2f} TB/s copy bandwidth\n"
    )
    print(
        f"| row | tokens/s | vs {shape['baseline'] or '-'} | ms/step | host ms/step | GPU ms/step | floor ms | "
        f"% of floor | peak GiB | KV GiB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in shape["rows"]:
        gpu = (
            "-"
            if r["gpu_ms_per_step"] is None
            else f"{r['gpu_ms_per_step']:.1f}" + ("" if r["gpu_timing"] == "events" else "*")
        )
        vs = "-" if r["vs_baseline"] is None else f"{r['vs_baseline']:.2f}x"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(
            f"| {r['name']} | {r['tokens_per_s']:.1f} | {vs} | {r['ms_per_step']:.2f} | {r['host_ms_per_step']:.2f} | "
            f"{gpu} | {r['floor_ms']:.2f} | {r['floor_pct']:.0f} % | {peak} | {r['kv_gib']:.2f} |"
        )
    if any(r["gpu_timing"] == "profiler" for r in shape["rows"]):
        print(
            "\n* summed kernel time from the profiler: the step synchronizes with the device, so events around "
            "queued steps would time the host too"
        )
    for key, why in shape["skipped"].items():
        print(f"skipped {key}: {why}")
    for r in shape["rows"]:
        if r["graph_breaks"]:
            print(f"graph breaks, {r['key']}: {r['graph_breaks']}")
    for note in shape["notes"]:
        print(f"note: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes",
        default=DEFAULT_SHAPES,
        help="BATCHxCONTEXT[,...] (default: %(default)s); 'none': only the max-batch search",
    )
    parser.add_argument(
        "--rows",
        default=DEFAULT_ROWS,
        help="rows to run, comma-separated (default: %(default)s); also int2, int8-reference",
    )
    parser.add_argument("--steps", type=int, default=64, help="decode steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per row; the median counts")
    parser.add_argument("--reference-steps", type=int, default=6, help="steps of the slow reference row")
    parser.add_argument("--gpu-steps", type=int, default=4, help="steps queued behind a sleep for GPU ms/step")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="SPEC",
        help="another selkv spec to run eager with the fused kernel (repeatable)",
    )
    parser.add_argument(
        "--max-batch",
        default="full,int8,int4,int2",
        help="paths whose largest batch is measured (full,int8,int4,int3,int2; 'none' to skip)",
    )
    parser.add_argument("--max-batch-context", type=int, default=32768)
    parser.add_argument("--max-batch-budget-s", type=float, default=120.0, help="seconds per path for the search")
    parser.add_argument(
        "--throughput-steps",
        type=int,
        default=16,
        help="decode steps per round timed at each path's largest batch (0: no throughput)",
    )
    parser.add_argument(
        "--reserve-gib", type=float, default=8.0, help="device memory kept free when packing rows into one group"
    )
    parser.add_argument(
        "--layers", type=int, default=0, help="decoder layers (default: the model's; fewer to try the script)"
    )
    parser.add_argument(
        "--hold-gib",
        type=float,
        default=0.0,
        help="device memory held for the whole run (to try grouping and max-batch on a smaller card)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one shape (the first), 16 steps, no reference row, no max-batch search"
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU (a smoke test of this script)")
    parser.add_argument("--compile-on-cpu", action="store_true", help="with --tiny: compile the static sdpa row too")
    parser.add_argument("--out", default="decode_e2e.json")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1 or args.reference_steps < 1 or args.gpu_steps < 1:
        parser.error("--steps, --rounds, --reference-steps and --gpu-steps must be at least 1")
    if args.throughput_steps < 0:
        parser.error("--throughput-steps must be 0 (no throughput) or more")
    try:
        shapes = [] if args.shapes == "none" else parse_shapes(args.shapes)
    except ValueError as error:
        parser.error(str(error))
    rows_known = catalog(args.extra)
    wanted = [key for key in args.rows.split(",") if key] + [spec for spec in args.extra if spec not in args.rows]
    unknown = [key for key in wanted if key not in rows_known]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(rows_known)}")
    paths = [] if args.max_batch in ("", "none") else args.max_batch.split(",")
    if any(p not in ("full", "int8", "int4", "int3", "int2") for p in paths):
        parser.error(f"--max-batch takes full, int8, int4, int3, int2 or none, not {args.max_batch!r}")
    if args.quick:
        shapes, args.steps, paths = shapes[:1], 16, []
        wanted = [key for key in wanted if rows_known[key].kind != "reference"]
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny for the CPU smoke test")
    args.progress = not os.environ.get("SELKV_NO_PROGRESS")

    bench = Bench(args)
    notes = []
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        notes.append("hf-quanto:bits=4 skipped: a prefilled 32k QuantizedCache cannot be filled directly")
    else:
        notes.append("hf-quanto:bits=4 not run: optimum-quanto is not installed on this machine")
    print(
        f"copy bandwidth {bench.bandwidth / 1e12:.3f} TB/s (read + write); weights {bench.weights / GIB:.2f} GiB, "
        f"read per step {bench.weights_read / GIB:.2f} GiB",
        flush=True,
    )
    import transformers

    result = dict(
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name() if bench.device == "cuda" else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        triton=_version("triton"),
        command="PYTHONPATH=src python " + " ".join(sys.argv),
        steps=args.steps,
        rounds=args.rounds,
        layers=bench.config.num_hidden_layers,
        hold_gib=args.hold_gib,
        copy_bandwidth_bytes_per_s=bench.bandwidth,
        weights_gib=bench.weights / GIB,
        weights_read_gib=bench.weights_read / GIB,
        total_memory_gib=torch.cuda.mem_get_info()[1] / GIB if bench.device == "cuda" else None,
        shapes=[],
        max_batch={},
        notes=notes,
        method="caches filled directly with random data (no prefill); greedy steps through model(); rows take "
        "turns round by round (in groups that fit in memory, the baseline in every group); tokens/s from the "
        "median round; vs = median of per-round ratios to the baseline; GPU ms = CUDA events around steps queued "
        "behind a sleeping kernel; floor = (weights read + KV bytes) / measured copy bandwidth; max batch = "
        "largest batch that ran one decode step at the context without running out of memory; throughput = "
        "tokens/s of the median round of greedy steps at that batch, through the same step",
    )

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for batch, context in shapes:
        shape = bench.run_shape(batch, context, [rows_known[key] for key in wanted])
        result["shapes"].append(shape)
        save()
        print_table(shape, bench.bandwidth)
        torch._dynamo.reset()  # the next shape compiles afresh (static shapes, as generate() compiles)
        release()
    if paths:
        result["max_batch"] = bench.max_batch(paths, args.max_batch_context, args.max_batch_budget_s)
        save()
        print(f"\nlargest batch that decodes at {args.max_batch_context} context (measured):")
        for path, found in result["max_batch"].items():
            if "skipped" in found or "error" in found:
                print(f"- {path}: not measured: {found.get('skipped') or found['error']}")
            else:
                exact = "" if found["exact"] else f" (search stopped; fails at {found['fails_at']})"
                ratio = f", {found['vs_full']:.2f}x full" if "vs_full" in found else ""
                speed = found.get("throughput", {}).get("tokens_per_s")
                speed = f"; {speed:.0f} tokens/s" if speed else ""
                speed += f" ({found['throughput_vs_full']:.2f}x full)" if "throughput_vs_full" in found else ""
                print(f"- {path}: {found['max_batch']}{exact}{ratio}{speed} ({found['how']})")
    for note in notes:
        print(f"note: {note}")


def _version(package: str) -> str | None:
    with contextlib.suppress(Exception):
        return importlib.import_module(package).__version__
    return None


if __name__ == "__main__":
    main()
