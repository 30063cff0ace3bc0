"""``creative-sparse evaluate`` and ``report``: the evaluation protocol's runner and tables."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def run_evaluate(args) -> None:
    from ..evaluation.runner import evaluate, plan_units
    from ..models import load_model

    units = plan_units(args.tasks, args.methods, args.seeds, split=args.split,
                       prompts=args.prompts, settings=args.settings)   # checked before loading
    print(f"{len(units)} units ({len(args.tasks)} tasks x prompts x methods x settings x "
          f"{len(args.seeds)} seeds) -> {args.out}", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device)
    start = time.perf_counter()
    path = evaluate(model, tokenizer, tasks=args.tasks, methods=args.methods, seeds=args.seeds,
                    out=args.out, split=args.split, prompts=args.prompts,
                    num_outputs=args.outputs, settings=args.settings,
                    max_new_tokens=args.max_tokens, model_name=args.model,
                    progress=not args.quiet, compute=args.compute, constrain=args.constrain,
                    safety=None if args.no_safety else "default")
    print(f"results: {path} ({time.perf_counter() - start:.0f} s); tables and plots: "
          f"creative-sparse report {path}", file=sys.stderr)


def _write_report(results_paths, out_dir, *, no_plots: bool = False,
                  human: dict | None = None) -> list[Path]:
    """report.md, report.csv (and plots) of one or more results files (read as one run,
    :func:`~creative_sparse.evaluation.records.combine_results`); ``human`` fills that
    column."""
    from ..evaluation.frontier import format_gaps, frontier_gaps, write_gaps_csv
    from ..evaluation.records import combine_results
    from ..evaluation.tables import (aggregate, format_markdown, plot_frontiers,
                                     runtime_summary, write_csv)

    paths = [results_paths] if isinstance(results_paths, (str, Path)) else list(results_paths)
    results = combine_results(paths)
    records = results.records()
    rows = aggregate(records, human=human)
    gaps = frontier_gaps(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = results.header
    title = (f"Evaluation of {h.get('model') or 'the model'} on the {h.get('split')} split "
             f"({len(results.units)} units, {h.get('num_outputs')} outputs each"
             + (", equal FLOPs" if h.get("compute") == "flops" else "")
             + (", every method decoded under the task's validators" if h.get("constrained")
                else "") + ")")
    if human:
        title += "; human: win rate in paired votes (ties count 1/2)"
    notes = [runtime_summary(results.units.values())]
    if len(paths) > 1:
        notes.append(f"From {len(paths)} results files: "
                     + ", ".join(f"`{Path(p).name}`" for p in paths)
                     + f" (library version {h.get('library_version')}).")
    sections = {task: format_gaps(gaps, task) for task in {r.task for r in rows}}
    (out / "report.md").write_text(format_markdown(rows, title=title, notes=notes,
                                                   sections=sections) + "\n", encoding="utf-8")
    write_csv(rows, out / "report.csv")
    written = [out / "report.md", out / "report.csv"]
    if gaps:
        written.append(write_gaps_csv(gaps, out / "frontier_gaps.csv"))
    if not no_plots:
        written += plot_frontiers(rows, out)
    if results.skipped:
        print(f"skipped {len(results.skipped)} corrupt line(s): {results.skipped[:10]}",
              file=sys.stderr)
    return written


def run_report(args) -> None:
    human = None
    if args.human:
        from ..human.aggregate import human_column, summarise
        human = human_column(summarise(_human_votes(args.human), bootstrap=1))
    print("\n".join(map(str, _write_report(args.results, args.out_dir, no_plots=args.no_plots,
                                            human=human))))


def _human_votes(source: str) -> list[dict]:
    """Votes from a judgements export (``.jsonl``) or a judgement database."""
    if Path(source).suffix in (".jsonl", ".json"):
        from ..human.store import read_judgements
        return read_judgements(source)
    if "://" not in source and not Path(source).is_file():
        raise ValueError(f"{source}: no such judgements export (.jsonl) or database")
    return _store(source).judgements()


def _store(db: str):
    try:
        from ..human.store import open_store
    except ImportError as exc:
        raise ImportError(f"the human evaluation needs the 'human' extra ({exc.name} is "
                          "missing): pip install 'creative-sparse[human]'") from exc
    return open_store(db)
