"""Triton source of the fused block-sparse attention kernel; the host side is ``triton.py``.

Under ``TRITON_INTERPRET=1`` Triton interprets this very source on CPU
tensors, which is how the tests check it without a GPU.
Numerics are described in :mod:`creative_sparse.attention.quant`, whose
``emulate`` mirrors the loop below step for step.

One program computes one query block (``BLOCK_M`` rows) of one (batch, head):
it walks the kept key blocks of its row of the block map in ascending order,
first those that need no element mask, then the suffix that crosses the
causal diagonal or the end of the keys.
"""

import triton
import triton.language as tl


@triton.jit
def _attend(acc, l_i, m_i, q, q_scale, k_base, v_base, ks_base, idx_base, start, stop,
            offs_m, offs_d, offs_dv, stride_kn, stride_vn, k_len, causal_offset, pv_limit,
            BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
            PV_SKIP: tl.constexpr, PV_FP8: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for j in range(start, stop):
        kb = tl.load(idx_base + j)
        offs_n = kb * BLOCK_N + offs_n0
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None])
        k_scale = tl.load(ks_base + kb)
        s = tl.dot(q, k).to(tl.float32) * (q_scale * k_scale)   # scores in log2 units
        if MASKED:
            allowed = offs_n[None, :] < k_len
            if IS_CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(allowed, s, float("-inf"))
        m_blk = tl.max(s, 1)
        m_new = tl.maximum(m_i, m_blk)
        if MASKED:   # a row with no allowed key so far keeps m = -inf; subtract 0 instead
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.math.exp2(s - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # V is loaded unconditionally so the loop's software pipeline can prefetch it.
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :])
        if PV_FP8:
            p_low = (p * 448.0).to(v.dtype)
        else:
            p_low = p.to(v.dtype)
        if PV_SKIP:   # skip P.V when every row of the block is far below its running max
            if tl.max(m_blk - m_new_safe, 0) >= -pv_limit:
                acc = tl.dot(p_low, v, acc)
        else:
            acc = tl.dot(p_low, v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def block_sparse_fwd(Q, K, V, QScale, KScale, VScale, Out, Counts, Indices, PVLimit,
                     stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
                     stride_vz, stride_vh, stride_vn, stride_oz, stride_oh, stride_om,
                     num_heads, group, num_q_blocks, num_k_blocks, q_len, k_len, causal_offset,
                     head_dim_v,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, PV_SKIP: tl.constexpr,
                     PV_FP8: tl.constexpr, NK_POW2: tl.constexpr):
    # Causal rows near the end hold the most blocks: start them first.
    qb = num_q_blocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hk = h // group
    row = bh * num_q_blocks + qb
    count = tl.load(Counts + row)
    idx_base = Indices + row.to(tl.int64) * num_k_blocks
    # The kept list is ascending and the blocks needing an element mask (crossing the
    # causal diagonal or the end of the keys) are its highest: count the prefix below.
    offs_list = tl.arange(0, NK_POW2)
    listed = tl.load(idx_base + offs_list, mask=offs_list < count, other=num_k_blocks)
    limit = k_len // BLOCK_N
    if IS_CAUSAL:
        limit = tl.minimum(limit, tl.maximum((qb * BLOCK_M + causal_offset + 1) // BLOCK_N, 0))
    n_full = tl.sum((listed < limit).to(tl.int32), 0)

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q = tl.load(Q + b * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :])
    q_scale = tl.load(QScale + row)
    k_base = K + b * stride_kz + hk * stride_kh
    v_base = V + b * stride_vz + hk * stride_vh
    ks_base = KScale + (b * (num_heads // group) + hk) * num_k_blocks
    pv_limit = tl.load(PVLimit + h)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_scale, k_base, v_base, ks_base, idx_base,
                            0, n_full, offs_m, offs_d, offs_dv, stride_kn, stride_vn, k_len,
                            causal_offset, pv_limit, BLOCK_N, False, IS_CAUSAL, PV_SKIP, PV_FP8)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_scale, k_base, v_base, ks_base, idx_base,
                            n_full, count, offs_m, offs_d, offs_dv, stride_kn, stride_vn, k_len,
                            causal_offset, pv_limit, BLOCK_N, True, IS_CAUSAL, PV_SKIP, PV_FP8)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if PV_FP8:
        v_scale = tl.load(VScale + (b * (num_heads // group) + hk) * HEAD_DIM_V + offs_dv)
        out = out * (v_scale / 448.0)[None, :]
    o_ptrs = Out + b * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    mask = (offs_m[:, None] < q_len) & (offs_dv[None, :] < head_dim_v)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def quantize_blocks(X, Mean, Out, Scale, stride_xz, stride_xh, stride_xl, num_heads, length,
                    dim, multiplier, BLOCK: tl.constexpr, DIM: tl.constexpr,
                    SMOOTH: tl.constexpr):
    """One block of rows of one (batch, head) to INT8, as ``quant.quantize_per_block``
    (after subtracting ``Mean`` when SMOOTH): Out is ``[B, H, nblocks*BLOCK, DIM]``."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, DIM)
    inside = (rows[:, None] < length) & (cols[None, :] < dim)
    x = tl.load(X + b * stride_xz + h * stride_xh + rows[:, None] * stride_xl + cols[None, :],
                mask=inside, other=0.0).to(tl.float32)
    if SMOOTH:
        mean = tl.load(Mean + bh.to(tl.int64) * dim + cols, mask=cols < dim, other=0.0)
        x = tl.where(inside, x - mean[None, :], 0.0)
    scale = tl.max(tl.max(tl.abs(x), 1), 0) / 127.0
    y = x / tl.where(scale > 0.0, scale, 1.0)
    y = tl.minimum(tl.maximum(tl.floor(y + 0.5), -127.0), 127.0)
    num_blocks = tl.num_programs(0)
    out_rows = (bh.to(tl.int64) * num_blocks * BLOCK + rows) * DIM
    tl.store(Out + out_rows[:, None] + cols[None, :], y.to(tl.int8))
    tl.store(Scale + bh * num_blocks + blk, scale * multiplier)
