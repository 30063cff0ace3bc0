"""Random calls of the public attention functions, and the check of each against an fp64 oracle.

Shared by the fuzz runner (``scripts/fuzz_attention.py``) and the Hypothesis tests
(``tests/test_attention_fuzz.py``). A *case* is a JSON-serialisable dict that
fully determines one call (tensors are regenerated from its seed), so a failing
case is its own reproducer. :func:`draw_case` draws one from a *pick*, a source
of choices (:class:`RandomPick` here, Hypothesis draws in the tests);
:func:`run_case` makes the call and classifies it:

* valid input: ``"ok"`` when the result matches the oracle, ``"mismatch"`` when
  not, ``"valid_raised"`` when it raised;
* bad input: ``"rejected"`` for a ``ValueError`` or ``TypeError``,
  ``"wrong_exception"`` for any other exception, ``"bad_accepted"`` when it ran;
* ``"harness_error"`` when this module itself failed to build the call.

The oracle is dense softmax attention over the block map's token mask, computed
in float64 by code that shares nothing with the library but
:func:`~creative_sparse.attention.predict_block_map`, whose map it takes as given
(the prediction itself is held to its invariants instead: causally valid,
threshold 1 is dense, every row with a valid block keeps one, ...).
"""

from __future__ import annotations

import math
import random
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

import creative_sparse.attention as attention
from creative_sparse.attention import BlockMap, dispatch, use_backend
from creative_sparse.attention.blockmap import block_diagonal_map, block_valid_map

__all__ = ["CPU_BACKENDS", "FUNCTIONS", "RandomPick", "build_call", "check", "draw_case",
           "execute", "run_case"]

SEED_CDF = ("spas_sage2_attn_meansim_cuda", "spas_sage_attn_meansim_cuda")
SEED_TOPK = ("spas_sage2_attn_meansim_topk_cuda", "spas_sage_attn_meansim_topk_cuda")
PREDICTING = ("sparse_attention",) + SEED_CDF + SEED_TOPK
GIVEN_MAP = ("block_sparse_attention", "BlockMap")
FUNCTIONS = ("sparse_attention", "predict_block_map", "block_sparse_attention", "BlockMap",
             *SEED_CDF, *SEED_TOPK, "block_sparse_sage2_attn_cuda")
CPU_BACKENDS = ("cpu_kernel", "torch", "reference")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
LENGTH_EDGES = (1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257)
KINDS = ("normal", "normal", "zeros", "huge", "tiny", "equal_keys", "repeated_rows")
FAILURES = ("mismatch", "valid_raised", "wrong_exception", "bad_accepted", "harness_error")


class RandomPick:
    """Choices from :class:`random.Random` (the runner's source of cases)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def choice(self, options):
        return options[self.rng.randrange(len(options))]

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def real(self, low: float, high: float) -> float:
        return self.rng.uniform(low, high)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


# ------------------------------------------------------------------ values in JSON

def spec(kind: str, value) -> dict:
    """A value JSON cannot hold: a NumPy scalar or array, a tensor, a dtype, a complex."""
    return {"$": kind, "v": value}


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "np.float32": np.float32, "np.float64": np.float64, "np.int64": np.int64,
    "np.array": np.array, "tensor": torch.tensor, "dtype": lambda name: getattr(torch, name),
    "complex": lambda pair: complex(*pair),
}


def decode(value):
    if isinstance(value, dict) and "$" in value:
        return _DECODERS[value["$"]](value["v"])
    if isinstance(value, list):
        return [decode(x) for x in value]
    return value


# ------------------------------------------------------------------ drawing cases

def _length(pick) -> int:
    return pick.choice(LENGTH_EDGES) if pick.chance(0.5) else pick.integer(1, 300)


def _head_value(pick, heads: int, low: float, high: float):
    """A valid scalar or per-head value in ``[low, high]`` (``low`` itself excluded), in
    one of the forms the API takes: float, NumPy scalar or 0-d array, 0-d tensor, or
    one entry per head as a list, array or tensor."""
    def one():
        return pick.choice((high, pick.real(max(low, -1e6) + 1e-6, min(high, 1e6))))
    form = pick.choice(("float", "float", "np.float32", "np.float64", "np.array", "tensor",
                        "list", "np.array_heads", "tensor_heads"))
    if form == "float":
        return one()
    if form in ("np.float32", "np.float64", "np.array", "tensor"):
        return spec(form, one())
    values = [one() for _ in range(heads)]
    return values if form == "list" else spec(form.removesuffix("_heads"), values)


def draw_case(pick, *, fn: str | None = None, backend: str | None = None,
              valid: bool | None = None, backends=CPU_BACKENDS) -> dict:
    """One call of ``fn`` (default: drawn) on ``backend``, valid or with one bad input."""
    fn = fn or pick.choice(FUNCTIONS)
    backend = backend or pick.choice(tuple(backends))
    valid = pick.chance(0.6) if valid is None else valid
    kv_heads, group = pick.integer(1, 3), pick.integer(1, 3)
    dtype = pick.choice(("float32", "float32", "bfloat16", "float16", "float64"))
    head_dim = pick.choice((1, 8, 16, 24, 33, 64, 80))
    kinds = KINDS + (("big64",) if dtype == "float64" and backend in dispatch.FP64_BACKENDS
                     else ())
    case = {
        "fn": fn, "backend": backend, "valid": valid, "seed": pick.integer(0, 2**31 - 1),
        "batch": pick.integer(1, 2), "heads": kv_heads * group, "kv_heads": kv_heads,
        "q_len": _length(pick), "k_len": _length(pick), "head_dim": head_dim,
        "v_dim": head_dim if pick.chance(0.7) else pick.choice((1, 16, 40)),
        "dtype": dtype, "dtype_kv": dtype if pick.chance(0.9) else pick.choice(tuple(DTYPES)),
        "layout": "HND" if fn == "predict_block_map" else pick.choice(("HND", "NHD")),
        "kind": pick.choice(kinds), "noncontiguous": pick.chance(0.15),
        "requires_grad": pick.chance(0.1), "causal": pick.chance(0.5),
        "params": _draw_params(pick, fn), "bad": None,
    }
    # one-row blocks on short sequences only: the torch backend loops over query blocks
    for block, length in (("block_q", "q_len"), ("block_k", "k_len")):
        if case["params"].get(block) == 1:
            case[length] = min(case[length], 64)
    if case["kind"] == "big64":                 # 1e25: only fp64 holds it, in and out
        case["dtype_kv"] = "float64"
        case["params"].pop("output_dtype", None)
    if fn in GIVEN_MAP:
        case["map"] = {"block_q": pick.choice((128, 16, 64, 100, 7, 4096)),
                       "block_k": pick.choice((64, 8, 128, 37, 640, 4096)),
                       "density": pick.choice((0.0, 0.3, 0.7, 1.0)),
                       "broadcast_batch": pick.chance(0.3), "broadcast_heads": pick.chance(0.3),
                       "lists": "shuffled" if fn == "BlockMap" else pick.choice((None, "sorted"))}
    if fn == "block_sparse_sage2_attn_cuda":
        case["mask"] = {"form": pick.choice((None, "bool", "int", "float")),
                        "density": pick.choice((0.0, 0.3, 0.7, 1.0)),
                        "broadcast_batch": pick.chance(0.3), "broadcast_heads": pick.chance(0.3)}
    if not valid:
        case["bad"] = _draw_bad(pick, case)
    return case


def _draw_params(pick, fn: str) -> dict:
    """Keyword arguments in value-spec form; the per-head ones are drawn for the
    largest head count (9) and cut to size when the call is built."""
    params: dict[str, Any] = {}
    if pick.chance(0.3):
        params["scale"] = pick.choice((pick.real(0.01, 2.0), spec("np.float32", 0.5), 1))
    if fn in PREDICTING or fn == "predict_block_map":
        params["simthreshd1"] = _head_value(pick, 9, -1.0, 1.0)
        if fn in SEED_CDF:
            selection = "cdfthreshd"
        elif fn in SEED_TOPK:
            selection = "topk"
        else:
            selection = pick.choice(("cdfthreshd", "topk", "default"))
        if selection != "default":
            params[selection] = _head_value(pick, 9, 0.0, 1.0)
        if fn in ("sparse_attention", "predict_block_map") and pick.chance(0.5):
            params["selection"] = pick.choice(("mass", "sparge"))   # the rule set
        params["smooth_k"] = pick.chance(0.5)
        params["attention_sink"] = pick.chance(0.3)
    if fn in ("sparse_attention", "predict_block_map"):
        for name, options in (("block_q", (128, 16, 32, 64, 256, 7, 100, 1, 4096)),
                              ("block_k", (64, 8, 16, 128, 5, 640, 1, 4096))):
            if pick.chance(0.6):
                params[name] = pick.choice(options)
    if fn == "block_sparse_sage2_attn_cuda":
        params["attention_sink"] = pick.chance(0.3)
        params["smooth_k"] = pick.chance(0.5)
    if fn != "predict_block_map":
        if pick.chance(0.5):
            params["pvthreshd"] = _head_value(pick, 9, 0.0, math.inf)
        if pick.chance(0.3):
            params["output_dtype"] = spec("dtype", pick.choice(tuple(DTYPES)))
        params["return_sparsity"] = pick.chance(0.5)
    if fn == "sparse_attention" and pick.chance(0.3):
        params["predictor"] = pick.choice(("torch", "auto"))
    return params


# Bad inputs: (name, functions it applies to, draws its details). Each must be
# rejected with ValueError or TypeError.
ALL = FUNCTIONS
WITH_V = tuple(f for f in FUNCTIONS if f != "predict_block_map")
WITH_LAYOUT = WITH_V
THRESHOLDS = PREDICTING + ("predict_block_map",)
BAD_NUMBERS = {
    "scale": (0, -1.0, math.nan, math.inf, -math.inf, "0.5", True, [0.5], spec("complex", [0, 1])),
    # per-head values of 5 entries: no case has 5 heads (1, 2, 3, 4, 6 or 9)
    "simthreshd1": (1.5, -2, math.nan, True, "0.5", None, [0.5] * 5, spec("np.float32", 2.0),
                    spec("tensor", [0.1] * 5)),
    "selection": (0, 1.5, math.nan, -0.1, math.inf, "x", [0.9] * 5, spec("np.float64", 0.0)),
    "pvthreshd": (0, -1, math.nan, -math.inf, "15", [15] * 5, spec("np.array", [15.0, -1.0])),
    "block_size": (0, -1, 4097, 2**31, 2**62, 2**70, 1.5, True, "64", None),
    "rules": ("cdf", "Sparge", "", None, 1, ["mass"]),      # the selection= rule set
    "tensor_layout": ("BHLD", "hnd", None, 1),
    "output_dtype": (spec("dtype", "int32"), "float16", spec("dtype", "bool"),
                     spec("dtype", "complex64"), 1.0),
}
RESHAPED = ("head_dim", "batch", "heads")       # applied before the layout change
BAD_TENSORS = ("rank3", "int32", "bool", "complex64", "meta", "sparse", "list", "none",
               "empty") + RESHAPED
BAD_MAPS = ("keep_blocks", "keep_rank3", "keep_list", "keep_batch", "lengths", "not_a_map",
            "block_size")
BAD_LISTS = ("index_high", "index_negative", "index_huge", "duplicate", "count_high",
             "count_negative", "count_low", "int64", "lists_shape", "unkept", "causal_invalid")
BAD_MASKS = ("mask_blocks", "mask_2", "mask_-1", "mask_0.5", "mask_nan", "mask_list",
             "mask_batch")


def _draw_bad(pick, case: dict) -> dict:
    fn = case["fn"]
    options = ["tensor", "unknown_kwarg"]
    if fn in ALL:
        options.append("scale")
    if fn in THRESHOLDS:
        options += ["simthreshd1", "selection"]
    if fn in ("sparse_attention", "predict_block_map"):
        options += ["block_size", "both_selections", "rules"]
    if fn != "predict_block_map":
        options += ["pvthreshd", "output_dtype", "tensor_layout", "backend"]
    if fn in SEED_CDF + SEED_TOPK + ("block_sparse_sage2_attn_cuda",):
        options.append("dropout_p")
    if fn in SEED_CDF + SEED_TOPK:
        options.append("attn_mask")
    if fn == "sparse_attention":
        options.append("predictor")
    if fn == "block_sparse_attention":
        options += ["map"] * 3
    if fn == "BlockMap":
        options += ["lists"] * 6 + ["map"]
    if fn == "block_sparse_sage2_attn_cuda":
        options += ["mask"] * 3
    what = pick.choice(tuple(options))
    bad: dict[str, Any] = {"what": what}
    if what == "tensor":
        bad["which"] = pick.choice(("q", "k", "v") if fn in WITH_V else ("q", "k"))
        bad["how"] = pick.choice(BAD_TENSORS)
    elif what in BAD_NUMBERS:
        bad["value"] = pick.choice(BAD_NUMBERS[what])
        if what == "block_size":
            bad["name"] = pick.choice(("block_q", "block_k"))
    elif what == "map":
        bad["how"] = pick.choice(BAD_MAPS)
        bad["value"] = pick.choice(BAD_NUMBERS["block_size"])
    elif what == "lists":
        bad["how"] = pick.choice(BAD_LISTS)
    elif what == "mask":
        bad["how"] = pick.choice(BAD_MASKS)
    elif what == "backend":
        bad["value"] = pick.choice(("cudnn", "", "TORCH"))
    elif what == "dropout_p":
        bad["value"] = pick.choice((0.1, 1.0, math.nan))
    return bad


# ------------------------------------------------------------------ building the call

@dataclass
class Call:
    """One call ready to run, and what the oracle needs to check it."""

    fn: Callable
    args: list
    kwargs: dict
    backend_context: str | None          # use_backend(...) around the call (seed names)
    q: torch.Tensor                      # the valid inputs, [B, H, L, D]
    k: torch.Tensor
    v: torch.Tensor
    block_map: BlockMap | None = None    # the given map (block_sparse_attention, BlockMap)
    mask_keep: torch.Tensor | None = None  # block_sparse_sage2: the mask as bool, sink added
    extra: dict = field(default_factory=dict)


def _inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, L, D]`` in the case's dtypes, shaped by its kind."""
    g = torch.Generator().manual_seed(case["seed"])
    b, h, h_kv = case["batch"], case["heads"], case["kv_heads"]
    d, dv = case["head_dim"], case["v_dim"]
    q = torch.randn(b, h, case["q_len"], d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h_kv, case["k_len"], d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h_kv, case["k_len"], dv, generator=g, dtype=torch.float64)
    kind = case["kind"]
    if kind == "equal_keys":
        k = k[:, :, :1].expand_as(k).clone()
    elif kind == "zeros":
        q, k, v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    elif kind in ("huge", "tiny", "big64"):
        factor = {"huge": 1e3, "tiny": 1e-20, "big64": 1e25}[kind]
        q, k, v = q * factor, k * factor, v * factor
    elif kind == "repeated_rows":
        for group in ((q,), (k, v)):
            n = group[0].shape[2]
            src = torch.randint(0, n, (3,), generator=g)
            dst = torch.randint(0, n, (3,), generator=g)
            for x in group:
                x[:, :, dst] = x[:, :, src]
    q = q.to(DTYPES[case["dtype"]])
    k, v = (t.to(DTYPES[case["dtype_kv"]]) for t in (k, v))
    if case["noncontiguous"]:  # every other row of a tensor twice as long
        q, k, v = (t.repeat_interleave(2, dim=2)[:, :, ::2] for t in (q, k, v))
    if case["requires_grad"]:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def _per_head(value, heads: int):
    """Cut a per-head value drawn for 9 heads to ``heads`` (scalars pass)."""
    if isinstance(value, list) and value and not isinstance(value[0], list):
        return value[:heads]
    if isinstance(value, dict) and value.get("$") in ("np.array", "tensor") \
            and isinstance(value["v"], list):
        return spec(value["$"], value["v"][:heads])
    return value


def _map_keep(case: dict, m: dict, block_q: int, block_k: int) -> torch.Tensor:
    nq, nk = -(-case["q_len"] // block_q), -(-case["k_len"] // block_k)
    b = 1 if m["broadcast_batch"] else case["batch"]
    h = 1 if m["broadcast_heads"] else case["heads"]
    g = torch.Generator().manual_seed(case["seed"] + 1)
    return torch.rand(b, h, nq, nk, generator=g) < m["density"]


def _kv_lists(keep: torch.Tensor, shuffle_seed: int | None):
    """Valid lists for ``keep``: kept blocks first (shuffled when asked), then the rest."""
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    counts = keep.sum(dim=-1, dtype=torch.int32)
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        noise = torch.rand(keep.shape, generator=g)
        # sort by (not kept, random): a random order inside the kept prefix and the padding
        order = torch.argsort((~keep).float() * 2 + noise, dim=-1)
    return counts, order.to(torch.int32)


def _break_lists(how: str, keep, counts, indices, valid) -> tuple:
    """Apply one bad-list edit; returns (keep, counts, indices)."""
    nk = keep.shape[-1]
    keep, counts, indices = keep.clone(), counts.clone(), indices.clone()
    row = (0, 0, keep.shape[2] - 1)
    if how == "index_high":
        indices[row + (0,)] = nk
    elif how == "index_negative":
        indices[row + (nk - 1,)] = -1
    elif how == "index_huge":
        indices[row + (0,)] = 2**31 - 1
    elif how == "duplicate":
        rows = (valid.sum(dim=-1) >= 2).nonzero()
        if len(rows) == 0:
            indices[row + (0,)] = nk            # no row can repeat a block: out of range instead
        else:
            qi = int(rows[0, 0])
            keep[0, 0, qi] = valid[qi]          # keep every valid block of that row ...
            counts, indices = _kv_lists(keep, None)
            indices[0, 0, qi, 1] = indices[0, 0, qi, 0]  # ... and list its first one twice
    elif how == "count_high":
        counts[row] = nk + 1
    elif how == "count_negative":
        counts[row] = -1
    elif how == "count_low":
        if counts[row] > 0:
            counts[row] -= 1
        else:
            counts[row] = 1                     # lists a block keep does not keep
    elif how == "int64":
        counts = counts.long()
    elif how == "lists_shape":
        indices = indices[..., :-1] if nk > 1 else indices[:, :, :0]
    elif how == "unkept":
        if bool(keep[row].all()):
            counts[row] = nk + 1
        else:
            counts[row] += 1                    # the next entry is an unkept block
    else:
        assert how == "causal_invalid"
        invalid = ~valid
        if bool(invalid.any()):
            qi, ki = (int(x) for x in invalid.nonzero()[0])
            keep[0, 0, qi, ki] = True
            counts, indices = _kv_lists(keep, None)
        else:
            indices[row + (0,)] = -5
    return keep, counts, indices


def _bad_tensor(t: torch.Tensor, how: str):
    if how == "rank3":
        return t[0]
    if how in ("int32", "bool", "complex64"):
        return t.detach().to(getattr(torch, how))
    if how == "meta":
        return t.detach().to("meta")
    if how == "sparse":
        return t.detach().to_sparse()
    if how == "list":
        return t.detach().float().tolist()
    if how == "none":
        return None
    if how == "empty":
        return t[:, :, :0]
    raise AssertionError(how)


def build_call(case: dict) -> Call:
    fn, bad = case["fn"], case["bad"] or {}
    q, k, v = _inputs(case)
    valid_q, valid_k, valid_v = q, k, v
    what, how = bad.get("what"), bad.get("how")
    if what == "tensor" and how in RESHAPED:
        if how == "head_dim":
            k = k[..., :-1] if k.shape[-1] > 1 else torch.cat([k, k], dim=-1)
        elif how == "batch":
            k, v = torch.cat([k, k[:1]]), torch.cat([v, v[:1]])
        else:  # H + 1 key heads: H % (H + 1) != 0
            k, v = (torch.cat([t[:, :1]] * (case["heads"] + 1), dim=1) for t in (k, v))
    layout = case["layout"]
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    tensors = {"q": q, "k": k, "v": v}
    if what == "tensor" and how not in RESHAPED:
        tensors[bad["which"]] = _bad_tensor(tensors[bad["which"]], how)
    q, k, v = tensors["q"], tensors["k"], tensors["v"]

    heads = case["heads"]
    kwargs = {name: decode(_per_head(value, heads)) for name, value in case["params"].items()}
    if fn != "predict_block_map":
        kwargs["tensor_layout"] = layout
    causal_name = "causal" if fn == "predict_block_map" else "is_causal"
    if fn not in GIVEN_MAP:
        kwargs[causal_name] = case["causal"]
    call = Call(fn=None, args=[q, k, v], kwargs=kwargs, backend_context=None,
                q=valid_q, k=valid_k, v=valid_v)
    backend = case["backend"]
    if fn in ("sparse_attention", "block_sparse_attention", "BlockMap"):
        kwargs["backend"] = backend
    elif fn != "predict_block_map":
        call.backend_context = backend

    if fn == "predict_block_map":
        call.fn = attention.predict_block_map
        call.args = [q, k]
    elif fn in GIVEN_MAP:
        call.fn = attention.block_sparse_attention
        _build_map(case, call, what, how, bad)
    elif fn == "block_sparse_sage2_attn_cuda":
        call.fn = attention.block_sparse_sage2_attn_cuda
        _build_mask(case, call, what, how)
    else:
        call.fn = getattr(attention, fn)

    if what in ("scale", "simthreshd1", "pvthreshd", "tensor_layout", "output_dtype"):
        kwargs[what] = decode(bad["value"])
    elif what == "selection":
        kwargs["topk" if "topk" in kwargs else "cdfthreshd"] = decode(bad["value"])
    elif what == "block_size":
        kwargs[bad["name"]] = decode(bad["value"])
    elif what == "both_selections":
        kwargs.update(cdfthreshd=0.9, topk=0.5)
    elif what == "rules":
        kwargs["selection"] = decode(bad["value"])
    elif what == "backend":
        if call.backend_context is not None:
            call.backend_context = bad["value"]
        else:
            kwargs["backend"] = bad["value"]
    elif what == "predictor":
        kwargs["predictor"] = "magic"
    elif what == "dropout_p":
        kwargs["dropout_p"] = bad["value"]
    elif what == "attn_mask":
        kwargs["attn_mask"] = torch.ones(1, 1, case["q_len"], case["k_len"], dtype=torch.bool)
    elif what == "unknown_kwarg":
        kwargs["block_size"] = 64
    return call


def _build_map(case: dict, call: Call, what, how, bad) -> None:
    m = case["map"]
    bq, bk = m["block_q"], m["block_k"]
    keep = _map_keep(case, m, bq, bk)
    valid = block_valid_map(case["q_len"], case["k_len"], bq, bk, case["causal"])
    lists = None
    if m["lists"] is not None:
        keep = keep & valid                     # a map with lists keeps no removed block
        lists = _kv_lists(keep, case["seed"] if m["lists"] == "shuffled" else None)
    if what == "lists":
        keep, *lists = _break_lists(how, keep, *lists, valid)
        lists = tuple(lists)
    bm_args = dict(keep=keep, block_q=bq, block_k=bk, q_len=case["q_len"], k_len=case["k_len"],
                   causal=case["causal"], kv_lists=lists)
    if what == "map":
        if how == "keep_blocks":
            bm_args["keep"] = torch.ones(keep.shape[:2] + (keep.shape[2] + 1, keep.shape[3]),
                                         dtype=torch.bool)
        elif how == "keep_rank3":
            bm_args["keep"] = keep[0]
        elif how == "keep_list":
            bm_args["keep"] = keep.tolist()
        elif how == "keep_batch":
            bm_args["keep"] = torch.ones((case["batch"] + 1,) + keep.shape[1:], dtype=torch.bool)
            bm_args["kv_lists"] = None
        elif how == "lengths":
            bm_args["q_len"] = case["q_len"] + bq      # one more block: still self-consistent
            bm_args["keep"] = torch.ones(keep.shape[:2] + (keep.shape[2] + 1, keep.shape[3]),
                                         dtype=torch.bool)
            bm_args["kv_lists"] = None
        elif how == "block_size":
            bm_args["block_q"] = decode(bad["value"])
        else:
            assert how == "not_a_map"
            call.args.append(keep)
            return
    call.extra["map_args"] = bm_args
    call.args.append(_LazyMap(bm_args))         # built inside the call, so its errors count
    if case["valid"]:
        call.block_map = BlockMap(**bm_args)


@dataclass
class _LazyMap:
    """A BlockMap made when the call runs: constructor errors are the call's errors."""

    args: dict


def _build_mask(case: dict, call: Call, what, how) -> None:
    m = case["mask"]
    nq, nk = -(-case["q_len"] // 128), -(-case["k_len"] // 64)
    keep = _map_keep(case, m, 128, 64)
    mask = None if m["form"] is None else keep.to({"bool": torch.bool, "int": torch.int32,
                                                   "float": torch.float32}[m["form"]])
    if what == "mask":
        base = keep.to(torch.float32)
        mask = {"mask_blocks": torch.ones(1, 1, nq + 1, nk), "mask_2": base + 2,
                "mask_-1": base - 2, "mask_0.5": base * 0 + 0.5,
                "mask_nan": base.masked_fill(base == base, math.nan),
                "mask_list": keep.tolist(),
                "mask_batch": torch.ones(case["batch"] + 1, 1, nq, nk)}[how]
    call.kwargs["mask_id"] = mask
    if case["valid"]:
        full = torch.ones(1, 1, nq, nk, dtype=torch.bool)
        keep = full if mask is None else keep.clone()
        if call.kwargs.get("attention_sink"):
            keep[..., 0] = True
        call.mask_keep = keep


# ------------------------------------------------------------------ running and checking

def execute(call: Call):
    """Make the call (fp64-on-an-fp32-backend warnings silenced: they are expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = [BlockMap(**a.args) if isinstance(a, _LazyMap) else a for a in call.args]
        if call.backend_context is None:
            return call.fn(*args, **call.kwargs)
        with use_backend(call.backend_context):
            return call.fn(*args, **call.kwargs)


def run_case(case: dict) -> tuple[str, str]:
    """Make the call of ``case`` and check it: ``(outcome, detail)``, see the module docstring."""
    try:
        call = build_call(case)
    except Exception:  # noqa: BLE001 - a bug here, not in the library
        return "harness_error", traceback.format_exc()[-1500:]
    try:
        result = execute(call)
    except (ValueError, TypeError) as exc:
        text = f"{type(exc).__name__}: {exc}"[:500]
        return ("rejected", text) if not case["valid"] else ("valid_raised", text)
    except Exception as exc:  # noqa: BLE001 - classifying every exception is the point
        text = f"{type(exc).__name__}: {exc}"[:500]
        return ("wrong_exception", text) if not case["valid"] else ("valid_raised", text)
    if not case["valid"]:
        return "bad_accepted", f"bad input {case['bad']} was accepted"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem = check(case, call, result)
    return ("ok", "") if problem is None else ("mismatch", problem)


def fp64_oracle(q, k, v, keep, block_q: int, block_k: int, causal: bool, scale) -> torch.Tensor:
    """Softmax attention over the token mask of ``keep`` ``[B|1, H|1, nq, nk]``, in float64."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    q, k, v = q.detach().double(), k.detach().double(), v.detach().double()
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    rows, cols = torch.arange(lq), torch.arange(lk)
    mask = keep.expand(b, h, -1, -1)[:, :, rows // block_q][:, :, :, cols // block_k]
    if causal:
        mask = mask & (cols.view(1, -1) <= rows.view(-1, 1) + (lk - lq))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, -math.inf)
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(scores - top) * mask
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights, v) / torch.where(total > 0, total, torch.ones_like(total))
    return out


def _tolerance(case: dict, q, k, v, ref, out_dtype) -> float:
    """Error allowed against the fp64 oracle: the backend's compute precision (scores
    computed in another order differ by about an ulp of the largest one, which moves a
    softmax average by that times max|v|), plus one rounding to the output dtype."""
    fp64 = case["backend"] in dispatch.FP64_BACKENDS and torch.float64 in (q.dtype, k.dtype,
                                                                           v.dtype)
    eps = torch.finfo(torch.float64 if fp64 else torch.float32).eps
    scale = case["params"].get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(decode(scale))
    qn = torch.linalg.vector_norm(q.detach().double(), dim=-1).max().item()
    kn = torch.linalg.vector_norm(k.detach().double(), dim=-1).max().item()
    v_max = v.detach().double().abs().max().item()
    base = 1e-10 if fp64 else 1e-5
    compute = (base + 8 * eps * (1.0 + qn * kn * scale)) * v_max
    # one rounding to the output dtype; below its smallest normal number a value may
    # flush to zero (1e-20 in fp16)
    out_type = torch.finfo(out_dtype)
    rounding = out_type.eps * ref.abs().max().item() + out_type.tiny if ref.numel() else 0.0
    return compute + rounding


def _compare(case: dict, call: Call, out, keep, block_q, block_k, causal,
             out_dtype) -> str | None:
    q, k, v = call.q, call.k, call.v
    scale = decode(case["params"].get("scale"))
    b, h, lq, _ = q.shape
    expected_shape = (b, h, lq, v.shape[-1])
    if case["layout"] == "NHD":
        expected_shape = (b, lq, h, v.shape[-1])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected_shape:
        return f"output shape {getattr(out, 'shape', type(out))}, expected {expected_shape}"
    if out.dtype != out_dtype:
        return f"output dtype {out.dtype}, expected {out_dtype}"
    got = out.transpose(1, 2) if case["layout"] == "NHD" else out
    ref = fp64_oracle(q, k, v, keep, block_q, block_k, causal, scale)
    if bool(torch.isfinite(ref).all()) and not bool(torch.isfinite(got).all()):
        return "NaN or inf in the output where the fp64 oracle is finite"
    err = (got.detach().double() - ref).abs().nan_to_num(0.0).max().item() if ref.numel() else 0
    tol = _tolerance(case, q, k, v, ref, out_dtype)
    if err > tol:
        return f"max |out - oracle| = {err:.3g} > tolerance {tol:.3g}"
    return None


def _prediction_kwargs(case: dict, call: Call) -> dict:
    names = ("simthreshd1", "cdfthreshd", "topk", "attention_sink", "smooth_k", "scale",
             "block_q", "block_k", "selection")
    kwargs = {n: call.kwargs[n] for n in names if n in call.kwargs}
    kwargs["causal"] = case["causal"]
    if case["fn"] in SEED_CDF + SEED_TOPK:
        kwargs.setdefault("selection", "sparge")     # the seed's names follow the original
    return kwargs


def map_invariants(case: dict, bm: BlockMap, kwargs: dict) -> str | None:
    """What a predicted map must satisfy whatever the thresholds."""
    b, h, lq = case["batch"], case["heads"], case["q_len"]
    lk = case["k_len"]
    bq, bk = kwargs.get("block_q", 128), kwargs.get("block_k", 64)
    nq, nk = -(-lq // bq), -(-lk // bk)
    if not isinstance(bm, BlockMap) or bm.keep.dtype != torch.bool \
            or tuple(bm.keep.shape) != (b, h, nq, nk):
        return f"predicted map: keep {getattr(bm, 'keep', bm)!r:.200} is not bool {(b, h, nq, nk)}"
    valid = block_valid_map(lq, lk, bq, bk, case["causal"])
    keep = bm.keep
    if bool((keep & ~valid).any()):
        return "predicted map keeps a block causal masking removes"
    rows_with_valid = valid.any(dim=-1)
    if bool((rows_with_valid & ~keep.any(dim=-1)).any()):
        return "a query block with a valid key block keeps none"
    if case["causal"]:
        diagonal = block_diagonal_map(lq, lk, bq, bk) & valid
        if bool((diagonal & ~keep).any()):
            return "under causal masking a diagonal block was dropped"
    if kwargs.get("attention_sink") and bool((valid[:, 0] & ~keep[..., 0]).any()):
        return "attention_sink did not keep the first key block"
    threshold = kwargs.get("topk", kwargs.get("cdfthreshd", 0.97))
    values = torch.as_tensor(np.asarray(threshold, dtype=np.float64)).flatten()
    dense = valid.expand_as(keep)
    if values.numel() and bool((values >= 1.0).all()) and not torch.equal(keep, dense):
        return "threshold 1.0 on every head did not keep every valid block"
    return None


def check(case: dict, call: Call, result) -> str | None:
    """None when ``result`` is right for ``case``, else what is wrong."""
    fn = case["fn"]
    if fn == "predict_block_map":
        kwargs = _prediction_kwargs(case, call)
        problem = map_invariants(case, result, kwargs)
        if problem:
            return problem
        out = attention.block_sparse_attention(call.q, call.k, call.v, result,
                                               scale=kwargs.get("scale"), backend=case["backend"])
        return _compare(case, call, out, result.keep, result.block_q, result.block_k,
                        case["causal"], call.q.dtype)
    out_dtype = call.kwargs.get("output_dtype") or call.q.dtype
    sparsity = None
    if call.kwargs.get("return_sparsity"):
        if not (isinstance(result, tuple) and len(result) == 2):
            return f"return_sparsity=True returned {type(result).__name__}, not (output, sparsity)"
        result, sparsity = result
    if fn in PREDICTING:
        kwargs = _prediction_kwargs(case, call)
        bm = attention.predict_block_map(call.q, call.k, **kwargs)
        keep, bq, bk = bm.keep, bm.block_q, bm.block_k
    elif fn in GIVEN_MAP:
        bm = call.block_map
        keep, bq, bk = bm.keep, bm.block_q, bm.block_k
    else:
        keep, bq, bk = call.mask_keep, 128, 64
        bm = BlockMap(keep, 128, 64, case["q_len"], case["k_len"], case["causal"])
    if sparsity is not None:
        expected = bm.expand_batch_heads(case["batch"], case["heads"]).sparsity()
        if not (isinstance(sparsity, float) and abs(sparsity - expected) <= 1e-12):
            return f"sparsity {sparsity!r}, expected {expected}"
    return _compare(case, call, result, keep, bq, bk, case["causal"], out_dtype)
