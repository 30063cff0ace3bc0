"""Load test of the human-evaluation app: concurrent raters voting against a served instance.

Starts ``creative-sparse human serve`` (waitress, 8 threads) as a subprocess on a free
localhost port over a fresh SQLite database, then runs ``--raters`` rater threads for
``--seconds``; each loads its page, votes (a random answer and ratings) and follows
on. A rater who has judged every pair is replaced by a newly invited one, so the
concurrency holds for the whole run. Afterwards it checks, from the database:

* every acknowledged vote (answered 303) is stored, and nothing else (no lost vote,
  no doubled vote: stored count == acknowledged count, assignments unique),
* no rater has two votes on one pair,

and prints the vote latency (POST to its 303 answer) at p50 / p95 / max, the votes per
second, and the status counts of every request.

Usage::

    python benchmarks/human_load.py                     # 20 raters for 60 s
    python benchmarks/human_load.py --raters 4 --seconds 3
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "docs" / "evaluation_run" / "results.jsonl"
_FIELD = re.compile(r'name="(csrf_token|assignment)" value="([^"]+)"')


def start_server(results: Path, db: Path, raters: list[str], timeout: float = 120.0):
    """``creative-sparse human serve`` as a subprocess on a free port.

    Returns ``(process, base_url, {name: token}, admin_token)``; raises ``RuntimeError``
    with the server's output when it does not come up within ``timeout`` seconds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "creative_sparse.cli", "human", "serve", str(results),
           "--db", str(db), "--port", "0"]
    if raters:
        cmd += ["--invite", *raters]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env)
    lines: list[str] = []
    base = admin = None
    tokens: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if m := re.match(r"serving on (http://\S+)", line):
            base = m.group(1)
        elif m := re.match(r"admin: \S+/admin/(\S+)", line):
            admin = m.group(1)
        elif m := re.match(r"rater (\S+): \S+/r/(\S+)", line):
            tokens[m.group(1)] = m.group(2)
        if base and len(tokens) == len(raters):
            # keep draining the pipe so the server never blocks on a full stderr
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, base, tokens, admin
    proc.kill()
    raise RuntimeError("the server did not start:\n" + "".join(lines))


def rate_until(base: str, token: str, stop_at: float, rng: random.Random, acks: list,
               latencies: list, statuses: Counter, lock: threading.Lock) -> bool:
    """One rater votes until ``stop_at`` (monotonic); True when it judged every pair."""
    with requests.Session() as s:
        while time.monotonic() < stop_at:
            page = s.get(f"{base}/r/{token}", timeout=30)
            with lock:
                statuses[("GET", page.status_code)] += 1
            if "All done" in page.text:
                return True
            fields = dict(_FIELD.findall(page.text))
            data = {**fields, "answer": rng.choice(["left", "right", "tie", "both_bad"]),
                    "left_rating": rng.choice(["", "1", "3", "5"]),
                    "right_rating": rng.choice(["", "2", "4"])}
            start = time.perf_counter()
            r = s.post(f"{base}/r/{token}/vote", data=data, allow_redirects=False, timeout=30)
            elapsed = time.perf_counter() - start
            with lock:
                statuses[("POST", r.status_code)] += 1
                if r.status_code == 303:
                    acks.append((token, int(fields["assignment"])))
                    latencies.append(elapsed)
    return False


def run_load(base: str, store, tokens: list[str], seconds: float, seed: int = 0) -> dict:
    """``len(tokens)`` concurrent raters for ``seconds``; a finished rater is replaced by
    a new one invited through ``store``. Returns acks, latencies and status counts."""
    acks: list = []
    latencies: list = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    spare = iter(range(10**9))

    def worker(k: int, token: str) -> None:
        rng = random.Random(seed * 1000 + k)
        while rate_until(base, token, stop_at, rng, acks, latencies, statuses, lock):
            token = store.add_rater(f"extra-{k}-{next(spare)}")

    threads = [threading.Thread(target=worker, args=(k, t)) for k, t in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"acks": acks, "latencies": latencies, "statuses": statuses}


def check(store, acks: list) -> list[str]:
    """Problems found by comparing the stored votes with the acknowledged ones."""
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT assignment_id, rater_id, pair_key FROM judgements").all()
    problems = []
    stored = Counter(r[0] for r in rows)
    acked = Counter(a for _, a in acks)
    if len(rows) != len(acks):
        problems.append(f"{len(rows)} votes stored, {len(acks)} acknowledged")
    if any(n > 1 for n in stored.values()) or any(n > 1 for n in acked.values()):
        problems.append("a vote counted twice")
    if set(stored) != set(acked):
        problems.append(f"{len(set(acked) - set(stored))} acknowledged vote(s) missing, "
                        f"{len(set(stored) - set(acked))} unacknowledged stored")
    pairs = Counter((r[1], r[2]) for r in rows)
    if any(n > 1 for n in pairs.values()):
        problems.append("a rater judged a pair twice")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raters", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from creative_sparse.human.store import open_store

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "load.sqlite"
        names = [f"rater{k}" for k in range(args.raters)]
        proc, base, tokens, _ = start_server(args.results, db, names)
        try:
            store = open_store(db)
            out = run_load(base, store, [tokens[n] for n in names], args.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        problems = check(store, out["acks"])
    lat = sorted(out["latencies"])
    if lat:
        def q(p):
            return 1000 * lat[min(len(lat) - 1, int(p * len(lat)))]
        print(f"{args.raters} raters x {args.seconds:g} s: {len(lat)} votes "
              f"({len(lat) / args.seconds:.1f}/s); vote latency p50 {q(0.50):.1f} ms, "
              f"p95 {q(0.95):.1f} ms, max {1000 * lat[-1]:.1f} ms")
    print("requests:", dict(sorted(out["statuses"].items())))
    print("check:", "; ".join(problems) if problems else
          "stored votes == acknowledged votes, none doubled, no pair twice per rater")
    return 1 if problems or not lat else 0


if __name__ == "__main__":
    sys.exit(main())
