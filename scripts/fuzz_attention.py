"""Fuzz the public attention functions on every CPU backend; a crash is caught and reported.

Random calls (``scripts/fuzz_attention_cases.py``: valid inputs checked against
an fp64 oracle, bad inputs that must raise ``ValueError`` or ``TypeError``) run
in batches, each batch in a fresh worker process, so that a segfault or an abort
kills a worker, not the run. When a worker dies, the case it was running is run
again alone, in another process: if that one dies too, it is the killer; if not,
the death needed the cases before it, and the whole batch is the reproducer.
Every failure is written as JSON to ``--out`` (default ``fuzz_failures/``) and
printed with the command that replays it.

    python scripts/fuzz_attention.py --calls 10000 --seed 0        # the long run
    python scripts/fuzz_attention.py --calls 300 --time-limit 60   # a quick one
    python scripts/fuzz_attention.py --replay fuzz_failures/seed0-case17.json

Exit status: 0 when every call behaved, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPLAY = f"python {Path(__file__).resolve().relative_to(HERE.parent)} --replay"
FAILURES = ("mismatch", "valid_raised", "wrong_exception", "bad_accepted", "harness_error",
            "died")
WORKER_TIMEOUT_S = 600  # a batch that takes longer is a hang, reported like a death
CRASH = {"fn": "_crash"}  # --inject-crash: a case that kills its worker (tests the harness)


def _cases_module():
    sys.path.insert(0, str(HERE))
    import fuzz_attention_cases
    return fuzz_attention_cases


# --------------------------------------------------------------------------- worker side

def worker() -> None:
    """Run the JSON list of cases on stdin; one JSON line per finished case on stdout."""
    cases = json.loads(sys.stdin.read())
    fuzz = _cases_module()
    for case in cases:
        if case["fn"] == CRASH["fn"]:
            import ctypes
            ctypes.string_at(0)                 # a real segfault, as a kernel bug would give
        outcome, detail = fuzz.run_case(case)
        print(json.dumps({"id": case["id"], "outcome": outcome, "detail": detail}), flush=True)


# --------------------------------------------------------------------------- runner side

def run_batch(cases: list[dict]) -> tuple[list[dict], str | None]:
    """Run ``cases`` in a fresh worker: (results of the cases it finished, why it died or None)."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(json.dumps(cases), timeout=WORKER_TIMEOUT_S)
        death = None if proc.returncode == 0 else \
            f"exit status {proc.returncode}; stderr: {err.strip()[-600:]}"
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        death = f"no result within {WORKER_TIMEOUT_S} s (hang)"
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results, death


class Run:
    """Counts and failures of one fuzzing run."""

    def __init__(self, out_dir: Path, seed: int):
        self.out_dir, self.seed = out_dir, seed
        self.calls = collections.Counter()       # (fn, backend) -> calls finished
        self.outcomes = collections.Counter()
        self.failures: list[dict] = []
        self.workers = 0

    def record(self, case: dict, result: dict) -> None:
        self.calls[(case["fn"], case["backend"])] += 1
        self.outcomes[result["outcome"]] += 1
        if result["outcome"] in FAILURES:
            self.fail(result["outcome"], [case], result["detail"])

    def fail(self, outcome: str, cases: list[dict], detail: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"seed{self.seed}-case{cases[-1]['id']}.json"
        path.write_text(json.dumps({"outcome": outcome, "detail": detail, "cases": cases},
                                   indent=1))
        self.failures.append({"outcome": outcome, "detail": detail, "file": str(path)})
        print(f"\n{outcome}: {detail}\n  case: {json.dumps(cases[-1])}\n  replay: {REPLAY} "
              f"{path}", flush=True)

    def run(self, batch: list[dict]) -> None:
        """Run a batch; on a worker's death, find the killer and carry on after it."""
        while batch:
            self.workers += 1
            results, death = run_batch(batch)
            by_id = {c["id"]: c for c in batch}
            for result in results:
                self.record(by_id[result["id"]], result)
            if death is None:
                return
            if len(results) == len(batch):      # died on the way out, after its last case
                self.outcomes["died"] += 1
                self.fail("died", batch, f"{death} (after its last case: the batch reproduces)")
                return
            suspect, rest = batch[len(results)], batch[len(results) + 1:]
            self.workers += 1
            alone, alone_death = run_batch([suspect])
            if alone_death is not None:
                self.calls[(suspect["fn"], suspect["backend"])] += 1
                self.outcomes["died"] += 1
                self.fail("died", [suspect], alone_death)
            else:  # it needed the cases before it: the batch up to it reproduces
                self.outcomes["died"] += 1
                self.fail("died", batch[:len(results) + 1],
                          f"{death} (alone the case ran: the batch up to it is the reproducer)")
                for result in alone:
                    self.record(suspect, result)
            batch = rest

    def summary(self, elapsed: float) -> dict:
        by_fn = collections.defaultdict(dict)
        for (fn, backend), n in self.calls.items():
            by_fn[fn][backend] = n
        return {
            "seed": self.seed, "calls": sum(self.calls.values()), "seconds": round(elapsed, 1),
            "workers": self.workers, "calls_per_function_and_backend": by_fn,
            "ok": self.outcomes["ok"], "rejected": self.outcomes["rejected"],
            "process_deaths": self.outcomes["died"],
            "non_value_type_errors_on_bad_input": self.outcomes["wrong_exception"],
            "oracle_mismatches_on_valid_input": self.outcomes["mismatch"],
            "valid_input_raised": self.outcomes["valid_raised"],
            "bad_input_accepted": self.outcomes["bad_accepted"],
            "harness_errors": self.outcomes["harness_error"],
            "failures": self.failures,
        }


def print_summary(s: dict, backends: tuple[str, ...]) -> None:
    print(f"\nfuzz_attention: {s['calls']} calls in {s['seconds']} s (seed {s['seed']}, "
          f"{s['workers']} worker processes)")
    width = max(len(fn) for fn in s["calls_per_function_and_backend"]) + 2
    print("calls per function and backend:")
    print(" " * (width + 2) + "".join(f"{b:>12}" for b in backends))
    for fn, row in sorted(s["calls_per_function_and_backend"].items()):
        print(f"  {fn:<{width}}" + "".join(f"{row.get(b, 0):>12}" for b in backends))
    print(f"valid input matching the fp64 oracle: {s['ok']}; bad input rejected with "
          f"ValueError/TypeError: {s['rejected']}")
    print(f"process deaths: {s['process_deaths']}; non-ValueError/TypeError exceptions on bad "
          f"input: {s['non_value_type_errors_on_bad_input']}; oracle mismatches on valid input: "
          f"{s['oracle_mismatches_on_valid_input']}; valid input raised: "
          f"{s['valid_input_raised']}; bad input accepted: {s['bad_input_accepted']}; "
          f"errors of the harness itself: {s['harness_errors']}")


def replay(path: Path) -> int:
    """Run the cases of a failure file in this process (a crash shows its traceback)."""
    fuzz = _cases_module()
    cases = json.loads(path.read_text())["cases"]
    for case in cases:
        outcome, detail = fuzz.run_case(case)
        print(f"case {case['id']} ({case['fn']}, {case['backend']}): {outcome} {detail}")
    return 0 if outcome not in FAILURES else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1000, help="number of calls (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds; start no batch after this (the summary says how many ran)")
    p.add_argument("--batch", type=int, default=250, help="calls per worker process")
    p.add_argument("--out", type=Path, default=Path("fuzz_failures"),
                   help="directory for failing cases (default fuzz_failures/)")
    p.add_argument("--summary-json", type=Path, help="also write the summary here")
    p.add_argument("--replay", type=Path, help="run the cases of a failure file and exit")
    p.add_argument("--inject-crash", type=int, metavar="I",
                   help="make call I kill its worker (checks the harness itself)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker()
        return 0
    if args.replay:
        return replay(args.replay)

    fuzz = _cases_module()
    from creative_sparse.attention import dispatch
    backends = tuple(b for b in fuzz.CPU_BACKENDS if b in dispatch.available_backends("cpu"))
    rng = random.Random(args.seed)
    cases = []
    for i in range(args.calls):
        case = fuzz.draw_case(fuzz.RandomPick(rng), backends=backends)
        if i == args.inject_crash:
            case = {**case, **CRASH}
        cases.append({"id": i, **case})
    run = Run(args.out, args.seed)
    start = time.monotonic()
    for first in range(0, len(cases), args.batch):
        if args.time_limit is not None and time.monotonic() - start > args.time_limit:
            break
        run.run(cases[first:first + args.batch])
        print(f"  {min(first + args.batch, len(cases))}/{len(cases)} calls, "
              f"{time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    summary = run.summary(time.monotonic() - start)
    print_summary(summary, backends)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary, indent=1))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
