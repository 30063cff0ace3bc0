"""The human-evaluation app served for real (``creative-sparse human serve`` in a
subprocess): killed mid-session it loses no acknowledged vote; concurrent raters lose
and double none (a short run of ``benchmarks/human_load.py``)."""

import importlib.util
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("flask", reason="needs the 'human' extra")
requests = pytest.importorskip("requests")

from creative_sparse.human.store import open_store  # noqa: E402
from human_helpers import REAL_RESULTS, form_fields  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "human_load", Path(__file__).resolve().parents[1] / "benchmarks" / "human_load.py")
load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load)


def test_killed_server_loses_no_acknowledged_vote(tmp_path):
    db = tmp_path / "h.sqlite"
    proc, base, tokens, admin = load.start_server(REAL_RESULTS, db, ["alice", "bob"])
    assert base.startswith("http://127.0.0.1:")   # localhost unless told otherwise
    acks, statuses = [], Counter()
    stop = threading.Event()
    session = requests.Session()
    try:
        for answer in ("left", "right", "tie"):   # a few votes, then keep voting...
            fields = form_fields(session.get(f"{base}/r/{tokens['alice']}").text)
            r = session.post(f"{base}/r/{tokens['alice']}/vote", allow_redirects=False,
                             data={**fields, "answer": answer, "left_rating": "4"})
            assert r.status_code == 303
            acks.append(int(fields["assignment"]))

        def vote_on():   # ...bob votes as fast as he can while the server is killed
            try:
                load.rate_until(base, tokens["bob"], time.monotonic() + 60,
                                random.Random(0), bob_acks, [], statuses, threading.Lock())
            except requests.RequestException:
                pass
        bob_acks: list = []
        voter = threading.Thread(target=vote_on)
        voter.start()
        while len(bob_acks) < 5:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        voter.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = open_store(db)
    stored = {j["rater"]: [] for j in store.judgements()}
    with store.engine.connect() as conn:
        for aid, name in conn.exec_driver_sql(
                "SELECT assignment_id, raters.name FROM judgements JOIN raters "
                "ON raters.id = judgements.rater_id ORDER BY judgements.id"):
            stored[name].append(aid)
    assert stored["alice"] == acks
    bob = [a for _, a in bob_acks]
    # every acknowledged vote is there; at most the one in flight at the kill besides
    assert stored["bob"][:len(bob)] == bob and len(stored["bob"]) - len(bob) <= 1
    assert [j["answer"] for j in store.judgements() if j["rater"] == "alice"] == \
        ["left", "right", "tie"]

    # restarted, the same browser session carries on (the secret key is kept)
    proc, base, _, _ = load.start_server(REAL_RESULTS, db, [])
    try:
        fields = form_fields(session.get(f"{base}/r/{tokens['alice']}").text)
        assert int(fields["assignment"]) not in acks
        r = session.post(f"{base}/r/{tokens['alice']}/vote", allow_redirects=False,
                         data={**fields, "answer": "both_bad"})
        assert r.status_code == 303
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert len([j for j in store.judgements() if j["rater"] == "alice"]) == 4


def test_concurrent_raters_lose_and_double_no_vote(tmp_path):
    db = tmp_path / "h.sqlite"
    names = [f"r{k}" for k in range(20)]
    proc, base, tokens, _ = load.start_server(REAL_RESULTS, db, names)
    try:
        store = open_store(db)
        out = load.run_load(base, store, [tokens[n] for n in names], seconds=5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert len(out["acks"]) >= 20
    assert load.check(store, out["acks"]) == []
    assert {s for _, s in out["statuses"]} == {200, 303}   # no 4xx or 5xx under load
