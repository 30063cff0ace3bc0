"""A test oracle: the original SpargeAttn block-map prediction, written from its published code.

Source read (not copied): thu-ml/SpargeAttn, ``spas_sage_attn/utils.py`` at commit
1e9db8142c659b1cac6be80aa96d1db60a878ace, function ``get_block_map_meansim_fuse_quant``
and the Triton kernel ``triton_bmm_pool_sim_simmean_fuse_quant`` it launches, as called
by ``spas_sage_attn/core.py`` (commit c597265f0e447474f4039e6ec501a67d4f8ea47e,
``spas_sage2_attn_meansim_cuda``: ``km = k.mean(dim=-2, keepdim=True)`` and the
prediction on ``k - km``). Each step below names the statement it follows, quoted,
because line numbers move between commits.

This is a plain, slow, independent transliteration: it shares no code with
``creative_sparse.attention.blockmap``. Two switches:

* ``half=True`` repeats the original's precision: pooled blocks stored in fp16, the
  normalised rows cast to fp16 before their Gram sum, the pooled scores, softmax
  and cumulative sum in fp16 (the original runs them on the fp16 inputs' dtype).
* ``fixes=True`` applies the defect fixes our two rule sets share (documented in
  ``creative_sparse/attention/blockmap.py``): padded and all-zero rows do not make a
  block's similarity NaN, a partial last key block weighs in with ``log(rows)``,
  ``cdfthreshd >= 1`` is exactly dense, the causal diagonal band is kept, causal
  masking of ``Lq != Lk`` is bottom-right, and under grouped-query attention each
  query head judges K's blocks with its own ``simthreshd1`` (the original's K pass
  runs over the key heads and reads the first ``H_kv`` thresholds). With ``fixes=False`` it is the original
  as published.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _per_head(value, heads: int) -> Tensor:
    """utils.py ``hyperparameter_check``: a scalar becomes ``torch.full((H,), value)``."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    return t.expand(heads).clone() if t.numel() == 1 else t


def _pool_and_similarity(x: Tensor, block: int, mean: Tensor | None, *, half: bool,
                         fixes: bool) -> tuple[Tensor, Tensor]:
    """``triton_bmm_pool_sim_simmean_fuse_quant``: per block of ``block`` rows, the pooled
    row ``pool = tl.sum(x_fp32, axis=0) / BS_`` (``BS_`` the block's real rows) and the
    similarity ``cur_sim = sum(gram(x / ||x||)) / (BS_ * BS_)`` with ``x -= x_mean`` first
    when ``fuse_mean`` (K smoothing). The original's padded rows are loaded as zeros,
    and ``x / x_norm`` of a zero row is NaN."""
    b, h, length, d = x.shape
    n = math.ceil(length / block)
    x = x.float()
    if mean is not None:
        x = x - mean.float()
    padded = torch.zeros(b, h, n * block, d)
    padded[:, :, :length] = x
    xb = padded.view(b, h, n, block, d)
    rows = torch.full((n,), float(block))
    rows[-1] = length - (n - 1) * block
    pool = xb.sum(dim=3) / rows.view(1, 1, n, 1)
    norm = xb.norm(dim=-1, keepdim=True)
    unit = xb / norm                                   # 0 / 0 = NaN for a zero row
    if fixes:
        unit = torch.where(norm > 0, unit, torch.zeros_like(unit))
    if half:                                          # `x = (x / x_norm).to(tl.float16)`
        unit = unit.half().float()
        pool = pool.half()                             # `pool` is stored in x.dtype
    # `grams = tl.dot(x, tl.trans(x)); sum_value = tl.sum(grams)`: the sum of all pairwise
    # dot products, which is ||sum_i u_i||^2 (NaN if any row is NaN)
    gram_sum = unit.sum(dim=3).pow(2).sum(-1)
    similarity = gram_sum / rows.pow(2).view(1, 1, n)
    return pool, similarity


def original_block_map(q: Tensor, k: Tensor, *, simthreshd1=0.6, cdfthreshd=None, topk=None,
                       causal: bool = False, attention_sink: bool = False,
                       smooth_k: bool = True, block_q: int = 128, block_k: int = 64,
                       half: bool = False, fixes: bool = True) -> Tensor:
    """Bool ``[B, H, nq, nk]``: the blocks the original keeps (see the module docstring)."""
    assert (cdfthreshd is None) != (topk is None), "Only one of cdfthreshd and topk can be set."
    q, k = q.detach().cpu(), k.detach().cpu()
    b, h, lq, d = q.shape
    h_kv, lk = k.shape[1], k.shape[2]
    sim_t = _per_head(simthreshd1, h)
    # core.py: `km = k.mean(dim=-2, keepdim=True)`, passed as the mean fused into K's pass.
    km = k.float().mean(dim=-2, keepdim=True) if smooth_k else None
    pq, sim_q = _pool_and_similarity(q, block_q, None, half=half, fixes=fixes)
    pk, sim_k = _pool_and_similarity(k, block_k, km, half=half, fixes=fixes)
    nq, nk = pq.shape[2], pk.shape[2]
    # `cur_sim = (sum_value / (BS_ * BS_)) > cur_h1`: NaN compares False (not similar).
    similar_q = sim_q > sim_t.view(1, h, 1)
    # GQA: `pooled_kblocks.repeat_interleave(repeat_factor, dim=1)`, same for sim_kblocks.
    group = h // h_kv
    pk = pk.repeat_interleave(group, dim=1)
    if fixes:   # each query head compares its K blocks with its own threshold
        similar_k = sim_k.repeat_interleave(group, dim=1) > sim_t.view(1, h, 1)
    else:       # K's pass is launched over the H_kv key heads and reads `simthreshd1 + h`
        similar_k = (sim_k > sim_t[:h_kv].view(1, h_kv, 1)).repeat_interleave(group, dim=1)
    sim_kblocks = similar_k.unsqueeze(-2).expand(-1, -1, nq, -1)
    sim_qblocks = similar_q.unsqueeze(-1).expand(-1, -1, -1, nk)
    # `pooled_score = pooled_qblocks @ pooled_kblocks.transpose(-1, -2) * q.shape[-1] ** -0.5`
    score = (pq @ pk.transpose(-1, -2)) * d ** -0.5
    if fixes:                      # a partial last key block stands for fewer keys
        rows_k = torch.full((nk,), float(block_k))
        rows_k[-1] = lk - (nk - 1) * block_k
        score = score + rows_k.log().to(score.dtype)
    score = score.masked_fill(~sim_kblocks, -torch.inf)  # `pooled_score[~sim_kblocks] = -inf`
    qi = torch.arange(nq).view(-1, 1)
    kj = torch.arange(nk).view(1, -1)
    if fixes:                      # bottom-right: the queries are the last Lq positions
        last_q = torch.clamp((qi + 1) * block_q, max=lq) - 1
        causal_mask = kj * block_k <= last_q + (lk - lq)
    else:                          # `fill_causal_mask_triton`: `k >= (q + 1) * BqdivBk` -> 0
        causal_mask = ~(kj >= (qi + 1) * (block_q / block_k))
    if causal:
        score = score.masked_fill(~causal_mask, -torch.inf)
    probs = score.softmax(-1)      # `pooled_score = pooled_score.softmax(-1)` (fp16 if half)
    # `sorted_score = torch.sort(pooled_score, dim=-1, descending=True)`
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cdf = torch.cumsum(sorted_p, dim=-1)
    if cdfthreshd is not None:
        thr = _per_head(cdfthreshd, h)
        # `num_to_select = torch.searchsorted(cdf, cdfthreshd_ts, right=True)`
        thr_ts = thr.view(1, h, 1, 1).expand(b, -1, nq, 1).to(cdf.dtype).contiguous()
        num = torch.searchsorted(cdf.contiguous(), thr_ts, right=True).squeeze(-1)
        if fixes:
            num = torch.where(thr.view(1, h, 1) >= 1.0, torch.full_like(num, nk), num)
    else:
        thr = _per_head(topk, h)
        # `num_to_select = (topk * K).to(torch.int64)`
        num = (thr * nk).to(torch.int64).view(1, h, 1).expand(b, -1, nq)
    # `triton_fill_block_map_kernel`: `cur_num_to_select + 1 if cur_num_to_select == 0`
    num = num.clamp_min(1)
    rank = torch.arange(nk).view(1, 1, 1, -1)
    chosen_sorted = rank < num.unsqueeze(-1)
    final = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    final.scatter_(-1, order, chosen_sorted)
    if fixes:   # only candidates are chosen (a row without any has NaN probabilities);
        final &= torch.isfinite(score.float())  # others are re-set or cleared just below
    final[~sim_kblocks] = True     # `final_map[~sim_kblocks] = 1`
    final[~sim_qblocks] = True     # `final_map[~sim_qblocks] = 1`
    if causal:                     # `final_map = final_map * causal_mask[None, None, ...]`
        final &= causal_mask
        if fixes:                  # the diagonal band: the blocks of the rows' own positions
            first_q = qi * block_q + (lk - lq)
            last_q = torch.clamp((qi + 1) * block_q, max=lq) - 1 + (lk - lq)
            last_k = torch.clamp((kj + 1) * block_k, max=lk) - 1
            final |= (kj * block_k <= last_q) & (last_k >= first_q) & (last_q >= 0)
    if attention_sink:             # `final_map[:, :, :, 0] = 1`
        final[..., 0] = True
    return final


def make_inputs(kind: str, lq: int, lk: int, h: int, h_kv: int, d: int = 64, seed: int = 0):
    """Test inputs ``(q [1, h, lq, d], k [1, h_kv, lk, d])``. ``"random"``: Gaussian;
    ``"correlated"``: slowly drifting random walks, so neighbouring rows are alike and the
    pooled scores are peaked, as in real models."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(1, h, lq, d, generator=g), torch.randn(1, h_kv, lk, d, generator=g)

    def walk(n, heads):
        steps = torch.randn(1, heads, n, d, generator=g) * 0.25
        drift = steps.cumsum(2) / torch.arange(1, n + 1).view(1, 1, n, 1).float() ** 0.3
        return drift + torch.randn(1, heads, 1, d, generator=g)
    return walk(lq, h), walk(lk, h_kv)


def half_inputs_supported() -> bool:
    """Whether this PyTorch runs fp16 matmul/softmax/cumsum on CPU (the ``half`` mode)."""
    try:
        x = torch.ones(2, 2, dtype=torch.float16)
        (x @ x).softmax(-1).cumsum(-1)
        return True
    except RuntimeError:
        return False
