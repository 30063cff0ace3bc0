"""Guaranteed constraints: violations before (rejection) and after (llguidance mask), and
what the mask costs per token against unconstrained decoding, in the same run.

For each case (a regex, a JSON schema, a small Lark context-free grammar) and each
of ``--seeds`` seeds, SmolLM2 answers one chat prompt in ``--rows`` sampled rows of
at most ``--max-tokens`` tokens, three ways with the same seeds:

* ``none``: unconstrained (the timing baseline, and how often the model obeys unasked);
* ``reject``: the rejection path: a prefix check after each sampled token, take back
  and resample (8 tries, then the best allowed of 1,024 candidates): for the regex
  the ``regex`` library's partial match, for the schema and grammar llguidance's
  own parser used as a prefix check (``grammar_validator(...).rejects_prefix``);
* ``mask``: llguidance's token mask (``GrammarMask``), the default of
  ``build_constraints``.

Printed per case and mode: rows violating / rows, rows cut by the length budget,
ms per generated token, the ratio to ``none``, and for ``mask`` the time spent in
the mask itself per row and step. Before anything is timed, each mode's first
rows are checked: every ``mask`` row that ended (EOS) must be a full match.

Usage::

    python benchmarks/constraints.py [--seeds 8] [--rows 4] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from creative_sparse.generation.constraints import ConstraintSet, ValidatorGuard
from creative_sparse.generation.engine import generate
from creative_sparse.generation.grammar import GrammarMask, grammar_source, grammar_validator
from creative_sparse.generation.knobs import SamplingParams
from creative_sparse.generation.wrapper import build_constraints
from creative_sparse.models import load_model
from creative_sparse.models.transformers import AttentionKnobs

CASES = {
    "regex": ("Is the sea blue? Answer yes or no, then say why in a few words.",
              {"regex": r"(Yes|No), because [a-z ,]{10,80}\."}),
    "json_schema": ("Describe a cat as JSON with its name and age.",
                    {"json_schema": {"type": "object",
                                     "properties": {"name": {"type": "string", "maxLength": 20},
                                                    "age": {"type": "integer", "minimum": 0,
                                                            "maximum": 30}},
                                     "required": ["name", "age"],
                                     "additionalProperties": False}}),
    "lark_cfg": ("Write a short arithmetic sum with brackets, like (1 + 2) * 3.",
                 {"grammar": 'start: expr\nexpr: term ((" + " | " - ") term)*\n'
                             'term: factor ((" * ") factor)*\n'
                             'factor: NUMBER | "(" expr ")"\nNUMBER: /[0-9]{1,3}/\n'}),
}


class Timed:
    """Wraps a logit processor and adds up the time spent in it."""

    def __init__(self, inner):
        self.inner, self.seconds, self.row_steps = inner, 0.0, 0

    def __call__(self, step, generated, logits):
        start = time.perf_counter()
        out = self.inner(step, generated, logits)
        self.seconds += time.perf_counter() - start
        self.row_steps += len(generated)
        return out


def constraints_for(tokenizer, spec, mode, budget, eos):
    """``(logit processor or None, validator, mask timer or None)`` of one mode."""
    kind, value = next(iter(spec.items()))
    if kind == "regex":
        validator = build_constraints(tokenizer, dict(spec, enforce="reject"), budget,
                                      eos).validators[0]
    else:
        source = grammar_source(**{"json_schema" if kind == "json_schema" else "lark": value})
        validator = grammar_validator(tokenizer, source, kind)
    if mode == "none":
        return None, validator, None
    if mode == "reject":
        return ConstraintSet([ValidatorGuard(tokenizer, [validator], eos, budget)],
                             [validator]), validator, None
    masks = [p for p in build_constraints(tokenizer, spec, budget, eos).processors
             if isinstance(p, GrammarMask)]
    timer = Timed(masks[0])
    return timer, validator, timer


def run(model, tokenizer, case, seeds, rows, max_tokens):
    prompt, spec = CASES[case]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    eos = [tokenizer.eos_token_id]
    schedule = (SamplingParams(temperature=1.0, top_p=0.95), AttentionKnobs())
    out = {}
    for mode in ("none", "reject", "mask"):
        violations = cut = tokens = 0
        seconds = 0.0
        timer = None
        for seed in range(seeds):
            processor, validator, timer_now = constraints_for(tokenizer, spec, mode, max_tokens,
                                                              eos)
            start = time.perf_counter()
            result = generate(model, tokenizer, ids, num_rows=rows, max_new_tokens=max_tokens,
                              schedule=schedule, seeds=[seed * 100 + r for r in range(rows)],
                              logit_processor=processor)
            seconds += time.perf_counter() - start
            tokens += result.stats.generated_tokens
            bad = [validator(t) for t in result.texts]
            violations += sum(bad)
            cut += result.finish_reasons.count("length")
            if mode == "mask":
                ended_bad = [t for t, b, r in zip(result.texts, bad, result.finish_reasons)
                             if b and r == "eos"]
                if ended_bad:   # the verification: a masked row that ended must match
                    sys.exit(f"{case}: a masked row ended outside the language: {ended_bad[0]!r}")
                if timer is None:
                    timer = timer_now
                else:
                    timer.seconds += timer_now.seconds
                    timer.row_steps += timer_now.row_steps
        out[mode] = dict(violations=violations, rows=seeds * rows, cut=cut,
                         ms_per_token=1e3 * seconds / max(tokens, 1),
                         mask_ms=1e3 * timer.seconds / max(timer.row_steps, 1) if timer else None)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    model, tokenizer = load_model()
    print(f"SmolLM2-135M-Instruct, {args.seeds} seeds x {args.rows} rows x <= {args.max_tokens} "
          f"tokens, {torch.get_num_threads()} threads")
    print(f"{'case':<12} {'mode':<7} {'violating':>10} {'cut':>5} {'ms/token':>9} "
          f"{'vs none':>8} {'mask ms/row-step':>17}")
    for case in args.cases:
        result = run(model, tokenizer, case, args.seeds, args.rows, args.max_tokens)
        base = result["none"]["ms_per_token"]
        for mode, r in result.items():
            mask = f"{r['mask_ms']:.3f}" if r["mask_ms"] is not None else ""
            print(f"{case:<12} {mode:<7} {r['violations']:>4}/{r['rows']:<5} {r['cut']:>5} "
                  f"{r['ms_per_token']:>9.2f} {r['ms_per_token'] / base:>7.2f}x {mask:>17}")
    print("violating: rows whose finished text is not a full match; cut: rows that hit the "
          "length budget (a mask cannot finish a match it has no tokens left for).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
