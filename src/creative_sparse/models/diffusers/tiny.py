"""Tiny randomly initialised diffusers transformers of the supported families, offline.

For tests, examples (``--tiny``) and benchmarks: the same classes as the real
checkpoints (Flux, CogVideoX, Wan, HunyuanVideo), a few thousand parameters,
built from a config, never downloaded.

Purely random weights give nearly uniform attention, which no block-sparse
method can skip. Trained diffusion transformers attend mostly locally (in
space and time) and to a few distinct tokens; ``structured=True`` mimics that
cheaply: keys share the query projection and the QK-norm gains are raised, so
a token attends most to tokens whose hidden states resemble its own, and
:func:`tiny_inputs` gives spatially smooth latents, so those are its neighbours.
The attention sparsity found on these models says nothing about the sparsity of a
real checkpoint; they exist to exercise the code paths at realistic token counts.

Example:
    >>> model = tiny_transformer("hunyuanvideo")
    >>> out = model(**tiny_inputs(model, height=8, width=8)).sample
    >>> out.shape
    torch.Size([1, 4, 1, 8, 8])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .params import FAMILIES, _require_diffusers, attention_layers, detect_family

__all__ = ["tiny_inputs", "tiny_transformer", "token_count"]

TEXT_DIM = 32
LATENT_CHANNELS = 4


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Three even RoPE axis sizes (time, height, width) summing to ``head_dim``."""
    t = max(2, 2 * (head_dim // 16))
    rest = head_dim - t
    h = rest // 2 // 2 * 2
    return t, h, rest - h


def tiny_transformer(family: str, *, heads: int = 2, head_dim: int = 16, layers: int = 2,
                     text_tokens: int = 16, structured: bool = True, sharpness: float = 2.0,
                     seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised transformer of ``family``, in eval mode.

    Args:
        family: ``"flux"``, ``"cogvideox"``, ``"wan"`` or ``"hunyuanvideo"``.
        heads, head_dim: attention heads and head size (``head_dim`` even, >= 12).
        layers: attention layers patched by sparse attention (Flux and HunyuanVideo
            split them between double- and single-stream blocks).
        text_tokens: CogVideoX only: its text length is fixed by the config.
        structured: tie key to query projections and scale the QK-norm gains by
            ``sharpness`` so attention is local, like a trained model's (module docstring).
        seed: weight initialisation seed.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)}")
    if head_dim % 2 or head_dim < 12 or heads < 1 or layers < 1:
        raise ValueError(f"need an even head_dim >= 12, heads >= 1 and layers >= 1; got "
                         f"head_dim={head_dim}, heads={heads}, layers={layers}")
    diffusers = _require_diffusers()
    torch.manual_seed(seed)
    double, single = max(1, layers // 2), max(0, layers - max(1, layers // 2))
    if family == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=double,
            num_single_layers=single, attention_head_dim=head_dim, num_attention_heads=heads,
            joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
            axes_dims_rope=_rope_axes(head_dim))
    elif family == "cogvideox":
        model = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=head_dim,
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, time_embed_dim=16,
            text_embed_dim=TEXT_DIM, num_layers=layers, sample_width=16, sample_height=16,
            sample_frames=5, patch_size=2, temporal_compression_ratio=4,
            max_text_seq_length=text_tokens)
    elif family == "wan":
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM,
            freq_dim=32, ffn_dim=2 * heads * head_dim, num_layers=layers)
    else:
        model = diffusers.HunyuanVideoTransformer3DModel(
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            num_attention_heads=heads, attention_head_dim=head_dim, num_layers=double,
            num_single_layers=single, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2,
            patch_size_t=1, guidance_embeds=True, text_embed_dim=TEXT_DIM,
            pooled_projection_dim=TEXT_DIM, rope_axes_dim=_rope_axes(head_dim))
    if structured:
        _structure(model, sharpness)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


@torch.no_grad()
def _structure(model, sharpness: float) -> None:
    for attn in attention_layers(model).values():
        for q_name, k_name in (("to_q", "to_k"), ("add_q_proj", "add_k_proj")):
            q_proj, k_proj = getattr(attn, q_name, None), getattr(attn, k_name, None)
            if q_proj is not None and k_proj is not None:
                k_proj.load_state_dict(q_proj.state_dict())
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            norm = getattr(attn, name, None)
            if getattr(norm, "weight", None) is not None:
                norm.weight.fill_(sharpness)


def _smooth(shape: tuple[int, ...], generator: torch.Generator, coarse: int = 4) -> Tensor:
    """Random field over the last 2 (or 3) dims, smooth at scale ``coarse``, plus 10 % noise."""
    spatial = shape[-3:] if len(shape) == 5 else shape[-2:]
    low = [max(1, s // coarse) for s in spatial]
    field = torch.randn(*shape[:-len(spatial)], *low, generator=generator)
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    field = torch.nn.functional.interpolate(field, size=spatial, mode=mode, align_corners=False)
    return field + 0.1 * torch.randn(shape, generator=generator)


def token_count(model, *, frames: int = 1, height: int = 16, width: int = 16,
                text_tokens: int = 16) -> tuple[int, int]:
    """``(image/video tokens, text tokens)`` in the joint sequence for these input sizes
    (latent frames, latent height and width)."""
    family = detect_family(model)
    cfg = model.config
    if family == "flux":
        return (height // 2) * (width // 2), text_tokens
    if family == "cogvideox":
        return frames * (height // cfg.patch_size) * (width // cfg.patch_size), \
            cfg.max_text_seq_length
    if family == "wan":
        pt, ph, pw = cfg.patch_size
        return (frames // pt) * (height // ph) * (width // pw), 0
    return (frames // cfg.patch_size_t) * (height // cfg.patch_size) * (width // cfg.patch_size), \
        text_tokens


def tiny_inputs(model, *, frames: int = 1, height: int = 16, width: int = 16,
                text_tokens: int = 16, batch: int = 1, pad_text: int = 0, seed: int = 0,
                timestep: float = 500.0) -> dict:
    """Forward keyword arguments for ``model`` (a tiny or real transformer) with smooth latents.

    Args:
        frames, height, width: latent size (Flux: an image of ``height x width`` latent
            pixels packed into 2x2 patches; the video families use their patch sizes).
        text_tokens: prompt length (CogVideoX uses its configured length).
        pad_text: HunyuanVideo only: mask out the last ``pad_text`` prompt tokens of the
            first batch element (exercises the key-padding path).
        timestep: diffusion time in [0, 1000].
    """
    family = detect_family(model)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    text_dim = {"flux": "joint_attention_dim", "cogvideox": "text_embed_dim",
                "wan": "text_dim", "hunyuanvideo": "text_embed_dim"}[family]
    if family == "cogvideox":
        text_tokens = cfg.max_text_seq_length
    text = torch.randn(batch, text_tokens, getattr(cfg, text_dim), generator=gen)
    t = torch.full((batch,), float(timestep))
    if family == "flux":
        channels = cfg.in_channels // 4
        lat = _smooth((batch, channels, height, width), gen)
        packed = lat.view(batch, channels, height // 2, 2, width // 2, 2)
        packed = packed.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * 4)
        ids = torch.zeros(height // 2, width // 2, 3)
        ids[..., 1] = torch.arange(height // 2)[:, None]
        ids[..., 2] = torch.arange(width // 2)[None, :]
        kwargs = dict(hidden_states=packed, encoder_hidden_states=text,
                      pooled_projections=torch.randn(batch, cfg.pooled_projection_dim,
                                                     generator=gen),
                      timestep=t / 1000.0, img_ids=ids.reshape(-1, 3),
                      txt_ids=torch.zeros(text_tokens, 3))
        if cfg.guidance_embeds:
            kwargs["guidance"] = torch.full((batch,), 3.5)
    elif family == "cogvideox":
        lat = _smooth((batch, cfg.in_channels, frames, height, width), gen).transpose(1, 2)
        kwargs = dict(hidden_states=lat, encoder_hidden_states=text, timestep=t.long())
    elif family == "wan":
        lat = _smooth((batch, cfg.in_channels, frames, height, width), gen)
        kwargs = dict(hidden_states=lat, encoder_hidden_states=text, timestep=t)
    else:
        lat = _smooth((batch, cfg.in_channels, frames, height, width), gen)
        mask = torch.ones(batch, text_tokens, dtype=torch.long)
        if pad_text:
            mask[0, text_tokens - pad_text:] = 0
        kwargs = dict(hidden_states=lat, encoder_hidden_states=text, encoder_attention_mask=mask,
                      pooled_projections=torch.randn(batch, cfg.pooled_projection_dim,
                                                     generator=gen),
                      timestep=t, guidance=torch.full((batch,), 6000.0))
    return {k: v.to(dtype) if torch.is_floating_point(v) and k not in ("img_ids", "txt_ids")
            else v for k, v in kwargs.items()}
