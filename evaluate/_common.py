"""Shared driver of the diffusers examples (flux_example.py, cogvideo_example.py, ...).

Each example runs the family's real diffusers pipeline, from a local checkpoint
directory (``--model_path``, nothing is downloaded) or, with ``--tiny``, from a
tiny randomly initialised transformer of the same architecture (text encoders
replaced by random prompt embeddings, VAE decoding skipped: the latents are
saved), so that every script runs offline on a CPU.

The flags are the seed library's:

* ``--tune``: record a few denoising steps and tune per-head thresholds for the
  targets ``--l1`` (block sparsity) and ``--pv_l1`` (total error with PV skip)
  under the original SpargeAttn's selection rules, then save them to
  ``--model_out_path``: a ``.pt`` path gets the original's format (a torch state
  dict of per-head tensors, loadable by code built on SpargeAttn), any other
  suffix this library's JSON;
* ``--use_spas_sage_attn``: generate with sparse attention, thresholds loaded
  from ``--model_out_path`` (or the ones just tuned); the original's own tuned
  ``.pt`` files load too.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from creative_sparse.models.diffusers import SparseParams, layer_stats, patch, unpatch
from creative_sparse.models.diffusers.tiny import tiny_transformer
from creative_sparse.autotune.thresholds import tune

DEFAULT_PROMPTS = (
    "A cat walks on the grass, realistic style.",
    "A lighthouse on a cliff at sunset, waves crashing below.",
)


@dataclass(frozen=True)
class Spec:
    pipeline: str            # diffusers pipeline class
    video: bool
    height: int
    width: int
    frames: int
    steps: int
    guidance: float
    fps: int = 8


SPECS = {
    "flux": Spec("FluxPipeline", False, 1024, 1024, 1, 28, 3.5),
    "cogvideox": Spec("CogVideoXPipeline", True, 480, 720, 49, 50, 6.0),
    "wan": Spec("WanPipeline", True, 480, 832, 81, 50, 5.0, fps=16),
    "hunyuanvideo": Spec("HunyuanVideoPipeline", True, 320, 512, 61, 30, 6.0, fps=15),
}
# Tiny runs still need several 128-token blocks: Flux 1024 image tokens, the video
# families 3 latent frames x 16 x 16 patches = 768 tokens.
TINY = {"flux": dict(height=512, width=512, frames=1, steps=4),
        "video": dict(height=256, width=256, frames=9, steps=4)}
TINY_TEXT_TOKENS = 16


def build_parser(family: str) -> argparse.ArgumentParser:
    spec = SPECS[family]
    p = argparse.ArgumentParser(description=f"{spec.pipeline} with creative-sparse sparse "
                                            "attention (SpargeAttn, per-head tuned thresholds)")
    p.add_argument("--model_path", help="local diffusers checkpoint directory of the pipeline")
    p.add_argument("--tiny", action="store_true",
                   help="tiny random transformer of the same architecture (offline, CPU)")
    p.add_argument("--use_spas_sage_attn", action="store_true",
                   help="generate with sparse attention (thresholds from --model_out_path)")
    p.add_argument("--tune", action="store_true", help="tune per-head thresholds and save them")
    p.add_argument("--model_out_path", default=f"evaluate/models_dict/{family}_thresholds.pt",
                   help="tuned thresholds to write with --tune / read otherwise: .pt is the "
                        "original SpargeAttn's state-dict format, .json this library's")
    p.add_argument("--l1", type=float, default=0.06, help="relative L1 bound per layer")
    p.add_argument("--pv_l1", type=float, default=0.065,
                   help="relative L1 bound including the PV skip (>= --l1)")
    p.add_argument("--tune_steps", type=int, default=5, help="denoising steps run while tuning")
    p.add_argument("--tune_samples", type=int, default=3, help="recorded calls per layer")
    p.add_argument("--tune_layers_per_pass", type=int,
                   help="record and tune this many layers per tuning run (bounds host memory "
                        "for large video models; default all at once)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("--prompt_file", help="file with one prompt per line")
    p.add_argument("--num_inference_steps", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    if spec.video:
        p.add_argument("--num_frames", type=int)
    p.add_argument("--guidance_scale", type=float, default=spec.guidance)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out_path", default=f"evaluate/outputs/{family}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--cpu_offload", action="store_true", help="enable_model_cpu_offload()")
    p.add_argument("--verbose", action="store_true")
    return p


def _tiny_pipeline(family: str, dtype):
    import diffusers
    transformer = tiny_transformer(family, text_tokens=TINY_TEXT_TOKENS, dtype=dtype)
    if family == "cogvideox":
        scheduler = diffusers.CogVideoXDDIMScheduler()
    elif family == "wan":
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                      use_flow_sigmas=True, flow_shift=3.0)
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=family == "flux", shift=1.0 if family == "flux" else 7.0)
    cls = getattr(diffusers, SPECS[family].pipeline)
    code = cls.__init__.__code__
    components = {name: None for name in code.co_varnames[1:code.co_argcount]}
    components.update(transformer=transformer, scheduler=scheduler)
    return cls(**components)


def load_pipeline(family: str, args):
    """The pipeline on ``args.device``: real from ``--model_path`` or tiny."""
    dtype = getattr(torch, args.dtype) if args.dtype else \
        (torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32)
    if args.tiny:
        pipe = _tiny_pipeline(family, dtype).to(args.device)
        pipe.set_progress_bar_config(disable=not args.verbose)
        return pipe
    if not args.model_path:
        raise SystemExit("give --model_path (a local diffusers checkpoint) or --tiny")
    if not Path(args.model_path).is_dir():
        raise SystemExit(f"--model_path {args.model_path} is not a directory")
    import diffusers
    extra = {}
    if family == "wan":  # the Wan VAE is meant to run in float32
        extra["vae"] = diffusers.AutoencoderKLWan.from_pretrained(
            args.model_path, subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
    pipe = getattr(diffusers, SPECS[family].pipeline).from_pretrained(
        args.model_path, torch_dtype=dtype, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=not args.verbose)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(args.device)
    if SPECS[family].video and hasattr(pipe, "vae") and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    return pipe


def _tiny_embeddings(family: str, pipe, prompt: str) -> dict:
    """Random prompt embeddings standing in for the text encoders, seeded by the prompt."""
    cfg = pipe.transformer.config
    gen = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
    dtype, device = pipe.transformer.dtype, pipe.transformer.device
    t = cfg.max_text_seq_length if family == "cogvideox" else TINY_TEXT_TOKENS
    dim = {"flux": "joint_attention_dim", "cogvideox": "text_embed_dim", "wan": "text_dim",
           "hunyuanvideo": "text_embed_dim"}[family]
    emb = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    out = {"prompt_embeds": emb(1, t, getattr(cfg, dim))}
    if family in ("flux", "hunyuanvideo"):
        out["pooled_prompt_embeds"] = emb(1, cfg.pooled_projection_dim)
    if family == "hunyuanvideo":
        out["prompt_attention_mask"] = torch.ones(1, t, dtype=torch.long, device=device)
    if family in ("cogvideox", "wan"):
        out["negative_prompt_embeds"] = emb(1, t, getattr(cfg, dim))
    return out


def call_kwargs(family: str, pipe, args, prompt: str, steps: int | None = None) -> dict:
    spec = SPECS[family]
    if args.tiny:
        size = TINY["video" if spec.video else "flux"]
    else:
        size = dict(height=spec.height, width=spec.width, frames=spec.frames, steps=spec.steps)
    kwargs = dict(height=args.height or size["height"], width=args.width or size["width"],
                  num_inference_steps=steps or args.num_inference_steps or size["steps"],
                  guidance_scale=args.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(args.seed))
    if spec.video:
        kwargs["num_frames"] = args.num_frames or size["frames"]
    if args.tiny:
        kwargs.update(_tiny_embeddings(family, pipe, prompt), output_type="latent")
    else:
        kwargs["prompt"] = prompt
    return kwargs


def _save(family: str, out, path: Path, tiny: bool, fps: int) -> Path:
    if tiny:
        latents = out.images if family == "flux" else out.frames
        torch.save(latents.float().cpu(), path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    if family == "flux":
        out.images[0].save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    from diffusers.utils import export_to_gif, export_to_video
    try:
        return Path(export_to_video(out.frames[0], str(path.with_suffix(".mp4")), fps=fps))
    except ImportError:  # neither imageio nor opencv installed
        return Path(export_to_gif(out.frames[0], str(path.with_suffix(".gif")), fps=fps))


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += [line.strip() for line in Path(args.prompt_file).read_text().splitlines()
                    if line.strip()]
    return prompts or list(DEFAULT_PROMPTS)


def main(family: str, argv: list[str] | None = None) -> dict:
    """Run the example; returns a summary (also printed as JSON)."""
    args = build_parser(family).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    pipe = load_pipeline(family, args)
    prompts = _prompts(args)
    summary: dict = {"family": family, "tiny": args.tiny, "sparse": args.use_spas_sage_attn}
    params = None
    if args.tune:
        start = time.perf_counter()
        params = tune(pipe.transformer,
                      lambda: [pipe(**call_kwargs(family, pipe, args, p, args.tune_steps))
                               for p in prompts[:1]],
                      l1=args.l1, pv_l1=args.pv_l1, max_samples=args.tune_samples,
                      layers_per_pass=args.tune_layers_per_pass, selection="sparge")
        params.save(args.model_out_path)
        summary.update(tuning_seconds=round(time.perf_counter() - start, 2),
                       tuned_sparsity=round(params.mean_sparsity(), 4),
                       tuned_max_l1=round(max(r["l1"] for r in params.report.values()), 4),
                       thresholds=str(args.model_out_path))
    if args.use_spas_sage_attn:
        params = params or SparseParams.load(args.model_out_path, pipe.transformer)
        patch(pipe.transformer, params)
    out_dir = Path(args.out_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs, seconds = [], []
    try:
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            out = pipe(**call_kwargs(family, pipe, args, prompt))
            seconds.append(time.perf_counter() - start)
            outputs.append(str(_save(family, out, out_dir / str(i), args.tiny, SPECS[family].fps)))
        if args.use_spas_sage_attn:
            stats = layer_stats(pipe.transformer).values()
            summary["attention_sparsity"] = round(
                sum(s["sparsity"] for s in stats) / max(1, len(stats)), 4)
    finally:
        if args.use_spas_sage_attn:
            unpatch(pipe.transformer)
    summary.update(outputs=outputs, seconds_per_prompt=[round(s, 3) for s in seconds])
    print(json.dumps(summary, indent=1))
    return summary
