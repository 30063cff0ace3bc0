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
import importlib.util
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["main", "structured_qkv"]

# Documented maxima, checked before anything is loaded. The demo's inputs: q, k, v
# and two outputs of at most DEMO_MAX_ELEMENTS float32 each stay near 1.3 GB.
DEMO_MAX_LENGTH = 32768
DEMO_MAX_HEADS = 64
DEMO_MAX_HEAD_DIM = 256
DEMO_MAX_ELEMENTS = 2**26          # heads x length x head_dim
MAX_NEW_TOKENS = 32768             # also bounded by the model's context, once it is loaded
MAX_CANDIDATES = 64                # 2 x as many drafts share one batch
SEED_RANGE = (-(2**63), 2**64 - 1)     # what torch.manual_seed accepts


def structured_qkv(batch: int, heads: int, length: int, head_dim: int, *,
                   amplitude: float = 2.0, noise: float = 0.5, seed: int = 0):
    """Queries, keys and values with positional structure, like a real model's.

    Each row is a slowly rotating positional code (so nearby positions attend to
    each other and neighbouring rows are similar) plus Gaussian noise; values
    vary smoothly with position. Returns three ``[batch, heads, length, head_dim]``
    fp32 tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(length, dtype=torch.float32)
    half = head_dim // 2
    freqs = 0.05 / (200.0 ** (torch.arange(half, dtype=torch.float32) / max(half, 1)))
    angles = pos[:, None] * freqs[None, :]
    code = torch.cat([angles.cos(), angles.sin()], dim=-1)
    code = F.pad(code, (0, head_dim - code.shape[-1]))

    def noisy(scale_signal: float) -> torch.Tensor:
        shape = (batch, heads, length, head_dim)
        return scale_signal * code + noise * torch.randn(shape, generator=gen)

    return noisy(amplitude), noisy(amplitude), noisy(1.0)


def _timed(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def run_demo(length: int = 4096, heads: int = 9, head_dim: int = 64) -> None:
    from .attention import sparse_attention
    from .attention.dispatch import select_backend

    backend = select_backend("cpu")  # builds the compiled kernel on first use
    q, k, v = structured_qkv(1, heads, length, head_dim)
    print(f"Sparse attention demo: B=1, H={heads}, L={length}, D={head_dim}, backend "
          f"{backend}, {torch.get_num_threads()} threads")
    print(f"{'setting':<28} {'causal':<7} {'sparsity':>8} {'rel L1':>8} {'cos':>9} "
          f"{'dense ms':>9} {'sparse ms':>9} {'speedup':>8}")
    settings = [("cdfthreshd=0.99", dict(cdfthreshd=0.99)),
                ("cdfthreshd=0.97 (default)", dict(cdfthreshd=0.97)),
                ("topk=0.25", dict(topk=0.25, simthreshd1=-0.1))]
    for causal in (False, True):
        dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ref = dense()
        t_dense = _timed(dense)
        for name, params in settings:
            sparse = lambda: sparse_attention(q, k, v, is_causal=causal, return_sparsity=True,
                                              **params)
            out, sparsity = sparse()
            t_sparse = _timed(sparse)
            diff = (out - ref).abs().sum() / ref.abs().sum()
            cos = F.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0)
            print(f"{name:<28} {str(causal):<7} {sparsity:>8.3f} {diff.item():>8.4f} "
                  f"{cos.item():>9.6f} {t_dense * 1e3:>9.0f} {t_sparse * 1e3:>9.0f} "
                  f"{t_dense / t_sparse:>7.2f}x")
    print("sparse ms includes the block prediction; see benchmarks/attention.py for the "
          "kernel-only table.")


DEMO_PROMPTS = [
    "Describe a robot learning to paint in a way that's both technically accurate and "
    "emotionally engaging.",
    "Write the opening of a story set in a lighthouse at the edge of the world.",
    "Write a slogan and two lines of ad copy for a bicycle made of bamboo.",
]


def run_creative_demo(prompts=DEMO_PROMPTS, candidates: int = 5, max_tokens: int = 100,
                      seed: int = 0) -> None:
    """The main job: Creative-Sparse beside plain top-p sampling of as many candidates."""
    from .generation import CreativeSparseWrapper
    from .models import load_model
    from .models.kv_cache import cache_bytes, returned_cache

    start = time.perf_counter()
    model, tokenizer = load_model()
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer)
    print(f"\nSmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.1f} s. "
          f"Creative-Sparse (schedule {wrapper.sparsity_schedule}) beside plain top-p "
          f"sampling (p=0.9), {candidates} candidates of {max_tokens} tokens each.")

    def line(name, texts, qualities, seconds, kv):
        mean = lambda f: sum(getattr(q, f) for q in qualities) / len(qualities)  # noqa: E731
        best = max(q.q for q in qualities)
        distinct = wrapper.quality.distinct_answers(texts)
        return (f"  {name:<15} best Q {best:+.3f} | mean novelty {mean('novelty'):.2f} "
                f"diversity {mean('diversity'):.2f} incoherence {mean('incoherence'):.2f} "
                f"relevance {mean('relevance'):.2f} | {distinct}/{len(texts)} distinct "
                f"| {seconds:5.1f} s, peak KV {kv / 2**20:.1f} MB")

    for i, prompt in enumerate(prompts, 1):
        print(f"\n[{i}/{len(prompts)}] {prompt}")
        ids = wrapper.prompt_ids(prompt)
        torch.manual_seed(seed)
        begin = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 top_p=0.9, top_k=0, num_return_sequences=candidates,
                                 max_new_tokens=max_tokens, pad_token_id=tokenizer.eos_token_id,
                                 return_dict_in_generate=True)
        t_plain = time.perf_counter() - begin
        plain = [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() or " "
                 for row in out.sequences]
        result = wrapper.generate_candidates(prompt, max_length=max_tokens,
                                             num_candidates=candidates, seed=seed)
        plain_q = wrapper.quality.breakdown(plain, [result.reference or " "], prompt)
        kv_creative = result.peak_cache_bytes
        print(line("top-p sampling", plain, plain_q, t_plain, cache_bytes(returned_cache(out))))
        print(line("Creative-Sparse", [c.text or " " for c in result.candidates],
                   [c.quality for c in result.candidates], result.wall_time, kv_creative))
        best_plain = plain[max(range(len(plain)), key=lambda j: plain_q[j].q)]
        print(f"  best top-p:          {best_plain[:300]}")
        print(f"  best Creative-Sparse: {result.best.text[:300]}")
    print(f"\nTop-p sampling here is model.generate. Creative-Sparse drafts "
          f"{math.ceil(candidates / wrapper.keep_fraction)} short candidates at high sparsity "
          f"and refines the {candidates} chosen as a set; its time includes the drafts, the "
          "greedy reference row and the scoring. benchmarks/generation.py times dense "
          "sampling in the same engine.")


def _schedule(text: str) -> tuple[float, float]:
    try:
        diverge, refine = (float(x) for x in text.split(","))
    except ValueError:
        diverge = refine = math.nan
    if not (0.0 <= diverge <= 1.0 and 0.0 <= refine <= 1.0):
        raise argparse.ArgumentTypeError(
            f"must be two numbers 'diverge,refine' in [0, 1], got {text!r}")
    return diverge, refine


def _level(text: str) -> float:
    try:
        level = float(text)
    except ValueError:
        level = math.nan
    if not 0.0 <= level <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return level


def _integer(low: int, high: int):
    """An argparse type: an integer in [low, high], checked before anything loads."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}")
        return value
    return parse


def _prompt(text: str) -> str:
    from .quality.metrics import check_text

    if not text.strip():
        raise argparse.ArgumentTypeError("must be a non-empty text")
    try:
        return check_text(text, "the prompt")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` (available here) or ``auto`` (cuda if any)."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    from .models.loading import _resolve_device

    try:
        _resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or 'auto')") from None
    return text


def _regex(text: str) -> str:
    import re

    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regex {text!r}: {exc}") from None
    if importlib.util.find_spec("llguidance") is not None:
        # The mask speaks Rust's regex syntax (no look-around, no back-references).
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(LLMatcher.grammar_from_regex(text))
        if error and not error.startswith("WARNING"):
            raise argparse.ArgumentTypeError(
                f"regex {text!r} cannot be a token mask (Rust regex syntax: no look-around "
                f"or back-references): {' '.join(error.split())}")
    return text


def _text_file(text: str) -> str:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {exc}") from None


def _json_schema_file(text: str) -> dict:
    import json

    try:
        schema = json.loads(_text_file(text))
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must hold a JSON object (a schema), got "
                                         f"{type(schema).__name__}")
    return schema


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


def _chat_prompt(prompt: str | None, system: str | None, chat: Path | None):
    """The prompt of ``generate``: the text, or chat messages when ``--system`` or
    ``--chat`` is given (checked here, before the model loads)."""
    if system is None and chat is None:
        if prompt is None:
            raise ValueError("give a prompt, or --chat FILE.json")
        return prompt
    import json

    from .generation.prompts import check_prompt

    messages = []
    if chat is not None:
        try:
            messages = json.loads(chat.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"argument --chat: cannot read {str(chat)!r} as JSON: "
                             f"{exc}") from None
        if not isinstance(messages, list):
            raise ValueError(f"argument --chat: {str(chat)!r} must hold a JSON list of "
                             f"messages, got {type(messages).__name__}")
    if system is not None:
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            raise ValueError("--system and a system message in --chat: give one of them")
        messages = [{"role": "system", "content": system}] + messages
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
    return check_prompt(messages)


def _plot_path(text: str) -> Path:
    """A plot file in an existing directory we can write to (never created for you)."""
    path = Path(text).expanduser()
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name, e.g. "
                                         f"{os.path.join(text, 'tune.png')!r}")
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"directory {str(folder)!r} {what} (it is not created "
                                         "for you)")
    try:   # the one reliable test of write access (root, ACLs, read-only mounts)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write in directory {str(folder)!r}: "
                                         f"{exc.strerror or exc}") from None
    if importlib.util.find_spec("matplotlib") is None:
        raise argparse.ArgumentTypeError("plotting needs matplotlib: pip install "
                                         "'creative-sparse[plots]'")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise argparse.ArgumentTypeError(f"{text!r}: the file name must end in one of "
                                         f"{', '.join('.' + f for f in sorted(formats))}")
    return path


def run_generate(args) -> None:
    """``creative-sparse generate``: the winner first, then the other candidates."""
    import json

    from tqdm import tqdm

    from .generation import CreativeSparseWrapper

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


def _safety(args):
    """The checker of ``--no-safety`` / ``--block-list``: None, the default, or the default
    plus the file's words (:meth:`WordListChecker.from_file`)."""
    if args.no_safety:
        return None
    if args.block_list is None:
        return "default"
    from .safety import CompositeChecker, WordListChecker, resolve_checker

    words = WordListChecker.from_file(args.block_list)
    base = resolve_checker("default")
    return words if base is None else CompositeChecker([base, words])


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

    from .autotune import OptimumNotIdentifiedWarning, sweep_sparsity

    common = dict(seed=args.seed, cache="refresh" if args.no_cache else True,
                  progress=not (args.json or args.csv or args.quiet),
                  safety="default" if args.flagged else None)
    if args.device != "cpu":     # the default path loads on the CPU by name
        from .models import load_model

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


def _settings(items: list[str]) -> dict[str, list[float]]:
    """``["top_p=0.7,1.0", ...]`` -> ``{"top_p": [0.7, 1.0]}`` (values checked by the runner)."""
    out: dict[str, list[float]] = {}
    for item in items:
        method, sep, values = item.partition("=")
        try:
            numbers = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            numbers = []
        if not sep or not numbers:
            raise ValueError(f"expected METHOD=V1,V2,... with numbers, got {item!r}")
        out[method.strip()] = numbers
    return out


def run_evaluate(args) -> None:
    from .evaluation.runner import evaluate, plan_units
    from .models import load_model

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
                    progress=not args.quiet, compute=args.compute,
                    safety=None if args.no_safety else "default")
    print(f"results: {path} ({time.perf_counter() - start:.0f} s); tables and plots: "
          f"creative-sparse report {path}", file=sys.stderr)


def _write_report(results_path, out_dir, *, no_plots: bool = False,
                  human: dict | None = None) -> list[Path]:
    """report.md, report.csv (and plots) of a results file; ``human`` fills that column."""
    from .evaluation.records import read_results
    from .evaluation.tables import aggregate, format_markdown, plot_frontiers, write_csv

    results = read_results(results_path)
    if results.header is None:
        raise ValueError(f"{results_path}: no such results file")
    rows = aggregate(results.records(), human=human)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = results.header
    title = (f"Evaluation of {h.get('model') or 'the model'} on the {h.get('split')} split "
             f"({len(results.units)} units, {h.get('num_outputs')} outputs each"
             + (", equal FLOPs" if h.get("compute") == "flops" else "") + ")")
    if human:
        title += "; human: win rate in paired votes (ties count 1/2)"
    (out / "report.md").write_text(format_markdown(rows, title=title) + "\n", encoding="utf-8")
    write_csv(rows, out / "report.csv")
    written = [out / "report.md", out / "report.csv"]
    if not no_plots:
        written += plot_frontiers(rows, out)
    if results.skipped:
        print(f"skipped {len(results.skipped)} corrupt line(s): {results.skipped[:10]}",
              file=sys.stderr)
    return written


def _human_votes(source: str) -> list[dict]:
    """Votes from a judgements export (``.jsonl``) or a judgement database."""
    if Path(source).suffix in (".jsonl", ".json"):
        from .human.store import read_judgements
        return read_judgements(source)
    if "://" not in source and not Path(source).is_file():
        raise ValueError(f"{source}: no such judgements export (.jsonl) or database")
    return _store(source).judgements()


def _store(db: str):
    try:
        from .human.store import open_store
    except ImportError as exc:
        raise ImportError(f"the human evaluation needs the 'human' extra ({exc.name} is "
                          "missing): pip install 'creative-sparse[human]'") from exc
    return open_store(db)


def run_report(args) -> None:
    human = None
    if args.human:
        from .human.aggregate import human_column, summarise
        human = human_column(summarise(_human_votes(args.human), bootstrap=1))
    print("\n".join(map(str, _write_report(args.results, args.out_dir, no_plots=args.no_plots,
                                            human=human))))


def run_human(args) -> None:
    base = args.base_url.rstrip("/") if getattr(args, "base_url", None) else None
    if args.action == "report":
        from .human.aggregate import format_markdown, human_column, summarise, write_csv
        summaries = summarise(_human_votes(args.source), bootstrap=args.bootstrap,
                              confidence=args.confidence, seed=args.seed)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "human.md").write_text(format_markdown(summaries, confidence=args.confidence)
                                      + "\n", encoding="utf-8")
        written = [out / "human.md", write_csv(summaries, out / "human.csv")]
        if args.results:
            written += _write_report(args.results, out, no_plots=True,
                                     human=human_column(summaries))
        print("\n".join(map(str, written)))
        return
    store = _store(args.db)
    if args.action == "serve":
        from .human.app import serve
        added = store.load_results(args.results)
        print(f"{added} new output(s) from {args.results}; {len(store.pairs())} pairs to judge",
              file=sys.stderr)
        links = [(name, store.add_rater(name)) for name in args.invite]
        admin = store.new_admin_token() if args.new_admin_token or not store.has_admin_token() \
            else None

        def ready(bound: str) -> None:
            print(f"serving on {bound} (Ctrl-C stops; votes are saved as they come)",
                  file=sys.stderr)
            url = base or bound
            if admin:
                print(f"admin: {url}/admin/{admin}", file=sys.stderr)
            for name, token in links:
                print(f"rater {name}: {url}/r/{token}", file=sys.stderr)
            sys.stderr.flush()

        try:
            serve(store, host=args.host, port=args.port, threads=args.threads, ready=ready)
        except KeyboardInterrupt:
            print("stopped; every acknowledged vote is in the database", file=sys.stderr)
    elif args.action == "invite":
        base = base or "http://127.0.0.1:8000"
        for name in args.names:
            print(f"{name}: {base}/r/{store.add_rater(name)}")
        if args.admin:
            print(f"admin: {base}/admin/{store.new_admin_token()}")
    elif args.action == "export":
        print(f"{store.export(args.out)} vote(s) -> {args.out}", file=sys.stderr)
    elif args.action == "import":
        from .human.store import read_judgements
        added, skipped = store.import_judgements(read_judgements(args.file))
        print(f"{added} vote(s) added, {skipped} already there", file=sys.stderr)


def _human_parser(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    hum = sub.add_parser("human", help="paired comparisons by people: web app, votes, report")
    act = hum.add_subparsers(dest="action", required=True)
    db_help = "judgement database: a SQLite file (WAL) or any SQLAlchemy URL"
    srv = act.add_parser("serve", formatter_class=fmt,
                         help="serve the rater and admin pages for a results file's outputs")
    srv.add_argument("results", help="a results file written by `creative-sparse evaluate`")
    srv.add_argument("--db", default="human.sqlite", help=db_help)
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind; 0.0.0.0 opens it to the network")
    srv.add_argument("--port", type=_integer(0, 65535), default=8000, help="0 picks a free one")
    srv.add_argument("--threads", type=_integer(1, 256), default=8)
    srv.add_argument("--base-url", default=None,
                     help="the address raters reach, for the printed links (default: the "
                          "bound one; give it with --host 0.0.0.0)")
    srv.add_argument("--invite", nargs="*", default=[], metavar="NAME",
                     help="create these raters (or give them new tokens) and print their links")
    srv.add_argument("--new-admin-token", action="store_true",
                     help="replace the admin token (one is made on first start) and print it")
    inv = act.add_parser("invite", formatter_class=fmt,
                         help="create raters (new tokens) and print their invitation links")
    inv.add_argument("names", nargs="*", metavar="NAME")
    inv.add_argument("--db", default="human.sqlite", help=db_help)
    inv.add_argument("--admin", action="store_true", help="also a new admin token")
    inv.add_argument("--base-url", default=None,
                     help="the server's address as raters reach it (default http://127.0.0.1:8000)")
    rep = act.add_parser("report", formatter_class=fmt,
                         help="Bradley-Terry strengths, win rates, ratings (human.md/.csv)")
    rep.add_argument("source", help="a judgements export (.jsonl) or a judgement database")
    rep.add_argument("--out-dir", default="human_report")
    rep.add_argument("--results", default=None,
                     help="also write this results file's report.md/.csv with the human column")
    rep.add_argument("--bootstrap", type=_integer(1, 100_000), default=1000,
                     help="resamples of the votes per task")
    rep.add_argument("--confidence", type=float, default=0.95)
    rep.add_argument("--seed", type=_integer(0, 2**63 - 1), default=0)
    exp = act.add_parser("export", help="write every vote as JSON lines")
    exp.add_argument("out", help="the .jsonl file to write")
    exp.add_argument("--db", default="human.sqlite", help=db_help)
    imp = act.add_parser("import", help="add the votes of an export (skipping ones already there)")
    imp.add_argument("file", help="a .jsonl export")
    imp.add_argument("--db", default="human.sqlite", help=db_help)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` where there is a default to show (not for flags, empty
    lists, ``None`` or required arguments)."""

    def _get_help_string(self, action):
        default = action.default
        if action.required or default is None or default is False or default == [] \
                or default == argparse.SUPPRESS:   # (0 == False: hence "is")
            return action.help
        return super()._get_help_string(action)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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
    gen.add_argument("--schedule", type=_schedule, default=(0.7, 0.3),
                     help="diverge,refine levels, e.g. 0.7,0.3")
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
    from .evaluation.runner import METHODS
    from .tasks import list_tasks
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
    ev.add_argument("--no-safety", action="store_true",
                    help="no flagged-rate monitoring and no screening of Creative-Sparse")
    rep = sub.add_parser("report", help="tables (Markdown, CSV) and frontier plots of results",
                         formatter_class=fmt)
    rep.add_argument("results", help="a results file written by `creative-sparse evaluate`")
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
        from .safety import DEFAULT_SAFETY_GATE, check_gate

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

    from .autotune import SweepFailedError

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
            from .attention.dispatch import available_backends, select_backend
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


if __name__ == "__main__":
    sys.exit(main())
