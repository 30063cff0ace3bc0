"""The original SpargeAttn's tuned-parameter files, read into and written from :class:`SparseParams`.

thu-ml/SpargeAttn's ``--tune --model_out_path`` writes ``torch.save`` of a state dict
that its ``extract_sparse_attention_state_dict`` collects: for every attention module
that holds a ``SparseAttentionMeansim`` as ``inner_attention``, five per-head tensors
of shape ``[heads]``::

    transformer_blocks.0.attn1.inner_attention.is_sparse     bool
    transformer_blocks.0.attn1.inner_attention.cdfthreshd    float
    transformer_blocks.0.attn1.inner_attention.simthreshd1   float
    transformer_blocks.0.attn1.inner_attention.simthreshd2   float (unused: zeros)
    transformer_blocks.0.attn1.inner_attention.pvthreshd     float

The prefix is the attention module's name in the diffusers transformer, which is the
layer name :func:`~creative_sparse.models.diffusers.params.attention_layers` gives.

Reading (:func:`params_from_sparge`): ``torch.load(weights_only=True)`` (no code
runs), then every layer and head is checked against the model, and the first
mismatch is named. A head with ``is_sparse = False`` runs dense (``cdfthreshd = 1``;
the original's tuner also sets its thresholds to 1). The result uses the original's
selection rules (``selection="sparge"``) and, as the original's
``SparseAttentionMeansim.forward`` does at inference, ``attention_sink=True``.

Writing (:func:`params_to_sparge`): the same five tensors per layer, so a file tuned
here loads into code built on the original; ``is_sparse`` is False exactly for the
heads whose ``cdfthreshd`` and ``simthreshd1`` are both 1 (how the original's tuner
writes a dense head). Thresholds tuned under our ``"mass"``
rules select differently under the original's; that is a warning, not an error.
"""

from __future__ import annotations

import logging
import math
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from .params import LayerThresholds, SparseParams, attention_layers

logger = logging.getLogger(__name__)

__all__ = ["FIELDS", "INNER", "is_torch_file", "load_sparge_params", "params_from_sparge",
           "params_to_sparge", "read_state_dict", "save_sparge_params"]

INNER = "inner_attention"
FIELDS = ("is_sparse", "cdfthreshd", "simthreshd1", "simthreshd2", "pvthreshd")
_RANGES = {"cdfthreshd": (0.0, 1.0, True), "simthreshd1": (-1.0, 1.0, False),
           "pvthreshd": (0.0, math.inf, True)}


def is_torch_file(path: Path) -> bool:
    """Whether ``path`` looks like a ``torch.save`` file (zip archive or legacy pickle)."""
    if path.suffix in (".pt", ".pth"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head == b"PK" or head[:1] == b"\x80"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """``torch.load(path, weights_only=True)``, checked to be a flat ``{str: Tensor}`` dict;
    ``ValueError`` naming the file otherwise (nothing in the file is executed)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected SpargeAttn tuned parameters, a "
                         "torch state dict)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError,
            AttributeError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a readable torch state dict of SpargeAttn tuned "
                         f"parameters: {(str(err).splitlines() or [repr(err)])[0][:200]}"
                         ) from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), "
                         f"got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(f"{path}: entry {key!r} is {type(value).__name__}; a SpargeAttn "
                             "state dict maps names to tensors")
    return dict(data)


def _head_values(sd: Mapping[str, Tensor], key: str, heads: int, source: str) -> Tensor:
    if key not in sd:
        raise ValueError(f"{source}: missing {key!r} (the model's layer needs all of "
                         f"{', '.join(FIELDS)})")
    value = sd[key]
    if tuple(value.shape) != (heads,):
        raise ValueError(f"{source}: {key!r} has shape {tuple(value.shape)}; the model's layer "
                         f"has {heads} heads, so [{heads}] is expected")
    field = key.rsplit(".", 1)[1]
    if field == "is_sparse":
        if value.dtype != torch.bool:
            raise ValueError(f"{source}: {key!r} must be a bool tensor, got {value.dtype}")
        return value
    if not value.is_floating_point():
        raise ValueError(f"{source}: {key!r} must be a floating tensor, got {value.dtype}")
    value = value.double()
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).nonzero()[0])
        raise ValueError(f"{source}: {key!r} head {bad} is {value[bad].item()}; thresholds "
                         "must be finite")
    if field in _RANGES:
        low, high, low_open = _RANGES[field]
        bad = (value > high) | ((value <= low) if low_open else (value < low))
        if bool(bad.any()):
            head = int(bad.nonzero()[0])
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise ValueError(f"{source}: {key!r} head {head} is {value[head].item():.6g}; "
                             f"allowed {interval}")
    return value


def params_from_sparge(state_dict: Mapping[str, Tensor], model, *, source: str = "<state dict>",
                       block_q: int = 128, block_k: int = 64,
                       attention_sink: bool = True) -> SparseParams:
    """:class:`SparseParams` for ``model`` from the original's tuned-parameter state dict.

    Every attention layer of ``model`` must have its five tensors with one value per
    head, and every tensor must belong to a layer; the first mismatch is named.
    ``block_q``/``block_k``: the block shape the thresholds were tuned with (the
    original's default 128 x 64; 64 x 128 if they were tuned on a Hopper GPU).
    """
    layers_of_model = attention_layers(model)
    expected = {f"{name}.{INNER}.{f}" for name in layers_of_model for f in FIELDS}
    unknown = sorted(set(state_dict) - expected)
    if unknown:
        raise ValueError(f"{source}: {unknown[0]!r} belongs to no attention layer of "
                         f"{type(model).__name__} ({len(unknown)} such entries; the model's "
                         f"layers are e.g. {sorted(layers_of_model)[:2]})")
    layers = {}
    for name, module in sorted(layers_of_model.items()):
        prefix = f"{name}.{INNER}."
        values = {f: _head_values(state_dict, prefix + f, module.heads, source) for f in FIELDS}
        dense = ~values["is_sparse"]
        cdf = torch.where(dense, torch.ones_like(values["cdfthreshd"]), values["cdfthreshd"])
        layers[name] = LayerThresholds(tuple(values["simthreshd1"].tolist()),
                                       tuple(cdf.tolist()),
                                       tuple(values["pvthreshd"].tolist()))
    return SparseParams.for_model(model, layers, block_q=block_q, block_k=block_k,
                                  attention_sink=attention_sink, selection="sparge",
                                  report={"source": {"format": "spargeattn", "file": source}})


def params_to_sparge(params: SparseParams) -> dict[str, Tensor]:
    """The original's state dict for ``params`` (five ``[heads]`` tensors per layer)."""
    if params.selection != "sparge":
        logger.warning("these thresholds were tuned for the %r selection rules; code built on "
                       "the original SpargeAttn applies its own rules ('sparge'), which keep "
                       "fewer blocks at the same cdfthreshd: tune with selection='sparge' "
                       "for an exact transfer", params.selection)
    out = {}
    for name, t in sorted(params.layers.items()):
        prefix = f"{name}.{INNER}."
        cdf = torch.tensor(t.cdfthreshd, dtype=torch.float32)
        sim = torch.tensor(t.simthreshd1, dtype=torch.float32)
        # the original's tuner marks a head dense with is_sparse=False, cdfthreshd=1 and
        # simthreshd1=1 (`fill_results`); cdfthreshd=1 alone also runs dense
        out[prefix + "is_sparse"] = (cdf < 1.0) | (sim < 1.0)
        out[prefix + "cdfthreshd"] = cdf
        out[prefix + "simthreshd1"] = sim
        out[prefix + "simthreshd2"] = torch.zeros(t.heads, dtype=torch.float32)
        out[prefix + "pvthreshd"] = torch.tensor(t.pvthreshd, dtype=torch.float32)
    return out


def load_sparge_params(path: str | Path, model, **options) -> SparseParams:
    """:func:`read_state_dict` then :func:`params_from_sparge` (errors name ``path``)."""
    return params_from_sparge(read_state_dict(path), model, source=str(path), **options)


def save_sparge_params(params: SparseParams, path: str | Path) -> Path:
    """Write :func:`params_to_sparge` with ``torch.save`` (through a temporary file, so an
    interrupted write never leaves a truncated file in place); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(params_to_sparge(params), tmp)
    tmp.replace(path)
    return path
