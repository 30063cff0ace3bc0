"""Fast per-head threshold tuning for sparse attention in diffusers transformers.

Two steps:

1. :func:`record`: run the model (a few denoising steps of the user's pipeline)
   with dense attention while each patched layer keeps a few evenly spaced
   samples of the ``q``/``k``/``v`` its attention call sees (optionally only some
   query blocks: the prediction of a query block depends on that block and all
   keys only, so a subset of whole query blocks is tuned exactly as it will run).
2. :func:`tune_layer`, for each layer: compute once, per sampled query row and
   key block, the block's max score, exp-sum and partial output (the pieces
   online softmax combines). Any block map's output is then a weighted sum
   over ``nk`` blocks instead of an attention over ``Lk`` keys, so a candidate
   costs ``1/block_k`` of an attention. Every head and every ``simthreshd1``
   of a grid is searched at once (heads are stacked ``grid x heads`` into one
   :func:`~creative_sparse.attention.predict_block_map` call with per-head
   thresholds), bisecting ``cdfthreshd`` per (grid value, head) for the
   sparsest map whose relative L1 error versus dense stays under ``l1`` on
   *every* sample; each head then takes the grid value with the most sparsity.
   Heads below ``min_sparsity`` stay dense (``cdfthreshd = 1``). Finally
   ``pvthreshd`` is bisected per head for a total error under ``pv_l1``.

The PV-skip rule is emulated (DESIGN.md, step 4): in ascending key-block order
a kept block's ``P.V`` is skipped when, for every row of the query block, its
maximum score is more than ``pvthreshd`` (log2 units) below the running row
maximum including the block; its weights still count in the softmax
denominator. Only a kernel that implements that rule (the GPU kernel) uses
``pvthreshd``; the CPU backends compute kept blocks exactly.

After the search each layer is *measured* with the real sparse attention
against the fp32 dense reference on its samples; the report holds that error
and the sparsity.

Example:
    >>> from creative_sparse.models.diffusers.tiny import tiny_inputs, tiny_transformer
    >>> model = tiny_transformer("flux")
    >>> x = tiny_inputs(model, height=32, width=32)
    >>> params = tune(model, lambda: model(**x), l1=0.05, progress=False)
    >>> all(r["l1"] < 0.05 for r in params.report.values())
    True
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch
from torch import Tensor

from ..attention import dense_attention, predict_block_map, sparse_attention
from ..attention.reference import expand_kv_heads
from ..models.diffusers import _LayerRuntime, _wrap, unpatch
from ..models.diffusers.params import (DENSE_PVTHRESHD, LayerThresholds, SparseParams, _require_diffusers,
                               attention_layers, check_target)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SIM_GRID", "QKVSample", "block_partials", "combine_blocks", "measure_layer",
           "record", "tune", "tune_layer", "tune_recording"]

DEFAULT_SIM_GRID = (0.0, 0.3, 0.5, 0.7, 0.9)
_CDF_STEPS = 10          # bisection on (0, 1]: resolution 2**-10
_PV_STEPS = 9            # bisection on (0, 50]: resolution ~0.1
_LN2 = math.log(2.0)


@dataclass
class QKVSample:
    """One recorded attention call of one layer (CPU tensors, the model's dtype).

    Attributes:
        q: ``[B, H, R, D]``: whole query blocks (``R`` rows) out of ``q_len``.
        k, v: ``[B, H_kv, Lk, D]`` all keys and values (padded keys dropped).
        scale: the call's score scale (``None`` = ``1/sqrt(D)``).
        q_len: the full query length.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float | None
    q_len: int


def _query_rows(q_len: int, block_q: int, max_blocks: int | None) -> Tensor | None:
    nq = math.ceil(q_len / block_q)
    if max_blocks is None or nq <= max_blocks:
        return None
    blocks = torch.linspace(0, nq - 1, max_blocks).round().long().unique()
    rows = blocks[:, None] * block_q + torch.arange(block_q)[None]
    return rows.flatten()[rows.flatten() < q_len]


class _Recorder:
    """Keeps at most ``max_samples`` evenly spaced calls per layer: when full it
    drops every other sample and records half as often."""

    def __init__(self, max_samples: int, max_query_blocks: int | None, block_q: int):
        self.max_samples, self.max_query_blocks, self.block_q = \
            max_samples, max_query_blocks, block_q
        self.samples: dict[str, list[QKVSample]] = {}
        self.calls: dict[str, int] = {}
        self.stride: dict[str, int] = {}

    def __call__(self, name, q, k, v, scale, padding, causal):
        if causal:
            raise ValueError(f"{name}: causal attention; tuning supports the non-causal "
                             "diffusion transformers only")
        n = self.calls.get(name, 0)
        self.calls[name] = n + 1
        stride = self.stride.setdefault(name, 1)
        if n % stride:
            return
        items = self.samples.setdefault(name, [])
        rows = _query_rows(q.shape[2], self.block_q, self.max_query_blocks)
        batches = [(slice(None), None)] if padding is None or bool(padding.all()) else \
            [(slice(b, b + 1), padding[b]) for b in range(q.shape[0])]
        for sel, keys in batches:
            qs, ks, vs = q[sel], k[sel], v[sel]
            if keys is not None:
                ks, vs = ks[:, :, keys], vs[:, :, keys]
            if rows is not None:
                qs = qs[:, :, rows.to(qs.device)]
            items.append(QKVSample(qs.detach().cpu(), ks.detach().cpu(), vs.detach().cpu(),
                                   scale, q.shape[2]))
        if len(items) > self.max_samples * len(batches):
            del items[1::2]
            self.stride[name] = stride * 2


@torch.no_grad()
def record(model, run: Callable[[], object], *, max_samples: int = 3,
           max_query_blocks: int | None = 16, block_q: int = 128,
           layers: Collection[str] | None = None) -> dict[str, list[QKVSample]]:
    """Run ``run()`` (which calls ``model``) with dense attention and record each
    patched layer's ``q``/``k``/``v``.

    Args:
        model: a supported diffusers transformer (not patched).
        run: calls the model, e.g. ``lambda: pipe(prompt, num_inference_steps=5)``.
        max_samples: calls kept per layer, evenly spaced over the run.
        max_query_blocks: keep only this many evenly spaced whole query blocks of
            ``block_q`` rows (``None``: all). Keys and values are kept whole.
        layers: record only these layers (default: all).

    Returns:
        layer name -> list of :class:`QKVSample` (on CPU). Memory: per sample the
        layer's full K and V in the model's dtype (bf16: Flux-dev at 1024x1024 56 MB,
        CogVideoX-5B 218 MB, Wan2.1-14B 671 MB, HunyuanVideo 720p 1.5 GB, per batch
        element); record large video models a few layers at a time
        (``tune(layers_per_pass=...)``).
    """
    _require_diffusers()
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
    chosen = set(attention_layers(model)) if layers is None else set(layers)
    unknown = sorted(chosen - set(attention_layers(model)))
    if unknown:
        raise ValueError(f"record: unknown layers {unknown[:3]}")
    recorder = _Recorder(max_samples, max_query_blocks, block_q)
    _wrap(model, lambda name, mod: _LayerRuntime(name, mod.heads, None, None,
                                                 recorder if name in chosen else None))
    try:
        run()
    finally:
        unpatch(model)
    return recorder.samples


# --------------------------------------------------------------------------- block partials

@torch.no_grad()
def block_partials(q: Tensor, k: Tensor, v: Tensor, scale: float | None, block_k: int,
                   row_chunk: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """Online-softmax pieces of every (query row, key block), in fp32.

    Args:
        q: ``[B, H, R, D]``; k, v: ``[B, H, Lk, D]`` / ``[B, H, Lk, Dv]`` (same heads).

    Returns:
        ``(m, l, o)``: ``m`` ``[B, H, R, nk]`` the block's max score, ``l`` the sum of
        ``exp(score - m)`` over its keys and ``o`` ``[B, H, R, nk, Dv]`` the matching
        ``exp(score - m) @ V``. :func:`combine_blocks` turns them into the output of
        any block map.
    """
    b, h, r, d = q.shape
    lk = k.shape[2]
    nk = math.ceil(lk / block_k)
    pad = nk * block_k - lk
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad))
    vb = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(b, h, nk, block_k, -1)
    valid = torch.arange(nk * block_k, device=q.device) < lk
    m = torch.empty(b, h, r, nk, device=q.device)
    l = torch.empty_like(m)
    o = torch.empty(b, h, r, nk, v.shape[-1], device=q.device)
    for start in range(0, r, row_chunk):
        stop = min(start + row_chunk, r)
        s = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale
        s = s.masked_fill(~valid, float("-inf")).view(b, h, stop - start, nk, block_k)
        mc = s.amax(dim=-1)
        p = torch.exp(s - mc.unsqueeze(-1))
        m[:, :, start:stop], l[:, :, start:stop] = mc, p.sum(dim=-1)
        # [B, H, nk, rows, bk] @ [B, H, nk, bk, Dv] -> [B, H, rows, nk, Dv]
        o[:, :, start:stop] = torch.matmul(p.permute(0, 1, 3, 2, 4), vb).permute(0, 1, 3, 2, 4)
    return m, l, o


def combine_blocks(m: Tensor, l: Tensor, o: Tensor, keep: Tensor,
                   skip_pv: Tensor | None = None) -> Tensor:
    """Attention output over the kept blocks from :func:`block_partials`.

    Args:
        m, l, o: from :func:`block_partials` (``[B, H, R, nk]``, ``[B, H, R, nk, Dv]``).
        keep: bool ``[..., B, H, R, nk]`` per row (leading dims broadcast, e.g. a grid).
        skip_pv: bool like ``keep``: kept blocks whose ``P.V`` is left out of the
            numerator (their weights stay in the denominator).

    Returns:
        ``[..., B, H, R, Dv]`` fp32.
    """
    mk = m.masked_fill(~keep, float("-inf"))
    top = mk.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(mk - top)
    den = (w * l).sum(dim=-1, keepdim=True)
    if skip_pv is not None:
        w = w.masked_fill(skip_pv, 0.0)
    # One batched GEMM over (batch, head, row): [rows, lead, nk] @ [rows, nk, Dv].
    lead = w.shape[:w.dim() - m.dim()]
    n_lead, n_rows, nk, dv = math.prod(lead), m.numel() // m.shape[-1], m.shape[-1], o.shape[-1]
    w2 = w.expand(*lead, *m.shape).reshape(n_lead, n_rows, nk).transpose(0, 1)
    num = torch.bmm(w2, o.reshape(n_rows, nk, dv)).transpose(0, 1).reshape(*w.shape[:-1], dv)
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


def _rows(keep: Tensor, block_q: int, r: int) -> Tensor:
    return keep.repeat_interleave(block_q, dim=-2)[..., :r, :]


def _rel_l1(out: Tensor, ref: Tensor) -> Tensor:
    """Per head relative L1 over (batch, rows, dims): ``out [..., B, H, R, D]`` -> ``[..., H]``."""
    err = (out - ref).abs().sum(dim=(-1, -2)).sum(dim=-2)
    return err / ref.abs().sum(dim=(-1, -2)).sum(dim=-2).clamp_min(1e-30)


# --------------------------------------------------------------------------- the search

class _HeadChunk:
    """The samples of one layer restricted to some heads, with their block partials."""

    def __init__(self, samples: Sequence[QKVSample], heads: slice, block_k: int):
        self.items = []
        self._stacked: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for s in samples:
            h = s.q.shape[1]
            q = s.q[:, heads].float()
            k = expand_kv_heads(s.k, h)[:, heads].float()
            v = expand_kv_heads(s.v, h)[:, heads].float()
            m, l, o = block_partials(q, k, v, s.scale, block_k)
            ref = combine_blocks(m, l, o, torch.ones_like(m, dtype=torch.bool))
            self.items.append((q, k, s.scale, m, l, o, ref))

    def keeps(self, sim: Tensor, cdf: Tensor, grid: int, sink: bool, block_q: int,
              block_k: int, selection: str = "mass") -> list[Tensor]:
        """Block maps ``[B, grid, Hc, nq, nk]`` per sample for per-(grid, head) thresholds."""
        if grid not in self._stacked:  # the same stacked copies serve every bisection step
            self._stacked[grid] = [(q.repeat(1, grid, 1, 1), k.repeat(1, grid, 1, 1))
                                   for q, k, *_ in self.items]
        out = []
        for (q, _, scale, *_), (q_grid, k_grid) in zip(self.items, self._stacked[grid]):
            bm = predict_block_map(q_grid, k_grid,
                                   simthreshd1=sim.flatten(), cdfthreshd=cdf.flatten(),
                                   attention_sink=sink, scale=scale, block_q=block_q,
                                   block_k=block_k, selection=selection)
            out.append(bm.keep.view(q.shape[0], grid, q.shape[1], *bm.keep.shape[-2:]))
        return out

    def errors(self, keeps: list[Tensor], block_q: int, skips: list[Tensor] | None = None):
        """Max over samples of the per-(grid, head) relative L1 error: ``[grid, Hc]``."""
        worst = None
        for i, (q, _, _, m, l, o, ref) in enumerate(self.items):
            keep = _rows(keeps[i], block_q, q.shape[2]).transpose(0, 1)   # [G, B, Hc, R, nk]
            skip = None if skips is None else _rows(skips[i], block_q, q.shape[2]).transpose(0, 1)
            err = _rel_l1(combine_blocks(m, l, o, keep, skip), ref)
            worst = err if worst is None else torch.maximum(worst, err)
        return worst


def _sparsity(keeps: list[Tensor]) -> Tensor:
    """Mean over samples of each (grid, head)'s skipped-block fraction: ``[grid, Hc]``."""
    return torch.stack([1.0 - k.float().mean(dim=(0, 3, 4)) for k in keeps]).mean(dim=0)


def _pv_gap(m: Tensor, keep_rows: Tensor, block_q: int) -> Tensor:
    """Per (query block, key block): max over the block's rows of (block max - running
    row max including the block), in natural-log units; ``+inf`` for unkept blocks."""
    mk = m.masked_fill(~keep_rows, float("-inf"))
    running = torch.cummax(mk, dim=-1).values
    gap = torch.where(keep_rows, mk - running, torch.full_like(mk, float("inf")))
    r = gap.shape[-2]
    nq = math.ceil(r / block_q)
    gap = torch.nn.functional.pad(gap, (0, 0, 0, nq * block_q - r), value=float("-inf"))
    return gap.view(*gap.shape[:-2], nq, block_q, gap.shape[-1]).amax(dim=-2)


@torch.no_grad()
def tune_layer(samples: Sequence[QKVSample], *, l1: float = 0.06, pv_l1: float = 0.065,
               sim_grid: Sequence[float] = DEFAULT_SIM_GRID, min_sparsity: float = 0.1,
               attention_sink: bool = False, block_q: int = 128, block_k: int = 64,
               heads_per_chunk: int | None = None,
               selection: str = "mass") -> tuple[LayerThresholds, dict]:
    """Per-head thresholds of one layer from its samples (see the module docstring).

    ``selection`` is the block-selection rule set the thresholds are for (``"mass"`` or
    ``"sparge"``, the original SpargeAttn's; see :mod:`creative_sparse.attention.blockmap`).

    Returns:
        ``(thresholds, report)``; the report holds per-head ``head_sparsity`` and
        ``head_l1`` (emulated), ``pv_skip`` (emulated fraction of kept blocks whose
        P.V is skipped) and ``dense_heads``.
    """
    l1, pv_l1 = check_target(l1, "l1"), check_target(pv_l1, "pv_l1")
    if pv_l1 < l1:
        raise ValueError(f"pv_l1 bounds the total error (blocks + PV skip) and must be >= l1; "
                         f"got l1={l1}, pv_l1={pv_l1}")
    if not samples:
        raise ValueError("tune_layer needs at least one sample")
    grid = torch.tensor(sorted(float(x) for x in sim_grid))
    heads = samples[0].q.shape[1]
    if heads_per_chunk is None:  # bound the working set to ~512 MB per chunk of heads
        g = len(grid)
        per_head = 4 * sum(s.q.shape[0] * (
            s.q.shape[2] * math.ceil(s.k.shape[2] / block_k) * (s.v.shape[-1] + 2 + 3 * g)
            + (g + 1) * (s.q.shape[2] + s.k.shape[2]) * (s.q.shape[-1] + s.v.shape[-1]))
            for s in samples)
        heads_per_chunk = max(1, min(heads, int(2 ** 29 // max(per_head, 1))))
    sim_out, cdf_out, pv_out = [], [], []
    spars_out, err_out, skip_out = [], [], []
    for h0 in range(0, heads, heads_per_chunk):
        chunk = _HeadChunk(samples, slice(h0, min(h0 + heads_per_chunk, heads)), block_k)
        hc = chunk.items[0][0].shape[1]
        g = len(grid)
        sim = grid[:, None].expand(g, hc)
        lo, hi = torch.zeros(g, hc), torch.ones(g, hc)
        for _ in range(_CDF_STEPS):
            mid = (lo + hi) / 2
            ok = chunk.errors(chunk.keeps(sim, mid, g, attention_sink, block_q, block_k,
                                          selection), block_q) < l1
            hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        keeps = chunk.keeps(sim, hi, g, attention_sink, block_q, block_k, selection)
        spars = _sparsity(keeps)
        best = spars.argmax(dim=0)                                   # sparsest grid value
        idx = torch.arange(hc)
        h_sim, h_cdf, h_spars = grid[best], hi[best, idx], spars[best, idx]
        dense = h_spars < min_sparsity
        h_sim = torch.where(dense, torch.ones_like(h_sim), h_sim)
        h_cdf = torch.where(dense, torch.ones_like(h_cdf), h_cdf)
        final = [k[:, 0] for k in chunk.keeps(h_sim[None], h_cdf[None], 1, attention_sink,
                                               block_q, block_k, selection)]  # [B,Hc,nq,nk]
        h_err = chunk.errors([f[:, None] for f in final], block_q)[0]
        gaps = [_pv_gap(item[3], _rows(f, block_q, item[0].shape[2]), block_q)
                for item, f in zip(chunk.items, final)]
        lo, hi = torch.zeros(hc), torch.full((hc,), DENSE_PVTHRESHD)
        for _ in range(_PV_STEPS):
            mid = (lo + hi) / 2
            skips = [(gap < -mid.view(1, hc, 1, 1) * _LN2)[:, None] for gap in gaps]
            ok = chunk.errors([f[:, None] for f in final], block_q, skips)[0] < pv_l1
            hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        skipped = sum(float((gap < -hi.view(1, hc, 1, 1) * _LN2).sum()) for gap in gaps)
        kept = sum(float(f.sum()) for f in final)
        sim_out.append(h_sim), cdf_out.append(h_cdf), pv_out.append(hi)
        spars_out.append(torch.where(dense, torch.zeros_like(h_spars), h_spars))
        err_out.append(h_err), skip_out.append((skipped, kept))
    thresholds = LayerThresholds(tuple(torch.cat(sim_out).tolist()),
                                 tuple(torch.cat(cdf_out).clamp(max=1.0).tolist()),
                                 tuple(torch.cat(pv_out).tolist()))
    report = {"head_sparsity": [round(x, 4) for x in torch.cat(spars_out).tolist()],
              "head_l1": [round(x, 5) for x in torch.cat(err_out).tolist()],
              "pv_skip": sum(s for s, _ in skip_out) / max(1.0, sum(k for _, k in skip_out)),
              "dense_heads": sum(thresholds.dense_heads)}
    return thresholds, report


@torch.no_grad()
def measure_layer(samples: Sequence[QKVSample], thresholds: LayerThresholds, *,
                  attention_sink: bool = False, block_q: int = 128,
                  block_k: int = 64, selection: str = "mass") -> dict:
    """Run the real sparse attention with ``thresholds`` on each sample against the fp32
    dense reference: ``{"l1": max over samples, "sparsity": mean over samples}``."""
    errors, sparsities = [], []
    for s in samples:
        out, sparsity = sparse_attention(
            s.q, s.k, s.v, scale=s.scale, simthreshd1=list(thresholds.simthreshd1),
            cdfthreshd=list(thresholds.cdfthreshd), pvthreshd=list(thresholds.pvthreshd),
            attention_sink=attention_sink, block_q=block_q, block_k=block_k,
            return_sparsity=True, output_dtype=torch.float32, selection=selection)
        ref = dense_attention(s.q.float(), s.k.float(), s.v.float(), scale=s.scale)
        errors.append(float((out - ref).abs().sum() / ref.abs().sum().clamp_min(1e-30)))
        sparsities.append(sparsity)
    return {"l1": max(errors), "sparsity": sum(sparsities) / len(sparsities)}


def _tune_layers(recording, names, bar, *, l1, pv_l1, sim_grid, min_sparsity, attention_sink,
                 block_q, block_k, free, selection) -> tuple[dict, dict]:
    missing = sorted(set(names) - {n for n, s in recording.items() if s})
    if missing:
        raise ValueError(f"no recorded attention call for layers {missing[:3]} "
                         f"({len(missing)} in all); did run() call the model?")
    thresholds, report = {}, {}
    for name in names:
        bar.update(1)
        start = time.perf_counter()
        t, rep = tune_layer(recording[name], l1=l1, pv_l1=pv_l1, sim_grid=sim_grid,
                            min_sparsity=min_sparsity, attention_sink=attention_sink,
                            block_q=block_q, block_k=block_k, selection=selection)
        rep.update(measure_layer(recording[name], t, attention_sink=attention_sink,
                                 block_q=block_q, block_k=block_k, selection=selection))
        rep["samples"] = len(recording[name])
        rep["seconds"] = round(time.perf_counter() - start, 4)
        if rep["l1"] >= l1:
            logger.warning("%s: measured l1 %.4f >= target %.4f", name, rep["l1"], l1)
        thresholds[name], report[name] = t, rep
        if free:
            recording[name] = []
    return thresholds, report


def tune_recording(model, recording: dict[str, list[QKVSample]], *, l1: float = 0.06,
                   pv_l1: float = 0.065, sim_grid: Sequence[float] = DEFAULT_SIM_GRID,
                   min_sparsity: float = 0.1, attention_sink: bool = False,
                   block_q: int = 128, block_k: int = 64, progress: bool = True,
                   free: bool = False, selection: str = "mass") -> SparseParams:
    """:func:`tune_layer` and :func:`measure_layer` for every layer of a :func:`record`
    result; returns :class:`SparseParams` for ``model`` whose report holds, per layer,
    the measured ``l1`` and ``sparsity``, ``pv_skip``, ``dense_heads`` and ``seconds``.
    ``free=True`` drops each layer's samples once tuned."""
    from tqdm.auto import tqdm

    l1, pv_l1 = check_target(l1, "l1"), check_target(pv_l1, "pv_l1")
    names = list(attention_layers(model))
    with tqdm(total=len(names), desc="tuning layers", disable=not progress) as bar:
        thresholds, report = _tune_layers(
            recording, names, bar, l1=l1, pv_l1=pv_l1, sim_grid=sim_grid,
            min_sparsity=min_sparsity, attention_sink=attention_sink, block_q=block_q,
            block_k=block_k, free=free, selection=selection)
    return SparseParams.for_model(model, thresholds, l1=l1, pv_l1=pv_l1, block_q=block_q,
                                  block_k=block_k, attention_sink=attention_sink, report=report,
                                  selection=selection)


def tune(model, run: Callable[[], object], *, l1: float = 0.06, pv_l1: float | None = None,
         max_samples: int = 3, max_query_blocks: int | None = 16,
         sim_grid: Sequence[float] = DEFAULT_SIM_GRID, min_sparsity: float = 0.1,
         attention_sink: bool = False, block_q: int = 128, block_k: int = 64,
         layers_per_pass: int | None = None, progress: bool = True,
         selection: str = "mass") -> SparseParams:
    """Record ``run()`` and tune every layer: :func:`record` then :func:`tune_recording`.

    Args:
        model: a supported diffusers transformer (``pipe.transformer``), not patched.
        run: calls the model; a few denoising steps suffice, e.g.
            ``lambda: pipe(prompt, num_inference_steps=5)``.
        l1: relative L1 error versus dense each layer must stay under, in (0, 1).
        pv_l1: total error bound including the PV skip, in [l1, 1); default ``l1 * 1.1``.
        layers_per_pass: record and tune this many layers per call of ``run()``
            (``run`` is called ``ceil(layers / layers_per_pass)`` times); bounds the
            recorded K/V in host memory for large video models. Default: all at once.
        selection: the block-selection rules the thresholds are tuned for: ``"mass"``
            (ours) or ``"sparge"`` (the original SpargeAttn's, e.g. to export them to
            its ``.pt`` format with :meth:`SparseParams.save`).
        Others: see :func:`record` and :func:`tune_layer`.

    Returns:
        :class:`SparseParams` ready for :func:`~creative_sparse.models.diffusers.patch`
        and ``save``.
    """
    l1 = check_target(l1, "l1")
    pv_l1 = check_target(min(l1 * 1.1, 0.999) if pv_l1 is None else pv_l1, "pv_l1")
    if pv_l1 < l1:
        raise ValueError(f"pv_l1 bounds the total error (blocks + PV skip) and must be >= l1; "
                         f"got l1={l1}, pv_l1={pv_l1}")
    from tqdm.auto import tqdm

    names = list(attention_layers(model))
    step = len(names) if layers_per_pass is None else layers_per_pass
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"layers_per_pass must be None or an int >= 1, got {layers_per_pass!r}")
    thresholds, report = {}, {}
    with tqdm(total=len(names), desc="tuning layers", disable=not progress) as bar:
        for start in range(0, len(names), step):
            group = names[start:start + step]
            recording = record(model, run, max_samples=max_samples,
                               max_query_blocks=max_query_blocks, block_q=block_q, layers=group)
            t, rep = _tune_layers(recording, group, bar, l1=l1, pv_l1=pv_l1, sim_grid=sim_grid,
                                  min_sparsity=min_sparsity, attention_sink=attention_sink,
                                  block_q=block_q, block_k=block_k, free=True,
                                  selection=selection)
            thresholds.update(t)
            report.update(rep)
    return SparseParams.for_model(model, thresholds, l1=l1, pv_l1=pv_l1, block_q=block_q,
                                  block_k=block_k, attention_sink=attention_sink, report=report,
                                  selection=selection)
