"""Which diffusers models sparse attention supports, and the per-head thresholds for them.

* :data:`FAMILIES`, :func:`detect_family`, :func:`attention_layers`: the supported
  transformers and the self-attention modules that are made sparse.
* :class:`LayerThresholds`: per-head ``simthreshd1``/``cdfthreshd``/``pvthreshd`` of
  one layer. :class:`SparseParams`: those of every layer of one model, bound to
  the model's identity (family, class, config fingerprint), with the tuning targets
  and report, saved as a small versioned JSON file.

Example:
    >>> from creative_sparse.models.diffusers.tiny import tiny_transformer
    >>> model = tiny_transformer("cogvideox")
    >>> detect_family(model), sorted(attention_layers(model))
    ('cogvideox', ['transformer_blocks.0.attn1', 'transformer_blocks.1.attn1'])
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from ...attention.blockmap import SELECTIONS, check_selection, per_head_param
from ...attention.checks import MAX_BLOCK_SIZE
from ...attention.checks import check_block_size as _check_block_size
from ...jsonfile import read_json, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["DENSE_PVTHRESHD", "FAMILIES", "FORMAT_VERSION", "MAX_BLOCK_SIZE", "LayerThresholds",
           "SparseParams", "attention_layers", "check_block_size", "check_target", "detect_family"]

FORMAT = "creative-sparse/diffusers-thresholds"
FORMAT_VERSION = 1

# family -> (transformer class names, regex of the self-attention modules we patch).
# Cross-attention (Wan's attn2) and HunyuanVideo's token refiner (text only, a few
# hundred tokens) stay dense: sparsity pays on the long image/video sequence.
FAMILIES: Mapping[str, tuple[tuple[str, ...], str]] = MappingProxyType({
    "flux": (("FluxTransformer2DModel",),
             r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn"),
    "cogvideox": (("CogVideoXTransformer3DModel",), r"transformer_blocks\.\d+\.attn1"),
    "wan": (("WanTransformer3DModel",), r"blocks\.\d+\.attn1"),
    "hunyuanvideo": (("HunyuanVideoTransformer3DModel",),
                     r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn"),
})

DENSE_PVTHRESHD = 50.0  # 2**-50: a PV-skip threshold that skips nothing measurable


def _require_diffusers():
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("creative_sparse.models.diffusers needs diffusers: "
                          "pip install 'creative-sparse[diffusers]'") from err
    return diffusers


def _library_version() -> str:
    from ..._version import __version__
    return __version__


def check_block_size(value: int, name: str) -> int:
    """Validate a prediction block size with the attention layer's one check
    (:func:`creative_sparse.attention.checks.check_block_size`); returns it."""
    _check_block_size(name, value)
    return value


def check_target(value: float, name: str) -> float:
    """Validate an error target (relative L1) in the open interval (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a relative L1 error in (0, 1), got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- model inspection

def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


def detect_family(model) -> str:
    """The family name of a diffusers transformer (``"flux"``, ``"cogvideox"``, ``"wan"``,
    ``"hunyuanvideo"``); ``ValueError`` listing the supported classes otherwise."""
    names = {cls.__name__ for cls in type(_unwrap(model)).__mro__}
    for family, (classes, _) in FAMILIES.items():
        if names.intersection(classes):
            return family
    supported = ", ".join(f"{fam} ({'/'.join(c)})" for fam, (c, _) in FAMILIES.items())
    raise ValueError(f"unsupported model {type(model).__name__}: sparse attention for diffusers "
                     f"supports {supported}; pass the pipeline's transformer (pipe.transformer)")


def attention_layers(model) -> dict[str, torch.nn.Module]:
    """The self-attention modules that sparse attention replaces, by qualified name."""
    model = _unwrap(model)
    pattern = re.compile(FAMILIES[detect_family(model)][1] + r"$")
    layers = {name: mod for name, mod in model.named_modules()
              if pattern.match(name) and hasattr(mod, "processor")}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention module matching "
                         f"{pattern.pattern!r}; is this a supported diffusers version?")
    return layers


def _architecture(model) -> tuple[str, str, dict]:
    """``(class name, fingerprint, config)``: the fingerprint hashes the model config
    (everything but private ``_`` keys such as ``_name_or_path``)."""
    model = _unwrap(model)
    config = {k: v for k, v in dict(model.config).items() if not str(k).startswith("_")}
    config = json.loads(json.dumps(config, sort_keys=True, default=str))
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return type(model).__name__, digest, config


# --------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class LayerThresholds:
    """Per-head SpargeAttn thresholds of one attention layer.

    Attributes:
        simthreshd1: block self-similarity below which a block is always kept, in [-1, 1].
        cdfthreshd: attention mass each query block keeps, in (0, 1]; 1.0 = dense head.
        pvthreshd: PV-skip threshold in log2 units, > 0 (used by the GPU kernel; the
            CPU backends compute kept blocks exactly, so it changes nothing there).

    Example:
        >>> LayerThresholds.uniform(2, cdfthreshd=0.9).cdfthreshd
        (0.9, 0.9)
    """

    simthreshd1: tuple[float, ...]
    cdfthreshd: tuple[float, ...]
    pvthreshd: tuple[float, ...]

    def __post_init__(self):
        n = len(self.cdfthreshd)
        for name, low, high, low_open in (("simthreshd1", -1.0, 1.0, False),
                                          ("cdfthreshd", 0.0, 1.0, True),
                                          ("pvthreshd", 0.0, math.inf, True)):
            values = tuple(float(x) for x in getattr(self, name))
            if len(values) != n or n == 0:
                raise ValueError(f"LayerThresholds: every field needs one value per head; got "
                                 f"{len(self.simthreshd1)}/{len(self.cdfthreshd)}/"
                                 f"{len(self.pvthreshd)} (simthreshd1/cdfthreshd/pvthreshd)")
            per_head_param(values, name, n, low, high, low_open=low_open)
            object.__setattr__(self, name, values)

    @classmethod
    def uniform(cls, heads: int, *, simthreshd1: float = 0.6, cdfthreshd: float = 0.97,
                pvthreshd: float = 15.0) -> "LayerThresholds":
        """The same thresholds for each of ``heads`` heads."""
        return cls((simthreshd1,) * heads, (cdfthreshd,) * heads, (pvthreshd,) * heads)

    @property
    def heads(self) -> int:
        return len(self.cdfthreshd)

    @property
    def dense_heads(self) -> tuple[bool, ...]:
        """Per head: True when every block is kept (``cdfthreshd >= 1``)."""
        return tuple(c >= 1.0 for c in self.cdfthreshd)

    def to_json(self) -> dict:
        return {"simthreshd1": list(self.simthreshd1), "cdfthreshd": list(self.cdfthreshd),
                "pvthreshd": list(self.pvthreshd)}


@dataclass(frozen=True)
class SparseParams:
    """Sparse-attention thresholds for every patched layer of one model.

    Attributes:
        family: model family (see :data:`FAMILIES`).
        model_class: the transformer's class name.
        fingerprint: hash of the model config; a file only loads into a model with
            the same architecture.
        layers: layer name -> :class:`LayerThresholds`.
        model_name: ``config._name_or_path`` of the model it was made for (informative).
        l1, pv_l1: the tuning targets (relative L1 versus dense), ``None`` when hand-made.
        block_q, block_k: prediction block sizes the thresholds were tuned for.
        attention_sink: always keep the first key block.
        selection: the block-selection rule set the thresholds were tuned for:
            ``"mass"`` (ours, the default) or ``"sparge"`` (the original SpargeAttn's;
            files imported from it carry this).
        report: per-layer tuning report (sparsity, measured l1, ...), free-form.
        library_version, diffusers_version: versions that produced the parameters.

    Example:
        >>> from creative_sparse.models.diffusers.tiny import tiny_transformer
        >>> p = SparseParams.uniform(tiny_transformer("wan"), cdfthreshd=0.95)
        >>> sorted(p.layers)[0], p.family
        ('blocks.0.attn1', 'wan')
    """

    family: str
    model_class: str
    fingerprint: str
    layers: Mapping[str, LayerThresholds]
    model_name: str = ""
    l1: float | None = None
    pv_l1: float | None = None
    block_q: int = 128
    block_k: int = 64
    attention_sink: bool = False
    report: Mapping[str, Any] = field(default_factory=dict)
    selection: str = "mass"
    library_version: str = field(default_factory=_library_version)
    diffusers_version: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"SparseParams: unsupported family {self.family!r}; supported: "
                             f"{', '.join(FAMILIES)}")
        for name in ("l1", "pv_l1"):
            if getattr(self, name) is not None:
                check_target(getattr(self, name), name)
        for name in ("block_q", "block_k"):
            check_block_size(getattr(self, name), f"SparseParams.{name}")
        if not isinstance(self.attention_sink, bool):
            raise ValueError(f"SparseParams.attention_sink must be a bool, got "
                             f"{self.attention_sink!r}")
        check_selection(self.selection)
        if not self.layers:
            raise ValueError("SparseParams: no layers")
        for name, value in self.layers.items():
            if not isinstance(value, LayerThresholds):
                raise ValueError(f"SparseParams: layer {name!r} holds {type(value).__name__}, "
                                 "expected LayerThresholds")
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "report", MappingProxyType(dict(self.report)))

    @classmethod
    def uniform(cls, model, *, simthreshd1: float = 0.6, cdfthreshd: float = 0.97,
                pvthreshd: float = 15.0, attention_sink: bool = False,
                block_q: int = 128, block_k: int = 64,
                selection: str = "mass") -> "SparseParams":
        """The same thresholds for every head of every patched layer of ``model`` (no tuning).

        ``simthreshd1=1.0`` keeps every block of every head (the sparse code path, dense result).
        """
        _require_diffusers()
        layers = {name: LayerThresholds.uniform(mod.heads, simthreshd1=simthreshd1,
                                                cdfthreshd=cdfthreshd, pvthreshd=pvthreshd)
                  for name, mod in attention_layers(model).items()}
        return cls.for_model(model, layers, attention_sink=attention_sink, block_q=block_q,
                             block_k=block_k, selection=selection)

    @classmethod
    def for_model(cls, model, layers: Mapping[str, LayerThresholds], **fields) -> "SparseParams":
        """Parameters bound to ``model``'s identity (family, class, config fingerprint)."""
        diffusers = _require_diffusers()
        model_class, fingerprint, _ = _architecture(model)
        name = str(getattr(_unwrap(model).config, "_name_or_path", "") or "")
        params = cls(family=detect_family(model), model_class=model_class,
                     fingerprint=fingerprint, layers=layers, model_name=name,
                     diffusers_version=diffusers.__version__, **fields)
        params.check_model(model)
        return params

    def check_model(self, model) -> None:
        """``ValueError`` unless these parameters were made for ``model``'s architecture."""
        family = detect_family(model)
        model_class, fingerprint, _ = _architecture(model)
        if (family, model_class) != (self.family, self.model_class):
            raise ValueError(f"these sparse-attention parameters are for {self.family} "
                             f"({self.model_class}), not for {family} ({model_class})")
        if fingerprint != self.fingerprint:
            raise ValueError(f"these sparse-attention parameters were tuned for a different "
                             f"{self.model_class} configuration (fingerprint {self.fingerprint}, "
                             f"this model {fingerprint}, e.g. other layer or head counts); re-tune "
                             f"for this model")
        layers = attention_layers(model)
        if set(layers) != set(self.layers):
            missing = sorted(set(layers) - set(self.layers))[:3]
            extra = sorted(set(self.layers) - set(layers))[:3]
            raise ValueError(f"sparse-attention parameters and model disagree on the layers: "
                             f"missing {missing}, unknown {extra}")
        for name, mod in layers.items():
            if mod.heads != self.layers[name].heads:
                raise ValueError(f"layer {name}: parameters hold {self.layers[name].heads} heads, "
                                 f"the model has {mod.heads}")
        loaded = str(getattr(_unwrap(model).config, "_name_or_path", "") or "")
        if self.model_name and loaded and loaded != self.model_name:
            logger.warning("sparse-attention parameters were tuned on %s; applying them to %s "
                           "(same architecture)", self.model_name, loaded)

    def mean_sparsity(self) -> float | None:
        """Mean tuned sparsity over layers, from the report (``None`` if not tuned)."""
        values = [r["sparsity"] for r in self.report.values() if "sparsity" in r]
        return sum(values) / len(values) if values else None

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "diffusers_version": self.diffusers_version,
            "family": self.family, "model_class": self.model_class,
            "model_name": self.model_name, "fingerprint": self.fingerprint,
            "targets": {"l1": self.l1, "pv_l1": self.pv_l1},
            "block_q": self.block_q, "block_k": self.block_k,
            "attention_sink": self.attention_sink,
            "selection": self.selection,
            "layers": {name: t.to_json() for name, t in sorted(self.layers.items())},
            "report": dict(self.report),
        }

    def save(self, path: str | Path) -> Path:
        """Write the parameters; returns the path.

        A path ending in ``.pt``/``.pth`` gets the original SpargeAttn's tuned-parameter
        format (a torch state dict, see :mod:`creative_sparse.models.diffusers.sparge_files`),
        anything else this library's JSON (a few kB per layer, with the model's
        identity, the targets and the tuning report).
        """
        path = Path(path)
        if path.suffix in (".pt", ".pth"):
            from .sparge_files import save_sparge_params
            return save_sparge_params(self, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=1)
        # one line per per-head list keeps a 57-layer x 24-head file readable
        text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m[1].split()) + "]",
                      text)
        # Atomic: a failed save leaves the previous file whole, never half of either.
        mode = path.stat().st_mode & 0o777 if path.is_file() else 0o644
        write_text_atomic(path, text + "\n", mode=mode)
        return path

    @classmethod
    def from_json(cls, data: Mapping, *, source: str = "<dict>") -> "SparseParams":
        """Parameters from the JSON form of :meth:`to_json`, every field type- and
        range-checked: ``ValueError`` naming ``source``, the field, its value and
        what is allowed."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"{source} is not a creative-sparse diffusers threshold file")
        version = data.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise ValueError(f"{source} has format version {data.get('format_version')!r}; this "
                             f"creative-sparse reads version {FORMAT_VERSION}; re-tune")
        field_ = _FieldReader(data, source)
        theirs, ours = field_.text("library_version"), _library_version()
        if theirs.split(".")[:2] != ours.split(".")[:2]:
            raise ValueError(f"{source} was tuned with creative-sparse {theirs}; this is {ours} "
                             f"and the block prediction may differ between minor versions; re-tune")
        targets = field_.mapping("targets", optional=True)
        layers = field_.mapping("layers")
        if not layers:
            field_.fail("layers", layers, "an object of layer name -> thresholds, not empty")
        return cls(family=field_.choice("family", tuple(FAMILIES)),
                   model_class=field_.text("model_class"),
                   fingerprint=field_.text("fingerprint"),
                   layers={name: field_.layer(name, values) for name, values in layers.items()},
                   model_name=field_.text("model_name", optional=True),
                   l1=field_.target("targets.l1", targets.get("l1")),
                   pv_l1=field_.target("targets.pv_l1", targets.get("pv_l1")),
                   block_q=field_.block_size("block_q"), block_k=field_.block_size("block_k"),
                   attention_sink=field_.flag("attention_sink"),
                   report=field_.report(), library_version=theirs,
                   diffusers_version=field_.text("diffusers_version", optional=True),
                   # files written before the field existed were tuned for "mass"
                   selection=field_.choice("selection", SELECTIONS, default="mass"))

    @classmethod
    def load(cls, path: str | Path, model=None) -> "SparseParams":
        """Read a file written by :meth:`save`; with ``model``, also check it belongs to it.

        A torch file (the original SpargeAttn's tuned parameters, e.g. from its
        ``--tune --model_out_path``, or :meth:`save` to ``.pt``) needs ``model``: its
        state dict names layers and heads only (see
        :func:`~creative_sparse.models.diffusers.sparge_files.params_from_sparge`).
        """
        path = Path(path)
        from .sparge_files import is_torch_file, load_sparge_params
        if is_torch_file(path):
            if model is None:
                raise ValueError(f"{path} holds SpargeAttn tuned parameters (a torch state "
                                 "dict of per-head tensors); pass the model they are for: "
                                 "SparseParams.load(path, model)")
            return load_sparge_params(path, model)
        data = read_json(path)   # ValueError naming the file: a directory, binary, not JSON
        params = cls.from_json(data, source=str(path))
        if model is not None:
            params.check_model(model)
        return params


# cdfthreshd first: its length is the head count the other two are held to.
_LAYER_FIELDS = {"cdfthreshd": ("(0, 1]", lambda x: 0.0 < x <= 1.0),
                 "simthreshd1": ("[-1, 1]", lambda x: -1.0 <= x <= 1.0),
                 "pvthreshd": ("(0, inf)", lambda x: 0.0 < x)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


class _FieldReader:
    """Reads one field of a threshold file at a time; every error names the file,
    the field, the value and what is allowed (the file is the user's: never fixed up)."""

    def __init__(self, data: Mapping, source: str):
        self.data, self.source = data, source

    def fail(self, name: str, value: Any, allowed: str):
        text = repr(value)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise ValueError(f"{self.source}: field {name} = {text} is not allowed; expected {allowed}")

    def get(self, name: str, optional: bool, default: Any) -> Any:
        if name not in self.data:
            if optional:
                return default
            raise ValueError(f"{self.source}: field {name} is missing")
        return self.data[name]

    def text(self, name: str, optional: bool = False) -> str:
        value = self.get(name, optional, "")
        if not isinstance(value, str) or (not optional and not value):
            self.fail(name, value, "a string" if optional else "a non-empty string")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str | None = None) -> str:
        value = self.get(name, default is not None, default)
        if value not in allowed or not isinstance(value, str):
            self.fail(name, value, "one of " + ", ".join(allowed))
        return value

    def mapping(self, name: str, optional: bool = False) -> Mapping:
        value = self.get(name, optional, {})
        if not isinstance(value, Mapping):
            self.fail(name, value, "a JSON object")
        return value

    def flag(self, name: str) -> bool:
        value = self.get(name, False, None)
        if not isinstance(value, bool):
            self.fail(name, value, "true or false (a JSON boolean, not a string or number)")
        return value

    def block_size(self, name: str) -> int:
        value = self.get(name, False, None)
        try:
            return check_block_size(value, name)
        except ValueError:
            self.fail(name, value, f"an integer in [1, {MAX_BLOCK_SIZE}]")

    def target(self, name: str, value: Any) -> float | None:
        if value is not None and not (_is_number(value) and 0.0 < value < 1.0):
            self.fail(name, value, "null or a relative L1 error in (0, 1)")
        return value

    def layer(self, name: Any, values: Any) -> LayerThresholds:
        where = f"layers[{name!r}]"
        if not isinstance(name, str) or not name:
            self.fail("layers", name, "layer names that are non-empty strings")
        if not isinstance(values, Mapping) or set(values) != set(_LAYER_FIELDS):
            self.fail(where, values, "an object with exactly " + ", ".join(_LAYER_FIELDS))
        heads = values["cdfthreshd"]
        heads = len(heads) if isinstance(heads, list) else 0
        for key, (interval, ok) in _LAYER_FIELDS.items():
            per_head = values[key]
            if not isinstance(per_head, list) or not per_head or len(per_head) != heads:
                self.fail(f"{where}.{key}", per_head, "a non-empty list of one number per head"
                          + (f" ({heads}, as in cdfthreshd)" if key != "cdfthreshd" else ""))
            for i, x in enumerate(per_head):
                if not _is_number(x) or not ok(x):
                    self.fail(f"{where}.{key}[{i}]", x, f"a finite number in {interval}")
        return LayerThresholds(**{key: tuple(values[key]) for key in _LAYER_FIELDS})

    def report(self) -> Mapping:
        report = self.mapping("report", optional=True)
        for name, entry in report.items():
            if not isinstance(entry, Mapping):
                self.fail(f"report[{name!r}]", entry, "an object (the layer's tuning report)")
            if "sparsity" in entry and not (_is_number(entry["sparsity"])
                                            and 0.0 <= entry["sparsity"] <= 1.0):
                self.fail(f"report[{name!r}].sparsity", entry["sparsity"],
                          "a finite number in [0, 1]")
        return report
