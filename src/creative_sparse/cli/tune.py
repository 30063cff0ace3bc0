"""``creative-sparse tune``: the sparsity s* that maximises Q on a task."""

from __future__ import annotations

from .generate import _write_csv


def _no_nan(value):
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def run_tune(args) -> None:
    """``creative-sparse tune``: sweep Q(s) on a task, print the table, write the plot."""
    import json
    import warnings

    from ..autotune import OptimumNotIdentifiedWarning, sweep_sparsity

    common = dict(seed=args.seed, cache="refresh" if args.no_cache else True,
                  progress=not (args.json or args.csv or args.quiet),
                  safety="default" if args.flagged else None)
    if args.device != "cpu":     # the default path loads on the CPU by name
        from ..models import load_model

        common["model"], common["tokenizer"] = load_model(args.model, device=args.device)
    with warnings.catch_warnings():   # the table prints them
        warnings.simplefilter("ignore", OptimumNotIdentifiedWarning)
        result = sweep_sparsity(args.model, args.task, args.budget, **common)
        held = None
        if args.held_out:   # the tuned s* and the tuning levels, on prompts tuning never saw
            levels = sorted({row.s for row in result.table} | {round(result.s_star, 4)})
            held = sweep_sparsity(args.model, args.task, args.budget, split="held_out",
                                  levels=levels, **common)
    # matplotlib is imported only here, when a plot was asked for (--plot)
    plot = result.plot(args.plot) if args.plot is not None else None
    held_plot = (held.plot(plot.with_name(f"{plot.stem}_held_out{plot.suffix}"))
                 if held and plot is not None else None)
    if args.csv:
        _write_csv(["split", "s", "novelty", "diversity", "incoherence", "q", "q_low",
                    "q_high", "violations", "prompts_ok"],
                   [[r_split, r.s, r.novelty, r.diversity, r.incoherence, r.q, r.q_ci[0],
                     r.q_ci[1], r.violations, r.prompts_ok]
                    for r_split, res in (("tune", result), ("held_out", held)) if res
                    for r in res.table])
        return
    if args.json:
        print(json.dumps(_no_nan({"s_star": result.s_star, "tune": result.to_dict(),
                                  "held_out": held.to_dict() if held else None,
                                  "plot": str(plot) if plot else None,
                                  "held_out_plot": str(held_plot) if held_plot else None}),
                         indent=1))
        return
    print(result.format_table())
    if plot is not None:
        print(f"plot: {plot}")
    if held is not None:
        at = held.row(round(result.s_star, 4))
        dense = held.row(0.0)
        best = max(held.table, key=lambda r: r.q)
        print(f"\n{held.format_table()}" + (f"\nplot: {held_plot}" if held_plot else ""))
        print(f"held-out: Q at the tuned s* = {result.s_star:.3f}: {at.q:+.3f} "
              f"[{at.q_ci[0]:+.3f}, {at.q_ci[1]:+.3f}]; at s = 0: {dense.q:+.3f}; best level "
              f"s = {best.s:.3f}: {best.q:+.3f}; the held-out prompts' own s* = "
              f"{held.s_star:.3f} ({held.method})")
