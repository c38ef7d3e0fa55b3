"""EXPERIMENTAL v3 of the decode kernel (round 4, benchmarks/NOTES.md): not in src, not the default.

Differences from src/selkv/kernels/decode_attention.py (v1): every middle tile's codes, scales and
zeros are loaded by one helper (optionally one tile ahead, ``prefetch``); codes become float16 by bits
(``fast_codes``: 0x6400 | c is 1024 + c; 2 = inline PTX prmt, 1 = integer ops); per-token scales are
loaded as [tokens, groups] tiles; ``programs_per_sm`` sets the split count. It passes the interpreter
tests but ABORTED compiling the first CUDA test case (float16, head_dim 64, int8, GQA ratio 1) in call 5.

Fused decode attention over a selective cache (Triton): kernels, configs and the launcher.

One decode step (query length 1) attends over a layer's cache as it is stored::

    [ sink: 16-bit ][ middle: nbits codes + float16 scales/zeros ][ window: 16-bit ]

The kernels read the codes, dequantize them in registers and never write a
16-bit copy of the history. Flash-decoding: the middle is split into chunks of
``tokens_per_split`` tokens, one program per (chunk, batch row, KV head); one more
program per (row, head) reads the 16-bit sink and window. Each program loads its
keys/values once for all the query heads that share the KV head (GQA) and writes
a partial output with its log-sum-exp; a second kernel merges the partials.

With ``TRITON_INTERPRET=1`` in the environment before Triton is first imported,
the same kernels run in Triton's CPU interpreter, on CPU tensors (tests without a GPU).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634  # 1/ln(2): the kernels use exp2/log2
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _selective_decode_partial_kernel(
    # pointers: query [B, Hq, 1, D]; 16-bit sink/window [B, H, cap, D]
    Q, SinkK, SinkV, RecentK, RecentV,
    # middle: codes [B, H, C, P] uint8; scales/zeros float16 (layouts in the launcher's docstring)
    KCodes, KScale, KZero, VCodes, VScale, VZero,
    # [B] int32 left padding of each row (unused unless HAS_PADDING)
    RowPadding,
    # outputs: partial outputs [B, Hq, S, D] float32, their log2-sum-exp [B, Hq, S] float32
    PartialOut, PartialLse,
    # sizes
    num_sink, num_stored, num_recent, tokens_per_split, num_kv_heads, num_partials,
    scale_log2,  # softmax scale * log2(e)
    # strides (elements); the last dimension of every tensor is contiguous
    stride_qb, stride_qh,
    stride_sb, stride_sh, stride_sn,
    stride_rb, stride_rh, stride_rn,
    stride_cb, stride_ch, stride_cn,
    stride_ksb, stride_ksh, stride_ksn,
    stride_vsb, stride_vsh, stride_vsn,
    # meta-parameters
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two >= 16 (tl.dot's smallest M)
    HEAD_DIM: tl.constexpr,
    NBITS: tl.constexpr,
    Q_GROUP: tl.constexpr,  # channels per scale group (per-token groups)
    KEY_PER_CHANNEL: tl.constexpr,  # keys grouped per channel over KEY_BLOCK tokens (KIVI)
    KEY_BLOCK: tl.constexpr,  # tokens per key group when KEY_PER_CHANNEL
    KEY_ROWS: tl.constexpr,  # 1: each middle tile lies inside one key group; 0: gather a scale row per token
    HAS_PADDING: tl.constexpr,
    BLOCK_N: tl.constexpr,  # middle tokens per tile
    BLOCK_EXACT: tl.constexpr,  # 16-bit tokens per tile
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no tf32), else "tf32" (ignored for 16-bit)
    FAST_CODES: tl.constexpr,  # codes -> float16: 0 conversions, 1 bits (integer ops), 2 bits (inline PTX)
    PREFETCH: tl.constexpr,  # issue the next middle tile's loads before computing this one
):
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    head_ok = offs_g < GROUP
    q_ptrs = Q + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=head_ok[:, None], other=0.0)  # [GROUP_PAD, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)

    if split == num_partials - 1:
        # ---- the 16-bit regions: sink (minus this row's left padding), then the window
        first = 0
        if HAS_PADDING:
            first = tl.load(RowPadding + b)
        offs_e = tl.arange(0, BLOCK_EXACT)
        sink_base = b * stride_sb + h * stride_sh
        for start in range(0, num_sink, BLOCK_EXACT):
            pos = start + offs_e
            valid = (pos < num_sink) & (pos >= first)
            offs = sink_base + pos[:, None] * stride_sn + offs_d[None, :]
            k = tl.load(SinkK + offs, mask=valid[:, None], other=0.0)
            v = tl.load(SinkV + offs, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep exp2 finite
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        recent_base = b * stride_rb + h * stride_rh
        for start in range(0, num_recent, BLOCK_EXACT):
            pos = start + offs_e
            valid = pos < num_recent
            offs = recent_base + pos[:, None] * stride_rn + offs_d[None, :]
            k = tl.load(RecentK + offs, mask=valid[:, None], other=0.0)
            v = tl.load(RecentV + offs, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
    else:
        # ---- one chunk of the quantized middle
        #
        # Codes are packed in planes (quant.pack): byte j holds channels j, j + D/k, ... in bits
        # [0, nbits), [nbits, 2 nbits), ... Loading byte (c mod D/k) for channel c and shifting it
        # by (c div D/k) * nbits gives every channel's code in natural order, with no register
        # shuffles (each byte is read k times, from L1).
        #
        # Codes (< 256) are exact in float16, so they go into the dot products as they are and
        # the scales are applied outside them, on [heads, tokens] or [heads, channels] tiles:
        #   keys, per-token groups:   q.k[n] = sum_g scale[n,g] (q_g . code[n]) + zero[n,g] sum(q_g)
        #   keys, per-channel groups: q.k[n] = (q * scale_row) . code[n] + q . zero_row
        #   values (per-token groups): sum_n p[n] v[n] = sum_g [(p * scale_g) @ code + p . zero_g] on group g
        # where q_g is q with the channels outside group g zeroed. With FAST_CODES, a code c becomes
        # float16 by bits (0x6400 | c is 1024 + c) instead of by int -> float conversions, and the
        # 16-bit dot operands are float16 whatever the model's 16-bit dtype.
        # Each tile's loads (codes, scales, zeros) are issued one tile ahead (PREFETCH).
        PER_BYTE: tl.constexpr = 8 // NBITS
        PACKED: tl.constexpr = HEAD_DIM // PER_BYTE
        NUM_GROUPS: tl.constexpr = HEAD_DIM // Q_GROUP
        shift = (offs_d // PACKED) * NBITS
        group_of = offs_d // Q_GROUP  # [D]
        offs_grp = tl.arange(0, NUM_GROUPS)
        if FAST_CODES > 0:
            dot_ty = tl.float16
        else:
            dot_ty = q.dtype
        q32 = q.to(tl.float32)
        qd = q.to(dot_ty)
        code_base = b * stride_cb + h * stride_ch
        kscale_base = b * stride_ksb + h * stride_ksh
        vscale_base = b * stride_vsb + h * stride_vsh
        lo = split * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, num_stored)
        kbytes, vbytes, ks, kz, vs, vz = _load_middle_tile(
            KCodes, KScale, KZero, VCodes, VScale, VZero, lo, hi, code_base, kscale_base, vscale_base,
            stride_cn, stride_ksn, stride_vsn, HEAD_DIM, NBITS, Q_GROUP, KEY_PER_CHANNEL, KEY_BLOCK, KEY_ROWS, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            if PREFETCH:
                n_kbytes, n_vbytes, n_ks, n_kz, n_vs, n_vz = _load_middle_tile(
                    KCodes, KScale, KZero, VCodes, VScale, VZero, start + BLOCK_N, hi, code_base, kscale_base,
                    vscale_base, stride_cn, stride_ksn, stride_vsn, HEAD_DIM, NBITS, Q_GROUP, KEY_PER_CHANNEL,
                    KEY_BLOCK, KEY_ROWS, BLOCK_N)
            else:
                kbytes, vbytes, ks, kz, vs, vz = _load_middle_tile(
                    KCodes, KScale, KZero, VCodes, VScale, VZero, start, hi, code_base, kscale_base,
                    vscale_base, stride_cn, stride_ksn, stride_vsn, HEAD_DIM, NBITS, Q_GROUP, KEY_PER_CHANNEL,
                    KEY_BLOCK, KEY_ROWS, BLOCK_N)
            pos = start + tl.arange(0, BLOCK_N)
            valid = pos < hi

            kc = _codes_to_float(kbytes, shift, NBITS, FAST_CODES, dot_ty)  # [BLOCK_N, D]
            if KEY_PER_CHANNEL:
                if KEY_ROWS == 1:  # the tile lies inside one key group: one scale row for all its tokens
                    q_scaled = (q32 * ks[None, :]).to(dot_ty)
                    s = tl.dot(q_scaled, tl.trans(kc), input_precision=DOT_PRECISION)
                    s = s + tl.sum(q32 * kz[None, :], 1)[:, None]
                else:  # tiles and key groups do not nest: dequantize with one scale row per token
                    k = (kc.to(tl.float32) * ks + kz).to(q.dtype)
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            else:
                s = tl.zeros([GROUP_PAD, BLOCK_N], tl.float32)
                for g in tl.static_range(NUM_GROUPS):
                    ks_g = tl.sum(tl.where((offs_grp == g)[None, :], ks, 0.0), 1)  # [BLOCK_N]
                    kz_g = tl.sum(tl.where((offs_grp == g)[None, :], kz, 0.0), 1)
                    if NUM_GROUPS == 1:
                        q_g = qd
                        qsum_g = tl.sum(q32, 1)
                    else:
                        q_g = tl.where((group_of == g)[None, :], qd, 0.0).to(dot_ty)
                        qsum_g = tl.sum(tl.where((group_of == g)[None, :], q32, 0.0), 1)
                    dot_g = tl.dot(q_g, tl.trans(kc), input_precision=DOT_PRECISION)
                    s += dot_g * ks_g[None, :] + qsum_g[:, None] * kz_g[None, :]

            s = s * scale_log2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]

            vc = _codes_to_float(vbytes, shift, NBITS, FAST_CODES, dot_ty)
            for g in tl.static_range(NUM_GROUPS):
                vs_g = tl.sum(tl.where((offs_grp == g)[None, :], vs, 0.0), 1)  # [BLOCK_N]
                vz_g = tl.sum(tl.where((offs_grp == g)[None, :], vz, 0.0), 1)
                pv = tl.dot((p * vs_g[None, :]).to(dot_ty), vc, input_precision=DOT_PRECISION)  # [GROUP_PAD, D]
                pz = tl.sum(p * vz_g[None, :], 1)
                if NUM_GROUPS == 1:
                    acc += pv + pz[:, None]
                else:
                    acc += tl.where((group_of == g)[None, :], pv + pz[:, None], 0.0)
            m_i = m_new
            if PREFETCH:
                kbytes, vbytes, ks, kz, vs, vz = n_kbytes, n_vbytes, n_ks, n_kz, n_vs, n_vz

    # ---- partial result of this program: normalized output and log2-sum-exp (-inf when empty)
    num_heads = num_kv_heads * GROUP
    row = (b * num_heads + h * GROUP + offs_g) * num_partials + split  # [GROUP_PAD]
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("-inf"))
    tl.store(PartialOut + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=head_ok[:, None])
    tl.store(PartialLse + row, lse, mask=head_ok)


@triton.jit
def _load_middle_tile(
    KCodes, KScale, KZero, VCodes, VScale, VZero, start, hi, code_base, kscale_base, vscale_base,
    stride_cn, stride_ksn, stride_vsn,
    HEAD_DIM: tl.constexpr, NBITS: tl.constexpr, Q_GROUP: tl.constexpr, KEY_PER_CHANNEL: tl.constexpr,
    KEY_BLOCK: tl.constexpr, KEY_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Codes [BLOCK_N, D] uint8 (byte of each channel), key scales/zeros ([D], [BLOCK_N, D] or
    [BLOCK_N, groups]) and value scales/zeros [BLOCK_N, groups] of middle tokens start.. (masked at hi)."""
    PACKED: tl.constexpr = HEAD_DIM * NBITS // 8
    NUM_GROUPS: tl.constexpr = HEAD_DIM // Q_GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_grp = tl.arange(0, NUM_GROUPS)
    pos = start + offs_n
    valid = pos < hi
    code_offs = code_base + pos[:, None] * stride_cn + (offs_d % PACKED)[None, :]
    kbytes = tl.load(KCodes + code_offs, mask=valid[:, None], other=0)
    vbytes = tl.load(VCodes + code_offs, mask=valid[:, None], other=0)
    if KEY_PER_CHANNEL:
        if KEY_ROWS == 1:
            row_offs = kscale_base + (start // KEY_BLOCK) * stride_ksn + offs_d
            row_ok = (start + 0 * offs_d) < hi
            ks = tl.load(KScale + row_offs, mask=row_ok, other=0.0).to(tl.float32)
            kz = tl.load(KZero + row_offs, mask=row_ok, other=0.0).to(tl.float32)
        else:
            s_offs = kscale_base + (pos // KEY_BLOCK)[:, None] * stride_ksn + offs_d[None, :]
            ks = tl.load(KScale + s_offs, mask=valid[:, None], other=0.0).to(tl.float32)
            kz = tl.load(KZero + s_offs, mask=valid[:, None], other=0.0).to(tl.float32)
    else:
        s_offs = kscale_base + pos[:, None] * stride_ksn + offs_grp[None, :]
        ks = tl.load(KScale + s_offs, mask=valid[:, None], other=0.0).to(tl.float32)
        kz = tl.load(KZero + s_offs, mask=valid[:, None], other=0.0).to(tl.float32)
    v_offs = vscale_base + pos[:, None] * stride_vsn + offs_grp[None, :]
    vs = tl.load(VScale + v_offs, mask=valid[:, None], other=0.0).to(tl.float32)
    vz = tl.load(VZero + v_offs, mask=valid[:, None], other=0.0).to(tl.float32)
    return kbytes, vbytes, ks, kz, vs, vz


@triton.jit
def _codes_to_float(bytes, shift, NBITS: tl.constexpr, FAST_CODES: tl.constexpr, dot_ty: tl.constexpr):
    """[BLOCK_N, D] codes from their bytes (shifted by ``shift`` [D] for nbits < 8) in ``dot_ty``.

    FAST_CODES 0: int -> float conversions; 1: float16 from bits with integer ops (0x6400 | c is
    1024 + c); 2: the same in inline PTX, two ``prmt`` + two ``sub.f16x2`` per four codes (CUDA only).
    """
    MASK: tl.constexpr = (1 << NBITS) - 1
    if NBITS < 8:
        bytes = ((bytes >> shift[None, :].to(tl.uint8)) & MASK).to(tl.uint8)
    if FAST_CODES == 0:
        out = bytes.to(dot_ty)
    elif FAST_CODES == 1:
        out = (bytes.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        out = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 m, k;
            mov.b32 m, 0x64646464;
            mov.b32 k, 0x64006400;
            prmt.b32 $0, $2, m, 0x4140;
            prmt.b32 $1, $2, m, 0x4342;
            sub.f16x2 $0, $0, k;
            sub.f16x2 $1, $1, k;
            }
            """,
            constraints="=r,=r,r",
            args=[bytes],
            dtype=tl.float16,
            is_pure=True,
            pack=4,
        )
    return out


@triton.jit
def _merge_partials_kernel(
    # pointers: partial outputs [B, Hq, S, D] float32, log2-sum-exp [B, Hq, S], output [B, 1, Hq, D]
    PartialOut, PartialLse, Out,
    # sizes and strides
    num_heads, num_partials,
    stride_ob, stride_oh,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # partials merged per step
):
    pid = tl.program_id(0)  # b * num_heads + head
    b = pid // num_heads
    head = pid % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
    denom = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, num_partials, BLOCK_S):
        idx = s0 + offs_s
        ok = idx < num_partials
        lse = tl.load(PartialLse + pid * num_partials + idx, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)  # 0 for empty partials
        o = tl.load(PartialOut + (pid * num_partials + idx)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        denom = denom * alpha + tl.sum(w, 0)
        m = m_new
    out = acc / denom
    tl.store(Out + b * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty))


# ------------------------------------------------------------------ configs


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the partial kernel (``num_splits=0``: choose from the GPU's size)."""

    block_n: int = 64
    block_exact: int = 32
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int = 0
    programs_per_sm: int = 8  # middle programs per multiprocessor when num_splits=0
    fast_codes: int = 2  # codes -> float16 by bits: 2 inline PTX (CUDA), 1 integer ops, 0 int->float conversions
    prefetch: bool = True  # load the next middle tile before computing the current one


def default_config(nbits: int, head_dim: int, axis_key: str, block_length: int) -> DecodeConfig:
    """Launch parameters (H200, head_dim 128; benchmarks/NOTES.md): 32-token tiles, which nest in 32-token key groups."""
    return DecodeConfig(block_n=32, block_exact=32, num_warps=4, num_stages=1)


def _fast_codes(config: DecodeConfig, query: torch.Tensor) -> int:
    """float32 models keep exact float32 codes (0); inline PTX only on CUDA, not in the interpreter."""
    if query.dtype == torch.float32:
        return 0
    if query.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return min(config.fast_codes, 1)
    return config.fast_codes


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _key_rows(block_n: int, block_length: int) -> int:
    """1 when every middle tile lies inside one per-channel key group (one scale row), else 0."""
    return 1 if block_length % block_n == 0 else 0


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, to exercise the merge


def _splits(num_stored: int, programs_per_split: int, config: DecodeConfig, device: torch.device) -> tuple[int, int]:
    """(number of middle chunks, tokens per chunk): about ``programs_per_sm`` programs per multiprocessor."""
    if num_stored == 0:
        return 0, config.block_n
    tiles = triton.cdiv(num_stored, config.block_n)
    if config.num_splits:
        wanted = config.num_splits
    else:
        wanted = triton.cdiv(config.programs_per_sm * _num_sms(device), programs_per_split)
        wanted = min(wanted, triton.cdiv(tiles, 4))  # keep >= 4 tiles per chunk: each chunk pays a partial
    wanted = max(1, min(wanted, tiles))
    tokens_per_split = triton.cdiv(tiles, wanted) * config.block_n
    return triton.cdiv(num_stored, tokens_per_split), tokens_per_split


def check_supported(head_dim: int, num_groups: int, nbits: int, q_group_size: int, dtype: torch.dtype) -> str | None:
    """Why the fused kernel cannot take these shapes (``None``: it can)."""
    if dtype not in _SUPPORTED_DTYPES:
        return f"dtype {dtype} (supported: float16, bfloat16, float32)"
    if not _pow2(head_dim) or head_dim < 16:
        return f"head_dim={head_dim} (a power of two >= 16 is needed)"
    if nbits not in (2, 4, 8):
        return f"nbits={nbits}"
    if not _pow2(q_group_size) or head_dim % q_group_size:
        return f"q_group_size={q_group_size} (a power of two dividing head_dim is needed)"
    if num_groups < 1:
        return f"num_key_value_groups={num_groups}"
    return None


# ---------------------------------------------------------------- launcher


def selective_decode_attention(
    query_states: torch.Tensor,
    sink_keys: torch.Tensor,
    sink_values: torch.Tensor,
    num_sink: int,
    key_codes: torch.Tensor | None,
    key_scale: torch.Tensor | None,
    key_zero: torch.Tensor | None,
    value_codes: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    value_zero: torch.Tensor | None,
    num_stored: int,
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    num_recent: int,
    *,
    nbits: int,
    q_group_size: int,
    axis_key: str = "token",
    block_length: int = 1,
    row_padding: torch.Tensor | None = None,
    scaling: float | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one query token over sink[:num_sink] + middle[:num_stored] + window[:num_recent].

    Args:
        query_states: ``[batch_size, num_heads, 1, head_dim]``; query head ``i`` reads KV head
            ``i // (num_heads // num_key_value_heads)``.
        sink_keys, sink_values: ``[batch_size, num_key_value_heads, sink_capacity, head_dim]``, 16-bit.
        key_codes, value_codes: uint8 ``[batch_size, num_key_value_heads, capacity, head_dim * nbits // 8]``,
            codes packed in planes (``quant.pack``); ``None`` when ``num_stored == 0``.
        key_scale, key_zero: float16 ``[B, H, capacity, head_dim // q_group_size]`` (``axis_key="token"``)
            or ``[B, H, capacity // block_length, head_dim]`` (``axis_key="channel"``).
        value_scale, value_zero: float16 ``[B, H, capacity, head_dim // q_group_size]``.
        recent_keys, recent_values: ``[B, H, window_capacity, head_dim]``, 16-bit.
        row_padding: ``[batch_size]`` int32 left padding per row (positions below it are masked), or ``None``.
        scaling: softmax scale, ``head_dim ** -0.5`` by default.
    Returns:
        ``[batch_size, 1, num_heads, head_dim]`` in the query's dtype (transformers' attention output layout).
    """
    batch_size, num_heads, q_len, head_dim = query_states.shape
    num_kv_heads = sink_keys.shape[1]
    if q_len != 1:
        raise ValueError(f"the decode kernel takes one query token, got query length {q_len}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    why = check_supported(head_dim, group, nbits, q_group_size, query_states.dtype)
    if why:
        raise ValueError(f"the fused decode kernel does not support {why}")
    if axis_key not in ("token", "channel"):
        raise ValueError(f"axis_key must be 'token' or 'channel', got {axis_key!r}")
    for name, t in (("sink_keys", sink_keys), ("sink_values", sink_values), ("recent_keys", recent_keys),
                    ("recent_values", recent_values)):
        if t.shape[0] != batch_size or t.shape[1] != num_kv_heads or t.shape[-1] != head_dim:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{batch_size}, {num_kv_heads}, *, {head_dim}]")
        if t.dtype != query_states.dtype:
            raise ValueError(f"{name} is {t.dtype} but the query is {query_states.dtype}")
    if num_sink > sink_keys.shape[2] or num_recent > recent_keys.shape[2]:
        raise ValueError(f"num_sink={num_sink} / num_recent={num_recent} exceed the sink / window capacity")
    config = config or default_config(nbits, head_dim, axis_key, block_length)
    device = query_states.device

    def last_contiguous(t: torch.Tensor) -> torch.Tensor:
        return t if t.stride(-1) == 1 else t.contiguous()

    query_states = last_contiguous(query_states)
    sink_keys, sink_values = last_contiguous(sink_keys), last_contiguous(sink_values)
    recent_keys, recent_values = last_contiguous(recent_keys), last_contiguous(recent_values)
    if sink_keys.stride() != sink_values.stride():
        sink_keys, sink_values = sink_keys.contiguous(), sink_values.contiguous()
    if recent_keys.stride() != recent_values.stride():
        recent_keys, recent_values = recent_keys.contiguous(), recent_values.contiguous()
    if sink_keys.numel() == 0:  # no sink storage: hand the kernel any valid pointer (it loads nothing)
        sink_keys = sink_values = recent_keys
    if recent_keys.numel() == 0:
        recent_keys = recent_values = sink_keys if sink_keys.numel() else query_states

    if num_stored:
        packed = head_dim * nbits // 8
        if key_codes is None or key_codes.shape[-1] != packed or value_codes.shape[-1] != packed:
            raise ValueError(f"key/value codes must have {packed} packed bytes per token for nbits={nbits}")
        if key_codes.shape[2] < num_stored:
            raise ValueError(f"num_stored={num_stored} exceeds the middle capacity {key_codes.shape[2]}")
        key_codes, value_codes = last_contiguous(key_codes), last_contiguous(value_codes)
        key_scale, key_zero = last_contiguous(key_scale), last_contiguous(key_zero)
        value_scale, value_zero = last_contiguous(value_scale), last_contiguous(value_zero)
        if key_codes.stride() != value_codes.stride():
            key_codes, value_codes = key_codes.contiguous(), value_codes.contiguous()
        if key_scale.stride() != key_zero.stride():
            key_scale, key_zero = key_scale.contiguous(), key_zero.contiguous()
        if value_scale.stride() != value_zero.stride():
            value_scale, value_zero = value_scale.contiguous(), value_zero.contiguous()
        expected_key_groups = head_dim if axis_key == "channel" else head_dim // q_group_size
        if key_scale.shape[-1] != expected_key_groups or value_scale.shape[-1] != head_dim // q_group_size:
            raise ValueError(
                f"scale shapes {tuple(key_scale.shape)} / {tuple(value_scale.shape)} do not match "
                f"axis_key={axis_key!r}, q_group_size={q_group_size}, head_dim={head_dim}"
            )
    else:  # no middle yet: any valid pointers (the middle programs do not exist)
        key_codes = value_codes = key_scale = key_zero = value_scale = value_zero = sink_keys
    has_padding = row_padding is not None
    if has_padding:
        row_padding = row_padding.to(device=device, dtype=torch.int32).contiguous()
    else:
        row_padding = sink_keys  # unused

    num_splits, tokens_per_split = _splits(num_stored, batch_size * num_kv_heads, config, device)
    num_partials = num_splits + 1  # the last one reads the 16-bit regions
    partial_out = torch.empty(batch_size, num_heads, num_partials, head_dim, device=device, dtype=torch.float32)
    partial_lse = torch.empty(batch_size, num_heads, num_partials, device=device, dtype=torch.float32)
    out = torch.empty(batch_size, 1, num_heads, head_dim, device=device, dtype=query_states.dtype)
    scaling = head_dim**-0.5 if scaling is None else float(scaling)

    _selective_decode_partial_kernel[(num_partials, batch_size * num_kv_heads)](
        query_states, sink_keys, sink_values, recent_keys, recent_values,
        key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
        row_padding, partial_out, partial_lse,
        num_sink, num_stored, num_recent, tokens_per_split, num_kv_heads, num_partials,
        scaling * _LOG2E,
        query_states.stride(0), query_states.stride(1),
        sink_keys.stride(0), sink_keys.stride(1), sink_keys.stride(2),
        recent_keys.stride(0), recent_keys.stride(1), recent_keys.stride(2),
        key_codes.stride(0), key_codes.stride(1), key_codes.stride(2),
        key_scale.stride(0), key_scale.stride(1), key_scale.stride(2),
        value_scale.stride(0), value_scale.stride(1), value_scale.stride(2),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        NBITS=nbits,
        Q_GROUP=q_group_size,
        KEY_PER_CHANNEL=axis_key == "channel",
        KEY_BLOCK=block_length,
        KEY_ROWS=_key_rows(config.block_n, block_length),
        HAS_PADDING=has_padding,
        BLOCK_N=config.block_n,
        BLOCK_EXACT=config.block_exact,
        DOT_PRECISION="ieee" if query_states.dtype == torch.float32 else "tf32",
        FAST_CODES=_fast_codes(config, query_states),
        PREFETCH=config.prefetch,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    _merge_partials_kernel[(batch_size * num_heads,)](
        partial_out, partial_lse, out,
        num_heads, num_partials,
        out.stride(0), out.stride(2),
        HEAD_DIM=head_dim,
        BLOCK_S=min(32, triton.next_power_of_2(num_partials)),
        num_warps=4 if head_dim >= 128 else 2,
    )
    return out


def bytes_read(
    batch_size: int, num_heads: int, num_kv_heads: int, head_dim: int, num_exact: int, num_stored: int,
    nbits: int, q_group_size: int, axis_key: str, block_length: int, element_size: int = 2,
) -> int:
    """Bytes one call must read from memory: query, 16-bit tokens, codes and scales/zeros (for GB/s)."""
    rows = batch_size * num_kv_heads
    exact = rows * num_exact * 2 * head_dim * element_size
    codes = rows * num_stored * 2 * head_dim * nbits // 8
    value_scales = rows * num_stored * 2 * (head_dim // q_group_size) * 2
    if axis_key == "channel":
        key_scales = rows * math.ceil(num_stored / block_length) * 2 * head_dim * 2
    else:
        key_scales = rows * num_stored * 2 * (head_dim // q_group_size) * 2
    query = batch_size * num_heads * head_dim * element_size
    return exact + codes + value_scales + key_scales + query
