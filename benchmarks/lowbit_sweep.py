"""Fake-quantization sweep of low-bit key/value candidates (issue 23, step 1: sweep first, build second).

Each candidate runs at the point where selkv's quantized layer quantizes: tokens leaving the 16-bit window
(in whole blocks) are quantized once and read back, dequantized, by every later chunk. Here they are
quantized and dequantized at once and the float values are kept (fake quantization), so any quantizer can be
tried without codes, packing, a kernel or a spec. The library is not changed: :class:`FakeQuantLayer`
subclasses selkv's ``SelectiveLayer`` (sink, window and eviction exactly as ``quant`` specs do them).

Perplexity is selkv's chunked perplexity (``selkv eval perplexity --chunk 64``: each chunk of 64 tokens
reads the cache the earlier chunks left behind), in float32 on the CPU. Baselines (``full``, the library's
``quant:`` specs) run through ``make_cache`` itself.

Candidates are written ``key=value`` lists (see ``Candidate`` and ``--help``)::

    kbits=2,vbits=2                    int2 with rotated keys only, key blocks of 32 (= quant:bits=2,block=32,
                                       late_kbits=2,rotate=hadamard-signs,vrotate=none); today's quant:bits=2 is
                                       kbits=2,vbits=2,block=128,rotate=hadamard,vrotate=hadamard,
                                       layer_bits=<the last 3/4 of the layers>:3/2
    kbits=2,vbits=2,prerope=1          keys quantized before RoPE (un-rotated by their positions, re-rotated when read)
    kbits=2,vbits=2,outliers=0.01      1 % of each key block's elements kept in 16 bits (dense-and-sparse)
    kbits=3,vbits=3                    true 3-bit codes (8 codes in 3 bytes)
    kbits=2,vbits=2,retain=1           1 token per 32-token block kept 16-bit, chosen by the attention it received
    kbits=3,vbits=3,block=64,vrotate=hadamard-signs   values rotated too (the attention output rotated back)
    kbits=3,vbits=3,block=64,vsym=1,group=32          symmetric value groups (a scale, no zero) of 32 channels
    kbits=3,vbits=3,block=64,kclip=0.7                key ranges shrunk where that lowers the squared error
    kbits=3,vbits=3,block=64,layer_bits=0-1:4/4       layers 0 and 1 with 4-bit keys and values, the rest 3-bit
    kbits=3,vbits=3,block=64,levels=normal            non-uniform codes (a normal distribution's Lloyd-Max levels)

Bytes held are computed for a 4,096-token cache of the model as ``selkv size`` counts them (a bfloat16 model,
fed in chunks of 64): 16-bit sink and window buffers, middle store capacity (spare room included) times the
candidate's bytes per token (packed codes, float16 scales and zeros, outliers as a float16 value plus a uint16
index within the block, retained tokens as 16-bit keys and values plus a uint16 index; symmetric groups a
float16 scale only), counted layer by layer (``layer_bits``), and each rotation matrix once per cache.
:func:`held_bytes` reproduces ``selkv size`` for the library's specs (tested).

    PYTHONPATH=src python benchmarks/lowbit_sweep.py --out benchmarks/results/lowbit_sweep.json \
        --texts pg19:4096,wikitext2:2048,pg19-dragons-blood:4096 \
        --baseline full --baseline quant:bits=2,sink=4,window=124 \
        --cand kbits=2,vbits=2,prerope=1 ...
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from selkv import quant
from selkv.layers.base import SelectiveLayer

FP16_MAX = torch.finfo(torch.float16).max
LEVELS = ("uniform", "normal")


# --------------------------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """One fake-quantized middle store.

    ``kbits``/``vbits``: 2, 3, 4, 8, or 16 (not quantized). ``key_axis``: ``channel`` (groups of ``block``
    tokens per channel, KIVI) or ``token`` (groups of ``group`` channels). Values are grouped per token in
    ``group`` channels. ``rotate``: a ``quant.ROTATIONS`` rotation of the keys before they are quantized.
    ``prerope``: keys are un-rotated by their RoPE positions before everything else and rotated again when
    read (KVQuant's pre-RoPE keys). ``outliers``: the share of each key block's ``block x head_dim`` elements
    kept in 16 bits (the largest deviations from their channel's median in the block, excluded from the
    ranges; dense-and-sparse, KVQuant). ``retain``: tokens per block kept in ``retain_bits`` (16 or 8) for
    keys and values, those whose mean attention probability (per query that could see them, summed over the
    KV head's query heads) was highest while they were in the window. ``sink``/``window`` as in ``quant``.

    ``vrotate``: a ``quant.ROTATIONS`` rotation of the values before they are quantized; the attention output
    is rotated back (``o = (sum_j p_j v_j R) R^T``), so here the values are simply unrotated when read.
    ``ksym``/``vsym``: symmetric groups (the range ``[-m, m]`` of the group's largest magnitude, a float16
    scale and no zero; ``2**bits`` levels at half-integer steps, none at 0). ``kclip``/``vclip``: when not 0,
    each group's range is shrunk about its middle by the factor in ``1, 0.95, ..., kclip`` that gives the
    least squared error on the group (range clipping; codes and bytes unchanged). ``layer_bits``: layers
    quantized to other widths, ``+``-separated ``LAYERS:KBITS/VBITS`` items where ``LAYERS`` is ``i`` or
    ``i-j`` (inclusive), e.g. ``0-1:4/4+29:4/3``; every other layer uses ``kbits``/``vbits``. ``levels``:
    ``uniform`` codes, or ``normal``: the ``2**bits`` Lloyd-Max levels of a normal distribution, scaled so that
    the outer two fall on the group's range (denser in the middle; keys and values, same bytes; a kernel would
    read them from a table of 2**bits entries).
    """

    kbits: int = 2
    vbits: int = 2
    key_axis: str = "channel"
    block: int = 32
    group: int = 64
    rotate: str = "hadamard-signs"
    prerope: int = 0
    outliers: float = 0.0
    retain: int = 0
    retain_bits: int = 16
    vrotate: str = "none"
    ksym: int = 0
    vsym: int = 0
    kclip: float = 0.0
    vclip: float = 0.0
    layer_bits: str = ""
    levels: str = "uniform"
    sink: int = 4
    window: int = 124

    @classmethod
    def parse(cls, text: str) -> Candidate:
        kinds = {f.name: f.type for f in fields(cls)}
        values = {}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key not in kinds:
                raise SystemExit(f"unknown candidate field {key!r}; allowed: {', '.join(kinds)}")
            kind = kinds[key]
            values[key] = float(value) if kind == "float" else int(value) if kind == "int" else value
        cand = cls(**values)
        for bits in (cand.kbits, cand.vbits, *(b for widths in cand.layer_widths().values() for b in widths)):
            if bits not in (2, 3, 4, 8, 16):
                raise SystemExit(f"bit widths are 2, 3, 4, 8 or 16, got {bits}")
        if cand.retain_bits not in (8, 16):
            raise SystemExit("retain_bits is 8 or 16")
        for rotate in (cand.rotate, cand.vrotate):
            if rotate not in quant.ROTATIONS:
                raise SystemExit(f"rotations are {', '.join(quant.ROTATIONS)}, got {rotate!r}")
        if cand.levels not in LEVELS:
            raise SystemExit(f"levels is one of {', '.join(LEVELS)}, got {cand.levels!r}")
        for clip in (cand.kclip, cand.vclip):
            if clip and not 0 < clip <= 1:
                raise SystemExit(f"kclip/vclip is 0 (off) or the smallest range factor in (0, 1], got {clip}")
        return cand

    def layer_widths(self) -> dict[int, tuple[int, int]]:
        """``layer_bits`` as ``{layer: (kbits, vbits)}``."""
        widths = {}
        for item in filter(None, self.layer_bits.split("+")):
            try:
                layers, _, bits = item.partition(":")
                first, _, last = layers.partition("-")
                kbits, vbits = (int(b) for b in bits.split("/"))
                for layer in range(int(first), int(last or first) + 1):
                    widths[layer] = (kbits, vbits)
            except ValueError:
                raise SystemExit(f"layer_bits items are LAYERS:KBITS/VBITS (LAYERS i or i-j), got {item!r}") from None
        return widths

    def for_layer(self, layer_idx: int) -> Candidate:
        """The candidate as layer ``layer_idx`` applies it (its ``layer_bits`` widths, if any)."""
        widths = self.layer_widths().get(layer_idx)
        return self if widths is None else replace(self, kbits=widths[0], vbits=widths[1], layer_bits="")

    def __str__(self) -> str:
        default = Candidate()
        return (
            ",".join(f"{k}={v}" for k, v in asdict(self).items() if k in ("kbits", "vbits") or v != getattr(default, k))
            or "kbits=2,vbits=2"
        )

    def outliers_per_block(self, head_dim: int) -> int:
        return round(self.outliers * self.block * head_dim)


# ------------------------------------------------------------------------------------ quantization math


def _round_outwards(value: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 -> float16, rounded towards ``direction`` when inexact (as ``quant.quantize`` rounds scales)."""
    rounded = value.to(torch.float16)
    limit = torch.full_like(rounded, direction)
    inexact = (rounded.float() < value) if direction > 0 else (rounded.float() > value)
    return torch.where(inexact, torch.nextafter(rounded, limit), rounded)


def fake_quantize(
    x: torch.Tensor,
    nbits: int,
    group_size: int,
    dim: int = -1,
    keep: torch.Tensor | None = None,
    sym: bool = False,
    clip: float = 0.0,
    levels: str = "uniform",
) -> torch.Tensor:
    """Quantize and dequantize ``x`` (float32) in groups of ``group_size`` along ``dim``, as ``quant.quantize``
    and ``quant.dequantize`` do (asymmetric, float16 scale and zero rounded outwards), for any ``nbits``
    (3 included). ``keep``: a bool mask like ``x`` of elements stored in 16 bits instead (float16-rounded),
    left out of their group's range. ``nbits=16``: ``x`` rounded to float16. ``sym``: symmetric groups (range
    ``[-m, m]``, ``m`` the largest magnitude; a float16 scale rounded up, no zero). ``clip``: when not 0, the
    range of each group is shrunk about its middle (about 0 when ``sym``) by the factor of ``1, 0.95, ...``
    down to ``clip`` whose codes give the least squared error on the group (kept elements aside). ``levels``:
    ``uniform`` or ``normal`` (:func:`normal_levels` over the group's range, each element to the nearest).
    """
    if nbits >= 16:
        return x.half().float()
    dim = dim % x.dim()
    size = x.shape[dim]
    nlevels = 2**nbits - 1
    xf = torch.nan_to_num(x.float(), nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX).clamp(-FP16_MAX, FP16_MAX)
    grouped = xf.movedim(dim, -1).unflatten(-1, (size // group_size, group_size))
    if keep is None:
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    else:
        kept = keep.movedim(dim, -1).unflatten(-1, (size // group_size, group_size))
        lo = grouped.masked_fill(kept, float("inf")).amin(dim=-1)
        hi = grouped.masked_fill(kept, float("-inf")).amax(dim=-1)
        every = kept.all(dim=-1)  # a group of kept elements only: any scale and zero
        lo, hi = torch.where(every, 0.0, lo), torch.where(every, 0.0, hi)
    if sym:
        lo, hi = -torch.maximum(lo.abs(), hi.abs()), torch.maximum(lo.abs(), hi.abs())
    factors = [1.0]
    while clip and factors[-1] - 0.05 >= clip - 1e-9:
        factors.append(round(factors[-1] - 0.05, 2))
    best = best_error = None
    for factor in factors:
        if factor == 1.0:
            out = _dequantized_groups(grouped, lo, hi, nlevels, sym, levels)
        else:
            middle, half = (hi + lo) / 2, (hi - lo) / 2 * factor
            out = _dequantized_groups(grouped, middle - half, middle + half, nlevels, sym, levels)
        if len(factors) == 1:
            best = out
            break
        error = (out - grouped).square()
        if keep is not None:
            error = error.masked_fill(kept, 0.0)
        error = error.sum(-1, keepdim=True)
        if best is None:
            best, best_error = out, error
        else:
            better = error < best_error
            best, best_error = torch.where(better, out, best), torch.where(better, error, best_error)
    out = best.flatten(-2).movedim(-1, dim)
    if keep is not None:
        out = torch.where(keep, x.half().float(), out)
    return out


def _dequantized_groups(
    grouped: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int, sym: bool, spacing: str = "uniform"
) -> torch.Tensor:
    """``grouped`` ``[..., groups, size]`` quantized to ``levels + 1`` codes over ``[lo, hi]`` per group,
    dequantized."""
    if spacing == "normal":  # float16 range ends (rounded outwards), the table's levels between them
        if sym:
            hi = _round_outwards(hi, float("inf")).float()
            lo = -hi
        else:
            lo = _round_outwards(lo, float("-inf")).float()
            hi = _round_outwards(hi, float("inf")).float()
        table = (normal_levels(levels + 1) + 1) / 2  # [0, 1]
        values = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * table  # [..., groups, levels + 1]
        bounds = (values[..., 1:] + values[..., :-1]) / 2
        codes = torch.searchsorted(bounds.contiguous(), grouped.contiguous())
        return values.gather(-1, codes)
    if sym:  # one float16 scale; the zero is -scale * levels / 2, implied (an all-zero group: the smallest scale)
        scale = _round_outwards(hi / (levels / 2), float("inf"))
        scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24)).float().unsqueeze(-1)
        zero = -scale * (levels / 2)
    else:
        zero = _round_outwards(lo, float("-inf"))
        scale = _round_outwards((hi - zero.float()) / levels, float("inf"))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero, scale = zero.float().unsqueeze(-1), scale.float().unsqueeze(-1)
    codes = torch.round((grouped - zero) / scale).clamp_(0, levels)
    return torch.addcmul(zero, codes, scale)


@functools.cache
def normal_levels(count: int) -> torch.Tensor:
    """The ``count`` Lloyd-Max (least squared error) levels of a standard normal distribution, divided by the
    largest: ``count`` ascending floats in ``[-1, 1]``, the first -1 and the last 1."""

    def pdf(z):
        return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    def cdf(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    levels = [-2 + 4 * i / (count - 1) for i in range(count)]
    for _ in range(500):
        edges = [-math.inf] + [(a + b) / 2 for a, b in zip(levels, levels[1:], strict=False)] + [math.inf]
        levels = [(pdf(a) - pdf(b)) / (cdf(b) - cdf(a)) for a, b in zip(edges, edges[1:], strict=False)]
    return torch.tensor(levels, dtype=torch.float32) / levels[-1]


def outlier_mask(x: torch.Tensor, count: int, block: int) -> torch.Tensor:
    """Bool mask of ``x`` ``[B, H, n, D]`` (``n`` whole blocks of ``block`` tokens): in each block of each head,
    the ``count`` elements farthest from their channel's median over the block's tokens (ties: lowest index)."""
    b, h, n, d = x.shape
    blocks = x.reshape(b, h, n // block, block, d)
    score = (blocks - blocks.median(dim=-2, keepdim=True).values).abs().flatten(-2)  # [B, H, nb, block*D]
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count:
        mask.scatter_(-1, score.topk(count, dim=-1).indices, True)
    return mask.reshape(b, h, n // block, block, d).reshape(b, h, n, d)


class Rope:
    """RoPE of a Llama-style model at given positions: ``apply`` as the model applies it, ``invert`` its inverse."""

    def __init__(self, rotary_emb):
        self.rotary_emb = rotary_emb

    def _cos_sin(self, x: torch.Tensor, positions: torch.Tensor):
        cos, sin = self.rotary_emb(x, positions[None])  # [1, n, D], attention_scaling included
        return cos[:, None].float(), sin[:, None].float()

    @staticmethod
    def _rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(x, positions)
        return x * cos + self._rotate_half(x) * sin

    def invert(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(x, positions)
        # the rotation is s * R (s = attention_scaling, cos^2 + sin^2 = s^2): its inverse is R^T / s
        norm = cos * cos + sin * sin
        return (x * cos - self._rotate_half(x) * sin) / norm


def fake_quantize_middle(
    cand: Candidate,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    rope: Rope | None = None,
    scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the candidate's middle store reads back for whole blocks of tokens ``[B, H, n, D]`` (float32).

    ``cand`` is one layer's (``Candidate.for_layer``): its ``kbits``/``vbits`` are used, not ``layer_bits``.

    ``positions`` ``[n]`` and ``rope``: for ``prerope``. ``scores`` ``[B, H, n]``: for ``retain``.
    """
    keys, values = keys.float(), values.float()
    b, h, n, d = keys.shape
    block = cand.block
    retained = None
    if cand.retain:
        picked = scores.reshape(b, h, n // block, block).topk(cand.retain, dim=-1).indices
        retained = torch.zeros(b, h, n // block, block, dtype=torch.bool).scatter_(-1, picked, True).reshape(b, h, n)
    k = keys
    if cand.prerope:
        k = rope.invert(k, positions)
    rotation = quant.rotation_matrix(cand.rotate, d)
    k = quant.rotate(k, rotation)
    keep = None
    if cand.outliers:
        keep = outlier_mask(k, cand.outliers_per_block(d), block)
    if retained is not None and cand.key_axis == "channel":  # retained tokens leave their key groups' ranges
        keep = retained[..., None].expand(b, h, n, d) if keep is None else keep | retained[..., None]
    ksym, kclip = bool(cand.ksym), cand.kclip
    if cand.key_axis == "channel":
        k = fake_quantize(k, cand.kbits, block, dim=-2, keep=keep, sym=ksym, clip=kclip, levels=cand.levels)
    else:
        k = fake_quantize(k, cand.kbits, cand.group, dim=-1, keep=keep, sym=ksym, clip=kclip, levels=cand.levels)
    k = quant.unrotate(k, rotation)
    if cand.prerope:
        k = rope.apply(k, positions)
    vrotation = quant.rotation_matrix(cand.vrotate, d)
    v = quant.rotate(values, vrotation)
    v = fake_quantize(v, cand.vbits, cand.group, dim=-1, sym=bool(cand.vsym), clip=cand.vclip, levels=cand.levels)
    v = quant.unrotate(v, vrotation)
    if retained is not None:
        if cand.retain_bits == 16:
            exact_k, exact_v = keys.half().float(), values.half().float()
        else:
            exact_k = fake_quantize(keys, 8, d, dim=-1)
            exact_v = fake_quantize(values, 8, d, dim=-1)
        k = torch.where(retained[..., None], exact_k, k)
        v = torch.where(retained[..., None], exact_v, v)
    return k, v


# -------------------------------------------------------------------------------------- the cache layer


class AttentionRecorder:
    """Mean attention probability each position received, per layer and KV head (for ``retain``).

    ``received[layer]`` ``[B, H_kv, L]`` sums the probabilities of every query (the KV head's query heads
    summed); ``seen`` ``[L]`` counts the queries that could attend to each position. Filled by the
    ``sweep_sdpa`` attention function, which computes the probabilities besides transformers' SDPA output.
    """

    active: AttentionRecorder | None = None

    def __init__(self):
        self.received: dict[int, torch.Tensor] = {}
        self.seen: dict[int, torch.Tensor] = {}

    def add(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        b, hq, q, d = query.shape
        hkv, kv_len = key.shape[1], key.shape[-2]
        groups = hq // hkv
        scores = torch.matmul(query.float(), key.float().repeat_interleave(groups, dim=1).transpose(-1, -2)) * scaling
        qpos = torch.arange(kv_len - q, kv_len)[:, None]
        scores = scores.masked_fill(torch.arange(kv_len)[None] > qpos, float("-inf"))
        probs = scores.softmax(-1).sum(-2).reshape(b, hkv, groups, kv_len).sum(2)  # [B, H_kv, L]
        total = self.received.setdefault(layer_idx, torch.zeros(b, hkv, 0))
        if total.shape[-1] < kv_len:
            total = torch.cat([total, total.new_zeros(b, hkv, kv_len - total.shape[-1])], -1)
        total += probs
        self.received[layer_idx] = total
        seen = self.seen.setdefault(layer_idx, torch.zeros(0))
        if seen.shape[-1] < kv_len:
            seen = torch.cat([seen, seen.new_zeros(kv_len - seen.shape[-1])])
        seen += (torch.arange(kv_len)[None] <= qpos).sum(0)
        self.seen[layer_idx] = seen

    def mean(self, layer_idx: int, start: int, end: int) -> torch.Tensor:
        return self.received[layer_idx][..., start:end] / self.seen[layer_idx][start:end].clamp(min=1)


def sweep_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, plus the probabilities for :class:`AttentionRecorder` when one is active."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = AttentionRecorder.active
    if recorder is not None:
        recorder.add(module.layer_idx, query, key, kwargs.get("scaling") or module.scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("sweep_sdpa", sweep_sdpa)
    AttentionMaskInterface.register("sweep_sdpa", sdpa_mask)  # SDPA's causal masks (else none is built)
    return "sweep_sdpa"


class FakeQuantLayer(SelectiveLayer):
    """selkv's sink + window layer whose middle holds the candidate's dequantized keys and values (float)."""

    retains_evicted = True

    def __init__(
        self, cand: Candidate, layer_idx: int, rope: Rope | None = None, recorder: AttentionRecorder | None = None
    ):
        super().__init__(cand.sink, cand.window, cand.block)
        cand = cand.for_layer(layer_idx)
        self.cand, self.layer_idx, self.rope, self.recorder = cand, layer_idx, rope, recorder
        self._reset_middle()

    def _reset_middle(self) -> None:
        self.middle_keys = self.middle_values = None

    @property
    def num_stored(self) -> int:
        return 0 if self.middle_keys is None else self.middle_keys.shape[-2]

    def _store_evicted(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        count = keys.shape[-2]
        first = self.num_sink + self.left_padding + self.num_evicted  # position of the first evicted token
        positions = torch.arange(first, first + count, device=keys.device)
        scores = None
        if self.cand.retain:
            scores = self.recorder.mean(self.layer_idx, first, first + count)
        k, v = fake_quantize_middle(self.cand, keys, values, positions=positions, rope=self.rope, scores=scores)
        k, v = k.to(keys.dtype), v.to(values.dtype)
        if self.middle_keys is None:
            self.middle_keys, self.middle_values = k, v
        else:
            self.middle_keys = torch.cat([self.middle_keys, k], dim=-2)
            self.middle_values = torch.cat([self.middle_values, v], dim=-2)

    def _read_stored(self, count, out_keys=None, out_values=None):
        keys, values = self.middle_keys[:, :, :count], self.middle_values[:, :, :count]
        if out_keys is None:
            return keys, values
        out_keys.copy_(keys)
        out_values.copy_(values)
        return out_keys, out_values


def make_fake_cache(cand: Candidate, model, recorder: AttentionRecorder | None = None):
    """A transformers ``Cache`` of :class:`FakeQuantLayer` (one per layer of a full-attention model)."""
    from transformers.cache_utils import Cache

    rope = Rope(model.model.rotary_emb) if cand.prerope else None
    layers = [FakeQuantLayer(cand, i, rope, recorder) for i in range(model.config.num_hidden_layers)]
    return Cache(layers=layers)


# ------------------------------------------------------------------------------------------------- bytes


def _layout(cand: Candidate, config, tokens: int, chunk: int) -> dict:
    """A library ``quant`` layer with the candidate's sink, window and block, filled like ``selkv size`` fills
    it (random bfloat16 states): its buffers' bytes and the middle store's capacity in tokens."""
    from selkv.cache import make_cache
    from selkv.shapes import model_shape

    shape = model_shape(config)
    spec = f"quant:bits=8,sink={cand.sink},window={cand.window},block={cand.block},key_axis=channel,rotate=none"
    cache = make_cache(spec, config)
    layer_idx = 0
    done = 0
    while done < tokens:
        count = min(chunk, tokens - done)
        states = torch.randn(1, shape["num_key_value_heads"], count, shape["head_dim"], dtype=torch.bfloat16)
        cache.update(states, states.clone(), layer_idx)
        done += count
    layer = cache.layers[layer_idx]
    buffers = [layer.sink_keys, layer.sink_values, layer.recent_keys, layer.recent_values]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in buffers}
    capacity = layer.middle.capacity
    return {
        "bytes_16bit_held": sum(storages.values()),
        "capacity": capacity,
        "stored": layer.num_stored,
        "heads": shape["num_key_value_heads"],
        "head_dim": shape["head_dim"],
        "layers": shape["num_hidden_layers"],
    }


def middle_bytes_per_head(cand: Candidate, head_dim: int, capacity: int) -> dict[str, int]:
    """Bytes of one KV head's middle store of ``capacity`` tokens, by kind."""

    def codes(bits: int) -> int:
        return 2 * head_dim if bits >= 16 else -(-head_dim * bits // 8)

    blocks = capacity // cand.block
    kgroup, vgroup = (2 if cand.ksym else 4), (2 if cand.vsym else 4)  # float16 scale (and zero) per group
    out = {"key_codes": capacity * codes(cand.kbits), "value_codes": capacity * codes(cand.vbits)}
    scales = 0
    if cand.kbits < 16:
        scales += (blocks * head_dim if cand.key_axis == "channel" else capacity * head_dim // cand.group) * kgroup
    if cand.vbits < 16:
        scales += capacity * head_dim // cand.group * vgroup
    out["scales"] = scales
    out["outliers"] = blocks * cand.outliers_per_block(head_dim) * (2 + 2)  # float16 value + uint16 index in block
    per_retained = 2 * (2 * head_dim if cand.retain_bits == 16 else head_dim + 4) + 2  # K and V (+ 8-bit scales), index
    out["retained"] = blocks * cand.retain * per_retained
    return out


def held_bytes(cand: Candidate, config, tokens: int = 4096, chunk: int = 64) -> dict:
    """Bytes the candidate would hold for ``tokens`` tokens of ``config``'s model, counted as ``selkv size`` counts
    (bfloat16 model, chunks of ``chunk``): ``allocated``, ``full16``, ``compression`` and the parts."""
    lay = _layout(cand, config, tokens, chunk)
    parts = {}
    for layer_idx in range(lay["layers"]):  # layer_bits: each layer's widths
        for kind, count in middle_bytes_per_head(cand.for_layer(layer_idx), lay["head_dim"], lay["capacity"]).items():
            parts[kind] = parts.get(kind, 0) + count * lay["heads"]
    rotations = {r for r in (cand.rotate, cand.vrotate) if r != "none"}
    rotation = len(rotations) * lay["head_dim"] ** 2 * (4 + 2)  # float32 matrix + bf16 signs, once per rotation
    allocated = lay["bytes_16bit_held"] * lay["layers"] + sum(parts.values()) + rotation
    full16 = lay["layers"] * lay["heads"] * 2 * lay["head_dim"] * tokens * 2
    return {
        "allocated": allocated,
        "full16": full16,
        "compression": full16 / allocated,
        "bytes_16bit": lay["bytes_16bit_held"] * lay["layers"],
        "rotation": rotation,
        **parts,
    }


def spec_held_bytes(spec: str, config, tokens: int = 4096, chunk: int = 64) -> dict:
    """``selkv size``'s count for a library spec."""
    from selkv.sizing import cache_size

    return cache_size(spec, config, tokens, chunk=chunk)


# -------------------------------------------------------------------------------------------- perplexity


@torch.inference_mode()
def score(model, ids: list[int], chunk: int, *, spec: str | None = None, cand: Candidate | None = None) -> dict:
    """Summed NLL of ``ids[1:]`` fed in chunks, with a library spec's cache or a candidate's fake cache."""
    from selkv.cache import make_cache
    from selkv.generation import prefill

    recorder = AttentionRecorder() if cand is not None and cand.retain else None
    cache = make_cache(spec, model.config) if cand is None else make_fake_cache(cand, model, recorder)
    targets = torch.tensor(ids[1:])
    total = torch.zeros((), dtype=torch.float64)
    n = len(ids)

    def add_nll(start: int, logits: torch.Tensor) -> None:
        end = min(start + logits.shape[1], n - 1)
        if end > start:
            part = logits[0, : end - start].float()
            total.add_(torch.nn.functional.cross_entropy(part, targets[start:end], reduction="sum").double())

    AttentionRecorder.active = recorder
    try:
        prefill(model, torch.tensor([ids]), cache, chunk, on_logits=add_nll)
    finally:
        AttentionRecorder.active = None
    return {"nll_sum": float(total), "tokens": n - 1}


def load_ids(tokenizer, data: str, max_tokens: int) -> list[int]:
    from selkv.eval.perplexity import load_segments

    segments, _ = load_segments(tokenizer, data, max_tokens, 1)
    return segments[0]


# ------------------------------------------------------------------------------------------------ the CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Candidate fields (defaults; see Candidate): "
        + ", ".join(f"{k}={v}" for k, v in asdict(Candidate()).items()),
    )
    parser.add_argument("--model", default="smollm2-135m", help="model (default: the embedded smollm2-135m)")
    parser.add_argument(
        "--texts",
        default="pg19:4096,wikitext2:2048,pg19-dragons-blood:4096",
        help="comma-separated DATA:TOKENS (named sets of selkv eval perplexity; default %(default)s)",
    )
    parser.add_argument("--chunk", type=int, default=64, help="tokens per forward pass (default 64)")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="SPEC",
        help="a library cache spec run through make_cache (full, quant:...); repeatable",
    )
    parser.add_argument(
        "--cand",
        action="append",
        default=[],
        metavar="FIELDS",
        help="a fake-quantized candidate, e.g. kbits=2,vbits=2,prerope=1; repeatable",
    )
    parser.add_argument("--bytes-only", action="store_true", help="print bytes held at --size-tokens and stop")
    parser.add_argument("--size-tokens", type=int, default=4096, help="tokens for bytes held (default 4096)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/lowbit_sweep.json"),
        help="JSON of results; rows already in it are skipped (default %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from selkv.models import load_config

    config = load_config(args.model)
    cands = [Candidate.parse(c) for c in args.cand]
    rows = [("spec", s) for s in args.baseline] + [("cand", c) for c in cands]
    sizes = {}
    for kind, item in rows:
        b = (
            spec_held_bytes(item, config, args.size_tokens)
            if kind == "spec"
            else held_bytes(item, config, args.size_tokens)
        )
        sizes[str(item)] = {"allocated": b["allocated"], "full16": b["full16"], "compression": b["compression"]}
        print(f"{b['compression']:6.3f}x  {kind:4s} {item}")
    if args.bytes_only:
        return 0

    from selkv.eval.runner import progress
    from selkv.models import load_model

    results = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}}
    results.update(
        {
            "model": args.model,
            "dtype": "float32",
            "chunk": args.chunk,
            "size_tokens": args.size_tokens,
            "command": " ".join(["benchmarks/lowbit_sweep.py", *(argv if argv is not None else sys.argv[1:])]),
        }
    )
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    model.set_attn_implementation(register_attention())
    texts = []
    for item in args.texts.split(","):
        data, _, count = item.rpartition(":")
        texts.append((data, int(count), load_ids(tokenizer, data, int(count))))
    todo = [
        (kind, item, data, count, ids)
        for kind, item in rows
        for data, count, ids in texts
        if f"{data}:{count}" not in results["rows"].get(str(item), {}).get("texts", {})
    ]
    for kind, item, data, count, ids in progress(todo, desc="lowbit sweep", unit="run"):
        started = time.perf_counter()
        scored = score(model, ids, args.chunk, **({"spec": item} if kind == "spec" else {"cand": item}))
        row = results["rows"].setdefault(str(item), {"kind": kind, "texts": {}})
        row.update(sizes[str(item)])
        nll = scored["nll_sum"] / scored["tokens"]
        row["texts"][f"{data}:{count}"] = {**scored, "ppl": math.exp(nll), "seconds": time.perf_counter() - started}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def table(results: dict) -> str:
    """Markdown table: perplexity change vs ``full`` per text, and bytes held vs a 16-bit full cache."""
    rows = results["rows"]
    texts = sorted({t for r in rows.values() for t in r["texts"]}, key=lambda t: (t.split(":")[0] != "pg19", t))
    full = rows.get("full", {}).get("texts", {})
    lines = ["| cache | " + " | ".join(texts) + " | held at 4,096 |", "| --- |" + " ---: |" * (len(texts) + 1)]
    for name, row in rows.items():
        cells = []
        for t in texts:
            r = row["texts"].get(t)
            if r is None:
                cells.append("")
            elif name == "full" or t not in full:
                cells.append(f"{r['ppl']:.3f}")
            else:
                cells.append(f"{(r['ppl'] / full[t]['ppl'] - 1) * 100:+.2f}%")
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {row.get('compression', 1.0):.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
