"""MoE expert control: experts per token and router temperature on every router.

transformers' MoE routers copy ``config.num_experts_per_tok`` into a ``top_k``
attribute when they are built, so changing the config does nothing at run
time: :func:`moe_routing` sets ``top_k`` on each router module (and on the MoE
block around it, which keeps a copy too) and divides the router's input by the
temperature with a forward pre-hook (logits / T, since the router is linear).
Everything is restored on exit.

Supported families: every router that follows transformers' ``*TopKRouter``
pattern (an ``nn.Module`` with integer ``top_k`` and ``num_experts`` and a
``weight`` parameter): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and others built
the same way. Note that Mixtral renormalises the kept weights, while Qwen-MoE
and OLMoE do so only when ``norm_topk_prob`` is set.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["find_routers", "is_moe", "moe_routing", "num_experts"]


def is_moe(model: torch.nn.Module) -> bool:
    """True when the model's config declares experts per token."""
    return getattr(getattr(model, "config", None), "num_experts_per_tok", None) is not None


def find_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router modules of ``model`` (see the module docstring for the pattern)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "top_k", None), int)
            and isinstance(getattr(m, "num_experts", None), int)
            and isinstance(getattr(m, "weight", None), torch.nn.Parameter)]


def num_experts(model: torch.nn.Module) -> int | None:
    """Number of experts per MoE layer, or None for a dense model."""
    routers = find_routers(model)
    return routers[0].num_experts if routers else None


@contextlib.contextmanager
def moe_routing(model: torch.nn.Module, experts_per_token: int | None,
                temperature: float = 1.0) -> Iterator[None]:
    """Set experts per token and router temperature inside a ``with`` block.

    ``experts_per_token=None`` and ``temperature=1`` leave the model untouched
    (also for dense models). Raises ``ValueError`` for an MoE model whose
    routers we do not recognise, for a dense model asked for experts, and for
    ``experts_per_token`` outside ``[1, num_experts]``.
    """
    if experts_per_token is None and temperature == 1.0:
        yield
        return
    routers = find_routers(model)
    if not routers:
        kind = "an MoE model of an unknown family" if is_moe(model) else "a dense model"
        raise ValueError(f"{type(model).__name__} is {kind}: no router modules with top_k / "
                         "num_experts / weight to set experts per token or router temperature on")
    total = routers[0].num_experts
    if experts_per_token is not None and not 1 <= experts_per_token <= total:
        raise ValueError(f"experts_per_token must be in [1, {total}] for this model, got "
                         f"{experts_per_token}")
    if not temperature > 0:
        raise ValueError(f"router temperature must be > 0, got {temperature}")
    saved: list[tuple[torch.nn.Module, int]] = []
    hooks = []
    try:
        for router in routers:
            if experts_per_token is not None:
                saved.append((router, router.top_k))
                router.top_k = experts_per_token
            if temperature != 1.0:
                hooks.append(router.register_forward_pre_hook(
                    lambda _m, args, t=temperature: (args[0] / t,) + tuple(args[1:])))
        if experts_per_token is not None:
            for block in model.modules():
                gate = getattr(block, "gate", None)
                if gate is not None and gate in routers and isinstance(
                        getattr(block, "top_k", None), int):
                    saved.append((block, block.top_k))
                    block.top_k = experts_per_token
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module, value in reversed(saved):
            module.top_k = value
