"""Draw every knob of the control manifold M(s) over s in [0, 1] into ``docs/knobs.png``.

Usage (from the repository root; needs matplotlib, the ``plots`` extra):

    python scripts/plot_knobs.py                  # writes docs/knobs.png
    python scripts/plot_knobs.py --out /tmp/k.png --dpi 80
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np

from creative_sparse.config import SparsityConfig
from creative_sparse.control import SparsityController

log = logging.getLogger("plot_knobs")

NUM_EXPERTS = 8        # an 8-expert MoE (Mixtral-like) for the K(s) panel
CONTEXT_LEN = 4096     # keys in context for the absolute-key panels
HEAD_DIM = 64          # d in the seed's k_attn (SmolLM2's head_dim)


def _sweep(controller: SparsityController, levels: np.ndarray, **kwargs) -> list:
    return [controller.get_sparsity_params(float(s), **kwargs) for s in levels]


def draw(out: Path, dpi: int = 90, points: int = 201) -> Path:
    """Draw the knob grid with the default config and save it to ``out``; returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.linspace(0.0, 1.0, points)
    mono = SparsityController(SparsityConfig())
    seed = SparsityController(SparsityConfig(attention_schedule="seed"))
    seed_consts = _sweep(SparsityController(SparsityConfig.seed_constants()), s)
    moe_k1 = _sweep(mono, s, num_experts=NUM_EXPERTS, context_len=CONTEXT_LEN, head_dim=HEAD_DIM)
    moe_k2 = _sweep(mono, s, num_experts=NUM_EXPERTS, default_experts=2)
    seed_p = _sweep(seed, s, context_len=CONTEXT_LEN, head_dim=HEAD_DIM)

    def col(params, name):
        return [getattr(p, name) for p in params]

    panels = [
        ("temperature T(s)", "T", [(col(moe_k1, "temperature"), "default: T0=0.8, kappa_T=0.4"),
                                   (col(seed_consts, "temperature"), "seed: T0=1, kappa_T=0.5")]),
        ("nucleus p(s), clamped to 1", "top-p",
         [(col(moe_k1, "top_p"), "default: kappa_p=0.1"),
          (col(seed_consts, "top_p"), "seed: kappa_p=0.3")]),
        (f"MoE experts per token K(s), E={NUM_EXPERTS}", "experts",
         [(col(moe_k1, "experts_per_token"), "K0=1 (seed)"),
          (col(moe_k2, "experts_per_token"), "K0=2 (model default)")]),
        ("MoE router temperature", "router T", [(col(moe_k1, "router_temperature"), None)]),
        ("attention keep fraction (= top-k)", "fraction of keys",
         [(col(moe_k1, "keep_fraction"), "monotone (default)"),
          (col(seed_p, "keep_fraction"), f"seed, L={CONTEXT_LEN}")]),
        (f"attention keys per query, L={CONTEXT_LEN}", "keys (log scale)",
         [(col(moe_k1, "attention_keys"), "monotone (default)"),
          (col(seed_p, "attention_keys"), "seed (rounded)")]),
        (f"seed k_attn(s), d={HEAD_DIM}: not monotone", "keys per query",
         [(col(seed_p, "k_attn_seed"), "k0 + kappa_a s d sqrt(1-s^2)")]),
        ("token-pruning rate (cap 0.5)", "evictable fraction",
         [(col(moe_k1, "token_pruning_rate"), None)]),
        ("KV-reuse ratio in refine", "reused fraction", [(col(moe_k1, "kv_reuse_ratio"), None)]),
        ("simthreshd1", "cosine similarity", [(col(moe_k1, "simthreshd1"), None)]),
        ("cdfthreshd", "cumulative mass", [(col(moe_k1, "cdfthreshd"), None)]),
        ("pvthreshd", "log2 units", [(col(moe_k1, "pvthreshd"), None)]),
    ]
    ncols = 4
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.5 * nrows))
    for ax, (title, ylabel, lines) in zip(axes.flat, panels):
        for values, label in lines:
            step = isinstance(values[0], int)
            draw_fn = ax.step if step else ax.plot
            kw = {"where": "post"} if step else {}
            draw_fn(s, values, label=label, lw=1.5, **kw)
        if "log scale" in ylabel:
            ax.set_yscale("log")
        if title.startswith("seed k_attn"):
            ax.axvline(2 ** -0.5, color="grey", ls=":", lw=1)
            ax.annotate("peak s=0.71", (2 ** -0.5, max(lines[0][0])), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("sparsity level s", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlim(0.0, 1.0)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if any(label for _, label in lines):
            ax.legend(fontsize=6.5, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Creative-Sparse control manifold M(s): every knob, default SparsityConfig",
                 fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: parse ``--out`` and ``--dpi`` and draw."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--out", type=Path, default=root / "docs" / "knobs.png")
    parser.add_argument("--dpi", type=int, default=90)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = draw(args.out, dpi=args.dpi)
    log.info("wrote %s (%d bytes)", path, path.stat().st_size)


if __name__ == "__main__":
    main()
