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
* ``stratified``: the drafts are drawn as one stratified set (arithmetic sampling,
  ``CreativeSparse(stratify_drafts=True)``): each draft alone is the same draw as
  before, so its NLL and relevance should not move, but together they spread over the
  distribution instead of repeating its mode. Reason: diversity is a property of the
  set, and independent drafts spend draws on near-duplicates.
* ``minp``: both stages also truncate with min-p 0.1 (drop tokens below a tenth of the
  most probable one's probability) on top of the dial's nucleus. Reason: on the
  evaluation runs min-p was the most prompt-relevant sampler at a given NLL, and the
  drafts' relevance is what Creative-Sparse loses; min-p cuts the far tail only where
  the model is confident. Like ``attention_narrow`` an override, not a dial constant.
* ``minp_hot``: ``minp`` with a hotter dial (T0 = 1, kappa_T = 0.8: T = 1.49 at
  s = 0.9, 1.23 at the refine level 0.3), to win back with temperature the diversity
  that the min-p truncation takes away, as min-p's own frontier does.

``top_p T=1 stratified`` draws top-p's outputs as one stratified set over their whole
length, to tell what stratification does for any sampler from what it does inside
Creative-Sparse.

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
import zlib
from pathlib import Path

import numpy as np

VARIANTS = {
    "current": {},
    "nucleus_fixed": {"nucleus_adaptation": "constant"},
    "attention_dense": {"k0_frac": 1.0},
    "sampling_only": {"nucleus_adaptation": "constant", "k0_frac": 1.0},
    "attention_narrow": {},
    "stratified": {},
    "minp": {},
    "minp_hot": {"T0": 1.0, "kappa_T": 0.8},
}
ATTENTION_OVERRIDES = {"attention_narrow": {"local_window": 4}}
SAMPLING_OVERRIDES = {"minp": {"min_p": 0.1}, "minp_hot": {"min_p": 0.1}}
DEFAULT_VARIANTS = ["current", "nucleus_fixed", "attention_dense", "top_p T=1", "min_p T=1.5"]
BASELINES = {"top_p T=1": ("top_p", 1.0), "min_p T=1.5": ("min_p", 1.5),
             "top_p T=1 stratified": ("top_p", 1.0)}
STRATEGY_OVERRIDES = {"stratified": {"stratify_drafts": True}}
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


@contextlib.contextmanager
def _sampling_overrides(overrides: dict):
    """The dial's sampling knobs inside Creative-Sparse (both stages and the safety
    repairs) get ``overrides`` (``SamplingParams`` fields)."""
    from dataclasses import replace

    from creative_sparse.generation import creative

    original = creative.dial_knobs
    if not overrides:
        yield
        return

    def patched(*args, **kwargs):
        sampling, attention = original(*args, **kwargs)
        return replace(sampling, **overrides), attention
    creative.dial_knobs = patched
    try:
        yield
    finally:
        creative.dial_knobs = original


@contextlib.contextmanager
def _stratified_baseline(on: bool, steps: int):
    """Plain sampling's rows drawn as one stratified set for ``steps`` tokens."""
    from creative_sparse.generation import strategies

    original = strategies.generate
    if not on:
        yield
        return
    strategies.generate = lambda *a, **k: original(*a, **{"stratified_steps": steps, **k})
    try:
        yield
    finally:
        strategies.generate = original


def _summary(record: dict) -> dict[str, float]:
    outputs = record["outputs"]
    mean = lambda name: float(np.mean([o[name] for o in outputs]))   # noqa: E731
    return {"novelty": mean("novelty_raw"), "diversity": record["set"]["diversity"],
            "relevance": mean("relevance"), "nll": mean("nll"), "q": mean("q")}


def _interval(values: list[float], label: str) -> str:
    """Mean and 95% bootstrap interval; the draws are seeded by ``label`` (task, variant,
    metric), so a row's interval does not depend on which other rows are printed."""
    values = np.asarray(values)
    rng = np.random.default_rng(zlib.crc32(label.encode()))
    boots = rng.choice(values, (2000, len(values))).mean(axis=1)
    low, high = np.percentile(boots, [2.5, 97.5])
    return f"{values.mean():.3f} [{low:.3f}, {high:.3f}]"


def _paired(done: dict, task: str, args) -> str:
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
        cells = [_interval([other[i][m] - base[i][m] for i in shared],
                           f"{task}/{variant}-current/{m}") for m in METRICS]
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
                    allow_high_sparsity=True, quality=scorer.quality,
                    **STRATEGY_OVERRIDES.get(variant, {}))
            with _attention_overrides(ATTENTION_OVERRIDES.get(variant, {})), \
                    _sampling_overrides(SAMPLING_OVERRIDES.get(variant, {})), \
                    _stratified_baseline(variant.endswith("stratified") and variant in BASELINES,
                                         budgets[task]):
                record = scorer.run(Unit(task, index, prompt, method, setting, args.seed),
                                    reference)
            record.update(key=key, variant=variant, level=args.level)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            done[key] = record

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
            cells = [_interval([row[m] for row in rows], f"{task}/{variant}/{m}")
                     for m in METRICS]
            ratio = (np.mean([r["cost"]["flops"] for r in records]) / np.mean(flops_ref)
                     if flops_ref else float("nan"))
            print(f"| {variant} | " + " | ".join(cells) + f" | {100 * ratio:.0f} |")
        print()
        print(_paired(done, task, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
