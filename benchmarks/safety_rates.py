"""How often does the safety checker flag diverge drafts, refine outputs and what is returned,
per sparsity level? (Issue 23.)

On the evaluation prompts of every task (the first ``--task-prompts`` of each) and the
team's provocative prompts (``benchmarks/safety_prompts.json``), Creative-Sparse runs
at each ``--levels`` value (diverge at s, refine at min(s, 0.3)) with the default
checker (alt-profanity-check) screening refine. Per level and prompt set it counts:

* drafts: diverge drafts flagged (generated at s, before any check);
* refined: refined candidates flagged by the first check (draft + refine, before repair);
* returned: returned candidates the checker flags when run again (should be 0);
* repaired / dropped: what the screen did.

Rates carry a 95% Wilson interval: with a few dozen drafts per level, a difference of
a few points is noise. Results go to ``benchmarks/results/safety_rates.json``.

Usage (about 10 minutes on 1 CPU thread with the defaults):

    OMP_NUM_THREADS=1 python benchmarks/safety_rates.py
    python benchmarks/safety_rates.py --levels 0.2 0.95 --task-prompts 1 --provocative 4
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from creative_sparse.tasks import list_tasks, load_task
from creative_sparse.generation.wrapper import CreativeSparseWrapper
from creative_sparse.models import load_model
from creative_sparse.safety import ProfanityCheck, run_checks

HERE = Path(__file__).parent


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k / n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k:3d}/{n:<3d} {k / n if n else math.nan:6.1%} [{lo:5.1%}, {hi:5.1%}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", type=float, nargs="+", default=[0.2, 0.5, 0.8, 0.95])
    ap.add_argument("--task-prompts", type=int, default=2,
                    help="evaluation prompts per task (5 tasks)")
    ap.add_argument("--provocative", type=int, default=20, help="provocative prompts (<= 20)")
    ap.add_argument("--candidates", type=int, default=2, help="returned per prompt "
                    "(drafts: twice as many)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "safety_rates.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    sets = {"evaluation": [p for t in list_tasks()
                           for p in load_task(t).prompts("evaluation")[:args.task_prompts]],
            "provocative": json.loads((HERE / "safety_prompts.json").read_text(
                encoding="utf-8"))["prompts"][:args.provocative]}
    model, tokenizer = load_model()
    checker = ProfanityCheck()
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer, safety=checker)
    start = time.perf_counter()
    table = []
    for s in args.levels:
        for name, prompts in sets.items():
            c = dict(level=s, prompts=name, drafts=0, drafts_flagged=0, refined=0,
                     refined_flagged=0, returned=0, returned_flagged=0, repaired=0, dropped=0,
                     withheld=0)
            for k, prompt in enumerate(prompts):
                r = wrapper.generate_candidates(prompt, max_length=args.max_tokens,
                                                num_candidates=args.candidates,
                                                sparsity_level=s, seed=args.seed * 1000 + k)
                actions = [x.action for x in r.safety]
                c["drafts"] += len(r.draft_flags)
                c["drafts_flagged"] += r.flagged_drafts
                c["refined"] += len(actions)
                c["refined_flagged"] += r.flagged_outputs
                c["repaired"] += actions.count("repaired")
                c["dropped"] += actions.count("dropped")
                c["withheld"] += actions.count("withheld")
                texts = [cand.text for cand in r.candidates]
                again = run_checks(checker, texts)
                c["returned"] += len(texts)
                c["returned_flagged"] += sum(bool(f) for f in again.flags) if again.ok else 0
            table.append(c)
            print(f"s={s:<5g} {name:<12} drafts {rate(c['drafts_flagged'], c['drafts'])}   "
                  f"refined {rate(c['refined_flagged'], c['refined'])}   returned "
                  f"{rate(c['returned_flagged'], c['returned'])}   repaired {c['repaired']}, "
                  f"dropped {c['dropped']}, withheld {c['withheld']}", flush=True)
    seconds = time.perf_counter() - start
    print(f"{seconds:.0f} s; checker {checker.name} (threshold {checker.threshold}); "
          f"{args.candidates} candidates from {2 * args.candidates} drafts of "
          f"{args.max_tokens} tokens per prompt")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "seconds": seconds, "rows": table},
                              indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
