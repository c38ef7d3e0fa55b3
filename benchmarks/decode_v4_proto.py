"""Round 5 prototypes: the quantized middle only, int8 per-token keys and values (groups of 64).

    PYTHONPATH=src python benchmarks/decode_v4_proto.py [--ncu]

Experiment, not the library. Structure of every variant:
- codes become float16 by their bits (0x6400 | code = 1024 + code, exact) and go into the dot
  products as they are; scales, zeros and the 1024 offset are applied outside them on
  [tokens, heads] tiles (keys: per (token, group); values: p * scale per group);
- TOK_M=1 puts the tokens in the dot's M dimension and the 4 query heads in N (padded to GP);
  TOK_M=0 puts the heads in M (padded to 16), as kernel v1 does;
- ASM_K / ASM_V convert the codes with two `prmt` per four codes (inline PTX, opaque to Triton's
  layout passes) instead of Triton integer ops.
Each program reads one chunk of one (row, KV head) and writes a partial output and its log2-sum-exp;
the check merges them in PyTorch against a float64 attention.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _codes_f16(c, ASM: tl.constexpr):
    """uint8 codes -> float16 1024 + code."""
    if ASM:
        return tl.inline_asm_elementwise(
            "prmt.b32 $0, $2, 0x64646464, 0x4140; prmt.b32 $1, $2, 0x64646464, 0x4342;",
            "=r,=r,r", [c], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)


@triton.jit
def proto_kernel(Q, KC, KS, KZ, VC, VS, VZ, PartOut, PartLse,
                 num_stored, tokens_per_split, num_splits, scale_log2,
                 stride_ch, stride_sh,
                 GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, QG: tl.constexpr, BN: tl.constexpr,
                 TOK_M: tl.constexpr, ASM_K: tl.constexpr, ASM_V: tl.constexpr):
    # Q [BH, GROUP, D] bf16; codes [BH, C, D] u8; scales [BH, C, 2] f16; PartOut [BH, GROUP, S, D] f32
    split = tl.program_id(0)
    bh = tl.program_id(1)
    NG: tl.constexpr = D // QG
    offs_h = tl.arange(0, GP)
    offs_j = tl.arange(0, QG)
    offs_n = tl.arange(0, BN)
    KC += bh * stride_ch
    VC += bh * stride_ch
    KS += bh * stride_sh
    KZ += bh * stride_sh
    VS += bh * stride_sh
    VZ += bh * stride_sh
    Q += bh * GROUP * D
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, num_stored)
    head_ok = offs_h < GROUP
    if TOK_M:
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc0 = tl.zeros([QG, GP], tl.float32)
        acc1 = tl.zeros([QG, GP], tl.float32)
        qT0 = tl.load(Q + offs_j[:, None] + offs_h[None, :] * D, mask=head_ok[None, :], other=0.0).to(tl.float16)
        qT1 = tl.load(Q + QG + offs_j[:, None] + offs_h[None, :] * D, mask=head_ok[None, :], other=0.0).to(tl.float16)
        qs0 = tl.sum(qT0.to(tl.float32), 0)
        qs1 = tl.sum(qT1.to(tl.float32), 0)
        for start in range(lo, hi, BN):
            pos = start + offs_n
            valid = pos < hi
            k0 = _codes_f16(tl.load(KC + pos[:, None] * D + offs_j[None, :], mask=valid[:, None], other=0), ASM_K)
            k1 = _codes_f16(tl.load(KC + pos[:, None] * D + QG + offs_j[None, :], mask=valid[:, None], other=0), ASM_K)
            ks0 = tl.load(KS + pos * NG, mask=valid, other=0.0).to(tl.float32)
            kz0 = tl.load(KZ + pos * NG, mask=valid, other=0.0).to(tl.float32)
            ks1 = tl.load(KS + pos * NG + 1, mask=valid, other=0.0).to(tl.float32)
            kz1 = tl.load(KZ + pos * NG + 1, mask=valid, other=0.0).to(tl.float32)
            s0 = tl.dot(k0, qT0)
            s1 = tl.dot(k1, qT1)
            s = ks0[:, None] * (s0 - 1024.0 * qs0[None, :]) + kz0[:, None] * qs0[None, :]
            s += ks1[:, None] * (s1 - 1024.0 * qs1[None, :]) + kz1[:, None] * qs1[None, :]
            s = tl.where(valid[:, None], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, 0)
            vs0 = tl.load(VS + pos * NG, mask=valid, other=0.0).to(tl.float32)
            vz0 = tl.load(VZ + pos * NG, mask=valid, other=0.0).to(tl.float32)
            vs1 = tl.load(VS + pos * NG + 1, mask=valid, other=0.0).to(tl.float32)
            vz1 = tl.load(VZ + pos * NG + 1, mask=valid, other=0.0).to(tl.float32)
            v0 = _codes_f16(tl.load(VC + pos[:, None] * D + offs_j[None, :], mask=valid[:, None], other=0), ASM_V)
            v1 = _codes_f16(tl.load(VC + pos[:, None] * D + QG + offs_j[None, :], mask=valid[:, None], other=0), ASM_V)
            ps0 = (p * vs0[:, None]).to(tl.float16)
            ps1 = (p * vs1[:, None]).to(tl.float16)
            c0 = tl.sum(p * vz0[:, None] - 1024.0 * ps0.to(tl.float32), 0)
            c1 = tl.sum(p * vz1[:, None] - 1024.0 * ps1.to(tl.float32), 0)
            acc0 = acc0 * alpha[None, :] + c0[None, :]
            acc1 = acc1 * alpha[None, :] + c1[None, :]
            acc0 = tl.dot(tl.trans(v0), ps0, acc0)
            acc1 = tl.dot(tl.trans(v1), ps1, acc1)
            m_i = m_new
        out_ptr = PartOut + ((bh * GROUP + offs_h[None, :]) * num_splits + split) * D + offs_j[:, None]
        tl.store(out_ptr, acc0 / l_i[None, :], mask=head_ok[None, :])
        tl.store(out_ptr + QG, acc1 / l_i[None, :], mask=head_ok[None, :])
    else:
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc0 = tl.zeros([GP, QG], tl.float32)
        acc1 = tl.zeros([GP, QG], tl.float32)
        q0 = tl.load(Q + offs_j[None, :] + offs_h[:, None] * D, mask=head_ok[:, None], other=0.0).to(tl.float16)
        q1 = tl.load(Q + QG + offs_j[None, :] + offs_h[:, None] * D, mask=head_ok[:, None], other=0.0).to(tl.float16)
        qs0 = tl.sum(q0.to(tl.float32), 1)
        qs1 = tl.sum(q1.to(tl.float32), 1)
        for start in range(lo, hi, BN):
            pos = start + offs_n
            valid = pos < hi
            k0 = _codes_f16(tl.load(KC + pos[:, None] * D + offs_j[None, :], mask=valid[:, None], other=0), ASM_K)
            k1 = _codes_f16(tl.load(KC + pos[:, None] * D + QG + offs_j[None, :], mask=valid[:, None], other=0), ASM_K)
            ks0 = tl.load(KS + pos * NG, mask=valid, other=0.0).to(tl.float32)
            kz0 = tl.load(KZ + pos * NG, mask=valid, other=0.0).to(tl.float32)
            ks1 = tl.load(KS + pos * NG + 1, mask=valid, other=0.0).to(tl.float32)
            kz1 = tl.load(KZ + pos * NG + 1, mask=valid, other=0.0).to(tl.float32)
            s0 = tl.dot(q0, tl.trans(k0))
            s1 = tl.dot(q1, tl.trans(k1))
            s = ks0[None, :] * (s0 - 1024.0 * qs0[:, None]) + kz0[None, :] * qs0[:, None]
            s += ks1[None, :] * (s1 - 1024.0 * qs1[:, None]) + kz1[None, :] * qs1[:, None]
            s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vs0 = tl.load(VS + pos * NG, mask=valid, other=0.0).to(tl.float32)
            vz0 = tl.load(VZ + pos * NG, mask=valid, other=0.0).to(tl.float32)
            vs1 = tl.load(VS + pos * NG + 1, mask=valid, other=0.0).to(tl.float32)
            vz1 = tl.load(VZ + pos * NG + 1, mask=valid, other=0.0).to(tl.float32)
            v0 = _codes_f16(tl.load(VC + pos[:, None] * D + offs_j[None, :], mask=valid[:, None], other=0), ASM_V)
            v1 = _codes_f16(tl.load(VC + pos[:, None] * D + QG + offs_j[None, :], mask=valid[:, None], other=0), ASM_V)
            ps0 = (p * vs0[None, :]).to(tl.float16)
            ps1 = (p * vs1[None, :]).to(tl.float16)
            c0 = tl.sum(p * vz0[None, :] - 1024.0 * ps0.to(tl.float32), 1)
            c1 = tl.sum(p * vz1[None, :] - 1024.0 * ps1.to(tl.float32), 1)
            acc0 = acc0 * alpha[:, None] + c0[:, None]
            acc1 = acc1 * alpha[:, None] + c1[:, None]
            acc0 = tl.dot(ps0, v0, acc0)
            acc1 = tl.dot(ps1, v1, acc1)
            m_i = m_new
        out_ptr = PartOut + ((bh * GROUP + offs_h[:, None]) * num_splits + split) * D + offs_j[None, :]
        tl.store(out_ptr, acc0 / l_i[:, None], mask=head_ok[:, None])
        tl.store(out_ptr + QG, acc1 / l_i[:, None], mask=head_ok[:, None])
    lse = m_i + tl.log2(l_i)
    tl.store(PartLse + (bh * GROUP + offs_h) * num_splits + split, lse, mask=head_ok)



@triton.jit
def proto_kernel_b(Q, KC, KS, KZ, VC, VS, VZ, PartOut, PartLse,
                   num_stored, tokens_per_split, num_splits, scale_log2,
                   stride_ch, stride_sh,
                   GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, QG: tl.constexpr, BN: tl.constexpr,
                   ASM_K: tl.constexpr, ASM_V: tl.constexpr, PREFETCH: tl.constexpr):
    """Tokens in M; each scale tensor read as one [BN, 2] tile (both groups), optionally one tile ahead."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    NG: tl.constexpr = D // QG
    offs_h = tl.arange(0, GP)
    offs_j = tl.arange(0, QG)
    offs_n = tl.arange(0, BN)
    offs_g = tl.arange(0, 2)
    KC += bh * stride_ch
    VC += bh * stride_ch
    KS += bh * stride_sh
    KZ += bh * stride_sh
    VS += bh * stride_sh
    VZ += bh * stride_sh
    Q += bh * GROUP * D
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, num_stored)
    head_ok = offs_h < GROUP
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc0 = tl.zeros([QG, GP], tl.float32)
    acc1 = tl.zeros([QG, GP], tl.float32)
    qT0 = tl.load(Q + offs_j[:, None] + offs_h[None, :] * D, mask=head_ok[None, :], other=0.0).to(tl.float16)
    qT1 = tl.load(Q + QG + offs_j[:, None] + offs_h[None, :] * D, mask=head_ok[None, :], other=0.0).to(tl.float16)
    qs0 = tl.sum(qT0.to(tl.float32), 0)
    qs1 = tl.sum(qT1.to(tl.float32), 0)
    pos = lo + offs_n
    valid = pos < hi
    s_offs = pos[:, None] * NG + offs_g[None, :]
    ks = tl.load(KS + s_offs, mask=valid[:, None], other=0.0)
    kz = tl.load(KZ + s_offs, mask=valid[:, None], other=0.0)
    vs = tl.load(VS + s_offs, mask=valid[:, None], other=0.0)
    vz = tl.load(VZ + s_offs, mask=valid[:, None], other=0.0)
    for start in range(lo, hi, BN):
        pos = start + offs_n
        valid = pos < hi
        if not PREFETCH:
            s_offs = pos[:, None] * NG + offs_g[None, :]
            ks = tl.load(KS + s_offs, mask=valid[:, None], other=0.0)
            kz = tl.load(KZ + s_offs, mask=valid[:, None], other=0.0)
            vs = tl.load(VS + s_offs, mask=valid[:, None], other=0.0)
            vz = tl.load(VZ + s_offs, mask=valid[:, None], other=0.0)
        k0 = _codes_f16(tl.load(KC + pos[:, None] * D + offs_j[None, :], mask=valid[:, None], other=0), ASM_K)
        k1 = _codes_f16(tl.load(KC + pos[:, None] * D + QG + offs_j[None, :], mask=valid[:, None], other=0), ASM_K)
        v0 = _codes_f16(tl.load(VC + pos[:, None] * D + offs_j[None, :], mask=valid[:, None], other=0), ASM_V)
        v1 = _codes_f16(tl.load(VC + pos[:, None] * D + QG + offs_j[None, :], mask=valid[:, None], other=0), ASM_V)
        ks0, ks1 = tl.split(ks.to(tl.float32))
        kz0, kz1 = tl.split(kz.to(tl.float32))
        vs0, vs1 = tl.split(vs.to(tl.float32))
        vz0, vz1 = tl.split(vz.to(tl.float32))
        if PREFETCH:  # the next tile's scales, while this one computes
            nxt = pos + BN
            s_offs = nxt[:, None] * NG + offs_g[None, :]
            nvalid = (nxt < hi)[:, None]
            ks = tl.load(KS + s_offs, mask=nvalid, other=0.0)
            kz = tl.load(KZ + s_offs, mask=nvalid, other=0.0)
            vs = tl.load(VS + s_offs, mask=nvalid, other=0.0)
            vz = tl.load(VZ + s_offs, mask=nvalid, other=0.0)
        s0 = tl.dot(k0, qT0)
        s1 = tl.dot(k1, qT1)
        s = ks0[:, None] * (s0 - 1024.0 * qs0[None, :]) + kz0[:, None] * qs0[None, :]
        s += ks1[:, None] * (s1 - 1024.0 * qs1[None, :]) + kz1[:, None] * qs1[None, :]
        s = tl.where(valid[:, None], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        ps0 = (p * vs0[:, None]).to(tl.float16)
        ps1 = (p * vs1[:, None]).to(tl.float16)
        c0 = tl.sum(p * vz0[:, None] - 1024.0 * ps0.to(tl.float32), 0)
        c1 = tl.sum(p * vz1[:, None] - 1024.0 * ps1.to(tl.float32), 0)
        acc0 = acc0 * alpha[None, :] + c0[None, :]
        acc1 = acc1 * alpha[None, :] + c1[None, :]
        acc0 = tl.dot(tl.trans(v0), ps0, acc0)
        acc1 = tl.dot(tl.trans(v1), ps1, acc1)
        m_i = m_new
    out_ptr = PartOut + ((bh * GROUP + offs_h[None, :]) * num_splits + split) * D + offs_j[:, None]
    tl.store(out_ptr, acc0 / l_i[None, :], mask=head_ok[None, :])
    tl.store(out_ptr + QG, acc1 / l_i[None, :], mask=head_ok[None, :])
    lse = m_i + tl.log2(l_i)
    tl.store(PartLse + (bh * GROUP + offs_h) * num_splits + split, lse, mask=head_ok)


# name -> launch settings (kernel "a": proto_kernel, "b": proto_kernel_b); split_x multiplies the splits
_A = dict(kernel="a", TOK_M=1, GP=8, BN=64, num_warps=4, num_stages=2, ASM_K=0, ASM_V=0, split_x=1)
_B = dict(kernel="b", GP=8, BN=64, num_warps=1, num_stages=2, ASM_K=0, ASM_V=0, PREFETCH=1, split_x=1)
VARIANTS = {
    "a t1 gp8 bn64 w1": dict(_A, num_warps=1),
    "a t1 gp8 bn64 w1 asmK": dict(_A, num_warps=1, ASM_K=1),
    "a t1 gp8 bn64 w1 asmKV": dict(_A, num_warps=1, ASM_K=1, ASM_V=1),
    "a t0 gp16 bn64 w1": dict(_A, TOK_M=0, GP=16, num_warps=1),
    "b bn64 w1": dict(_B),
    "b bn64 w1 noprefetch": dict(_B, PREFETCH=0),
    "b bn64 w1 asmK": dict(_B, ASM_K=1),
    "b bn64 w1 asmKV": dict(_B, ASM_K=1, ASM_V=1),
    "b bn32 w1": dict(_B, BN=32),
    "b bn32 w1 asmK": dict(_B, BN=32, ASM_K=1),
    "b bn64 w1 s3": dict(_B, num_stages=3),
    "b bn64 w1 x2 splits": dict(_B, split_x=2),
    "b bn32 w1 x2 splits": dict(_B, BN=32, split_x=2),
    "b bn64 w2": dict(_B, num_warps=2),
    "b bn128 w2": dict(_B, BN=128, num_warps=2),
    "b bn128 w4": dict(_B, BN=128, num_warps=4),
    "b bn32 w1 r168": dict(_B, BN=32, maxnreg=168),
    "b bn32 w1 asmK r168": dict(_B, BN=32, ASM_K=1, maxnreg=168),
    "b bn32 w1 asmK x2 splits": dict(_B, BN=32, ASM_K=1, split_x=2),
    "b bn64 w1 asmK x2 splits": dict(_B, ASM_K=1, split_x=2),
}
GROUP, D, QG = 4, 128, 64


def make_inputs(rows: int, num_stored: int, device: str):
    g = torch.Generator(device=device).manual_seed(rows * 7 + num_stored)
    q = torch.randn(rows, GROUP, D, device=device, dtype=torch.bfloat16, generator=g)
    kc = torch.randint(0, 256, (rows, num_stored, D), device=device, dtype=torch.uint8, generator=g)
    vc = torch.randint(0, 256, (rows, num_stored, D), device=device, dtype=torch.uint8, generator=g)

    def sc():
        return (torch.rand(rows, num_stored, D // QG, device=device, generator=g) * 0.02 + 0.01).half()

    def zr():
        return (-torch.rand(rows, num_stored, D // QG, device=device, generator=g)).half()

    return q, kc, sc(), zr(), vc, sc(), zr()


def launch(variant, inputs, num_splits: int, scaling: float):
    v = dict(VARIANTS[variant])
    kernel = proto_kernel if v.pop("kernel") == "a" else proto_kernel_b
    num_splits *= v.pop("split_x")
    bn = v["BN"]
    q, kc, ks, kz, vc, vs, vz = inputs
    rows, num_stored, _ = kc.shape
    tiles = triton.cdiv(num_stored, bn)
    tokens_per_split = triton.cdiv(tiles, num_splits) * bn
    num_splits = triton.cdiv(num_stored, tokens_per_split)
    part_out = torch.empty(rows, GROUP, num_splits, D, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(rows, GROUP, num_splits, device=q.device, dtype=torch.float32)
    kernel[(num_splits, rows)](
        q, kc, ks, kz, vc, vs, vz, part_out, part_lse, num_stored, tokens_per_split, num_splits,
        scaling * 1.4426950408889634, kc.stride(0), ks.stride(0), GROUP=GROUP, D=D, QG=QG, **v)
    return part_out, part_lse


def merge(part_out, part_lse):
    w = torch.softmax(part_lse * 0.6931471805599453, dim=-1)  # lse is log2
    return (part_out * w[..., None]).sum(-2)


def reference(inputs, scaling):
    q, kc, ks, kz, vc, vs, vz = [t.double() for t in inputs]
    rows, n, _ = kc.shape
    k = (kc.view(rows, n, D // QG, QG) * ks[..., None] + kz[..., None]).view(rows, n, D)
    v = (vc.view(rows, n, D // QG, QG) * vs[..., None] + vz[..., None]).view(rows, n, D)
    s = torch.einsum("rgd,rnd->rgn", q, k) * scaling
    return torch.einsum("rgn,rnd->rgd", torch.softmax(s, -1), v)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ncu", nargs="*", default=None, help="run these variants once each (for ncu), no timing")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "proto.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scaling = D**-0.5
    if device == "cpu":  # interpreter check of the non-asm variants at a small size
        inputs = make_inputs(2, 300, device)
        want = reference(inputs, scaling)
        for name, v in VARIANTS.items():
            if v["ASM_K"] or v["ASM_V"]:
                continue
            got = merge(*launch(name, inputs, 3, scaling)).double()
            err = ((got - want).norm() / want.norm()).item()
            print(f"{name}: rel err {err:.2e}")
            assert err < 3e-3, name
        return
    from triton.testing import do_bench, do_bench_cudagraph

    sys.path.insert(0, os.path.dirname(__file__))
    from decode_attention import random_storage

    from selkv.kernels import decode_attention as v1

    if args.ncu is not None:
        inputs = make_inputs(64, 32768 - 160, device)
        for name in args.ncu or VARIANTS:
            launch(name, inputs, 16, scaling)
        storage = random_storage(8, 32768, 8, "token", 64)
        query = torch.randn(8, 32, 1, D, device=device, dtype=torch.bfloat16)
        v1.selective_decode_attention(query, storage)
        torch.cuda.synchronize()
        return
    results = []
    for rows, splits in ((8, 128), (64, 16)):  # 1 x 32k and 8 x 32k with 8 KV heads
        storage = random_storage(rows // 8, 32768, 8, "token", 64)
        query = torch.randn(rows // 8, 32, 1, D, device=device, dtype=torch.bfloat16)
        ms = do_bench_cudagraph(lambda: v1.selective_decode_attention(query, storage), rep=200)
        ms2 = do_bench(lambda: v1.selective_decode_attention(query, storage), warmup=50, rep=300, return_mode="median")
        k = torch.randn(rows // 8, 8, 32768, D, device=device, dtype=torch.bfloat16)
        vv = torch.randn_like(k)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(query, k, vv, enable_gqa=True)  # noqa: E731
        ms3 = do_bench_cudagraph(sdpa, rep=200)
        ms4 = do_bench(sdpa, warmup=50, rep=300, return_mode="median")
        print(f"{rows:3d} {'v1 (src, whole call)':28s} graph {ms:.4f} ms  do_bench {ms2:.4f} ms", flush=True)
        print(f"{rows:3d} {'bf16 SDPA':28s} graph {ms3:.4f} ms  do_bench {ms4:.4f} ms", flush=True)
        results += [dict(rows=rows, variant="v1", ms_graph=ms, ms=ms2), dict(rows=rows, variant="sdpa", ms_graph=ms3, ms=ms4)]
        del storage, k, vv
        num_stored = 32768 - 160
        inputs = make_inputs(rows, num_stored, device)
        want = reference([t[:2] for t in inputs], scaling)
        for name in VARIANTS:
            try:
                got = merge(*launch(name, inputs, splits, scaling))[:2].double()
                err = ((got - want).norm() / want.norm()).item()
                if not err < 3e-3:
                    raise AssertionError(f"rel err {err:.2e}")
                ms = do_bench_cudagraph(lambda: launch(name, inputs, splits, scaling), rep=200)
                ms2 = do_bench(lambda: launch(name, inputs, splits, scaling), warmup=50, rep=300, return_mode="median")
            except Exception as e:  # noqa: BLE001
                print(f"{rows} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            results.append(dict(rows=rows, variant=name, err=err, ms_graph=ms, ms=ms2))
            print(f"{rows:3d} {name:28s} err {err:.1e} graph {ms:.4f} ms  do_bench {ms2:.4f} ms", flush=True)
        del inputs
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
