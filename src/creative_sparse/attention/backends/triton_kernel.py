"""Triton source of the fused block-sparse attention kernel; the host side is ``triton.py``.

Under ``TRITON_INTERPRET=1`` Triton interprets this very source on CPU
tensors, which is how the tests check it without a GPU.
Numerics are described in :mod:`creative_sparse.attention.quant`, whose
``emulate`` mirrors the loop below step for step.

One program computes one query block (``BLOCK_M`` rows, or ``ROWS`` of them) of one
(batch, head):
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
            PV_SKIP: tl.constexpr, PV_FP8: tl.constexpr, STAGES: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    # An explicit stage count: Triton does not pipeline a loop holding the conditional
    # P.V product below on its own (no cp.async in the PTX: K and V are then loaded
    # synchronously, the measured cost of the PV threshold). benchmarks/triton_compile.py
    for j in tl.range(start, stop, num_stages=STAGES):
        kb = tl.load(idx_base + j)
        offs_n = kb * BLOCK_N + offs_n0
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None])
        k_scale = tl.load(ks_base + offs_n)       # one per key; 0 past the keys
        # raw * q_scale[:, None] (both scales >= 0): the scores in log2 units
        raw = tl.dot(q, k).to(tl.float32) * k_scale[None, :]
        if MASKED:
            allowed = offs_n[None, :] < k_len
            if IS_CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(allowed, raw * q_scale[:, None], float("-inf"))
            m_blk = tl.max(s, 1)
        else:
            # Rounding is monotone, so the row max of the scaled scores is the scaled row
            # max, and exp2's argument below is one fused multiply-add per score.
            m_blk = tl.max(raw, 1) * q_scale
        m_new = tl.maximum(m_i, m_blk)
        if MASKED:   # a row with no allowed key so far keeps m = -inf; subtract 0 instead
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_new_safe[:, None])
        else:
            m_new_safe = m_new
            p = tl.math.exp2(raw * q_scale[:, None] - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # V is loaded before the P·V test so the loop's software pipeline can prefetch
        # it; V may be the caller's tensor, unpadded, so a block past the keys is masked.
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :]
        if MASKED:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < k_len, other=0.0)
        else:
            v = tl.load(v_ptrs)
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
                     PV_FP8: tl.constexpr, NK_POW2: tl.constexpr, ROWS: tl.constexpr,
                     STAGES: tl.constexpr = 3):
    # A program takes ROWS query rows of one map block (all BLOCK_M rows, or a part of
    # them where a whole block would spill registers: see triton.py). Causal rows near
    # the end hold the most blocks: start them first.
    pid = tl.program_id(0)
    qb = num_q_blocks - 1 - pid // (BLOCK_M // ROWS)
    first_row = qb * BLOCK_M + (pid % (BLOCK_M // ROWS)) * ROWS
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)   # h * (a head's stride) can pass 2**31
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
        limit = tl.minimum(limit, tl.maximum((first_row + causal_offset + 1) // BLOCK_N, 0))
    n_full = tl.sum((listed < limit).to(tl.int32), 0)

    offs_m = first_row + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q = tl.load(Q + b * stride_qz + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :])
    q_scale = tl.load(QScale + bh.to(tl.int64) * (num_q_blocks * BLOCK_M) + offs_m)
    k_base = K + b * stride_kz + hk * stride_kh
    v_base = V + b * stride_vz + hk * stride_vh
    ks_base = KScale + (b * (num_heads // group) + hk) * (num_k_blocks * BLOCK_N)
    pv_limit = tl.load(PVLimit + h)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_V], dtype=tl.float32)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_scale, k_base, v_base, ks_base, idx_base,
                            0, n_full, offs_m, offs_d, offs_dv, stride_kn, stride_vn, k_len,
                            causal_offset, pv_limit, BLOCK_N, False, IS_CAUSAL, PV_SKIP, PV_FP8,
                            STAGES)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_scale, k_base, v_base, ks_base, idx_base,
                            n_full, count, offs_m, offs_d, offs_dv, stride_kn, stride_vn, k_len,
                            causal_offset, pv_limit, BLOCK_N, True, IS_CAUSAL, PV_SKIP, PV_FP8,
                            STAGES)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if PV_FP8:
        v_scale = tl.load(VScale + (b * (num_heads // group) + hk) * HEAD_DIM_V + offs_dv)
        out = out * (v_scale / 448.0)[None, :]
    o_ptrs = Out + b * stride_oz + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    mask = (offs_m[:, None] < q_len) & (offs_dv[None, :] < head_dim_v)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _smoothed_rows(X, mean, r, blk, b, h, stride_xz, stride_xh, stride_xl, length, dim,
                   BLOCK: tl.constexpr, CHUNK: tl.constexpr, DIM: tl.constexpr,
                   SMOOTH: tl.constexpr):
    """Rows ``r .. r+CHUNK`` of block ``blk`` in fp32, minus ``mean`` when SMOOTH, 0 outside."""
    rows = blk * BLOCK + r + tl.arange(0, CHUNK)
    cols = tl.arange(0, DIM)
    inside = (rows[:, None] < length) & (cols[None, :] < dim)
    # 64-bit row offsets: a [B, L, H, D] ("NHD") input has a row stride of H * D.
    x = tl.load(X + b * stride_xz + h * stride_xh + rows.to(tl.int64)[:, None] * stride_xl
                + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if SMOOTH:
        x = tl.where(inside, x - mean[None, :], 0.0)
    return x


@triton.jit
def quantize_rows(X, Mean, Out, Scale, stride_xz, stride_xh, stride_xl, num_heads, length,
                  dim, multiplier, BLOCK: tl.constexpr, DIM: tl.constexpr,
                  SMOOTH: tl.constexpr, CHUNK: tl.constexpr):
    """One block of rows of one (batch, head) to INT8 with a scale per row, as
    ``quant.quantize_per_token`` (after subtracting ``Mean`` when SMOOTH): Out is
    ``[B, H, nblocks*BLOCK, DIM]``, Scale ``[B, H, nblocks*BLOCK]``.

    ``CHUNK`` rows at a time: a whole 128 x 128 block held at once needs more
    registers than a thread has (see ``benchmarks/triton_compile.py``).
    """
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    cols = tl.arange(0, DIM)
    mean = tl.zeros([DIM], dtype=tl.float32)
    if SMOOTH:
        mean = tl.load(Mean + bh.to(tl.int64) * dim + cols, mask=cols < dim, other=0.0)
    first = bh.to(tl.int64) * tl.num_programs(0) * BLOCK
    for r in range(0, BLOCK, CHUNK):
        x = _smoothed_rows(X, mean, r, blk, b, h, stride_xz, stride_xh, stride_xl, length, dim,
                           BLOCK, CHUNK, DIM, SMOOTH)
        scale = tl.max(tl.abs(x), 1) / 127.0
        divisor = tl.where(scale > 0.0, scale, 1.0)
        y = tl.minimum(tl.maximum(tl.floor(x / divisor[:, None] + 0.5), -127.0), 127.0)
        rows = first + blk * BLOCK + r + tl.arange(0, CHUNK)
        tl.store(Out + rows[:, None] * DIM + cols[None, :], y.to(tl.int8))
        tl.store(Scale + rows, scale * multiplier)


# ------------------------------------------------------------------ block-map prediction
# ``blockmap.predict_block_map`` is the reference for the two kernels below.


@triton.jit
def pool_blocks(X, Mean, Pooled, Sim, stride_xz, stride_xh, stride_xl, num_heads, length, dim,
                BLOCK: tl.constexpr, CHUNK: tl.constexpr, DIM: tl.constexpr,
                SMOOTH: tl.constexpr):
    """One block of rows of one (batch, head), as ``blockmap.pooled_blocks`` (after
    subtracting ``Mean`` when SMOOTH): the mean row to ``Pooled`` ``[B, H, n, dim]``
    and the mean pairwise cosine similarity of the rows to ``Sim`` ``[B, H, n]``."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    cols = tl.arange(0, DIM)
    col_ok = cols < dim
    mean = tl.zeros([DIM], dtype=tl.float32)
    if SMOOTH:
        mean = tl.load(Mean + bh.to(tl.int64) * dim + cols, mask=col_ok, other=0.0)
    total = tl.zeros([DIM], dtype=tl.float32)
    unit = tl.zeros([DIM], dtype=tl.float32)
    for r in range(0, BLOCK, CHUNK):   # a chunk of rows at a time bounds the registers
        x = _smoothed_rows(X, mean, r, blk, b, h, stride_xz, stride_xh, stride_xl, length, dim,
                           BLOCK, CHUNK, DIM, SMOOTH)
        norm = tl.sqrt(tl.sum(x * x, 1))
        inv = tl.where(norm > 0.0, 1.0 / tl.where(norm > 0.0, norm, 1.0), 0.0)  # zero row: 0
        total += tl.sum(x, 0)
        unit += tl.sum(x * inv[:, None], 0)
    rows_in = tl.minimum(length - blk * BLOCK, BLOCK).to(tl.float32)
    out = bh.to(tl.int64) * tl.num_programs(0) + blk
    tl.store(Pooled + out * dim + cols, total / rows_in, mask=col_ok)
    tl.store(Sim + out, tl.sum(unit * unit, 0) / (rows_in * rows_in))


@triton.jit
def select_blocks(Logits, SimQ, SimK, SimT, Thr, Keep, Counts, Indices,
                  num_heads, group, num_q_blocks, num_k_blocks, q_len, k_len, scale,
                  BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, NK_POW2: tl.constexpr,
                  CAUSAL: tl.constexpr, TOPK: tl.constexpr, SINK: tl.constexpr,
                  SPARGE: tl.constexpr):
    """One query block of one (batch, head): softmax over the candidate key blocks of
    its row of pooled scores, the CDF (or top-k) selection, the always-computed
    blocks, and the kept blocks written both as a row of ``Keep`` and as an
    ascending list (``Counts``, ``Indices``) for the attention kernel.

    The reference sorts the row; here the smallest kept probability ``t`` is found
    by bisection over the bit patterns of non-negative floats (monotone in the
    value), which needs no sort: CDF keeps the blocks whose higher-ranked mass is
    below the threshold, top-k the ``budget`` most probable. Blocks tied at ``t``
    are taken in index order, as a stable sort would. ``SPARGE`` switches to the
    original SpargeAttn's rules (``blockmap`` module docstring): similar when
    ``> simthreshd1``, CDF keeps the blocks whose cumulative mass including their
    own is ``<= cdfthreshd``, top-k keeps ``int(topk * num_k_blocks)``.
    """
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % num_heads
    kv_row = ((bh // num_heads) * (num_heads // group) + h // group).to(tl.int64)
    row = bh.to(tl.int64) * num_q_blocks + qb
    j = tl.arange(0, NK_POW2)
    inside = j < num_k_blocks
    first_k = j * BLOCK_K
    last_k = tl.minimum(first_k + BLOCK_K, k_len) - 1
    offset = k_len - q_len
    last_q = tl.minimum((qb + 1) * BLOCK_Q, q_len) - 1
    valid = inside
    if CAUSAL:
        valid = valid & (first_k <= last_q + offset)

    sim_t = tl.load(SimT + h)
    if SPARGE:
        q_dense = tl.load(SimQ + row) <= sim_t
        k_dense = tl.load(SimK + kv_row * num_k_blocks + j, mask=inside, other=2.0) <= sim_t
    else:
        q_dense = tl.load(SimQ + row) < sim_t
        k_dense = tl.load(SimK + kv_row * num_k_blocks + j, mask=inside, other=2.0) < sim_t
    candidate = valid & (k_dense == 0)
    rows_k = tl.maximum(tl.minimum(k_len - first_k, BLOCK_K), 1).to(tl.float32)
    x = tl.load(Logits + row * num_k_blocks + j, mask=inside, other=0.0) * scale
    x = x + tl.log(rows_k)
    big = 8.507059173023462e37    # float32 max / 4, as the reference: keep scores finite
    x = tl.where(x != x, 0.0, x)
    x = tl.where(x == float("inf"), big, tl.where(x == float("-inf"), -big, x))
    x = tl.where(candidate, x, -big)
    e = tl.where(candidate, tl.exp(x - tl.max(x, 0)), 0.0)
    total = tl.sum(e, 0)
    p = e / tl.where(total > 0.0, total, 1.0)          # a row with no candidate: all 0
    p = tl.where(inside, p, -1.0)                      # padding never ranks

    thr = tl.load(Thr + h)
    if TOPK:
        if SPARGE:
            budget = tl.maximum((thr * num_k_blocks).to(tl.int32).to(tl.float32), 1.0)
        else:
            n_valid = tl.sum(valid.to(tl.float32), 0)
            budget = tl.maximum(tl.ceil(thr * n_valid - 1e-6), 1.0)
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0x3F800000, tl.int32)              # the bits of 1.0: always "kept"
    for _ in range(31):
        mid = (lo + hi) // 2
        t = mid.to(tl.float32, bitcast=True)
        if TOPK:
            ok = tl.sum((p > t).to(tl.float32), 0) < budget
        elif SPARGE:
            ok = tl.sum(tl.where(p > t, p, 0.0), 0) <= thr
        else:
            ok = tl.sum(tl.where(p > t, p, 0.0), 0) < thr
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid + 1)
    t = hi.to(tl.float32, bitcast=True)
    above = p > t
    tie = (p == t).to(tl.int32)
    tie_rank = (tl.cumsum(tie, 0) - tie).to(tl.float32)
    if TOPK:
        chosen = above | ((tie != 0) & (tl.sum(above.to(tl.float32), 0) + tie_rank < budget))
    elif SPARGE:
        mass = tl.sum(tl.where(above, p, 0.0), 0)
        chosen = above | ((tie != 0) & (mass + (tie_rank + 1.0) * t <= thr))
        chosen = chosen | (j == tl.argmax(p, 0))
        if thr >= 1.0:
            chosen = inside
    else:
        mass = tl.sum(tl.where(above, p, 0.0), 0)
        chosen = (above | ((tie != 0) & (mass + tie_rank * t < thr))) & (p > 0.0)
        chosen = chosen | (j == tl.argmax(p, 0))
        if thr >= 1.0:
            chosen = inside

    keep = tl.where(q_dense, valid, (chosen & candidate) | k_dense)
    if CAUSAL:   # the diagonal band: blocks holding the query rows' own positions
        own_lo = qb * BLOCK_Q + offset
        own_hi = last_q + offset
        keep = keep | ((first_k <= own_hi) & (last_k >= own_lo) & (own_hi >= 0))
    if SINK:
        keep = keep | (j == 0)
    keep = keep & valid
    tl.store(Keep + row * num_k_blocks + j, keep.to(tl.int8), mask=inside)
    _store_lists(keep, inside, j, Counts + row, Indices + row * num_k_blocks)


@triton.jit
def _store_lists(keep, inside, j, count_ptr, index_ptr):
    """A row's kept blocks as ``BlockMap.kv_indices`` lists them: the count, then the
    kept block indices ascending and the others ascending after them (what a stable
    sort gives; backends may gather past the count and mask afterwards)."""
    kept = keep.to(tl.int32)
    count = tl.sum(kept, 0)
    tl.store(count_ptr, count)
    dropped = (inside & (keep == 0)).to(tl.int32)
    position = tl.where(keep, tl.cumsum(kept, 0) - kept, count + tl.cumsum(dropped, 0) - dropped)
    tl.store(index_ptr + position, j, mask=inside)


@triton.jit
def list_blocks(Keep, Counts, Indices, stride_kb, stride_kh, stride_kq, num_heads,
                num_q_blocks, num_k_blocks, NK_POW2: tl.constexpr):
    """One row of a bool block map (any strides, e.g. broadcast) to kept-block lists:
    ``Counts`` ``[B, H, nq]`` and ``Indices`` ``[B, H, nq, nk]``, contiguous."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    j = tl.arange(0, NK_POW2)
    inside = j < num_k_blocks
    source = (Keep + (bh // num_heads).to(tl.int64) * stride_kb
              + (bh % num_heads).to(tl.int64) * stride_kh + qb.to(tl.int64) * stride_kq)
    keep = tl.load(source + j, mask=inside, other=0) != 0
    row = bh.to(tl.int64) * num_q_blocks + qb
    _store_lists(keep, inside, j, Counts + row, Indices + row * num_k_blocks)
