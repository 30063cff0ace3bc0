"""``creative-sparse generate``: Creative-Sparse generation of one prompt or chat."""

from __future__ import annotations

import math
import sys


def _constraints(args) -> dict | None:
    """The constraints spec of ``generate``'s flags (None without any)."""
    spec = {"banned": args.ban, "required": args.require, "regex": args.regex,
            "json_schema": args.json_schema, "grammar": args.grammar}
    spec = {k: v for k, v in spec.items() if v}
    return spec or None


def _write_csv(header: list[str], rows) -> None:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


def _safety(args):
    """The checker of ``--no-safety`` / ``--block-list``: None, the default, or the default
    plus the file's words (:meth:`WordListChecker.from_file`)."""
    if args.no_safety:
        return None
    if args.block_list is None:
        return "default"
    from ..safety import CompositeChecker, WordListChecker, resolve_checker

    words = WordListChecker.from_file(args.block_list)
    base = resolve_checker("default")
    return words if base is None else CompositeChecker([base, words])


def run_generate(args) -> None:
    """``creative-sparse generate``: the winner first, then the other candidates."""
    import json

    from tqdm import tqdm

    from ..generation import CreativeSparseWrapper

    quiet = args.quiet or args.json or args.csv
    if not quiet:
        print(f"loading {args.model} on {args.device} ...", file=sys.stderr)
    wrapper = CreativeSparseWrapper(args.model, sparsity_schedule=args.schedule,
                                    device=args.device, safety=_safety(args),
                                    allow_high_sparsity=args.allow_high_sparsity)
    # One tick per decoding step (diverge, then refine): at most --max-tokens of them,
    # so tqdm's rate and ETA are real; rows that all end early finish the bar sooner.
    with tqdm(total=args.max_tokens, desc="diverge -> refine", unit="tok", disable=quiet,
              file=sys.stderr) as bar:
        result = wrapper.generate_candidates(args.prompt, max_length=args.max_tokens,
                                             num_candidates=args.candidates,
                                             sparsity_level=args.sparsity, seed=args.seed,
                                             constraints=_constraints(args),
                                             progress=bar.update)
    if args.csv:
        fields = ["novelty", "diversity", "incoherence", "relevance", "violations", "q"]
        _write_csv(["rank", "text", "draft"] + fields,
                   [[i, c.text, c.draft] + [getattr(c.quality, f) for f in fields]
                    for i, c in enumerate(result.candidates, 1)])
        return
    if args.json:
        print(json.dumps({
            "prompt": args.prompt, "schedule": wrapper.sparsity_schedule,
            "reference": result.reference, "drafts": result.drafts,
            "candidates": [{"text": c.text, "draft": c.draft,
                            **{k: v if math.isfinite(v) else None   # JSON has no inf
                               for k, v in vars(c.quality).items()},
                            "safety": c.safety.to_dict() if c.safety else None}
                           for c in result.candidates],
            "safety": [r.to_dict() for r in result.safety], "withheld": result.withheld,
            "flagged_drafts": result.flagged_drafts,
            "wall_time": result.wall_time}, indent=2))
        return
    if not result.candidates:
        reason = result.withheld or "every candidate was flagged and could not be repaired"
        print(f"\nNo output: {reason}.", file=sys.stderr)
        return
    best, others = result.candidates[0], result.candidates[1:]

    def scores(c):
        q = c.quality
        return (f"Q={q.q:+.3f}  novelty {q.novelty:.2f}  diversity {q.diversity:.2f}  "
                f"incoherence {q.incoherence:.2f}  relevance {q.relevance:.2f}  "
                f"violations {q.violations:g}")

    print(f"\nBest ({scores(best)}):\n{best.text}\n")
    for i, cand in enumerate(others, 2):
        print(f"#{i} ({scores(cand)}):\n{cand.text}\n")
    print(f"{len(result.drafts)} drafts, {len(result.candidates)} chosen and refined, "
          f"{result.wall_time:.1f} s")
    if result.safety:
        actions = [r.action for r in result.safety]
        print(f"safety ({wrapper.safety.name}): {result.flagged_drafts} of "
              f"{len(result.draft_flags)} drafts flagged; candidates "
              + ", ".join(f"{actions.count(a)} {a}" for a in dict.fromkeys(actions)))
