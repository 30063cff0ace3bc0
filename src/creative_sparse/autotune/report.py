"""Reports of a Goldilocks sweep (:class:`creative_sparse.autotune.SweepResult`): the
table as text and the plot.

Used by ``SweepResult.format_table`` / ``SweepResult.plot`` and ``creative-sparse tune``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .goldilocks import sign_changes

if TYPE_CHECKING:
    from . import SweepResult

__all__ = ["format_sweep", "plot_sweep"]


def _ci(ci: tuple[float, float] | None) -> str:
    if ci is None or not all(math.isfinite(x) for x in ci):
        return "[  n/a ,  n/a ]"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def format_sweep(r: "SweepResult") -> str:
    """A sweep's table (s, N, D, I, Q with intervals; the flagged rate when a safety
    checker was given) and its verdict, as text."""
    p = r.plan
    flagged = bool(r.measurements.flagged)
    lines = [f"{r.task} ({r.split} split, {r.model}): {p.prompts} prompts x {p.samples} samples "
             f"x {p.levels} levels x {p.max_new_tokens} tokens (budget {p.budget:g}), "
             f"{r.runtime_s:.0f} s{' (from cache)' if r.from_cache else ''}",
             f"{'s':>6}  {'novelty':<22}{'diversity':<22}{'incoherence':<22}{'Q':<23}"
             f"{'viol':>5}{'ok':>4}" + (f"{'flagged':>9}" if flagged else "")]
    for row in r.table:
        lines.append(f"{row.s:6.3f}  " + "".join(
            f"{v:+.3f} {_ci(c):<16}" if name == "q" else f"{v:.3f} {_ci(c):<16}"
            for name, v, c in (("n", row.novelty, row.novelty_ci),
                               ("d", row.diversity, row.diversity_ci),
                               ("i", row.incoherence, row.incoherence_ci),
                               ("q", row.q, row.q_ci)))
            + f"{row.violations:5.2f}{row.prompts_ok:4d}"
            + (f"{row.flagged:9.3f}" if flagged else ""))
    lines.append(f"s* = {r.s_star:.3f} {_ci(r.s_star_ci)} ({r.method}); measured optimum "
                 f"{r.s_star_measured:.3f}"
                 + (f" {_ci(r.bootstrap.s_star_measured)}" if r.bootstrap else ""))
    f = r.fit
    if f is not None:
        k = f.params
        lines.append(f"fit: N = {k.n0:.3f} + {k.a1:.3f} s^{k.mu:.2f}, D = {k.d0:.3f} + {k.a3:.3f}"
                     f" (1 - e^(-{k.kappa:.2f} s)), I = {k.i0:.3f} + {k.a2:.3f} s^{k.nu:.2f}; "
                     f"RMS misfit of Q {f.rmse[3]:.4f}; fitted s* = {f.s_star:.3f}"
                     + (f" {_ci(r.bootstrap.s_star_fit)}" if r.bootstrap else ""))
        b = f.bounds
        if b is not None:
            seed = (f"{b.upper_seed:.3f} ({'holds' if b.seed_upper_holds else 'does not hold'})"
                    if b.upper_seed is not None else "n/a (nu <= 1)")
            lines.append(f"Corollary 1: {b.lower:.3f} <= s* <= {b.upper:.3f}; the seed's upper "
                         f"bound {seed}" + "".join(f"; {n}" for n in b.notes))
        lines.append(f"dQ/ds changes sign {f.sign_changes} time(s); interior maximum of the "
                     f"fitted Q: {'yes' if f.interior else 'no'}; identified: "
                     + ("yes" if f.identified else "no (see the warning)"
                        if r.method == "measured" else "no: " + "; ".join(f.issues)))
    measured = [row for row in r.table if math.isfinite(row.q)]
    best = max(measured, key=lambda row: row.q)
    changes = sign_changes(np.diff([row.q for row in measured]))
    lines.append(f"measured Q: successive differences change sign {changes} time(s); best "
                 f"level s = {best.s:.3f}")
    lines.extend(f"warning: {w}" for w in r.warnings)
    if r.measurements.errors:
        lines.append(f"{len(r.measurements.errors)} failed point(s), first: "
                     f"{r.measurements.errors[0]}")
    return "\n".join(lines)


def plot_sweep(r: "SweepResult", path: Path) -> Path:
    """PNG of a sweep: measured N, D, I and Q over s with intervals, the fit, s* and the
    bounds; the flagged rate over s on a second axis when the sweep recorded it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'creative-sparse[plots]'") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = r.table
    s = np.array([row.s for row in rows])
    dense = np.linspace(0, 1, 201)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7.5, 7.5))
    for name, color in (("novelty", "tab:blue"), ("diversity", "tab:green"),
                        ("incoherence", "tab:red")):
        mean = np.array([getattr(row, name) for row in rows])
        ci = np.array([getattr(row, name + "_ci") for row in rows])
        top.errorbar(s, mean, yerr=np.abs(ci.T - mean), fmt="o", color=color, capsize=3,
                     label=f"{name} (measured)")
        if r.fit is not None:
            top.plot(dense, getattr(r.fit.params, name)(dense), color=color, lw=1.2)
    top.set_ylabel("term (mean over prompts)")
    top.legend(fontsize=8, loc="best")
    q = np.array([row.q for row in rows])
    qci = np.array([row.q_ci for row in rows])
    bottom.errorbar(s, q, yerr=np.abs(qci.T - q), fmt="o", color="k", capsize=3,
                    label="Q (measured, 95% bootstrap over prompts)")
    if r.fit is not None:
        bottom.plot(dense, r.fit.params.q(dense, r.weights), color="k", lw=1.2, label="Q (fit)")
        b = r.fit.bounds
        if b is not None:
            bottom.axvspan(b.lower, b.upper, color="tab:orange", alpha=0.15,
                           label=f"Corollary-1 bounds [{b.lower:.2f}, {b.upper:.2f}]")
            if b.upper_seed is not None:
                bottom.axvline(b.upper_seed, color="tab:orange", ls=":",
                               label=f"seed's upper bound {b.upper_seed:.2f}")
    bottom.axvline(r.s_star, color="tab:purple", lw=2, label=f"s* = {r.s_star:.3f} ({r.method})")
    if r.s_star_ci is not None:
        bottom.axvspan(*r.s_star_ci, color="tab:purple", alpha=0.1)
    bottom.axvline(r.s_star_measured, color="tab:gray", ls="--",
                   label=f"measured optimum {r.s_star_measured:.3f}")
    if r.measurements.flagged:   # the safety monitor over s, on its own axis
        rate = bottom.twinx()
        rate.plot(s, [row.flagged for row in rows], "s--", color="tab:brown",
                  label="flagged rate (safety checker)")
        rate.set_ylabel("flagged rate (share of samples)", color="tab:brown")
        rate.set_ylim(0, max(0.05, 1.2 * np.nanmax([row.flagged for row in rows] + [0])))
        rate.legend(fontsize=8, loc="lower right")
    bottom.set_xlabel("sparsity level s")
    bottom.set_ylabel(f"Q = {r.weights.alpha:g} N + {r.weights.beta:g} D - {r.weights.gamma:g} I")
    bottom.legend(fontsize=8, loc="best")
    top.set_title(f"{r.task} ({r.split}): {r.plan.prompts} prompts x {r.plan.samples} samples, "
                  f"{r.plan.max_new_tokens} tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
