"""Which knob of Creative-Sparse's diverge stage buys diversity, and which costs relevance?

An ablation on the *tune* split (never on the evaluation prompts), scored exactly as
``creative-sparse evaluate --compute flops`` scores a unit (the runner's scorer: same Q,
embedder, dense-model NLL and greedy reference; as many drafts as outputs, every one
refined). Each variant changes one constant of the dial (``SparsityConfig``) for the
whole method at one diverge level:

* ``current``: the shipped defaults.
* ``nucleus_fixed``: top-p stays at p0 = 0.9 at every level (default: p rises to 0.985
  at s = 0.9), so the drafts do not sample the distribution's far tail.
* ``attention_dense``: the attention keeps every key at every level (``k0_frac = 1``;
  no sub-network either: the noise only reorders keys that are pruned), so the level
  moves only the sampling knobs.
* ``sampling_only``: both of the above: the level moves only the temperature.
* ``attention_narrow``: the attention's always-kept recent window shrinks from 32
  tokens to 4, so that key selection (and the sub-network noise) reaches the text just
  written, not only the prompt. The window is not a constant of the dial, so this
  variant overrides it where the dial's attention knobs are built (an experiment, not
  a setting users have).

Dense top-p (T = 1) and min-p (T = 1.5, the best of its frontier on the evaluation
run) are scored on the same prompts for scale. Records go to a JSONL file (resumed
when rerun); the summary gives means over prompts with 95% bootstrap intervals.

Usage::

    python scripts/diverge_ablation.py --out ablation.jsonl [--prompts 8] [--level 0.9]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

VARIANTS = {
    "current": {},
    "nucleus_fixed": {"nucleus_adaptation": "constant"},
    "attention_dense": {"k0_frac": 1.0},
    "sampling_only": {"nucleus_adaptation": "constant", "k0_frac": 1.0},
    "attention_narrow": {},
}
ATTENTION_OVERRIDES = {"attention_narrow": {"local_window": 4}}
DEFAULT_VARIANTS = ["current", "nucleus_fixed", "attention_dense", "top_p T=1", "min_p T=1.5"]
BASELINES = {"top_p T=1": ("top_p", 1.0), "min_p T=1.5": ("min_p", 1.5)}
TASKS = ("creative_writing", "poetry", "ad_copy")
METRICS = ("novelty", "diversity", "relevance", "nll", "q")


def _load(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record["key"]] = record
    return done


@contextlib.contextmanager
def _attention_overrides(overrides: dict):
    """Every ``AttentionKnobs.from_params`` call inside gets ``overrides`` (the dial's
    attention knobs are built there, for both stages)."""
    from creative_sparse.models.attention_knobs import AttentionKnobs

    original = AttentionKnobs.__dict__["from_params"]
    if not overrides:
        yield
        return

    def patched(cls, params, **kwargs):
        return original.__func__(cls, params, **{**overrides, **kwargs})
    AttentionKnobs.from_params = classmethod(patched)
    try:
        yield
    finally:
        AttentionKnobs.from_params = original


def _summary(record: dict) -> dict[str, float]:
    outputs = record["outputs"]
    mean = lambda name: float(np.mean([o[name] for o in outputs]))   # noqa: E731
    return {"novelty": mean("novelty_raw"), "diversity": record["set"]["diversity"],
            "relevance": mean("relevance"), "nll": mean("nll"), "q": mean("q")}


def _interval(values: list[float], rng: np.random.Generator) -> str:
    values = np.asarray(values)
    boots = rng.choice(values, (2000, len(values))).mean(axis=1)
    low, high = np.percentile(boots, [2.5, 97.5])
    return f"{values.mean():.3f} [{low:.3f}, {high:.3f}]"


def _paired(done: dict, task: str, args, rng: np.random.Generator) -> str:
    """Each variant minus ``current`` on the same prompts (paired differences: the
    prompt-to-prompt spread cancels), mean and 95% bootstrap interval."""
    def per_prompt(variant):
        return {r["prompt_index"]: _summary(r) for r in done.values()
                if r["task"] == task and r["variant"] == variant
                and (variant in BASELINES or r["level"] == args.level)}
    base = per_prompt("current")
    lines = ["| variant minus current | " + " | ".join(METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    for variant in args.variants:
        other = per_prompt(variant)
        shared = sorted(set(base) & set(other))
        if variant == "current" or not shared:
            continue
        cells = [_interval([other[i][m] - base[i][m] for i in shared], rng) for m in METRICS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSONL file of unit records (resumed)")
    parser.add_argument("--prompts", type=int, default=8, help="tune prompts per task")
    parser.add_argument("--level", type=float, default=0.9, help="the diverge level s")
    parser.add_argument("--outputs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        choices=list(VARIANTS) + list(BASELINES))
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    from creative_sparse.config import SparsityConfig
    from creative_sparse.evaluation.runner import Unit, _Scorer
    from creative_sparse.generation import strategies
    from creative_sparse.models import load_model
    from creative_sparse.tasks import load_task

    out = Path(args.out)
    done = _load(out)
    model, tokenizer = load_model()
    budgets = {t: load_task(t).max_new_tokens for t in TASKS}
    scorer = _Scorer(model, tokenizer, args.outputs, budgets, {}, compute="flops", safety=None)
    plans = [(task, i, prompt, variant) for task in TASKS
             for i, prompt in enumerate(load_task(task).prompts("tune")[:args.prompts])
             for variant in args.variants]
    with out.open("a") as sink:
        for task, index, prompt, variant in tqdm(plans, desc="ablation", unit="unit"):
            key = f"{task}/{index}/{variant}/s{args.level:g}/seed{args.seed}"
            if key in done:
                continue
            reference, _ = scorer.reference(task, index, prompt)
            if variant in BASELINES:
                method, setting = BASELINES[variant]
            else:
                method, setting = "creative_sparse", args.level
                scorer._cs = strategies.CreativeSparse(
                    config=SparsityConfig(**VARIANTS[variant]), safety=None,
                    allow_high_sparsity=True, quality=scorer.quality)
            with _attention_overrides(ATTENTION_OVERRIDES.get(variant, {})):
                record = scorer.run(Unit(task, index, prompt, method, setting, args.seed),
                                    reference)
            record.update(key=key, variant=variant, level=args.level)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done[key] = record

    rng = np.random.default_rng(0)
    print(f"\nDiverge level s = {args.level:g}; tune split, {args.prompts} prompts per task, "
          f"seed {args.seed}; mean over prompts [95% bootstrap interval]\n")
    for task in TASKS:
        print(f"### {task}\n")
        print("| variant | " + " | ".join(METRICS) + " | FLOPs/top-p |")
        print("|---" * (len(METRICS) + 2) + "|")
        flops_ref = [r["cost"]["flops"] for r in done.values()
                     if r["task"] == task and r["variant"] == "top_p T=1"]
        for variant in args.variants:
            records = [r for r in done.values() if r["task"] == task and r["variant"] == variant
                       and (variant in BASELINES or r["level"] == args.level)]
            if not records:
                continue
            rows = [_summary(r) for r in records]
            cells = [_interval([row[m] for row in rows], rng) for m in METRICS]
            ratio = (np.mean([r["cost"]["flops"] for r in records]) / np.mean(flops_ref)
                     if flops_ref else float("nan"))
            print(f"| {variant} | " + " | ".join(cells) + f" | {100 * ratio:.0f} |")
        print()
        print(_paired(done, task, args, rng))
    return 0


if __name__ == "__main__":
    sys.exit(main())
