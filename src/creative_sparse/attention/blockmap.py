"""Which attention blocks to compute: the :class:`BlockMap` and the SpargeAttn prediction.

A block is ``block_q`` query rows by ``block_k`` key rows (128 x 64 by default).
:func:`predict_block_map` implements the SpargeAttn prediction:

1. K smoothing: subtract the mean key over the sequence (softmax-invariant).
2. Mean-pool each block; its self-similarity is the mean pairwise cosine
   similarity of its rows, self-pairs included: ``||sum_i x_i/|x_i| ||^2 / n^2``
   (in [0, 1]; a zero row counts as dissimilar). A block that is not similar
   enough (see ``selection``) is not compressible and is always computed: a
   whole query-block row for Q, a whole key-block column for K.
3. Compressed map ``softmax(pooled_q . pooled_k^T * scale + log(rows_k))`` over
   the compressible, causally valid key blocks (``log(rows_k)`` weighs a
   partial last block by the number of keys it stands for). Per query block,
   the most probable blocks are kept by one of two rule sets (``selection``):

   * ``"mass"`` (ours): the smallest set whose mass reaches ``cdfthreshd``, or
     the ``ceil(topk * causally visible blocks)`` most probable; a block is
     similar when its similarity is ``>= simthreshd1``.
   * ``"sparge"`` (the original's, thu-ml/SpargeAttn ``spas_sage_attn/utils.py``,
     ``get_block_map_meansim``): the blocks whose cumulative probability, in
     descending order, is ``<= cdfthreshd``, or the ``int(topk * all key
     blocks)`` most probable (causally masked ones counted); similar when
     ``> simthreshd1``. Thresholds tuned on the original carry over.

4. At least one block per row that has any valid block; ``attention_sink``
   keeps the first key block too. Under causal masking the diagonal band (the
   key blocks holding the query rows' own positions) is always kept: its pooled
   estimate is unreliable (partly masked), it carries the local context a
   language model depends on, and without it a query row whose visible keys
   all sit in one unkept block would attend to nothing.

Both rule sets share the fixes of the original's defects: the diagonal band
above, a partial last block judged on its real rows (the original's padding
makes its similarity NaN, which forces it dense), ``cdfthreshd = 1`` exactly
dense (the original's float cumulative sum can pass 1 and drop blocks), and
an all-zero row does not turn its block's similarity into NaN. Causal masking
with ``Lq != Lk`` is bottom-right in both (the queries are the last positions,
as in decoding); the original aligns the block mask top-left.

Hyperparameters are scalars or per-head sequences/tensors of length ``H``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import Tensor

from .checks import (check_block_size, check_kv_lists_layout, check_kv_lists_values,
                     check_qk, check_scale)

__all__ = [
    "BlockMap",
    "HeadParam",
    "block_valid_map",
    "block_diagonal_map",
    "block_full_map",
    "block_pair_counts",
    "check_scalar",
    "check_selection",
    "per_head_param",
    "pooled_blocks",
    "predict_block_map",
    "SELECTIONS",
]

HeadParam = Union[float, int, Sequence[float], Tensor]

SELECTIONS = ("mass", "sparge")
"""The block-selection rule sets of :func:`predict_block_map` (see the module docstring)."""


def _num_blocks(length: int, block: int) -> int:
    return max(1, -(-length // block))  # integer ceil: float division rounds past 2**53


def block_valid_map(q_len: int, k_len: int, block_q: int, block_k: int, causal: bool,
                    device=None) -> Tensor:
    """Bool ``[nq, nk]``: blocks that hold at least one (query, key) pair dense attention computes."""
    nq, nk = _num_blocks(q_len, block_q), _num_blocks(k_len, block_k)
    if not causal:
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    offset = k_len - q_len
    last_q = torch.clamp((torch.arange(nq, device=device) + 1) * block_q, max=q_len) - 1
    first_k = torch.arange(nk, device=device) * block_k
    return first_k.unsqueeze(0) <= (last_q + offset).unsqueeze(1)


def block_full_map(q_len: int, k_len: int, block_q: int, block_k: int, causal: bool,
                   device=None) -> Tensor:
    """Bool ``[nq, nk]``: blocks in which every (query, key) pair is allowed (no element mask)."""
    nq, nk = _num_blocks(q_len, block_q), _num_blocks(k_len, block_k)
    if not causal:
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    offset = k_len - q_len
    first_q = torch.arange(nq, device=device) * block_q
    last_k = torch.clamp((torch.arange(nk, device=device) + 1) * block_k, max=k_len) - 1
    return last_k.unsqueeze(0) <= (first_q + offset).unsqueeze(1)


def block_diagonal_map(q_len: int, k_len: int, block_q: int, block_k: int,
                       device=None) -> Tensor:
    """Bool ``[nq, nk]``: under causal masking, the key blocks that hold the query
    rows' own positions (the diagonal band). Keeping them guarantees that every
    query row with a visible key attends at least to itself."""
    nq, nk = _num_blocks(q_len, block_q), _num_blocks(k_len, block_k)
    offset = k_len - q_len
    first_q = torch.arange(nq, device=device) * block_q
    last_q = torch.clamp(first_q + block_q, max=q_len) - 1
    lo = first_q + offset                      # own position of the block's first row
    hi = last_q + offset                       # ... and of its last row
    first_k = torch.arange(nk, device=device) * block_k
    last_k = torch.clamp(first_k + block_k, max=k_len) - 1
    return (first_k.unsqueeze(0) <= hi.unsqueeze(1)) & (last_k.unsqueeze(0) >= lo.unsqueeze(1)) \
        & (hi >= 0).unsqueeze(1)


def block_pair_counts(q_len: int, k_len: int, block_q: int, block_k: int, causal: bool,
                      device=None) -> Tensor:
    """Int64 ``[nq, nk]``: how many (query, key) pairs dense attention computes in each block."""
    nq, nk = _num_blocks(q_len, block_q), _num_blocks(k_len, block_k)
    first_k = torch.arange(nk, device=device) * block_k
    width = torch.clamp(k_len - first_k, max=block_k)                 # keys per block
    if causal:
        last_visible = torch.arange(q_len, device=device) + (k_len - q_len)  # per query row
        per_row = (last_visible.unsqueeze(1) + 1 - first_k.unsqueeze(0)).clamp(min=0)
        per_row = torch.minimum(per_row, width.unsqueeze(0))           # [q_len, nk]
    else:
        per_row = width.unsqueeze(0).expand(q_len, nk)
    pad = nq * block_q - q_len
    per_row = torch.nn.functional.pad(per_row, (0, 0, 0, pad))
    return per_row.view(nq, block_q, nk).sum(dim=1)


@functools.lru_cache(maxsize=32)
def shared_map(builder, *args) -> Tensor:
    """``builder(*args)`` for one of the index-only maps above, built once per shape and
    device and shared (never write to it): every layer of a model asks for the same
    ones, and on a GPU each build is several small launches."""
    return builder(*args)


@dataclass(frozen=True)
class BlockMap:
    """Kept attention blocks per (batch, head, query block).

    Attributes:
        keep: bool ``[B, H, nq, nk]``, True = computed. Blocks that causal
            masking removes entirely are always False (the constructor clears
            them), so ``keep`` counts exactly the work done.
        block_q, block_k: block sizes in query rows and key rows, each in
            ``[1, MAX_BLOCK_SIZE]`` (4096; see :data:`.checks.MAX_BLOCK_SIZE`).
        q_len, k_len: sequence lengths the map was made for.
        causal: bottom-right causal masking inside the kept blocks.
        kv_lists: the kept blocks as lists, ``(counts, indices)`` as
            :meth:`kv_indices` returns them (int32, on ``keep``'s device), when
            the producer already has them (the fused GPU prediction writes them
            with the map); else None. The backends read the lists, not ``keep``,
            so they must list exactly the kept blocks: each row's first
            ``counts`` indices are its kept key blocks, each once, in any order;
            every index, padding included, is in ``[0, nk)``; ``keep`` holds no
            block causal masking removes. The constructor checks all of this
            and raises ``ValueError`` naming the first offending entry.
        check_lists: False skips those value checks (a few tensor operations
            and, on a GPU, a wait for the device). Only for producers that
            guarantee the lists, such as the fused predictor; wrong lists read
            out of bounds in the compiled kernels.

    Example:
        >>> keep = torch.ones(1, 2, 1, 2, dtype=torch.bool)
        >>> BlockMap(keep, 128, 64, 100, 100, causal=True).sparsity()
        0.0
    """

    keep: Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int
    causal: bool = False
    kv_lists: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)
    check_lists: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self):
        check_block_size("BlockMap: block_q", self.block_q)
        check_block_size("BlockMap: block_k", self.block_k)
        for name in ("q_len", "k_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockMap: {name} must be a positive int, got {value!r}")
        if not isinstance(self.keep, Tensor):
            raise ValueError(f"BlockMap: keep must be a bool torch.Tensor, got "
                             f"{type(self.keep).__name__}")
        nq, nk = _num_blocks(self.q_len, self.block_q), _num_blocks(self.k_len, self.block_k)
        keep = self.keep
        if keep.dim() != 4 or tuple(keep.shape[-2:]) != (nq, nk):
            raise ValueError(
                f"BlockMap: keep must have shape [B, H, {nq}, {nk}] for q_len={self.q_len}, "
                f"k_len={self.k_len}, blocks {self.block_q}x{self.block_k}; got {tuple(keep.shape)}")
        if keep.is_meta:
            raise ValueError("BlockMap: keep is on the meta device (a shape without data); "
                             "allowed: a bool tensor on a real device")
        if self.kv_lists is not None:
            check_kv_lists_layout(keep, self.kv_lists)
            if self.check_lists:
                valid = shared_map(block_valid_map, self.q_len, self.k_len, self.block_q,
                                   self.block_k, True, keep.device) if self.causal else None
                check_kv_lists_values(keep, *self.kv_lists, valid)
            return
        valid = shared_map(block_valid_map, self.q_len, self.k_len, self.block_q,
                           self.block_k, self.causal, keep.device)
        object.__setattr__(self, "keep", keep.to(torch.bool) & valid)

    @property
    def num_q_blocks(self) -> int:
        return self.keep.shape[-2]

    @property
    def num_k_blocks(self) -> int:
        return self.keep.shape[-1]

    def valid(self) -> Tensor:
        """Bool ``[nq, nk]`` of blocks dense (causal-aware) attention would compute."""
        return block_valid_map(self.q_len, self.k_len, self.block_q, self.block_k,
                               self.causal, self.keep.device)

    def sparsity(self) -> float:
        """Fraction of the blocks dense attention computes that this map skips (0 = dense)."""
        b, h = self.keep.shape[:2]
        total = int(self.valid().sum()) * b * h
        if total == 0:
            return 0.0
        return 1.0 - int(self.keep.sum()) / total

    def pairs_computed(self) -> int:
        """Number of (query, key) score pairs the kept blocks hold, summed over batch and heads."""
        return int(self.pair_count())

    def pair_count(self) -> Tensor:
        """:meth:`pairs_computed` as a 0-d int64 tensor on the map's device (no host sync)."""
        counts = shared_map(block_pair_counts, self.q_len, self.k_len, self.block_q,
                            self.block_k, self.causal, self.keep.device)
        return (self.keep * counts).sum()

    def to_token_mask(self) -> Tensor:
        """Bool ``[B, H, q_len, k_len]``: True where attention is computed (causal included)."""
        mask = self.keep.repeat_interleave(self.block_q, dim=-2)[..., : self.q_len, :]
        mask = mask.repeat_interleave(self.block_k, dim=-1)[..., : self.k_len]
        if self.causal:
            rows = torch.arange(self.q_len, device=mask.device).unsqueeze(1)
            cols = torch.arange(self.k_len, device=mask.device).unsqueeze(0)
            mask = mask & (cols <= rows + (self.k_len - self.q_len))
        return mask

    def kv_indices(self) -> tuple[Tensor, Tensor]:
        """Kept key blocks as lists: ``counts`` int32 ``[B, H, nq]`` and ``indices`` int32
        ``[B, H, nq, nk]`` whose first ``counts`` entries are the kept blocks in
        ascending order (the rest is padding)."""
        if self.kv_lists is not None:
            return self.kv_lists
        counts = self.keep.sum(dim=-1, dtype=torch.int32)
        order = torch.argsort((~self.keep).to(torch.int8), dim=-1, stable=True)
        return counts, order.to(torch.int32)

    def expand_batch_heads(self, batch: int, heads: int) -> "BlockMap":
        """Broadcast a ``[1|B, 1|H, nq, nk]`` map to ``[batch, heads, nq, nk]``."""
        keep = self.keep.expand(batch, heads, -1, -1)
        return BlockMap(keep, self.block_q, self.block_k, self.q_len, self.k_len, self.causal)


def per_head_param(value: HeadParam, name: str, num_heads: int, low: float, high: float,
                   *, low_open: bool = False, device=None) -> Tensor:
    """Validate a scalar or per-head hyperparameter; return fp32 ``[num_heads]``.

    A scalar is a Python number or anything 0-dimensional (a NumPy scalar such as
    ``np.float32(0.9)``, a 0-d array or tensor): it applies to every head,
    whatever their number. A per-head value is a sequence, array or tensor of
    ``num_heads`` numbers. Raises ``ValueError`` naming the argument, the value
    and the allowed range (``(low, high]`` when ``low_open`` else ``[low, high]``).
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number or a per-head sequence, got {value!r}")
    if isinstance(value, (int, float)):
        check_scalar(float(value), name, low, high, low_open)
        return torch.full((num_heads,), float(value), device=device, dtype=torch.float32)
    else:
        try:
            values = torch.as_tensor(value, dtype=torch.float64, device="cpu")
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a number or a per-head sequence of numbers, got "
                             f"{value!r}") from None
        values = values.expand(num_heads) if values.dim() == 0 else values.flatten()
        if values.numel() != num_heads:
            raise ValueError(f"{name}: a per-head value needs {num_heads} entries (one per "
                             f"query head), got {values.numel()}")
    bad = torch.isnan(values) | (values > high) | ((values <= low) if low_open else (values < low))
    if bool(bad.any()):
        check_scalar(values[bad][0].item(), name, low, high, low_open)
    return values.to(device=device, dtype=torch.float32)


def check_scalar(value: float, name: str, low: float, high: float, low_open: bool) -> None:
    """The range check of :func:`per_head_param` for one number, in plain Python: the
    tensor version costs several operations, on every attention call of every layer."""
    if math.isnan(value) or value > high or (value <= low if low_open else value < low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def _block_sums(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per block of ``block`` rows of ``x`` ``[B, H, m*block, D]`` (fp32): the sum of the
    rows and the sum of the unit-normalised rows, each ``[B, H, m, D]``, in one pass."""
    b, h, length, d = x.shape
    m = length // block
    blocks = x.reshape(b, h, m, block, d)
    norms = torch.linalg.vector_norm(x, dim=-1)
    inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    # [1, 1/|x|] as a 2-row weight matrix: one batched GEMM reads x once.
    weights = torch.stack([torch.ones_like(inv), inv], dim=-2).view(b, h, 2, m, block)
    sums = torch.matmul(weights.transpose(2, 3), blocks)  # [B, H, m, 2, D]
    return sums[..., 0, :], sums[..., 1, :]


def block_rows(length: int, block: int, device=None) -> Tensor:
    """fp32 ``[ceil(length / block)]``: how many of ``length`` rows each block holds."""
    n = _num_blocks(length, block)
    rows = torch.full((n,), block, dtype=torch.float32, device=device)
    rows[-1] = length - (n - 1) * block
    return rows


def pooled_blocks(x: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean-pool ``[B, H, L, D]`` into blocks of ``block`` rows.

    Returns ``(pooled [B, H, n, D], similarity [B, H, n], rows [n])`` where
    ``similarity`` is the mean pairwise cosine similarity of each block's rows
    (self-pairs included; a zero row counts as dissimilar to everything) and
    ``rows`` the number of valid rows per block. Partial last blocks pool over
    their valid rows only.
    """
    length = x.shape[2]
    n = _num_blocks(length, block)
    xf = x.float()
    full = length // block
    parts = []
    if full:
        parts.append(_block_sums(xf[:, :, : full * block], block))
    if full * block < length:
        tail = xf[:, :, full * block:]
        parts.append(_block_sums(tail, tail.shape[2]))
    sums, unit_sums = parts[0] if len(parts) == 1 else (
        torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2))
    rows = shared_map(block_rows, length, block, x.device).clone()
    pooled = sums / rows.view(1, 1, n, 1)
    similarity = unit_sums.pow(2).sum(dim=-1) / rows.pow(2).view(1, 1, n)
    return pooled, similarity, rows


@functools.lru_cache(maxsize=64)
def constant_per_head(value: float, heads: int, device: torch.device) -> Tensor:
    """fp32 ``[heads]`` filled with ``value`` on ``device``, made once and shared (never
    write to it): a host-to-device copy per call makes every call wait for the GPU."""
    return torch.full((heads,), value, device=device, dtype=torch.float32)


def _head_values(value: HeadParam, name: str, heads: int, low: float, high: float, *,
                 low_open: bool = False, device: torch.device) -> Tensor:
    """:func:`per_head_param` on ``device``, without a copy per call for a scalar."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        check_scalar(float(value), name, low, high, low_open)
        return constant_per_head(float(value), heads, device)
    return per_head_param(value, name, heads, low, high, low_open=low_open, device=device)


def prediction_args(q: Tensor, k: Tensor, *, simthreshd1: HeadParam,
                    cdfthreshd: HeadParam | None, topk: HeadParam | None,
                    scale: float | None, block_q: int, block_k: int,
                    selection: str = "mass") -> tuple[float, Tensor, Tensor]:
    """Check the arguments of a block-map prediction (any predictor).

    Returns ``(scale, simthreshd1, threshold)``: the score multiplier (default
    ``1/sqrt(D)``) and fp32 ``[H]`` tensors on ``q``'s device; ``threshold`` is
    ``topk`` when given, else ``cdfthreshd`` (default 0.97). Raises ``ValueError``
    naming the offending argument and the allowed range.
    """
    check_selection(selection)
    if cdfthreshd is not None and topk is not None:
        raise ValueError("predict_block_map: give cdfthreshd or topk, not both; "
                         f"got cdfthreshd={cdfthreshd!r}, topk={topk!r}")
    check_qk(q, k)
    check_scale(scale)
    check_block_size("block_q", block_q)
    check_block_size("block_k", block_k)
    h, d = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    sim_t = _head_values(simthreshd1, "simthreshd1", h, -1.0, 1.0, device=q.device)
    name, value = ("cdfthreshd", 0.97 if cdfthreshd is None else cdfthreshd) if topk is None \
        else ("topk", topk)
    thr = _head_values(value, name, h, 0.0, 1.0, low_open=True, device=q.device)
    return scale, sim_t, thr


def check_selection(selection) -> str:
    """``selection`` if it names a rule set of :data:`SELECTIONS`, else ``ValueError``."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(map(repr, SELECTIONS))} "
                         f"('sparge': the original SpargeAttn's rules; 'mass': ours), "
                         f"got {selection!r}")
    return selection


def predict_block_map(q: Tensor, k: Tensor, *, simthreshd1: HeadParam = 0.6,
                      cdfthreshd: HeadParam | None = None, topk: HeadParam | None = None,
                      causal: bool = False, attention_sink: bool = False,
                      smooth_k: bool = True, scale: float | None = None,
                      block_q: int = 128, block_k: int = 64,
                      selection: str = "mass") -> BlockMap:
    """Predict the important attention blocks from pooled queries and keys (SpargeAttn).

    Args:
        q: ``[B, H, Lq, D]`` queries.
        k: ``[B, H_kv, Lk, D]`` keys (``H % H_kv == 0``).
        simthreshd1: self-similarity below which a block is always computed, in [-1, 1].
        cdfthreshd: probability mass to keep per query block, in (0, 1]; 1 keeps all.
            Default 0.97 when ``topk`` is not given.
        topk: instead of ``cdfthreshd``, the fraction of valid key blocks to keep
            per query block, in (0, 1]. At most one of the two may be given.
        causal: bottom-right causal masking.
        attention_sink: always keep the first key block.
        smooth_k: subtract the mean key first (does not change attention).
        scale: score multiplier, default ``1/sqrt(D)``.
        block_q, block_k: block sizes, each in ``[1, 4096]``
            (:data:`~creative_sparse.attention.checks.MAX_BLOCK_SIZE`).
        selection: ``"mass"`` (default) or ``"sparge"``, the rule set that turns
            ``cdfthreshd``/``topk``/``simthreshd1`` into kept blocks (module docstring).

    Returns:
        A :class:`BlockMap` with ``keep`` of shape ``[B, H, ceil(Lq/block_q), ceil(Lk/block_k)]``.

    Example:
        >>> q = torch.randn(1, 2, 300, 64); k = torch.randn(1, 2, 300, 64)
        >>> bm = predict_block_map(q, k, topk=0.5, causal=True)
        >>> bm.keep.shape, 0.0 <= bm.sparsity() < 1.0
        (torch.Size([1, 2, 3, 5]), True)
    """
    scale, sim_t, thr = prediction_args(q, k, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd,
                                        topk=topk, scale=scale, block_q=block_q,
                                        block_k=block_k, selection=selection)
    sparge = selection == "sparge"
    b, h, lq, _ = q.shape
    h_kv, lk = k.shape[1], k.shape[2]

    kf = k.float()
    if smooth_k:
        kf = kf - kf.mean(dim=2, keepdim=True)
    pq, sim_q, _ = pooled_blocks(q, block_q)
    pk, sim_k, rows_k = pooled_blocks(kf, block_k)
    group = h // h_kv
    pk = pk.repeat_interleave(group, dim=1)
    sim_k = sim_k.repeat_interleave(group, dim=1)

    valid = shared_map(block_valid_map, lq, lk, block_q, block_k, causal, q.device)
    # Not similar enough: keep the whole row (Q) / column (K). The original keeps a
    # block compressible when its similarity is > simthreshd1 (utils.py,
    # triton_bmm_pool_sim_simmean: `cur_sim = (sum_value / (BS_ * BS_)) > cur_h1`).
    below = torch.le if sparge else torch.lt
    q_dense = below(sim_q, sim_t.view(1, h, 1))     # [B, H, nq]
    k_dense = below(sim_k, sim_t.view(1, h, 1))     # [B, H, nk]

    logits = torch.matmul(pq, pk.transpose(-1, -2)) * scale + rows_k.log()
    # Huge inputs can overflow the pooled scores; keep them finite so that
    # the softmax still ranks blocks instead of producing NaN.
    big = torch.finfo(torch.float32).max / 4
    logits = torch.nan_to_num(logits, nan=0.0, posinf=big, neginf=-big)
    candidate = valid & ~k_dense.unsqueeze(2)
    logits = logits.masked_fill(~candidate, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-excluded rows -> 0

    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    rank = torch.arange(probs.shape[-1], device=q.device)
    thr4 = thr.view(1, h, 1, 1)
    if topk is None and sparge:
        # utils.py, get_block_map_meansim: `torch.searchsorted(cdf, cdfthreshd, right=True)`
        # counts the sorted blocks whose inclusive cumulative probability is <= cdfthreshd;
        # the fill kernel then takes at least one.
        keep_sorted = (torch.cumsum(sorted_p, dim=-1) <= thr4) | (thr4 >= 1.0) | (rank == 0)
    elif topk is None:
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        keep_sorted = ((before < thr4) & (sorted_p > 0)) | (thr4 >= 1.0) | (rank == 0)
    elif sparge:
        # utils.py: `num_to_select = (topk * K).to(torch.int64)` over all K key blocks
        # (causally masked ones included, they are cleared afterwards), at least one.
        nk_all = probs.shape[-1]
        budget = (thr4 * nk_all).to(torch.int64).clamp_min(1)
        keep_sorted = rank < budget
    else:
        n_valid = valid.sum(dim=-1).view(1, 1, -1, 1).float()
        budget = torch.ceil(thr4 * n_valid - 1e-6).clamp_min(1.0)
        keep_sorted = rank < budget
    keep = torch.zeros(order.shape, dtype=torch.bool, device=q.device)
    keep = keep.scatter(-1, order, keep_sorted.expand(order.shape))
    keep = keep & candidate
    keep = keep | q_dense.unsqueeze(-1) | k_dense.unsqueeze(2)
    if causal:
        keep = keep | shared_map(block_diagonal_map, lq, lk, block_q, block_k, q.device)
    if attention_sink:
        keep[..., 0] = True
    return BlockMap(keep, block_q, block_k, lq, lk, causal)
