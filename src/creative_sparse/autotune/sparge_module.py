"""The original SpargeAttn's ``SparseAttentionMeansim`` module and its state-dict helpers.

Code built on thu-ml/SpargeAttn (video pipelines, node packs) wraps attention in
``SparseAttentionMeansim`` (its ``spas_sage_attn/autotune.py``), usually as
``attn.inner_attention``, and saves or loads the per-head thresholds with
``extract_sparse_attention_state_dict`` / ``load_sparse_attention_state_dict``. The
same names live here (and under the seed's import path ``spas_sage_attn.autotune``),
with the same parameter names and shapes, backed by this library's kernels (CPU and
GPU) and the original's selection rules (``selection="sparge"``).

Parameters of a module, each ``[heads]``, created by tuning or loading:
``is_sparse`` (bool; a False head runs dense), ``cdfthreshd``, ``simthreshd1``,
``simthreshd2`` (unused by the prediction, kept for the file format) and
``pvthreshd``.

What differs from the original, on purpose:

* Tuning (``tune_mode=True`` or ``TUNE_MODE`` set) uses this library's tuner
  (:func:`~creative_sparse.autotune.thresholds.tune_layer`, all heads at once,
  ``sim_rule="l1"`` only) on the last ``max_samples`` calls, and tunes with the
  ``attention_sink`` the module runs with; the original bisects per head on the GPU.
* Loading keeps the thresholds in float32 (the original casts them to the model's
  dtype, bf16 rounds ``cdfthreshd``), checks names and shapes and names the first
  mismatch, and matches a module by its exact name prefix (the original's substring
  test loads ``blocks.1``'s values into ``blocks.10`` too).
* ``mask`` must be None: the original's kernels ignore it silently.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import torch
from torch import Tensor, nn

from ..attention import spas_sage2_attn_meansim_cuda

logger = logging.getLogger(__name__)

__all__ = ["PARAMETERS", "SparseAttentionMeansim", "extract_sparse_attention_state_dict",
           "load_sparse_attention_state_dict"]

PARAMETERS = ("is_sparse", "cdfthreshd", "simthreshd1", "simthreshd2", "pvthreshd")
_SIM_RULES = ("l1", "cosine", "rmse")


def _frozen(values: Tensor) -> nn.Parameter:
    return nn.Parameter(values, requires_grad=False)


class SparseAttentionMeansim(nn.Module):
    """Sparse attention with per-head thresholds, tuned or loaded (see the module docstring).

    Args (the original's): ``sim_rule`` (``"l1"``; ``"cosine"``/``"rmse"`` are accepted
    for loading and inference, tuning needs ``"l1"``), ``l1`` (error bound of the block
    selection), ``pv_l1`` (> ``l1``, bound including the PV skip), ``cos_sim``,
    ``rmse``, ``rearrange_kwargs`` (unused), ``tune_pv``. Extension: ``max_samples``,
    how many recent calls tuning keeps.

    Example:
        >>> attn = SparseAttentionMeansim()
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> _ = attn(q, k, v, tune_mode=True)       # tunes per head, returns dense attention
        >>> tuple(attn.cdfthreshd.shape), attn(q, k, v).shape
        ((2,), torch.Size([1, 2, 256, 64]))
    """

    def __init__(self, sim_rule: str = "l1", l1: float = 0.07, pv_l1: float = 0.08,
                 cos_sim: float = 0.98, rmse: float = 0.07, rearrange_kwargs=None,
                 tune_pv: bool = True, *, max_samples: int = 3):
        super().__init__()
        if sim_rule not in _SIM_RULES:
            raise ValueError(f"sim_rule should be one of {list(_SIM_RULES)}, got {sim_rule!r}")
        if not (l1 >= 0 and cos_sim <= 1 and rmse >= 0):
            raise ValueError(f"l1 ({l1}) and rmse ({rmse}) must be >= 0 and cos_sim ({cos_sim}) "
                             "<= 1")
        if not pv_l1 > l1:
            raise ValueError(f"pv_l1 ({pv_l1}) must be greater than l1 ({l1})")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
        self.sim_rule, self.l1, self.pv_l1 = sim_rule, l1, pv_l1
        self.cos_sim, self.rmse, self.tune_pv = cos_sim, rmse, tune_pv
        self.rearrange_kwargs = dict(rearrange_kwargs or {})
        self.max_samples = max_samples
        self.head_num: int | None = None
        for name in PARAMETERS:
            setattr(self, name, None)
        self._samples: list = []

    # ---------------------------------------------------------------- parameters

    def init_hyperparams(self, head_num: int, device=None) -> None:
        """The original's starting values: every head sparse, ``cdfthreshd`` 0.1,
        ``simthreshd1`` -1, ``simthreshd2`` 0, ``pvthreshd`` 20."""
        self.head_num = head_num
        self.is_sparse = _frozen(torch.ones(head_num, dtype=torch.bool, device=device))
        self.cdfthreshd = _frozen(torch.full((head_num,), 0.1, device=device))
        self.simthreshd1 = _frozen(torch.full((head_num,), -1.0, device=device))
        self.simthreshd2 = _frozen(torch.zeros(head_num, device=device))
        self.pvthreshd = _frozen(torch.full((head_num,), 20.0, device=device))

    def _tuned(self) -> bool:
        return all(isinstance(getattr(self, n), Tensor) for n in PARAMETERS)

    # ---------------------------------------------------------------- forward

    @torch.no_grad()
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask=None, is_causal: bool = False,
                scale: float | None = None, tensor_layout: str = "HND", tune_mode: bool = False,
                smooth_k: bool = True, return_sparsity: bool = False):
        if mask is not None:
            raise ValueError("SparseAttentionMeansim: mask must be None (the block map is the "
                             "mask; the original's kernels ignore a mask silently)")
        if not isinstance(q, Tensor) or q.dim() != 4:
            raise ValueError(f"q should be a 4-d tensor ({tensor_layout}), got "
                             f"{getattr(q, 'shape', type(q).__name__)}")
        if tensor_layout not in ("HND", "NHD"):
            raise ValueError(f"tensor_layout must be 'HND' or 'NHD', got {tensor_layout!r}")
        if os.environ.get("TUNE_MODE", "") != "" or tune_mode:
            return self._tune(q, k, v, is_causal, scale, tensor_layout, return_sparsity)
        if not self._tuned():
            raise ValueError("SparseAttentionMeansim: attention hyperparameters should be tuned "
                             "first (tune_mode=True) or loaded "
                             "(load_sparse_attention_state_dict)")
        heads = q.shape[1] if tensor_layout == "HND" else q.shape[2]
        if self.cdfthreshd.shape != (heads,):
            raise ValueError(f"SparseAttentionMeansim holds thresholds for "
                             f"{self.cdfthreshd.shape[0]} heads; the call has {heads}")
        device = q.device
        cdf = torch.where(self.is_sparse.to(device), self.cdfthreshd.to(device).float(),
                          torch.ones((), device=device))
        return spas_sage2_attn_meansim_cuda(
            q, k, v, is_causal=is_causal, scale=scale, smooth_k=smooth_k,
            simthreshd1=self.simthreshd1.to(device).float(), cdfthreshd=cdf,
            pvthreshd=self.pvthreshd.to(device).float(), attention_sink=True,
            tensor_layout=tensor_layout, return_sparsity=return_sparsity)

    def _tune(self, q, k, v, is_causal, scale, tensor_layout, return_sparsity):
        from ..attention import dense_attention
        from .thresholds import QKVSample, tune_layer

        if self.sim_rule != "l1":
            raise ValueError(f"SparseAttentionMeansim: tuning supports sim_rule='l1' only (this "
                             f"library's tuner bounds the relative L1 error), got "
                             f"{self.sim_rule!r}")
        if is_causal:
            raise ValueError("SparseAttentionMeansim: tuning supports non-causal attention only "
                             "(the diffusion transformers it is made for)")
        if tensor_layout == "NHD":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.head_num is None:
            self.init_hyperparams(q.shape[1], q.device)
        self._samples.append(QKVSample(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(),
                                       scale, q.shape[2]))
        del self._samples[:-self.max_samples]
        thresholds, report = tune_layer(self._samples, l1=self.l1, pv_l1=self.pv_l1,
                                        attention_sink=True, selection="sparge")
        device = self.cdfthreshd.device
        cdf = torch.tensor(thresholds.cdfthreshd, device=device)
        self.cdfthreshd.copy_(cdf)
        self.simthreshd1.copy_(torch.tensor(thresholds.simthreshd1, device=device))
        if self.tune_pv:
            self.pvthreshd.copy_(torch.tensor(thresholds.pvthreshd, device=device))
        else:                      # the original's fixed value when it does not tune it
            self.pvthreshd.fill_(20.0)
        self.is_sparse.copy_(cdf < 1.0)
        logger.info("SparseAttentionMeansim tuned on %d call(s): head sparsity %s",
                    len(self._samples), report["head_sparsity"])
        out = dense_attention(q, k, v, scale=scale)
        if tensor_layout == "NHD":
            out = out.transpose(1, 2)
        return (out, 0.0) if return_sparsity else out


# --------------------------------------------------------------------------- state dicts

def _modules(model: nn.Module) -> dict[str, SparseAttentionMeansim]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseAttentionMeansim)}


def extract_sparse_attention_state_dict(model: nn.Module, verbose: bool = False
                                        ) -> dict[str, Tensor]:
    """Every ``SparseAttentionMeansim``'s tuned parameters, by their full names in
    ``model`` (``"transformer_blocks.0.attn1.inner_attention.cdfthreshd"``, ...), as
    the original saves them with ``torch.save``."""
    out = {}
    for name, module in _modules(model).items():
        prefix = f"{name}." if name else ""
        for key in PARAMETERS:
            value = getattr(module, key)
            if isinstance(value, Tensor):
                out[prefix + key] = value.detach().clone()
        if verbose:
            print(f"{name or '<model>'}: {'tuned' if module._tuned() else 'not tuned'}")
    return out


def load_sparse_attention_state_dict(model: nn.Module, saved_state_dict: Mapping[str, Tensor],
                                     multigpu: bool = False, verbose: bool = False) -> nn.Module:
    """Load per-head thresholds saved by :func:`extract_sparse_attention_state_dict` (ours
    or the original's) into ``model``'s ``SparseAttentionMeansim`` modules; returns ``model``.

    Every entry must belong to a module and every module must get all five tensors with
    one value per head; the first mismatch is a ``ValueError`` that names it, and
    nothing is loaded then. Thresholds are stored in float32 (``is_sparse`` bool) on
    the device of the module's surroundings (``multigpu`` is accepted for
    compatibility).
    """
    if not isinstance(saved_state_dict, Mapping):
        raise ValueError(f"saved_state_dict must be a mapping of names to tensors, got "
                         f"{type(saved_state_dict).__name__}")
    modules = _modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} holds no SparseAttentionMeansim module to "
                         "load thresholds into")
    by_module: dict[str, dict[str, Tensor]] = {name: {} for name in modules}
    for key, value in saved_state_dict.items():
        owner, _, field = str(key).rpartition(".")
        if owner not in modules or field not in PARAMETERS:
            raise ValueError(f"{key!r} belongs to no SparseAttentionMeansim parameter of the "
                             f"model (modules e.g. {sorted(modules)[:2]}, parameters "
                             f"{', '.join(PARAMETERS)})")
        if not isinstance(value, Tensor) or value.dim() != 1:
            raise ValueError(f"{key!r} must be a 1-d tensor (one value per head), got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
        by_module[owner][field] = value
    staged = {}
    for name, values in by_module.items():
        missing = [f for f in PARAMETERS if f not in values]
        if missing:
            raise ValueError(f"{name}.{missing[0]} is missing from the state dict (each module "
                             f"needs {', '.join(PARAMETERS)})")
        heads = {values[f].numel() for f in PARAMETERS}
        if len(heads) != 1:
            raise ValueError(f"{name}: the five tensors disagree on the head count: "
                             f"{ {f: values[f].numel() for f in PARAMETERS} }")
        if values["is_sparse"].dtype != torch.bool:
            raise ValueError(f"{name}.is_sparse must be a bool tensor, got "
                             f"{values['is_sparse'].dtype}")
        for f in PARAMETERS[1:]:
            if not values[f].is_floating_point() or not bool(torch.isfinite(values[f]).all()):
                raise ValueError(f"{name}.{f} must hold finite floats, got {values[f]}")
        staged[name] = values
    device = next(model.parameters(), torch.empty(0)).device
    for name, values in staged.items():
        module = modules[name]
        module.head_num = values["is_sparse"].numel()
        for f in PARAMETERS:
            dtype = torch.bool if f == "is_sparse" else torch.float32
            setattr(module, f, _frozen(values[f].detach().to(device=device, dtype=dtype).clone()))
        if verbose:
            print(f"{name}: loaded {module.head_num} heads")
    return model
