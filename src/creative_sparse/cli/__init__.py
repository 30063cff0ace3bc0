"""The ``creative-sparse`` command.

Subcommands:

* ``demo``: the main job of ``make demo``: sparse attention against dense SDPA
  on inputs with positional structure (accuracy and speed), then Creative-Sparse
  generation beside plain top-p sampling of as many candidates on three prompts,
  with Q breakdowns and the cost of each.
* ``generate``: Creative-Sparse generation (diverge -> refine) of one prompt, or of
  a chat (``--system TEXT``, ``--chat FILE.json``), with constraints (``--ban``,
  ``--require``, ``--regex``, ``--json-schema``, ``--grammar``) and a per-token progress
  bar (rate and ETA) on stderr unless ``--quiet``.
* ``backends``: which attention backends can run here.
* ``tune``: the sparsity s* that maximises Q on a task (``find_optimal_sparsity``):
  the table of Q(s), the Goldilocks fit, its bounds and, with ``--plot``, a plot
  (matplotlib is imported only then).
* ``human serve|invite|report|export|import``: paired comparisons by people
  (:mod:`creative_sparse.human`); ``report --human`` fills the evaluation report's
  human column from their votes.

``--help`` shows every default; ``--device`` (cpu, cuda, cuda:N, mps, auto) picks where
the model runs; ``--json`` or ``--csv`` print machine-readable results on stdout.

Every argument is checked before a model is loaded or a sweep runs: sizes against
the documented maxima below, seeds against torch's seed range, the prompt for valid
Unicode, the plot's directory for existence and write access (it is not created).
Any error, then or later, exits with status 2 and one line ``error: ...`` after the
usage, as argparse does; a sweep in which every point failed exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .args import (DEMO_MAX_ELEMENTS, DEMO_MAX_HEAD_DIM, DEMO_MAX_HEADS, DEMO_MAX_LENGTH,
                   MAX_CANDIDATES, MAX_NEW_TOKENS, SEED_RANGE, _chat_prompt, _DefaultsHelp,
                   _device, _integer, _json_schema_file, _level, _one_line, _plot_path,
                   _prompt, _regex, _schedule, _settings, _text_file)
from .evaluate import run_evaluate, run_report
from .generate import run_generate
from .human import _human_parser, run_human
from .tune import run_tune
from .demo import DEMO_PROMPTS, run_creative_demo, run_demo, structured_qkv  # noqa: F401

__all__ = ["main", "structured_qkv"]


def main(argv: list[str] | None = None) -> int:
    fmt = _DefaultsHelp                                # every --help shows the defaults
    parser = argparse.ArgumentParser(prog="creative-sparse", description=__doc__.splitlines()[0],
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sparse attention vs dense: accuracy and speed",
                          formatter_class=fmt)
    demo.add_argument("--length", type=_integer(1, DEMO_MAX_LENGTH), default=4096,
                      help=f"sequence length, at most {DEMO_MAX_LENGTH}")
    demo.add_argument("--heads", type=_integer(1, DEMO_MAX_HEADS), default=9,
                      help=f"at most {DEMO_MAX_HEADS}")
    demo.add_argument("--head-dim", type=_integer(2, DEMO_MAX_HEAD_DIM), default=64,
                      help=f"at most {DEMO_MAX_HEAD_DIM}; heads x length x head-dim at most "
                           f"{DEMO_MAX_ELEMENTS} (2**26)")
    demo.add_argument("--no-model", action="store_true",
                      help="skip the SmolLM2 part (attention kernels only)")
    sub.add_parser("backends", help="list the attention backends available here",
                   formatter_class=fmt)
    device_help = "cpu, cuda, cuda:N, mps or auto (cuda when there is one)"
    gen = sub.add_parser("generate", help="Creative-Sparse generation: diverge -> refine",
                         formatter_class=fmt)
    gen.add_argument("prompt", type=_prompt, nargs="?", default=None,
                     help="the request (the chat template is applied; the last user turn "
                          "after --chat's messages)")
    gen.add_argument("--system", type=_prompt, default=None,
                     help="a system prompt, sent before the conversation")
    gen.add_argument("--chat", type=Path, default=None, metavar="FILE.json",
                     help="chat messages: a JSON list of {\"role\": \"system\" | \"user\" | "
                          "\"assistant\", \"content\": \"...\"} ending with a user turn "
                          "(or followed by PROMPT)")
    gen.add_argument("--candidates", type=_integer(1, MAX_CANDIDATES), default=5,
                     help="candidates returned (the diverge stage drafts candidates / "
                     f"keep_fraction of them and keeps this many, chosen as a set); at most "
                     f"{MAX_CANDIDATES}")
    gen.add_argument("--sparsity", type=_level, default=None,
                     help="divergence level s (overrides the schedule's first number)")
    gen.add_argument("--schedule", type=_schedule, default=(0.3, 0.3),
                     help="diverge,refine levels, e.g. 0.7,0.3 (default 0.3,0.3: the best "
                          "measured setting; higher diverge levels add diversity and may "
                          "drift off the prompt)")
    gen.add_argument("--max-tokens", type=_integer(1, MAX_NEW_TOKENS), default=120,
                     help=f"new tokens per candidate, at most {MAX_NEW_TOKENS} and the model's "
                          "context")
    gen.add_argument("--seed", type=_integer(*SEED_RANGE), default=0,
                     help="any integer torch accepts as a seed: [-2**63, 2**64 - 1]")
    gen.add_argument("--model", default="smollm2-135m", help="model name, HF id or local path")
    gen.add_argument("--device", type=_device, default="cpu", help=device_help)
    gen.add_argument("--allow-high-sparsity", action="store_true",
                     help="opt in to returned text above the safety gate (refine level > "
                          "0.8, or diverge level > 0.8 with --no-safety)")
    gen.add_argument("--no-safety", action="store_true",
                     help="no content checks on the candidates (default: alt-profanity-check)")
    gen.add_argument("--block-list", default=None, metavar="FILE",
                     help="also flag these words (one per line; re:PATTERN for a regex)")
    cons = gen.add_argument_group("constraints (enforced while decoding, counted as violations)")
    cons.add_argument("--ban", action="append", default=[], metavar="PHRASE",
                      help="a phrase that must not appear (any case); repeatable")
    cons.add_argument("--require", action="append", default=[], metavar="WORD",
                      help="a keyword that must appear; repeatable")
    cons.add_argument("--regex", type=_regex, default=None,
                      help="the whole answer must match (a token mask: guaranteed for rows "
                           "that end before the length budget)")
    cons.add_argument("--json-schema", type=_json_schema_file, default=None, metavar="FILE",
                      help="the answer must be JSON valid against this schema (token mask)")
    cons.add_argument("--grammar", type=_text_file, default=None, metavar="FILE",
                      help="the answer must follow this Lark grammar (llguidance's dialect; "
                           "token mask)")
    out = gen.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="machine-readable output")
    out.add_argument("--csv", action="store_true", help="the candidates as CSV on stdout")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    from ..evaluation.runner import METHODS
    from ..tasks import list_tasks
    tune = sub.add_parser("tune", help="find the sparsity s* that maximises Q on a task",
                          formatter_class=fmt)
    tune.add_argument("--task", required=True, choices=list_tasks(), metavar="TASK",
                      help=f"one of {', '.join(list_tasks())}")
    tune.add_argument("--budget", type=float, default=1.0,
                      help="fraction of the reference cost (8 prompts x 6 samples x 7 levels x "
                           "64 tokens)")
    tune.add_argument("--plot", type=_plot_path, default=None, nargs="?", const=True,
                      metavar="PNG",
                      help="write a plot (needs matplotlib) to PNG, in an existing, writable "
                           "directory; --plot alone: tune_<task>.png. No plot without it")
    tune.add_argument("--held-out", action="store_true",
                      help="also measure the held-back prompts at the tuning levels and s*")
    tune.add_argument("--model", default="smollm2-135m", help="model name, HF id or local path")
    tune.add_argument("--device", type=_device, default="cpu", help=device_help)
    tune.add_argument("--seed", type=_integer(*SEED_RANGE), default=0,
                      help="any integer torch accepts as a seed: [-2**63, 2**64 - 1]")
    tune.add_argument("--no-cache", action="store_true",
                      help="measure again and replace the cached answer")
    tune_out = tune.add_mutually_exclusive_group()
    tune_out.add_argument("--json", action="store_true", help="machine-readable output")
    tune_out.add_argument("--csv", action="store_true", help="the table as CSV on stdout")
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    tune.add_argument("--flagged", action="store_true",
                      help="also record the safety checker's flagged rate per level (table "
                           "and plot; needs creative-sparse[safety])")
    ev = sub.add_parser(
        "evaluate", help="compare methods as frontiers on held-back prompts (JSONL results)",
        formatter_class=fmt)
    ev.add_argument("--tasks", nargs="+", choices=list_tasks(), default=list(list_tasks()),
                    metavar="TASK", help=f"tasks: {', '.join(list_tasks())}")
    ev.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                    metavar="METHOD", help=f"methods: {', '.join(METHODS)}")
    ev.add_argument("--seeds", nargs="+", type=_integer(0, 2**31 - 1), default=[0, 1, 2],
                    help="base seeds, each a full repetition")
    ev.add_argument("--prompts", type=_integer(1, 10_000), default=None,
                    help="first N prompts of each task (default: all of the split)")
    ev.add_argument("--outputs", type=_integer(2, MAX_CANDIDATES), default=5,
                    help="outputs per unit (every method returns this many)")
    ev.add_argument("--setting", action="append", default=[], metavar="METHOD=V1,V2,...",
                    help="knob values to sweep for a method instead of its defaults "
                         "(temperature for top_p/min_p, level for the others); repeatable")
    ev.add_argument("--split", default="evaluation", choices=("evaluation", "held_out", "tune"),
                    help="which prompts")
    ev.add_argument("--max-tokens", type=_integer(1, MAX_NEW_TOKENS), default=None,
                    help="one length budget for every task (default: each task's own)")
    ev.add_argument("--out", default="results.jsonl",
                    help="results file; an existing one of the same run is resumed")
    ev.add_argument("--model", default="smollm2-135m", help="model name, HF id or local path")
    ev.add_argument("--device", type=_device, default="cpu", help=device_help)
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--compute", choices=("outputs", "flops"), default="outputs",
                    help="outputs: equal output count (Creative-Sparse drafts 2x and picks); "
                         "flops: also equal decoded tokens (Creative-Sparse drafts exactly as "
                         "many as it returns and uses the run's greedy reference)")
    ev.add_argument("--constrain", action="store_true",
                    help="every method decodes under each task's validators (code: Python "
                         "syntax, music: ABC), enforced token by token; tasks without "
                         "validators are unaffected")
    ev.add_argument("--no-safety", action="store_true",
                    help="no flagged-rate monitoring and no screening of Creative-Sparse")
    rep = sub.add_parser("report", help="tables (Markdown, CSV) and frontier plots of results",
                         formatter_class=fmt)
    rep.add_argument("results", nargs="+",
                     help="results file(s) written by `creative-sparse evaluate`; several "
                          "(runs of other tasks, methods or seeds under the same protocol) "
                          "make one report")
    rep.add_argument("--out-dir", default="report", help="where report.md, report.csv and "
                     "the frontier PNGs go (created if missing)")
    rep.add_argument("--no-plots", action="store_true", help="tables only")
    rep.add_argument("--human", default=None, metavar="JUDGEMENTS",
                     help="fill the human column (win rate in paired votes) from a "
                          "judgements export (.jsonl) or database of `creative-sparse human`")
    _human_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        try:
            args.settings = _settings(args.setting)
        except ValueError as exc:
            parser.error(f"argument --setting: {exc}")

    if args.command == "demo" and args.heads * args.length * args.head_dim > DEMO_MAX_ELEMENTS:
        parser.error(f"--heads x --length x --head-dim = {args.heads} x {args.length} x "
                     f"{args.head_dim} = {args.heads * args.length * args.head_dim} is more than "
                     f"{DEMO_MAX_ELEMENTS} (2**26) elements per tensor")
    if args.command == "generate":
        try:
            args.prompt = _chat_prompt(args.prompt, args.system, args.chat)
        except ValueError as exc:
            parser.error(str(exc))
    if args.command == "tune" and args.plot is True:     # --plot without a path
        try:
            args.plot = _plot_path(f"tune_{args.task}.png")
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --plot: {exc}")
    if args.command == "generate":   # the gate, before a model loads
        from ..safety import DEFAULT_SAFETY_GATE, check_gate

        diverge, refine = args.schedule
        diverge = diverge if args.sparsity is None else args.sparsity
        try:
            check_gate(min(refine, diverge), DEFAULT_SAFETY_GATE, args.allow_high_sparsity,
                       "--schedule's refine level")
            if args.no_safety:
                check_gate(diverge, DEFAULT_SAFETY_GATE, args.allow_high_sparsity,
                           "the diverge level with --no-safety")
        except ValueError as exc:
            parser.error(str(exc).replace("allow_high_sparsity=True (CLI: --allow-high-sparsity)",
                                          "--allow-high-sparsity"))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from ..autotune import SweepFailedError

    try:
        if args.command == "demo":
            run_demo(args.length, args.heads, args.head_dim)
            if not args.no_model:
                run_creative_demo()
        elif args.command == "generate":
            run_generate(args)
        elif args.command == "tune":
            run_tune(args)
        elif args.command == "evaluate":
            run_evaluate(args)
        elif args.command == "report":
            run_report(args)
        elif args.command == "human":
            run_human(args)
        elif args.command == "backends":
            from ..attention.dispatch import available_backends, select_backend
            print("available on cpu:", ", ".join(available_backends("cpu")))
            print("default on cpu:", select_backend("cpu"))
            if torch.cuda.is_available():
                print("available on cuda:", ", ".join(available_backends("cuda")))
    except SweepFailedError as exc:
        parser.exit(1, f"creative-sparse tune: {_one_line(exc)}\n")
    except (ValueError, OSError, ImportError, MemoryError, RuntimeError) as exc:
        # A bad value found late (a model name, the model's context), a file that cannot
        # be written, a missing extra, no memory: one line, no traceback.
        parser.error(_one_line(exc))
    return 0
