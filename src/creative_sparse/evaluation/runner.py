"""The evaluation runner: tasks x methods x settings x seeds, every unit scored and costed.

A *unit* is one method at one setting of its knob, on one prompt, with one seed: it
makes ``num_outputs`` outputs and appends one record to the results file
(:mod:`creative_sparse.evaluation.records`), flushed before the next unit starts. A
run that is killed resumes where it stopped: units already in the file are skipped,
so the finished file equals an uninterrupted run's (wall times aside).

Methods (:data:`METHODS`), each swept over its own knob with the same number of
settings, so that every method gets the same tuning budget and is judged as a
frontier, not at one operating point:

=================  ==============  ==============================================
id                 knob            strategy
=================  ==============  ==============================================
``top_p``          temperature     :class:`~creative_sparse.generation.strategies.DenseTopP` (top-p 0.9)
``min_p``          temperature     :class:`~creative_sparse.generation.strategies.MinP` (min-p 0.1)
``fixed``          level s         :class:`~creative_sparse.generation.strategies.Fixed`
``progressive``    level s         :class:`~creative_sparse.generation.strategies.Progressive` (s -> s/2)
``adaptive``       level s         :class:`~creative_sparse.generation.strategies.Adaptive` (base s)
``moe_only``       level s         :class:`~creative_sparse.generation.strategies.MoEOnly` (left out on a dense model)
``creative_sparse`` level s        :class:`~creative_sparse.generation.strategies.CreativeSparse` (diverge s)
=================  ==============  ==============================================

Per output the record holds Q and its terms given the prompt (novelty against the
dense greedy answer, diversity within the unit's outputs, both as Q uses them, i.e.
multiplied by relevance, and raw), the NLL per token under the dense model given the
prompt, the repeated-trigram rate, validator violations, for code whether the task's
tests pass (run in a subprocess with a time limit, in a temporary directory, with
sockets disabled) and where a validator applies whether the output is valid. Per set:
mean pairwise embedding distance, distinct answers, pass@k and pass rate, valid rate.
Cost: FLOPs (attention actually computed included), wall time, peak KV-cache bytes,
tokens.

Constrained decoding (``constrain=True``, ``--constrain``): every method decodes
under each task's validators (code: Python syntax, music: ABC), enforced token by
token by the same :class:`~creative_sparse.generation.constraints.ValidatorGuard`:
the samplers through a logits processor over the whole answer, Creative-Sparse
through its ``constraints`` (drafts and refinement). Off by default, so the
samplers are measured as users run them; on, the comparison isolates what the dial
adds to constraint-aware decoding. The header records it, and a constrained and an
unconstrained file never mix.

Safety monitoring: one content checker (``safety``, by default
:class:`~creative_sparse.safety.ProfanityCheck`) reads every method's outputs; each
output records ``flagged`` and the set the ``flagged`` rate (share of outputs
flagged), so the report can compare methods, tasks and levels. Creative-Sparse also
screens with it inside (repair or drop, see :mod:`~creative_sparse.generation.creative`)
and its record adds ``set.flagged_drafts`` (share of the diverge drafts flagged) and
``set.safety`` (the counts of the screen stage). The runner measures, so it opts in to levels above the
safety gate (``allow_high_sparsity``) for every method. A unit whose outputs were
all dropped or withheld is scored on one blank output, with ``set.withheld`` saying why.

Under ``torchrun`` (``torch.distributed``, gloo on CPU) each rank takes every
``world``-th unit and writes its own shard ``<out>.rank<r>.jsonl``; rank 0 merges the
shards into ``<out>`` once all ranks are done. Units ``<out>`` already holds (a run
begun in one process, an earlier merge) are skipped by every rank and kept by the
merge, so a run can move between one process and several without redoing anything. The same command runs unchanged on
one process, a multi-core machine or a multi-GPU node.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .methods import METHODS, Method
from .records import (FORMAT, FORMAT_VERSION, ResultsWriter, check_header, merge_shards,
                      read_results, unit_id)
from ..tasks import load_task, list_tasks

logger = logging.getLogger(__name__)

# "outputs": equal output count; "flops": equal output count and equal decoded tokens.
COMPUTE_MODES = ("outputs", "flops")

__all__ = ["METHODS", "Method", "Unit", "evaluate", "plan_units", "run_code_tests"]


@dataclass(frozen=True)
class Unit:
    task: str
    prompt_index: int
    prompt: str
    method: str
    setting: float
    seed: int

    @property
    def id(self) -> str:
        return unit_id(self.task, self.prompt_index, self.method, self.setting, self.seed)


def _check_names(values, allowed, what: str) -> list[str]:
    values = list(values)
    if not values:
        raise ValueError(f"give at least one {what}; known: {', '.join(allowed)}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown[0]!r}; known: {', '.join(allowed)}")
    return values


def plan_units(tasks: Sequence[str], methods: Sequence[str], seeds: Sequence[int], *,
               split: str = "evaluation", prompts: int | None = None,
               settings: Mapping[str, Sequence[float]] | None = None) -> list[Unit]:
    """Every unit of a run, in a fixed order (task, prompt, method, setting, seed)."""
    tasks = _check_names(tasks, list_tasks(), "task")
    methods = _check_names(methods, list(METHODS), "method")
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative ints, at least one; got {seeds!r}")
    if prompts is not None and (isinstance(prompts, bool) or not isinstance(prompts, int)
                                or prompts < 1):
        raise ValueError(f"prompts must be None or an int >= 1, got {prompts!r}")
    settings = dict(settings or {})
    for name, values in settings.items():
        _check_names([name], list(METHODS), "method")
        values = tuple(float(v) for v in values)
        knob = METHODS[name].knob
        ok = (lambda v: 0.0 <= v <= 1.0) if knob == "level" else (lambda v: 0.0 < v <= 5.0)
        if not values or not all(math.isfinite(v) and ok(v) for v in values):
            raise ValueError(f"settings of {name} ({knob}) must be "
                             f"{'in [0, 1]' if knob == 'level' else 'in (0, 5]'}, got {values}")
        settings[name] = values
    units = []
    for task in tasks:
        texts = load_task(task).prompts(split)
        for index, prompt in enumerate(texts[:prompts]):
            for method in methods:
                for setting in settings.get(method, METHODS[method].settings):
                    for seed in seeds:
                        units.append(Unit(task, index, prompt, method, float(setting), seed))
    return units


# --------------------------------------------------------------------------- code tests

_FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|\Z)", re.S)
_NO_NETWORK = ("import socket as _s\n"
               "def _refuse(*a, **k):\n    raise OSError('network disabled in tests')\n"
               "_s.socket = _s.create_connection = _refuse\n")


def extract_code(text: str) -> str:
    """The first fenced code block of ``text``, else ``text`` itself."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def run_code_tests(output: str, tests: str, *, timeout: float = 5.0) -> bool:
    """Whether ``tests`` (assert statements) pass against the code in ``output``.

    Runs ``python -I`` in a fresh temporary directory with an empty environment,
    sockets replaced by a function that raises, and ``timeout`` seconds; any failure,
    error or timeout is ``False``.
    """
    program = _NO_NETWORK + extract_code(output) + "\n\n" + tests + "\n"
    with tempfile.TemporaryDirectory(prefix="cs-code-") as tmp:
        path = Path(tmp) / "candidate.py"
        path.write_text(program, encoding="utf-8")
        try:
            done = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, env={},
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


# --------------------------------------------------------------------------- one unit

class _Scorer:
    """Generates and scores units; owns the strategies, the quality functional and the
    novelty references."""

    def __init__(self, model, tokenizer, num_outputs: int, max_new_tokens: Mapping[str, int],
                 references: dict, quality=None, compute: str = "outputs", safety="default",
                 constrain: bool = False):
        from ..generation import strategies
        from ..generation.constraint_spec import build_constraints, eos_ids
        from ..safety import resolve_checker

        self.model, self.tokenizer = model, tokenizer
        self.num_outputs, self.max_new_tokens = num_outputs, max_new_tokens
        self.references = references
        self.compute = compute
        self.checker = resolve_checker(safety)
        # One Q for drafting, selecting and scoring: the given one, else the strategy's.
        self._cs = strategies.CreativeSparse(safety=self.checker, allow_high_sparsity=True,
                                             quality=quality)
        self.quality = self._cs.quality_functional(model, tokenizer)
        specs = {t: {"validators": list(load_task(t).validators)} for t in max_new_tokens}
        self._validators = {t: list(build_constraints(tokenizer, spec, 1, []).validators)
                            for t, spec in specs.items()}
        # Under constrain, what each task's decoding is held to (None: nothing to hold).
        self._decoding = {t: spec if constrain and spec["validators"] else None
                          for t, spec in specs.items()}
        self._build_constraints, self._eos_ids = build_constraints, eos_ids(tokenizer)
        self._strategies = strategies

    def strategy(self, method: str, setting: float):
        s = self._strategies
        opt_in = dict(allow_high_sparsity=True)   # measuring, with the flagged rate recorded
        return {"top_p": lambda: s.DenseTopP(temperature=setting),
                "min_p": lambda: s.MinP(temperature=setting),
                "fixed": lambda: s.Fixed(setting, **opt_in),
                "progressive": lambda: s.Progressive(start=setting, end=round(setting / 2, 4),
                                                     **opt_in),
                "adaptive": lambda: s.Adaptive(base=setting, **opt_in),
                "moe_only": lambda: s.MoEOnly(setting, **opt_in)}[method]()

    def reference(self, task: str, index: int, prompt: str) -> tuple[str, bool]:
        """The dense greedy answer; ``(text, new)``."""
        key = (task, index)
        if key in self.references:
            return self.references[key], False
        from ..generation.creative import greedy_reference

        self.references[key] = greedy_reference(self.model, self.tokenizer, prompt,
                                                self.max_new_tokens[task])
        return self.references[key], True

    def run(self, unit: Unit, reference: str) -> dict:
        budget = self.max_new_tokens[unit.task]
        spec = self._decoding[unit.task]
        if unit.method == "creative_sparse":
            # Equal FLOPs: as many drafts as outputs (no selection) and the run's own
            # greedy reference, so it decodes num_outputs * budget tokens like sampling.
            equal = self.compute == "flops"
            result = self._cs.generate(self.model, self.tokenizer, unit.prompt,
                                       num_candidates=self.num_outputs, max_new_tokens=budget,
                                       seed=unit.seed, sparsity_level=unit.setting,
                                       num_drafts=self.num_outputs if equal else None,
                                       reference=reference if equal else None,
                                       constraints=spec)
        else:
            # The same guard as Creative-Sparse's, over the whole answer.
            guard = None if spec is None else self._build_constraints(
                self.tokenizer, spec, budget, self._eos_ids)
            result = self.strategy(unit.method, unit.setting).generate(
                self.model, self.tokenizer, unit.prompt, num_candidates=self.num_outputs,
                max_new_tokens=budget, seed=unit.seed, logits_processor=guard)
        texts = [t or " " for t in result.texts]
        withheld = None
        if not texts:
            withheld = ((result.safety or {}).get("withheld")
                        or "every output was dropped by the safety checks")
            texts = [" "]
        record = {"type": "unit", "id": unit.id, "task": unit.task,
                  "prompt_index": unit.prompt_index, "method": unit.method,
                  "knob": METHODS[unit.method].knob, "setting": unit.setting, "seed": unit.seed,
                  **self.score(unit, texts, reference), "cost": _cost(result.stats)}
        self.monitor(record, result.safety, withheld)
        return record

    def monitor(self, record: dict, screen: dict | None, withheld: str | None) -> None:
        """Add the flagged fields (module doc) to a unit record."""
        from ..safety import run_checks

        sets = record["set"]
        if withheld is not None:
            sets["withheld"] = withheld
        if screen is not None:
            sets["safety"] = screen
            sets["flagged_drafts"] = (screen["flagged_drafts"] / screen["drafts"]
                                      if screen["drafts"] else None)
        if self.checker is None:
            return
        texts = [o["text"] for o in record["outputs"]]
        outcome = run_checks(self.checker, texts)
        if not outcome.ok:      # monitoring failed: say so, count nothing
            sets["flagged"], sets["flag_error"] = None, outcome.reason
            return
        for out, flags in zip(record["outputs"], outcome.flags):
            out["flagged"] = bool(flags)
        sets["flagged"] = sum(bool(f) for f in outcome.flags) / len(texts)

    def score(self, unit: Unit, texts: list[str], reference: str) -> dict:
        from ..quality import metrics
        from ..quality.degeneration import repeated_ngram_rate

        task = load_task(unit.task)
        validators = self._validators[unit.task]
        q = self.quality
        with q._one_pass():
            parts = q.breakdown(texts, [reference], unit.prompt, validators=validators)
            novelty_raw = q.compute_novelty(texts, [reference])
            diversity_raw = q.compute_diversity(texts)
            distinct = q.distinct_answers(texts)
        tests = _code_test(task, unit.prompt)
        outputs = []
        for text, b, nov, div in zip(texts, parts, novelty_raw, diversity_raw):
            outputs.append({
                "text": text, "q": b.q, "novelty": b.novelty, "diversity": b.diversity,
                "novelty_raw": float(nov), "diversity_raw": float(div),
                "incoherence": b.incoherence, "relevance": b.relevance,
                "degeneration": b.degeneration, "nll": b.nll,
                "rep3": repeated_ngram_rate(text, 3), "violations": int(b.violations),
                "passed": None if tests is None else run_code_tests(text, tests),
                "valid": None if not validators else b.violations == 0})
        passed = [o["passed"] for o in outputs if o["passed"] is not None]
        valid = [o["valid"] for o in outputs if o["valid"] is not None]
        return {"outputs": outputs, "set": {
            "diversity": sum(o["diversity_raw"] for o in outputs) / len(outputs),
            "distinct": distinct,
            "q_mean": sum(o["q"] for o in outputs) / len(outputs),
            "pass_at_k": (float(any(passed)) if passed else None),
            "pass_rate": (sum(passed) / len(passed) if passed else None),
            "valid_rate": (sum(valid) / len(valid) if valid else None)}}


def _applicable(methods: Sequence[str], model) -> list[str]:
    """``methods`` less ``moe_only`` on a model without MoE layers, where every setting
    would decode exactly as the dense level: left out with a warning, refused when it
    is the only method asked for."""
    from ..control import SparsityController
    from ..generation.knobs import dial_knobs
    from ..generation.strategies import dense_model_message
    from ..models.moe import num_experts

    methods = list(methods)
    if "moe_only" not in methods or num_experts(model) is not None:
        return methods
    why = dense_model_message("MoE-Only", dial_knobs(SparsityController(), model, 0.0)[0])
    rest = [m for m in methods if m != "moe_only"]
    if not rest:
        raise ValueError(why)
    warnings.warn(f"{why}. It is left out of this run.", UserWarning, stacklevel=3)
    return rest


def _code_test(task, prompt: str) -> str | None:
    """The tests of a code prompt of the evaluation split, if the task has them."""
    items = getattr(task, "evaluation_tests", ()) or ()
    prompts = getattr(task, "evaluation", ()) or ()
    for text, item in zip(prompts, items):
        if text == prompt:
            return item.tests
    return None


def _cost(stats) -> dict:
    return {"flops": float(stats.flops), "wall_time": float(stats.wall_time),
            "peak_kv_bytes": int(stats.peak_cache_bytes),
            "generated_tokens": int(stats.generated_tokens),
            "prompt_tokens": int(stats.prompt_tokens),
            "attended_fraction": float(stats.attended_fraction)}


# --------------------------------------------------------------------------- the run

def _distributed() -> tuple[int, int]:
    """``(rank, world)`` under torchrun (initialising gloo/nccl once), else ``(0, 1)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}{out.suffix or '.jsonl'}")


def evaluate(model, tokenizer, *, tasks: Sequence[str], methods: Sequence[str],
             seeds: Sequence[int] = (0,), out: str | Path, split: str = "evaluation",
             prompts: int | None = None, num_outputs: int = 5,
             settings: Mapping[str, Sequence[float]] | None = None,
             max_new_tokens: int | None = None, model_name: str = "",
             progress: bool = True, on_unit: Callable[[dict], None] | None = None,
             quality=None, compute: str = "outputs", safety="default",
             constrain: bool = False) -> Path:
    """Run (or resume) an evaluation; returns the path of the results file.

    Args:
        model, tokenizer: a causal LM and its tokenizer (e.g. ``load_model()``).
        tasks, methods: names from :func:`~creative_sparse.tasks.list_tasks`
            and :data:`METHODS`.
        seeds: one unit per seed (outputs of a unit use seeds derived from it).
        out: the results file (JSON lines); an existing one is resumed if it belongs
            to the same run (same model, split, outputs and budgets), else refused.
        split: the task split (``"evaluation"``: prompts no tuning has seen).
        prompts: the first ``prompts`` prompts of each task (default all).
        num_outputs: outputs per unit (every method returns this many).
        settings: per method, the knob values to sweep instead of the defaults.
        max_new_tokens: one length budget for every task instead of each task's own.
        model_name: recorded in the header (two runs of different models never mix).
        on_unit: called with each new unit record (tests use it to interrupt a run).
        quality: a :class:`~creative_sparse.quality.QualityFunctional` to score with
            (and to select Creative-Sparse's drafts with); default the Creative-Sparse
            strategy's own.
        compute: ``"outputs"`` (every method returns ``num_outputs``; Creative-Sparse
            drafts twice as many and picks, at about 1.4x the FLOPs of sampling) or
            ``"flops"`` (also equal decoded tokens: Creative-Sparse makes exactly
            ``num_outputs`` drafts, refines all of them, and takes the run's greedy
            reference instead of decoding its own). Recorded in the header.
        safety: the content checker that monitors every output and screens
            Creative-Sparse's (``"default"``, a :class:`~creative_sparse.safety.SafetyChecker`
            or None: no monitoring); its name goes in the header.
        constrain: decode every method under each task's validators (module doc).
            Recorded in the header.
    """
    import torch
    from tqdm.auto import tqdm

    from .._version import __version__

    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 2:
        raise ValueError(f"num_outputs must be an int >= 2 (diversity needs two), got "
                         f"{num_outputs!r}")
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
    methods = _applicable(methods, model)
    units = plan_units(tasks, methods, seeds, split=split, prompts=prompts, settings=settings)
    from ..safety import resolve_checker

    checker = resolve_checker(safety)
    budgets = {t: (max_new_tokens or load_task(t).max_new_tokens) for t in dict.fromkeys(tasks)}
    header = {"type": "header", "format": FORMAT, "format_version": FORMAT_VERSION,
              "library_version": __version__, "model": model_name, "split": split,
              "num_outputs": num_outputs, "max_new_tokens": budgets,
              "tasks": list(budgets), "methods": list(dict.fromkeys(methods)),
              "seeds": list(seeds), "torch": torch.__version__, "compute": compute,
              "safety": None if checker is None else checker.name,
              "constrained": bool(constrain)}
    out = Path(out)
    rank, world = _distributed()
    mine = units[rank::world]
    path = out if world == 1 else shard_path(out, rank)
    # Under torchrun the ranks also resume from what <out> already holds (a run begun
    # in one process, or an earlier merge): those units are neither redone nor dropped.
    prior = read_results(out) if world > 1 else None
    if prior is not None:
        check_header(prior.header, header, out)
    with ResultsWriter(path, header) as writer:
        done = set(writer.results.units) | set(prior.units if prior else ())
        todo = [u for u in mine if u.id not in done]
        references = {**(prior.references if prior else {}), **writer.results.references}
        scorer = _Scorer(model, tokenizer, num_outputs, budgets, references,
                         quality, compute, checker, constrain)
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="unit",
                   desc=f"evaluate{f' rank {rank}' if world > 1 else ''}", disable=not progress)
        try:
            for unit in todo:
                bar.set_postfix_str(f"{unit.task} {unit.method}={unit.setting:g}", refresh=False)
                reference, new = scorer.reference(unit.task, unit.prompt_index, unit.prompt)
                if new:
                    writer.write({"type": "reference", "task": unit.task,
                                  "prompt_index": unit.prompt_index, "text": reference})
                start = time.perf_counter()
                record = scorer.run(unit, reference)
                record["cost"]["unit_seconds"] = round(time.perf_counter() - start, 3)
                writer.write(record)
                bar.update(1)
                if on_unit is not None:
                    on_unit(record)
        finally:
            bar.close()
    if world > 1:
        _barrier()
        if rank == 0:
            merge_shards(([out] if prior is not None and prior.header else [])
                         + [shard_path(out, r) for r in range(world)], out)
        _barrier()
    return out


def load(path: str | Path) -> list[dict]:
    """The records of a results file (header, references, units), for the report."""
    return read_results(path).records()
