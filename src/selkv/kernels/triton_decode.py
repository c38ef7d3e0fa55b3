"""The Triton kernels of selkv's fused decode attention (launched by ``decode_attention.py``).

One decode step (query length 1) attends over a layer's cache as it is stored::

    [ sink: 16-bit ][ middle: key/value codes + float16 scales/zeros ][ window: 16-bit ]

The kernels read the codes in registers and never write a 16-bit copy of the
history: codes enter the dot products as float16 (1024 + code, by their bits)
and scales, zeros and offsets are applied outside them (see the comment above
``_plane_ptx``). Flash-decoding: the middle is cut into splits of
``tokens_per_split`` tokens, one program per (split, batch row, KV head); one more
program per (row, head) reads the 16-bit sink and window. One warp per program.
Each program loads its keys/values once for all the query heads that share the KV
head (GQA) and writes a partial output with its log-sum-exp; a second kernel,
``_merge_partials_kernel``, merges the partials (and rotates the middle's part back when the values are
stored rotated).

Reading order: ``_selective_decode_partial_kernel`` (the entry point) and its 16-bit tiles
(``_exact_tile``), then the quantized middle (``_middle_split`` and its helpers), then the merge.
Kernels never allocate; the launcher validates, allocates and picks the meta-parameters.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _exact_tile(q, Keys, Values, offs, valid, m_i, l_i, acc, scale_log2, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) [HEADS_M heads] with one tile of 16-bit keys/values."""
    k = tl.load(Keys + offs, mask=valid[:, None], other=0.0)
    v = tl.load(Values + offs, mask=valid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep exp2 finite
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# Lengths that change from one decode step to the next are not specialized on (Triton specializes an
# int argument on == 1 and on divisibility by 16: a decode loop would compile a new kernel whenever
# num_recent crossed such a value, seconds each, in the middle of generation).
_VARYING_LENGTHS = [
    "num_sink",
    "num_stored",
    "num_recent",
    "tokens_per_split",
    "num_partials",
    "recent_capacity",
    "last_block",
]


@triton.jit(do_not_specialize=_VARYING_LENGTHS)
def _selective_decode_partial_kernel(
    # pointers: query [B, Hq, 1, D]; the query the middle's keys are read with ([B, Hq, 1, D], same strides:
    # the query itself (also when ROTATE), or query @ key_rotation from the launcher); 16-bit sink/window [B, H, cap, D]
    Q,
    QMiddle,
    SinkK,
    SinkV,
    RecentK,
    RecentV,
    # [D, D] key_rotation^T * sqrt(D) in the query's dtype, every entry +-1 (unused unless ROTATE)
    Rotation,
    # middle: codes [B, H, C, P] uint8 (P by each one's bit width); scales/zeros float16 (layouts in the
    # launcher's docstring)
    KCodes,
    KScale,
    KZero,
    VCodes,
    VScale,
    VZero,
    # [B] int32 left padding of each row (unused unless HAS_PADDING)
    RowPadding,
    # [4] int32 num_sink, num_stored, num_recent, recent_start (unused unless DEVICE_LENGTHS)
    Lengths,
    # outputs: partial outputs [B, Hq, S, D] float32, their log2-sum-exp [B, Hq, S] float32
    PartialOut,
    PartialLse,
    # sizes
    num_sink,
    num_stored,
    num_recent,
    tokens_per_split,
    num_kv_heads,
    num_partials,
    recent_capacity,  # window slots (the ring's size with DEVICE_LENGTHS)
    last_block,  # the middle's last allocated block (key scale row, value-code block) of block_length tokens
    scale_log2,  # softmax scale * log2(e)
    rotation_scale,  # 1 / sqrt(D): Rotation * rotation_scale is key_rotation^T
    # strides (elements); the last dimension of every tensor is contiguous
    stride_qb,
    stride_qh,
    stride_sb,
    stride_sh,
    stride_sn,
    stride_rb,
    stride_rh,
    stride_rn,
    stride_cb,
    stride_ch,
    stride_cn,  # key codes
    stride_vcb,
    stride_vch,  # value codes (each row's blocks are contiguous: block-major)
    stride_ksb,
    stride_ksh,
    stride_ksn,
    stride_vsb,
    stride_vsh,
    stride_vsn,
    # meta-parameters
    HEADS_PER_KV: tl.constexpr,  # query heads per KV head (num_key_value_groups)
    HEADS_M: tl.constexpr,  # HEADS_PER_KV rounded up to a power of two >= 16 (tl.dot's smallest M)
    HEAD_DIM: tl.constexpr,
    KEY_NBITS: tl.constexpr,
    VALUE_NBITS: tl.constexpr,
    Q_GROUP: tl.constexpr,  # channels per scale group (per-token groups)
    KEY_PER_CHANNEL: tl.constexpr,  # keys quantized per channel, one scale row per block of BLOCK_LENGTH tokens (KIVI)
    BLOCK_LENGTH: tl.constexpr,  # the cache's block: tokens per key scale row (KEY_PER_CHANNEL), per value-code block
    KEY_ROWS: tl.constexpr,  # key blocks per middle tile (1 or 2: one scale row each); 0: a scale row per token
    HAS_PADDING: tl.constexpr,
    DEVICE_LENGTHS: tl.constexpr,  # lengths from Lengths; the int lengths are capacities; the window is a ring
    MIN_SPLIT_TILES: tl.constexpr,  # with DEVICE_LENGTHS: tiles per middle program at least
    BLOCK_N: tl.constexpr,  # middle tokens per tile
    BLOCK_EXACT: tl.constexpr,  # 16-bit tokens per tile
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no tf32), else "tf32" (ignored for 16-bit)
    HEADS_N: tl.constexpr,  # HEADS_PER_KV rounded up to a power of two >= 8 (the middle's N dimension)
    CHUNK: tl.constexpr,  # channels per middle value chunk (one byte range, bit plane and scale group)
    KEY_CHUNK: tl.constexpr,  # channels per key chunk: CHUNK, or a whole bit plane for per-channel keys
    CODES_ASM: tl.constexpr,  # convert codes with inline PTX (CUDA only)
    SCALE_PREFETCH: tl.constexpr,  # load the next tile's per-token scales/zeros one tile ahead
    KEY_SCALE_ROWS: tl.constexpr,  # per-channel keys in chunks: each scale row loaded whole (_row_chunks)
    VALUE_SYM: tl.constexpr,  # value groups store no zero: it is -(2^VALUE_NBITS - 1) / 2 * scale (quant.midrise_zero)
    VALUE_DOT: tl.constexpr,  # operands of the middle's value dot (see _value_chunk_update)
    ROTATE: tl.constexpr,  # rotate the query in the middle programs' prologue (Rotation), not QMiddle
    WIDE_OFFSETS: tl.constexpr,  # a storage of more than 2^31 elements: 64-bit offsets (more registers)
):
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads
    if WIDE_OFFSETS:  # every offset derived from the row and head in 64 bits
        b = b.to(tl.int64)
        h = h.to(tl.int64)
    recent_start = 0
    if DEVICE_LENGTHS:
        # A captured decode step: the grid is sized from the capacities, the lengths are read here and
        # the filled middle is spread over the middle programs (those past it find no tiles).
        num_sink = tl.load(Lengths)
        num_stored = tl.load(Lengths + 1)
        num_recent = tl.load(Lengths + 2)
        recent_start = tl.load(Lengths + 3)
        tiles = tl.cdiv(num_stored, BLOCK_N)
        tokens_per_split = tl.maximum(tl.cdiv(tiles, tl.maximum(num_partials - 1, 1)), MIN_SPLIT_TILES) * BLOCK_N

    if split == num_partials - 1:
        # ---- the 16-bit regions: sink, then the window (positions below this row's left padding masked)
        offs_hm = tl.arange(0, HEADS_M)
        offs_d = tl.arange(0, HEAD_DIM)
        head_ok = offs_hm < HEADS_PER_KV
        q_ptrs = Q + b * stride_qb + (h * HEADS_PER_KV + offs_hm)[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=head_ok[:, None], other=0.0)  # [HEADS_M, D]
        m_i = tl.full([HEADS_M], float("-inf"), tl.float32)
        l_i = tl.zeros([HEADS_M], tl.float32)
        acc = tl.zeros([HEADS_M, HEAD_DIM], tl.float32)
        first = 0
        if HAS_PADDING:
            first = tl.load(RowPadding + b)
        offs_e = tl.arange(0, BLOCK_EXACT)
        sink_base = b * stride_sb + h * stride_sh
        for start in range(0, num_sink, BLOCK_EXACT):
            pos = start + offs_e
            valid = (pos < num_sink) & (pos >= first)
            offs = sink_base + pos[:, None] * stride_sn + offs_d[None, :]
            m_i, l_i, acc = _exact_tile(q, SinkK, SinkV, offs, valid, m_i, l_i, acc, scale_log2, DOT_PRECISION)
        recent_base = b * stride_rb + h * stride_rh
        first_recent = first - num_sink - num_stored  # padding that reaches into the window (without sink room)
        for start in range(0, num_recent, BLOCK_EXACT):
            pos = start + offs_e
            valid = (pos < num_recent) & (pos >= first_recent)
            if DEVICE_LENGTHS:  # the i-th oldest window token sits at slot (recent_start + i) % capacity
                pos = (recent_start + pos) % recent_capacity
            offs = recent_base + pos[:, None] * stride_rn + offs_d[None, :]
            m_i, l_i, acc = _exact_tile(q, RecentK, RecentV, offs, valid, m_i, l_i, acc, scale_log2, DOT_PRECISION)
        # ---- partial result of the 16-bit program: normalized output and log2-sum-exp (-inf when empty)
        row = (b * num_kv_heads * HEADS_PER_KV + h * HEADS_PER_KV + offs_hm) * num_partials + split  # [HEADS_M]
        has_any = l_i > 0.0
        out = acc / tl.where(has_any, l_i, 1.0)[:, None]
        lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("-inf"))
        tl.store(PartialOut + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=head_ok[:, None])
        tl.store(PartialLse + row, lse, mask=head_ok)
    else:
        first_stored = 0
        if HAS_PADDING:  # padding beyond the sink (a cache that was not given sink room for it)
            first_stored = tl.load(RowPadding + b) - num_sink
        _middle_split(
            QMiddle,
            Rotation,
            KCodes,
            KScale,
            KZero,
            VCodes,
            VScale,
            VZero,
            PartialOut,
            PartialLse,
            b,
            h,
            split,
            num_stored,
            first_stored,
            tokens_per_split,
            num_kv_heads,
            num_partials,
            last_block,
            scale_log2,
            rotation_scale,
            stride_qb,
            stride_qh,
            stride_cb,
            stride_ch,
            stride_cn,
            stride_vcb,
            stride_vch,
            stride_ksb,
            stride_ksh,
            stride_ksn,
            stride_vsb,
            stride_vsh,
            stride_vsn,
            HEADS_PER_KV,
            HEADS_N,
            HEAD_DIM,
            KEY_NBITS,
            VALUE_NBITS,
            Q_GROUP,
            CHUNK,
            KEY_CHUNK,
            KEY_PER_CHANNEL,
            BLOCK_LENGTH,
            KEY_ROWS,
            BLOCK_N,
            DOT_PRECISION,
            CODES_ASM,
            SCALE_PREFETCH,
            KEY_SCALE_ROWS,
            VALUE_SYM,
            VALUE_DOT,
            ROTATE,
        )


# ------------------------------------------------- the quantized middle
#
# Tokens go in the dot products' M dimension and the HEADS_PER_KV query heads of a KV head in N (padded to
# HEADS_N >= 8), so one warp computes a [BLOCK_N tokens, heads] score tile with no padding in M.
# Codes become 16-bit floats by their bits, 0x6400 | code = 1024 + code (exact in float16), and go
# into the dots as they are; scales, zeros and the 1024 offset are applied outside them, on
# [tokens, heads] tiles. The head dimension is read in chunks of CHUNK channels that share one byte
# column range, one bit plane and one scale group:
#   keys, per-token groups:    q.k[n] = scale[n] (q . (1024 + code[n]) - 1024 sum(q)) + zero[n] sum(q)
#   keys, per-channel groups:  q.k[n] = (q * scale_row) . (1024 + code[n]) - 1024 sum(q * scale_row) + q . zero_row
#   values (per-token groups): sum_n p[n] v[n] = (p * scale) @ (1024 + code) - 1024 sum_n p[n] scale[n]
#                                                + sum_n p[n] zero[n]
# where each 16-bit operand (q * scale_row, p * scale) enters both its dot and its correction term, so
# their rounding cancels. Up to four chunks; each has its own accumulator.


def _plane_ptx(nbits: int, shift: int) -> str:
    """PTX: four packed bytes ($2) -> four float16 1024 + code of one bit plane ($0, $1: two halves each)."""
    select = "prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342;"
    if nbits == 8:
        return select.replace("t,", "$2,")
    mask = ((1 << nbits) - 1) * 0x01010101
    return "{.reg .b32 t; " + f"shr.b32 t, $2, {shift}; and.b32 t, t, {mask:#010x}; " + select + "}"


# Triton's jit cannot build strings: one constant per (bit width, plane shift), chosen in _plane_to_dot.
_PTX_8 = tl.constexpr(_plane_ptx(8, 0))
_PTX_4_0, _PTX_4_4 = tl.constexpr(_plane_ptx(4, 0)), tl.constexpr(_plane_ptx(4, 4))
_PTX_2_0, _PTX_2_2 = tl.constexpr(_plane_ptx(2, 0)), tl.constexpr(_plane_ptx(2, 2))
_PTX_2_4, _PTX_2_6 = tl.constexpr(_plane_ptx(2, 4)), tl.constexpr(_plane_ptx(2, 6))


def _three_bit_ptx(shift: int) -> str:
    """PTX: four low-plane bytes ($2), four high-plane bytes ($3) and a rotation ($4) -> four float16
    1024 + code, where per byte code = (low >> shift) & 3 | 4 if the high byte's bit (2 + rotation) mod 8 is set.
    The four codes of a register share their high bit's position, so one rotation of the high bytes (right by $4
    mod 32, the same amount in each of $4's bytes) moves every bit into place."""
    return (
        "{.reg .b32 t, h; " + f"shr.b32 t, $2, {shift}; and.b32 t, t, 0x03030303; "
        "shf.r.wrap.b32 h, $3, $3, $4; and.b32 h, h, 0x04040404; "
        "or.b32 t, t, h; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }"
    )


_PTX_3_0, _PTX_3_2 = tl.constexpr(_three_bit_ptx(0)), tl.constexpr(_three_bit_ptx(2))
_PTX_3_4, _PTX_3_6 = tl.constexpr(_three_bit_ptx(4)), tl.constexpr(_three_bit_ptx(6))


@triton.jit
def _ptx3(low, high, masks, PTX: tl.constexpr):
    return tl.inline_asm_elementwise(PTX, "=r,=r,r,r,r", [low, high, masks], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _three_bit_ptx_to_dot(low, high, masks, SHIFT: tl.constexpr):
    if SHIFT == 0:
        codes = _ptx3(low, high, masks, _PTX_3_0)
    elif SHIFT == 2:
        codes = _ptx3(low, high, masks, _PTX_3_2)
    elif SHIFT == 4:
        codes = _ptx3(low, high, masks, _PTX_3_4)
    else:
        codes = _ptx3(low, high, masks, _PTX_3_6)
    return codes


@triton.jit
def _ptx_to_dot(bytes_, PTX: tl.constexpr):
    return tl.inline_asm_elementwise(PTX, "=r,=r,r", [bytes_], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _plane_to_dot(bytes_, NBITS: tl.constexpr, SHIFT: tl.constexpr):
    """Packed code bytes -> 1024 + code of plane SHIFT // NBITS as float16, with inline PTX."""
    if NBITS == 8:
        codes = _ptx_to_dot(bytes_, _PTX_8)
    elif NBITS == 4:
        if SHIFT == 0:
            codes = _ptx_to_dot(bytes_, _PTX_4_0)
        else:
            codes = _ptx_to_dot(bytes_, _PTX_4_4)
    elif SHIFT == 0:
        codes = _ptx_to_dot(bytes_, _PTX_2_0)
    elif SHIFT == 2:
        codes = _ptx_to_dot(bytes_, _PTX_2_2)
    elif SHIFT == 4:
        codes = _ptx_to_dot(bytes_, _PTX_2_4)
    else:
        codes = _ptx_to_dot(bytes_, _PTX_2_6)
    return codes


@triton.jit
def _codes_to_dot(bytes_, SHIFT: tl.constexpr, NBITS: tl.constexpr, DOT_DTYPE: tl.constexpr, ASM: tl.constexpr):
    """Packed code bytes -> OFFSET + code: 1024 + code in float16, or the code in float32 (float32 inputs)."""
    if ASM:  # per four packed bytes: shift the plane down, mask, two byte permutes (opaque to Triton,
        # which would otherwise unpack the bytes one per register)
        codes = _plane_to_dot(bytes_, NBITS, SHIFT)
    else:
        if NBITS < 8:
            bytes_ = (bytes_ >> SHIFT) & ((1 << NBITS) - 1)
        codes = (bytes_.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    if DOT_DTYPE == tl.float32:  # float32 inputs: exact codes (an offset of 1024 would cost float32 accuracy)
        codes = codes.to(tl.float32) - 1024.0
    return codes


@triton.jit
def _three_bit_high(C: tl.constexpr, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Byte columns and bit shifts [CHUNK] of the high bits of 3-bit codes of channels [C * CHUNK, (C + 1) * CHUNK).

    Channel p D/4 + j keeps its high bit in byte D/4 + j mod D/8, bit 2p + j div D/8 (see quant.pack)."""
    LOW: tl.constexpr = HEAD_DIM // 4
    HIGH: tl.constexpr = HEAD_DIM // 8
    j = (C * CHUNK) % LOW + tl.arange(0, CHUNK)
    return LOW + j % HIGH, (C * CHUNK) // LOW * 2 + j // HIGH


@triton.jit
def _three_bit_to_dot(
    low,
    high,
    SHIFT: tl.constexpr,
    high_shift,
    C: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ASM: tl.constexpr,
):
    """Low-plane bytes and high-bit bytes of chunk C (their shifts broadcast alike) -> OFFSET + code, as
    _codes_to_dot. A chunk of at most HEAD_DIM / 8 channels keeps every high bit at one position, HIGH_BIT (the
    first channel's, _three_bit_high); wider chunks read high_shift per channel."""
    HIGH_BIT: tl.constexpr = SHIFT + (C * CHUNK) % (HEAD_DIM // 4) // (HEAD_DIM // 8) if CHUNK * 8 <= HEAD_DIM else -1
    if ASM:  # four codes per instruction sequence, rotated by their high bit's position
        if HIGH_BIT >= 0:  # a constant: Triton converts the codes in the dot operand's layout
            rotation = tl.full(low.shape, (HIGH_BIT - 2) % 32, tl.uint8)
        else:  # a per-channel tensor (the high bits' position is uniform over a register's four codes)
            rotation = tl.broadcast_to(((high_shift - 2) & 31).to(tl.uint8), low.shape)
        codes = _three_bit_ptx_to_dot(low, high, rotation, SHIFT)
    else:
        if HIGH_BIT >= 0:
            high_shift = HIGH_BIT
        codes = ((low >> SHIFT) & 3) | (((high >> high_shift) & 1) << 2)
        codes = (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    if DOT_DTYPE == tl.float32:
        codes = codes.to(tl.float32) - 1024.0
    return codes


@triton.jit
def _load_chunk_codes(
    Codes,
    row_offs,
    valid,
    C: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NBITS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ASM: tl.constexpr,
):
    """[BLOCK_N, CHUNK] codes of channels [C * CHUNK, (C + 1) * CHUNK) as 1024 + code."""
    PLANE_BITS: tl.constexpr = 2 if NBITS == 3 else NBITS  # a 3-bit code's low plane (high bits: _three_bit_high)
    PLANE_BYTES: tl.constexpr = HEAD_DIM * PLANE_BITS // 8
    COL: tl.constexpr = (C * CHUNK) % PLANE_BYTES
    SHIFT: tl.constexpr = (C * CHUNK) // PLANE_BYTES * PLANE_BITS
    offs_w = tl.arange(0, CHUNK)
    bytes_ = tl.load(Codes + row_offs[:, None] + COL + offs_w[None, :], mask=valid[:, None], other=0)
    if NBITS == 3:
        high_col, high_shift = _three_bit_high(C, CHUNK, HEAD_DIM)
        high = tl.load(Codes + row_offs[:, None] + high_col[None, :], mask=valid[:, None], other=0)
        return _three_bit_to_dot(bytes_, high, SHIFT, high_shift[None, :], C, CHUNK, HEAD_DIM, DOT_DTYPE, ASM)
    return _codes_to_dot(bytes_, SHIFT, NBITS, DOT_DTYPE, ASM)


@triton.jit
def _load_query_chunk(q_ptrs, head_ok, C: tl.constexpr, CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """[CHUNK, HEADS_N] transposed query chunk in DOT_DTYPE and its float32 column sums (over the chunk)."""
    qT = tl.load(q_ptrs + C * CHUNK, mask=head_ok[None, :], other=0.0).to(DOT_DTYPE)
    return qT, tl.sum(qT.to(tl.float32), 0)


@triton.jit
def _rotated_query_chunk(
    qT_full,
    Rotation,
    rotation_scale,
    C: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Chunk C of the rotated query, transposed, [CHUNK, HEADS_N], and its float32 column sums.

    (q R)^T = R^T q^T; R^T * sqrt(D) is +-1 (Hadamard rotations), exact in 16 bits, so the dot of the
    16-bit query with it is exact up to float32 accumulation: as precise as a float32 matmul.
    """
    offs_w = C * CHUNK + tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    signs = tl.load(Rotation + offs_w[:, None] * HEAD_DIM + offs_d[None, :])  # [CHUNK, HEAD_DIM]
    qT = (tl.dot(signs, qT_full, input_precision=DOT_PRECISION) * rotation_scale).to(DOT_DTYPE)
    return qT, tl.sum(qT.to(tl.float32), 0)


@triton.jit
def _query_slot(
    q_source,
    Rotation,
    rotation_scale,
    head_ok,
    SLOT: tl.constexpr,
    KEY_CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """The query chunk in slot SLOT of four ([KEY_CHUNK, HEADS_N]) and its column sums: key chunk SLOT (modulo
    the number of chunks: a slot past them is never read), or with eight key chunks, chunks 2 SLOT and 2 SLOT + 1
    joined (the sums are the first's: only per-token keys use them, which are never read in eight chunks).
    ``q_source``: the whole query, transposed, to rotate (ROTATE), else pointers to its first chunk."""
    NUM_KEY_CHUNKS: tl.constexpr = HEAD_DIM // KEY_CHUNK
    if NUM_KEY_CHUNKS > 4:
        qT, q_sum = _query_chunk(
            q_source, Rotation, rotation_scale, head_ok, 2 * SLOT, KEY_CHUNK, HEAD_DIM, DOT_DTYPE, DOT_PRECISION, ROTATE
        )
        odd, _ = _query_chunk(
            q_source, Rotation, rotation_scale, head_ok, 2 * SLOT + 1, KEY_CHUNK, HEAD_DIM, DOT_DTYPE, DOT_PRECISION,
            ROTATE,
        )  # fmt: skip
        qT = tl.join(qT, odd)
    else:
        qT, q_sum = _query_chunk(
            q_source, Rotation, rotation_scale, head_ok, SLOT % NUM_KEY_CHUNKS, KEY_CHUNK, HEAD_DIM,
            DOT_DTYPE, DOT_PRECISION, ROTATE,
        )  # fmt: skip
    return qT, q_sum


@triton.jit
def _query_chunk(
    q_source,
    Rotation,
    rotation_scale,
    head_ok,
    C: tl.constexpr,
    KEY_CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROTATE: tl.constexpr,
):
    if ROTATE:
        qT, q_sum = _rotated_query_chunk(
            q_source, Rotation, rotation_scale, C, KEY_CHUNK, HEAD_DIM, DOT_DTYPE, DOT_PRECISION
        )
    else:
        qT, q_sum = _load_query_chunk(q_source, head_ok, C, KEY_CHUNK, DOT_DTYPE)
    return qT, q_sum


@triton.jit
def _fold_row(codes, qT, ks, kz, s, t, OFFSET: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One chunk of a per-channel key block, its scales ks and zeros kz [KEY_CHUNK] folded into the query: the dot
    accumulates into s [BLOCK_N, HEADS_N], the terms of the correction q . z - OFFSET sum(q * s) into t
    [KEY_CHUNK, HEADS_N] (summed over channels once per tile, _channel_key_scores)."""
    ks = ks.to(tl.float32)
    kz = kz.to(tl.float32)
    q = qT.to(tl.float32)
    q_scaled = (q * ks[:, None]).to(DOT_DTYPE)
    s = tl.dot(codes, q_scaled, s, input_precision=DOT_PRECISION)
    return s, t + q * kz[:, None] - OFFSET * q_scaled.to(tl.float32)


@triton.jit
def _row_chunks(Ptr, row, KEY_CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A whole scale row (one load that the pipeliner can prefetch: a chunk's own row is too narrow for it),
    shaped [KEY_CHUNK, 2, ..., 2] for _chunk_of: channel C * KEY_CHUNK + i at [i, bits of C, the lowest last]."""
    NUM_KEY_CHUNKS: tl.constexpr = HEAD_DIM // KEY_CHUNK
    x = tl.load(Ptr + row + tl.arange(0, HEAD_DIM))
    if NUM_KEY_CHUNKS == 2:
        x = tl.permute(tl.reshape(x, [2, KEY_CHUNK]), (1, 0))
    elif NUM_KEY_CHUNKS == 4:
        x = tl.permute(tl.reshape(x, [2, 2, KEY_CHUNK]), (2, 0, 1))
    else:
        x = tl.permute(tl.reshape(x, [2, 2, 2, KEY_CHUNK]), (3, 0, 1, 2))
    return x


@triton.jit
def _chunk_of(x, C: tl.constexpr, NUM_KEY_CHUNKS: tl.constexpr):
    """Chunk C ([KEY_CHUNK]) of a row from _row_chunks."""
    lo, hi = tl.split(x)
    x = lo if C % 2 == 0 else hi
    if NUM_KEY_CHUNKS > 2:
        lo, hi = tl.split(x)
        x = lo if C // 2 % 2 == 0 else hi
    if NUM_KEY_CHUNKS > 4:
        lo, hi = tl.split(x)
        x = lo if C // 4 % 2 == 0 else hi
    return x


@triton.jit
def _pick(x0, x1, x2, x3, INDEX: tl.constexpr):
    if INDEX == 0:
        x = x0
    elif INDEX == 1:
        x = x1
    elif INDEX == 2:
        x = x2
    else:
        x = x3
    return x


@triton.jit
def _channel_key_scores(
    KCodes,
    KScale,
    KZero,
    row_offs,
    valid,
    start,
    kscale_base,
    stride_ksn,
    last_block,
    qT0,
    qT1,
    qT2,
    qT3,
    KEY_CHUNK: tl.constexpr,
    HEADS_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NBITS: tl.constexpr,
    BLOCK_LENGTH: tl.constexpr,
    KEY_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ASM: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
):
    """[BLOCK_N, HEADS_N] scores q . k of a tile of per-channel keys in KEY_ROWS blocks (1 or 2: one scale row
    each): q . (s * code + z) = (q * s) . (OFFSET + code) + sum(q * z - OFFSET * q * s).

    The chunks' dots accumulate in one tile per row and their correction terms in one [KEY_CHUNK, HEADS_N] tile
    per row, reduced over channels once. With two rows the codes are converted once and each row's scores are
    kept for its half of the tile; a second row past the allocation is read as the first (its tokens are
    past num_stored, masked).
    """
    OFFSET: tl.constexpr = 0.0 if DOT_DTYPE == tl.float32 else 1024.0  # what _codes_to_dot adds to each code
    NUM_KEY_CHUNKS: tl.constexpr = HEAD_DIM // KEY_CHUNK
    first = start // BLOCK_LENGTH
    row0 = kscale_base + first * stride_ksn
    row1 = kscale_base + tl.minimum(first + 1, last_block) * stride_ksn
    PAIRED: tl.constexpr = NUM_KEY_CHUNKS > 4  # each qT holds two chunks (tl.join), see _middle_split
    s0 = tl.zeros([BLOCK_N, HEADS_N], tl.float32)
    t0 = tl.zeros([KEY_CHUNK, HEADS_N], tl.float32)
    s1 = s0
    t1 = t0
    WHOLE_ROWS: tl.constexpr = KEY_ROWS == 1 and NUM_KEY_CHUNKS > 1 and SCALE_ROWS
    if WHOLE_ROWS:
        ks_row = _row_chunks(KScale, row0, KEY_CHUNK, HEAD_DIM)
        kz_row = _row_chunks(KZero, row0, KEY_CHUNK, HEAD_DIM)
    for C in tl.static_range(NUM_KEY_CHUNKS):
        if PAIRED:
            q_even, q_odd = tl.split(_pick(qT0, qT1, qT2, qT3, C // 2))
            qT = q_even if C % 2 == 0 else q_odd
        else:
            qT = _pick(qT0, qT1, qT2, qT3, C)
        codes = _load_chunk_codes(KCodes, row_offs, valid, C, KEY_CHUNK, HEAD_DIM, NBITS, DOT_DTYPE, ASM)
        offs_w = C * KEY_CHUNK + tl.arange(0, KEY_CHUNK)
        if WHOLE_ROWS:
            ks = _chunk_of(ks_row, C, NUM_KEY_CHUNKS)
            kz = _chunk_of(kz_row, C, NUM_KEY_CHUNKS)
        else:
            ks = tl.load(KScale + (row0 + offs_w)).to(tl.float32)
            kz = tl.load(KZero + (row0 + offs_w)).to(tl.float32)
        s0, t0 = _fold_row(codes, qT, ks, kz, s0, t0, OFFSET, DOT_DTYPE, DOT_PRECISION)
        if KEY_ROWS == 2:
            ks = tl.load(KScale + (row1 + offs_w)).to(tl.float32)
            kz = tl.load(KZero + (row1 + offs_w)).to(tl.float32)
            s1, t1 = _fold_row(codes, qT, ks, kz, s1, t1, OFFSET, DOT_DTYPE, DOT_PRECISION)
    s = s0 + tl.sum(t0, 0)[None, :]
    if KEY_ROWS == 2:
        first_half = tl.arange(0, BLOCK_N) < BLOCK_LENGTH
        s = tl.where(first_half[:, None], s, s1 + tl.sum(t1, 0)[None, :])
    return s


@triton.jit
def _key_chunk_scores(
    KCodes,
    KScale,
    KZero,
    row_offs,
    pos,
    valid,
    kscale_base,
    stride_ksn,
    ks_tile,
    kz_tile,
    qT,
    q_sum,
    C: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NBITS: tl.constexpr,
    Q_GROUP: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr,
    BLOCK_LENGTH: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ASM: tl.constexpr,
):
    """[BLOCK_N, HEADS_N] contribution of one channel chunk to the scores q . k (per-token keys, or per-channel
    keys whose blocks do not nest with the tiles)."""
    OFFSET: tl.constexpr = 0.0 if DOT_DTYPE == tl.float32 else 1024.0  # what _codes_to_dot adds to each code
    codes = _load_chunk_codes(KCodes, row_offs, valid, C, CHUNK, HEAD_DIM, NBITS, DOT_DTYPE, ASM)
    offs_w = C * CHUNK + tl.arange(0, CHUNK)
    if KEY_PER_CHANNEL:  # tiles and blocks do not nest (else _channel_key_scores): one scale row per token
        rows = kscale_base + (pos // BLOCK_LENGTH)[:, None] * stride_ksn + offs_w[None, :]
        ks = tl.load(KScale + rows, mask=valid[:, None], other=0.0).to(tl.float32)
        kz = tl.load(KZero + rows, mask=valid[:, None], other=0.0).to(tl.float32)
        keys = ((codes.to(tl.float32) - OFFSET) * ks + kz).to(DOT_DTYPE)
        return tl.dot(keys, qT, input_precision=DOT_PRECISION)
    else:
        ks = _column(ks_tile, (C * CHUNK) // Q_GROUP)
        kz = _column(kz_tile, (C * CHUNK) // Q_GROUP)
        s = tl.dot(codes, qT, input_precision=DOT_PRECISION)
        return ks[:, None] * (s - OFFSET * q_sum[None, :]) + kz[:, None] * q_sum[None, :]


@triton.jit
def _load_value_bytes(
    VCodes,
    code_base,
    start,
    pos,
    valid,
    last_block,
    offs_c,
    PACKED: tl.constexpr,
    VALUE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """[CHUNK, BLOCK_N] value-code bytes of byte columns ``offs_c`` (rows of PACKED bytes, block-major)."""
    if VALUE_BLOCK % BLOCK_N == 0:
        # the tile lies inside one block, whose bytes are allocated (the store's capacity is whole
        # blocks): no mask, so the loads stay wide. Bytes past the stored tokens meet p = 0.
        in_block = tl.multiple_of(start % VALUE_BLOCK, BLOCK_N)  # tiles start at multiples of BLOCK_N
        tile_start = code_base + (start // VALUE_BLOCK) * (VALUE_BLOCK * PACKED) + in_block
        offs_t = tl.arange(0, BLOCK_N)
        bytes_ = tl.load(VCodes + tile_start + offs_c[:, None] * VALUE_BLOCK + offs_t[None, :])
    elif BLOCK_N == 2 * VALUE_BLOCK:
        # two whole blocks, each a contiguous run of VALUE_BLOCK tokens per byte column (no mask: wide
        # loads). A second block past the allocation is read as the first (its tokens meet p = 0).
        first = start // VALUE_BLOCK
        step = (tl.minimum(first + 1, last_block) - first) * (VALUE_BLOCK * PACKED)
        offs_t = tl.arange(0, BLOCK_N)
        tile_start = code_base + first * (VALUE_BLOCK * PACKED)
        bytes_ = tl.load(
            VCodes
            + tile_start
            + (offs_t // VALUE_BLOCK)[None, :] * step
            + offs_c[:, None] * VALUE_BLOCK
            + (offs_t % VALUE_BLOCK)[None, :]
        )
    else:  # tiles span blocks: one address per byte
        token = (pos // VALUE_BLOCK) * (VALUE_BLOCK * PACKED) + pos % VALUE_BLOCK
        bytes_ = tl.load(
            VCodes + code_base + offs_c[:, None] * VALUE_BLOCK + token[None, :], mask=valid[None, :], other=0
        )
    return bytes_


@triton.jit
def _load_value_codes(
    VCodes,
    code_base,
    start,
    pos,
    valid,
    last_block,
    C: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NBITS: tl.constexpr,
    VALUE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    ASM: tl.constexpr,
):
    """[CHUNK, BLOCK_N] value codes (channels x tokens) of channels [C * CHUNK, (C + 1) * CHUNK) as 1024 + code.

    Value codes are block-major (``quant.to_block_major``, blocks of VALUE_BLOCK tokens): the tokens of
    one byte column are adjacent, as the dot's inner dimension wants them.
    """
    PACKED: tl.constexpr = HEAD_DIM * NBITS // 8
    PLANE_BITS: tl.constexpr = 2 if NBITS == 3 else NBITS  # a 3-bit code's low plane (high bits: _three_bit_high)
    PLANE_BYTES: tl.constexpr = HEAD_DIM * PLANE_BITS // 8
    COL: tl.constexpr = (C * CHUNK) % PLANE_BYTES
    SHIFT: tl.constexpr = (C * CHUNK) // PLANE_BYTES * PLANE_BITS
    args = (VCodes, code_base, start, pos, valid, last_block)
    bytes_ = _load_value_bytes(*args, COL + tl.arange(0, CHUNK), PACKED, VALUE_BLOCK, BLOCK_N)
    if NBITS == 3:
        high_col, high_shift = _three_bit_high(C, CHUNK, HEAD_DIM)
        high = _load_value_bytes(*args, high_col, PACKED, VALUE_BLOCK, BLOCK_N)
        return _three_bit_to_dot(bytes_, high, SHIFT, high_shift[:, None], C, CHUNK, HEAD_DIM, DOT_DTYPE, ASM)
    return _codes_to_dot(bytes_, SHIFT, NBITS, DOT_DTYPE, ASM)


@triton.jit
def _value_chunk_update(
    acc,
    VCodes,
    code_base,
    start,
    pos,
    valid,
    last_block,
    vs_tile,
    vz_tile,
    p,
    alpha,
    C: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NBITS: tl.constexpr,
    Q_GROUP: tl.constexpr,
    VALUE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ASM: tl.constexpr,
    VALUE_DOT: tl.constexpr,
):
    """acc [CHUNK, HEADS_N] (channels x heads) rescaled by alpha plus this tile's p @ values on the chunk.

    VALUE_DOT chooses the dot's operands with 16-bit inputs (float32 inputs take exact float32 codes):
    - 0 ("dequant"): values dequantized to float16 in the tile (``code * scale + zero``), then
      ``values @ p``: float16's relative precision at any value magnitude.
    - 1 ("fp16"): ``(1024 + code) @ (p * value_scale)``, the scale folded into p. Small value scales
      (int8 values of RMS below ~0.05) put ``p * value_scale`` among float16's subnormals, which lose
      precision: relative L2 4.8e-2 at value RMS 0.005 (docs/kernel_notes.md, 2026-12-02).
    """
    OFFSET: tl.constexpr = 0.0 if DOT_DTYPE == tl.float32 else 1024.0
    codes = _load_value_codes(
        VCodes,
        code_base,
        start,
        pos,
        valid,
        last_block,
        C,
        CHUNK,
        HEAD_DIM,
        NBITS,
        VALUE_BLOCK,
        BLOCK_N,
        DOT_DTYPE,
        ASM,
    )
    vs = _column(vs_tile, (C * CHUNK) // Q_GROUP)
    vz = _column(vz_tile, (C * CHUNK) // Q_GROUP)
    acc = acc * alpha[None, :]
    if DOT_DTYPE == tl.float16 and VALUE_DOT == 0:
        values = (codes - OFFSET) * vs.to(DOT_DTYPE)[None, :] + vz.to(DOT_DTYPE)[None, :]
        return tl.dot(values, p.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    p_scaled = (p * vs[:, None]).to(DOT_DTYPE)
    acc += tl.sum(p * vz[:, None] - OFFSET * p_scaled.to(tl.float32), 0)[None, :]
    return tl.dot(codes, p_scaled, acc, input_precision=DOT_PRECISION)


@triton.jit
def _value_update(
    acc,
    VCodes,
    code_base,
    start,
    pos,
    valid,
    last_block,
    vs_tile,
    vz_tile,
    p,
    alpha,
    P: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NBITS: tl.constexpr,
    Q_GROUP: tl.constexpr,
    VALUE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ASM: tl.constexpr,
    VALUE_DOT: tl.constexpr,
):
    """_value_chunk_update of accumulator P: chunk P, or with eight chunks (3-bit values of head_dim >= 128, whose
    16-channel chunks keep their high bits at one position) chunks 2P and 2P + 1, joined in one accumulator."""
    if HEAD_DIM // CHUNK > 4:
        even, odd = tl.split(acc)
        even = _value_chunk_update(
            even, VCodes, code_base, start, pos, valid, last_block, vs_tile, vz_tile, p, alpha, 2 * P, CHUNK,
            HEAD_DIM, NBITS, Q_GROUP, VALUE_BLOCK, BLOCK_N, DOT_DTYPE, DOT_PRECISION, ASM, VALUE_DOT,
        )  # fmt: skip
        odd = _value_chunk_update(
            odd, VCodes, code_base, start, pos, valid, last_block, vs_tile, vz_tile, p, alpha, 2 * P + 1, CHUNK,
            HEAD_DIM, NBITS, Q_GROUP, VALUE_BLOCK, BLOCK_N, DOT_DTYPE, DOT_PRECISION, ASM, VALUE_DOT,
        )  # fmt: skip
        acc = tl.join(even, odd)
    else:
        acc = _value_chunk_update(
            acc, VCodes, code_base, start, pos, valid, last_block, vs_tile, vz_tile, p, alpha, P, CHUNK,
            HEAD_DIM, NBITS, Q_GROUP, VALUE_BLOCK, BLOCK_N, DOT_DTYPE, DOT_PRECISION, ASM, VALUE_DOT,
        )  # fmt: skip
    return acc


@triton.jit
def _scale_tiles(
    KScale,
    KZero,
    VScale,
    VZero,
    pos,
    valid,
    kscale_base,
    stride_ksn,
    vscale_base,
    stride_vsn,
    NUM_GROUPS: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr,
    VALUE_NBITS: tl.constexpr,
    VALUE_SYM: tl.constexpr,
):
    """Per-token scales/zeros of a tile as float32 [BLOCK_N, GROUPS_PAD] tiles (keys: zeros if per channel; value
    zeros computed from the scales when VALUE_SYM)."""
    offs_g = tl.arange(0, GROUPS_PAD)
    mask = valid[:, None] & (offs_g < NUM_GROUPS)[None, :]
    v_offs = vscale_base + pos[:, None] * stride_vsn + offs_g[None, :]
    vs = tl.load(VScale + v_offs, mask=mask, other=0.0).to(tl.float32)
    if VALUE_SYM:  # exact in float32: a float16 scale times (2^b - 1) / 2
        vz = vs * (-((1 << VALUE_NBITS) - 1) / 2)
    else:
        vz = tl.load(VZero + v_offs, mask=mask, other=0.0).to(tl.float32)
    if KEY_PER_CHANNEL:
        ks = tl.zeros_like(vs)
        kz = tl.zeros_like(vs)
    else:
        k_offs = kscale_base + pos[:, None] * stride_ksn + offs_g[None, :]
        ks = tl.load(KScale + k_offs, mask=mask, other=0.0).to(tl.float32)
        kz = tl.load(KZero + k_offs, mask=mask, other=0.0).to(tl.float32)
    return ks, kz, vs, vz


@triton.jit
def _column(tile, G: tl.constexpr):
    """Column G of a [BLOCK_N, GROUPS_PAD] tile (GROUPS_PAD 2 or 4), split apart in registers: a sum over a
    masked row would reduce across the lanes that hold the groups (two shuffles per element)."""
    if tile.shape[1] == 2:
        c0, c1 = tl.split(tile)
        if G == 0:
            column = c0
        else:
            column = c1
    else:
        even, odd = tl.split(tl.reshape(tile, [tile.shape[0], 2, 2]))  # columns (0, 2) and (1, 3)
        if G % 2 == 0:
            c0, c2 = tl.split(even)
            column = c0 if G == 0 else c2
        else:
            c1, c3 = tl.split(odd)
            column = c1 if G == 1 else c3
    return column


@triton.jit
def _store_chunk(PartialOut, acc, rows, head_ok, l_safe, C: tl.constexpr, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Accumulator C normalized: channels [C * CHUNK, (C + 1) * CHUNK), or with eight chunks, chunks 2C and 2C + 1
    (joined, see _value_update)."""
    if HEAD_DIM // CHUNK > 4:
        even, odd = tl.split(acc)
        _store_rows(PartialOut, even, rows, head_ok, l_safe, 2 * C * CHUNK + tl.arange(0, CHUNK), HEAD_DIM)
        _store_rows(PartialOut, odd, rows, head_ok, l_safe, (2 * C + 1) * CHUNK + tl.arange(0, CHUNK), HEAD_DIM)
    else:
        _store_rows(PartialOut, acc, rows, head_ok, l_safe, C * CHUNK + tl.arange(0, CHUNK), HEAD_DIM)


@triton.jit
def _store_rows(PartialOut, acc, rows, head_ok, l_safe, offs_w, HEAD_DIM: tl.constexpr):
    tl.store(PartialOut + rows[None, :] * HEAD_DIM + offs_w[:, None], acc / l_safe[None, :], mask=head_ok[None, :])


@triton.jit
def _middle_split(
    Q,
    Rotation,
    KCodes,
    KScale,
    KZero,
    VCodes,
    VScale,
    VZero,
    PartialOut,
    PartialLse,
    b,
    h,
    split,
    num_stored,
    first_stored,
    tokens_per_split,
    num_kv_heads,
    num_partials,
    last_block,
    scale_log2,
    rotation_scale,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ch,
    stride_cn,
    stride_vcb,
    stride_vch,
    stride_ksb,
    stride_ksh,
    stride_ksn,
    stride_vsb,
    stride_vsh,
    stride_vsn,
    HEADS_PER_KV: tl.constexpr,
    HEADS_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KEY_NBITS: tl.constexpr,
    VALUE_NBITS: tl.constexpr,
    Q_GROUP: tl.constexpr,
    CHUNK: tl.constexpr,
    KEY_CHUNK: tl.constexpr,
    KEY_PER_CHANNEL: tl.constexpr,
    BLOCK_LENGTH: tl.constexpr,
    KEY_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CODES_ASM: tl.constexpr,
    SCALE_PREFETCH: tl.constexpr,
    KEY_SCALE_ROWS: tl.constexpr,
    VALUE_SYM: tl.constexpr,
    VALUE_DOT: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """One program: tokens [split * tokens_per_split, ...) of the middle of row b, KV head h.

    Middle tokens below ``first_stored`` are padding and masked; tiles wholly below it are skipped
    (the first tile starts at a multiple of BLOCK_N, as the value-code loads assume).
    """
    NUM_CHUNKS: tl.constexpr = HEAD_DIM // CHUNK
    NUM_KEY_CHUNKS: tl.constexpr = HEAD_DIM // KEY_CHUNK
    DOT_DTYPE: tl.constexpr = tl.float32 if DOT_PRECISION == "ieee" else tl.float16
    offs_hn = tl.arange(0, HEADS_N)
    offs_w = tl.arange(0, KEY_CHUNK)
    offs_n = tl.arange(0, BLOCK_N)
    head_ok = offs_hn < HEADS_PER_KV
    if ROTATE:  # Q is the query itself: rotate it here, once per program (no launch outside the kernel)
        offs_d = tl.arange(0, HEAD_DIM)
        q_source = tl.load(
            Q + b * stride_qb + (h * HEADS_PER_KV + offs_hn)[None, :] * stride_qh + offs_d[:, None],
            mask=head_ok[None, :],
            other=0.0,
        )  # [HEAD_DIM, HEADS_N]
    else:
        q_source = Q + b * stride_qb + (h * HEADS_PER_KV + offs_hn)[None, :] * stride_qh + offs_w[:, None]
    q_args = (q_source, Rotation, rotation_scale, head_ok)
    qT0, q_sum0 = _query_slot(*q_args, 0, KEY_CHUNK, HEAD_DIM, DOT_DTYPE, DOT_PRECISION, ROTATE)
    qT1, q_sum1 = _query_slot(*q_args, 1, KEY_CHUNK, HEAD_DIM, DOT_DTYPE, DOT_PRECISION, ROTATE)
    qT2, q_sum2 = _query_slot(*q_args, 2, KEY_CHUNK, HEAD_DIM, DOT_DTYPE, DOT_PRECISION, ROTATE)
    qT3, q_sum3 = _query_slot(*q_args, 3, KEY_CHUNK, HEAD_DIM, DOT_DTYPE, DOT_PRECISION, ROTATE)
    m_i = tl.full([HEADS_N], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS_N], tl.float32)
    # one accumulator per chunk, or per pair of chunks (joined) when there are eight (_value_update)
    ACC_SHAPE: tl.constexpr = [CHUNK, HEADS_N, 2] if NUM_CHUNKS > 4 else [CHUNK, HEADS_N]
    acc0 = tl.zeros(ACC_SHAPE, tl.float32)
    acc1 = tl.zeros(ACC_SHAPE, tl.float32)
    acc2 = tl.zeros(ACC_SHAPE, tl.float32)
    acc3 = tl.zeros(ACC_SHAPE, tl.float32)
    code_base = b * stride_cb + h * stride_ch
    value_code_base = b * stride_vcb + h * stride_vch
    kscale_base = b * stride_ksb + h * stride_ksh
    vscale_base = b * stride_vsb + h * stride_vsh
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, num_stored)
    lo = tl.maximum(lo, (first_stored // BLOCK_N) * BLOCK_N)  # every tile run has a token at or past first_stored
    lo = tl.where(first_stored >= hi, hi, lo)  # ... and none when padding covers the whole range
    NUM_GROUPS: tl.constexpr = HEAD_DIM // Q_GROUP
    GROUPS_PAD: tl.constexpr = 2 if NUM_GROUPS == 1 else NUM_GROUPS
    scale_args = (KScale, KZero, VScale, VZero)
    scale_bases = (kscale_base, stride_ksn, vscale_base, stride_vsn)
    ks_tile, kz_tile, vs_tile, vz_tile = _scale_tiles(
        *scale_args,
        lo + offs_n,
        lo + offs_n < hi,
        *scale_bases,
        NUM_GROUPS,
        GROUPS_PAD,
        KEY_PER_CHANNEL,
        VALUE_NBITS,
        VALUE_SYM,
    )
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        valid = (pos < hi) & (pos >= first_stored)
        row_offs = code_base + pos * stride_cn
        if SCALE_PREFETCH:  # the next tile's scales load while this tile computes
            next_tiles = _scale_tiles(
                *scale_args,
                pos + BLOCK_N,
                pos + BLOCK_N < hi,
                *scale_bases,
                NUM_GROUPS,
                GROUPS_PAD,
                KEY_PER_CHANNEL,
                VALUE_NBITS,
                VALUE_SYM,
            )
        else:
            ks_tile, kz_tile, vs_tile, vz_tile = _scale_tiles(
                *scale_args, pos, valid, *scale_bases, NUM_GROUPS, GROUPS_PAD, KEY_PER_CHANNEL, VALUE_NBITS, VALUE_SYM
            )
        key_args = (
            KCodes,
            KScale,
            KZero,
            row_offs,
            pos,
            valid,
            kscale_base,
            stride_ksn,
            ks_tile,
            kz_tile,
        )
        if KEY_PER_CHANNEL and KEY_ROWS > 0:
            s = _channel_key_scores(
                KCodes,
                KScale,
                KZero,
                row_offs,
                valid,
                start,
                kscale_base,
                stride_ksn,
                last_block,
                qT0,
                qT1,
                qT2,
                qT3,
                KEY_CHUNK,
                HEADS_N,
                HEAD_DIM,
                KEY_NBITS,
                BLOCK_LENGTH,
                KEY_ROWS,
                BLOCK_N,
                DOT_DTYPE,
                DOT_PRECISION,
                CODES_ASM,
                KEY_SCALE_ROWS,
            )
        else:
            s = _key_chunk_scores(
                *key_args,
                qT0,
                q_sum0,
                0,
                KEY_CHUNK,
                HEAD_DIM,
                KEY_NBITS,
                Q_GROUP,
                KEY_PER_CHANNEL,
                BLOCK_LENGTH,
                DOT_DTYPE,
                DOT_PRECISION,
                CODES_ASM,
            )
            if NUM_KEY_CHUNKS > 1:
                s += _key_chunk_scores(
                    *key_args,
                    qT1,
                    q_sum1,
                    1,
                    KEY_CHUNK,
                    HEAD_DIM,
                    KEY_NBITS,
                    Q_GROUP,
                    KEY_PER_CHANNEL,
                    BLOCK_LENGTH,
                    DOT_DTYPE,
                    DOT_PRECISION,
                    CODES_ASM,
                )
            if NUM_KEY_CHUNKS > 2:
                s += _key_chunk_scores(
                    *key_args,
                    qT2,
                    q_sum2,
                    2,
                    KEY_CHUNK,
                    HEAD_DIM,
                    KEY_NBITS,
                    Q_GROUP,
                    KEY_PER_CHANNEL,
                    BLOCK_LENGTH,
                    DOT_DTYPE,
                    DOT_PRECISION,
                    CODES_ASM,
                )
            if NUM_KEY_CHUNKS > 3:
                s += _key_chunk_scores(
                    *key_args,
                    qT3,
                    q_sum3,
                    3,
                    KEY_CHUNK,
                    HEAD_DIM,
                    KEY_NBITS,
                    Q_GROUP,
                    KEY_PER_CHANNEL,
                    BLOCK_LENGTH,
                    DOT_DTYPE,
                    DOT_PRECISION,
                    CODES_ASM,
                )
        s = tl.where(valid[:, None], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))  # every tile has a valid token: m_new is finite
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        value_args = (VCodes, value_code_base, start, pos, valid, last_block, vs_tile, vz_tile, p, alpha)
        acc0 = _value_update(
            acc0,
            *value_args,
            0,
            CHUNK,
            HEAD_DIM,
            VALUE_NBITS,
            Q_GROUP,
            BLOCK_LENGTH,
            BLOCK_N,
            DOT_DTYPE,
            DOT_PRECISION,
            CODES_ASM,
            VALUE_DOT,
        )
        if NUM_CHUNKS > 1:
            acc1 = _value_update(
                acc1,
                *value_args,
                1,
                CHUNK,
                HEAD_DIM,
                VALUE_NBITS,
                Q_GROUP,
                BLOCK_LENGTH,
                BLOCK_N,
                DOT_DTYPE,
                DOT_PRECISION,
                CODES_ASM,
                VALUE_DOT,
            )
        if NUM_CHUNKS > 2:
            acc2 = _value_update(
                acc2,
                *value_args,
                2,
                CHUNK,
                HEAD_DIM,
                VALUE_NBITS,
                Q_GROUP,
                BLOCK_LENGTH,
                BLOCK_N,
                DOT_DTYPE,
                DOT_PRECISION,
                CODES_ASM,
                VALUE_DOT,
            )
        if NUM_CHUNKS > 3:
            acc3 = _value_update(
                acc3,
                *value_args,
                3,
                CHUNK,
                HEAD_DIM,
                VALUE_NBITS,
                Q_GROUP,
                BLOCK_LENGTH,
                BLOCK_N,
                DOT_DTYPE,
                DOT_PRECISION,
                CODES_ASM,
                VALUE_DOT,
            )
        m_i = m_new
        if SCALE_PREFETCH:
            ks_tile, kz_tile, vs_tile, vz_tile = next_tiles

    # partial result: normalized output and log2-sum-exp (-inf for a program past the filled middle or whose
    # tokens are all padding)
    rows = (b * num_kv_heads * HEADS_PER_KV + h * HEADS_PER_KV + offs_hn) * num_partials + split  # [HEADS_N]
    l_safe = tl.where(head_ok & (l_i > 0.0), l_i, 1.0)
    _store_chunk(PartialOut, acc0, rows, head_ok, l_safe, 0, CHUNK, HEAD_DIM)
    if NUM_CHUNKS > 1:
        _store_chunk(PartialOut, acc1, rows, head_ok, l_safe, 1, CHUNK, HEAD_DIM)
    if NUM_CHUNKS > 2:
        _store_chunk(PartialOut, acc2, rows, head_ok, l_safe, 2, CHUNK, HEAD_DIM)
    if NUM_CHUNKS > 3:
        _store_chunk(PartialOut, acc3, rows, head_ok, l_safe, 3, CHUNK, HEAD_DIM)
    tl.store(PartialLse + rows, tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf")), mask=head_ok)


@triton.jit(do_not_specialize=["num_partials"])
def _merge_partials_kernel(
    # pointers: partial outputs [B, Hq, S, D] float32, log2-sum-exp [B, Hq, S], output [B, 1, Hq, D]
    PartialOut,
    PartialLse,
    Out,
    # [D, D] value_rotation^T * sqrt(D) in the query's dtype (every entry +-1), or value_rotation^T in float32
    # (unused unless VALUE_ROTATE)
    ValueRotation,
    # sizes and strides
    num_heads,
    num_partials,
    stride_ob,
    stride_oh,
    value_rotation_scale,  # ValueRotation * value_rotation_scale is value_rotation^T (1 / sqrt(D), or 1)
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # partials merged per step
    VALUE_ROTATE: tl.constexpr,  # the middle's values are stored rotated: rotate the middle's output back
    ROTATE_CHUNK: tl.constexpr,  # output channels rotated back per step (VALUE_ROTATE)
):
    """One program per (row, query head): the partials merged by their log2-sum-exp, normalized, stored.

    With VALUE_ROTATE the middle programs' partials (every split but the last) hold attention over values
    stored rotated, ``sum_n p_n v_n R``; the last partial, the 16-bit program's, holds unrotated values. The
    middle's partials are merged apart from it, their sum rotated back by ``R^T`` (linear: merging, then
    rotating once, is rotating each), then the 16-bit partial is added and the whole normalized.
    """
    pid = tl.program_id(0).to(tl.int64)  # b * num_heads + head (64-bit: the partials can pass 2^31 elements)
    b = pid // num_heads
    head = pid % num_heads
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
    denom = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    out_ptrs = Out + b * stride_ob + head * stride_oh
    if VALUE_ROTATE:
        exact = num_partials - 1  # the 16-bit program's partial
        m, denom, acc = _merge_range(PartialOut, PartialLse, pid, exact, num_partials, m, denom, acc, HEAD_DIM, BLOCK_S)
        lse = tl.load(PartialLse + pid * num_partials + exact)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)  # 0 for an empty sink and window
        acc = acc * (alpha * value_rotation_scale)
        denom = denom * alpha + w
        denom = tl.where(denom > 0.0, denom, 1.0)
        exact_ptrs = PartialOut + (pid * num_partials + exact) * HEAD_DIM
        for c in range(0, HEAD_DIM, ROTATE_CHUNK):  # out[j] = sum_i acc[i] R^T[i, j] + w exact[j], by chunks of j
            offs_j = c + tl.arange(0, ROTATE_CHUNK)
            rotation = tl.load(ValueRotation + offs_d[:, None] * HEAD_DIM + offs_j[None, :]).to(tl.float32)
            middle = tl.sum(acc[:, None] * rotation, 0)  # +-1 entries: exact products, float32 sums
            out = (middle + w * tl.load(exact_ptrs + offs_j)) / denom
            tl.store(out_ptrs + offs_j, out.to(Out.dtype.element_ty))
    else:
        m, denom, acc = _merge_range(
            PartialOut, PartialLse, pid, num_partials, num_partials, m, denom, acc, HEAD_DIM, BLOCK_S
        )
        out = acc / tl.where(denom > 0.0, denom, 1.0)
        tl.store(out_ptrs + offs_d, out.to(Out.dtype.element_ty))


@triton.jit
def _merge_range(
    PartialOut, PartialLse, pid, end, num_partials, m, denom, acc, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr
):
    """(m, denom, acc) of the merge updated with partials [0, end) of program ``pid``'s ``num_partials``."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    for s0 in range(0, end, BLOCK_S):
        idx = s0 + offs_s
        ok = idx < end
        lse = tl.load(PartialLse + pid * num_partials + idx, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)  # 0 for empty partials
        o = tl.load(
            PartialOut + (pid * num_partials + idx)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0
        )
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        denom = denom * alpha + tl.sum(w, 0)
        m = m_new
    return m, denom, acc
