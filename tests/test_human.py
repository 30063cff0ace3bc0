"""creative_sparse.human: scheduling, Bradley-Terry, the store, the app (escaping, tokens,
CSRF, bad fields), export/import and the reports."""

import json
import random
import re
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("flask", reason="needs the 'human' extra")

from creative_sparse.cli import main  # noqa: E402
from creative_sparse.human.aggregate import bradley_terry, human_column, summarise  # noqa: E402
from creative_sparse.human.app import create_app  # noqa: E402
from creative_sparse.human.schedule import all_pairs, choose_pair, pair_key  # noqa: E402
from creative_sparse.human.store import open_store, read_judgements  # noqa: E402
from human_helpers import HOSTILE, form_fields, make_results  # noqa: E402


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "h.sqlite")
    s.load_results(make_results(tmp_path / "results.jsonl"))
    return s


@pytest.fixture
def client(store):
    app = create_app(store)
    return app.test_client()


def page(client, token):
    r = client.get(f"/r/{token}")
    assert r.status_code == 200
    return r.data.decode()


def vote(client, token, answer="left", **extra):
    fields = form_fields(page(client, token))
    return client.post(f"/r/{token}/vote", data={**fields, "answer": answer, **extra})


# ---------------------------------------------------------------- scheduling

def test_pair_keys_are_unordered_and_need_two_methods():
    assert pair_key("poetry", 1, "top_p", "fixed") == pair_key("poetry", 1, "fixed", "top_p")
    with pytest.raises(ValueError, match="two different methods"):
        pair_key("poetry", 1, "fixed", "fixed")


def test_scheduling_covers_every_pair_once_per_rater_and_evenly():
    pairs = all_pairs({("poetry", p): ["a", "b", "c", "d"] for p in range(3)}
                      | {("code", 0): ["a", "b"]})
    assert len(pairs) == 3 * 6 + 1
    rng = random.Random(0)
    counts, seen = Counter(), {r: set() for r in range(3)}
    for step in range(3 * len(pairs)):
        rater = step % 3
        key = choose_pair(pairs, counts, seen[rater], rng)
        assert key not in seen[rater]
        seen[rater].add(key)
        counts[key] += 1
        if (step + 1) % len(pairs) == 0:   # every pair judged equally often so far
            assert set(counts.values()) == {(step + 1) // len(pairs)}
    assert all(choose_pair(pairs, counts, seen[r], rng) is None for r in range(3))
    assert all(seen[r] == set(pairs) for r in range(3))


def test_scheduling_spreads_over_method_pairs_before_repeating_prompts():
    pairs = all_pairs({("poetry", p): ["a", "b", "c"] for p in range(4)})
    counts, seen = Counter(), set()
    rng = random.Random(1)
    first = [choose_pair(pairs, counts, seen, rng) for _ in range(1)]
    for _ in range(2):
        counts[first[-1]] += 1
        seen.add(first[-1])
        first.append(choose_pair(pairs, counts, seen, rng))
    # three votes: three different method pairs, on three different prompts
    assert len({k.split("/")[2] for k in first}) == 3
    assert len({k.split("/")[1] for k in first}) == 3


# ---------------------------------------------------------------- Bradley-Terry

def test_bradley_terry_recovers_known_strengths():
    rng = np.random.default_rng(0)
    true = np.array([0.0, 0.8, -0.5, 1.2])
    wins = np.zeros((4, 4))
    for _ in range(30000):
        i, j = rng.choice(4, 2, replace=False)
        if rng.random() < 1 / (1 + np.exp(true[j] - true[i])):
            wins[i, j] += 1
        else:
            wins[j, i] += 1
    est = bradley_terry(wins)
    np.testing.assert_allclose(est, true - true.mean(), atol=0.05)


def test_bradley_terry_ties_and_sweeps():
    tied = bradley_terry(np.array([[0, 2.5], [2.5, 0]]))
    np.testing.assert_allclose(tied, 0, atol=1e-6)
    sweep = bradley_terry(np.array([[0, 10.0], [0, 0]]))
    assert np.isfinite(sweep).all() and sweep[0] > 1.5
    with pytest.raises(ValueError, match="square non-negative"):
        bradley_terry(np.array([[0, -1.0], [0, 0]]))
    with pytest.raises(ValueError, match="prior"):
        bradley_terry(np.zeros((2, 2)), prior=0)


def _vote(a, b, answer, la=None, lb=None):
    return {"task": "poetry", "left": {"method": a}, "right": {"method": b}, "answer": answer,
            "left_rating": la, "right_rating": lb}


def test_summaries_count_ties_half_and_leave_both_bad_out():
    votes = ([_vote("x", "y", "left", 5, 1)] * 3 + [_vote("y", "x", "tie", 3, 4)] * 2
             + [_vote("x", "y", "both_bad")] * 4)
    s = {m.method: m for m in summarise(votes, bootstrap=200)}
    assert s["x"].votes == s["y"].votes == 9 and s["x"].both_bad == 4
    assert s["x"].win_rate == pytest.approx(4 / 5) and s["y"].win_rate == pytest.approx(1 / 5)
    assert s["x"].rating == pytest.approx((5 * 3 + 4 * 2) / 5) and s["x"].rating_n == 5
    assert s["x"].strength > 0 > s["y"].strength
    lo, hi = s["x"].win_rate_ci
    assert lo <= 0.8 <= hi and lo < hi
    assert human_column(list(s.values())) == {("poetry", "x"): pytest.approx(0.8),
                                              ("poetry", "y"): pytest.approx(0.2)}
    with pytest.raises(ValueError, match="no judgements"):
        summarise([])


# ---------------------------------------------------------------- the app

def test_generated_text_is_escaped(tmp_path):
    store = open_store(tmp_path / "h.sqlite")
    store.load_results(make_results(tmp_path / "r.jsonl", text=lambda *a: HOSTILE))
    token = store.add_rater('<script>name</script>')
    html = page(create_app(store).test_client(), token)
    assert "<script>window" not in html and "<img src=x" not in html and "<b>bold" not in html
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in html
    assert "{{ 7*7 }}" in html and "49" not in html   # not evaluated as a template either
    assert "&lt;script&gt;name&lt;/script&gt;" in html
    r = create_app(store).test_client().get(f"/r/{token}")
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["Referrer-Policy"] == "no-referrer"


def test_method_names_are_hidden_and_sides_random(store, client):
    sides = Counter()
    for k in range(12):
        token = store.add_rater(f"r{k}")
        html = page(client, token)
        j = store.assignment(store.rater(token)["id"])
        assert j["left"] in html and j["right"] in html
        # the texts of this test's file name their method; nothing else may
        html = html.replace(j["left"], "").replace(j["right"], "")
        assert not re.search(r"top_p|fixed|creative_sparse|Dense|Creative", html)
        sides[j["left"].split()[0]] += 1
    assert len(sides) == 3   # every method appeared on the left


def test_a_rater_never_sees_a_pair_twice_and_finishes(store, client):
    token = store.add_rater("alice")
    total = len(store.pairs())
    assert total == 2 * 3
    for _ in range(total):
        assert vote(client, token, "tie", left_rating="2").status_code == 303
    assert "All done" in page(client, token)
    keys = [r[0] for r in store.engine.connect().exec_driver_sql(
        "SELECT pair_key FROM judgements")]
    assert sorted(keys) == sorted(store.pairs())


def test_tokens_are_required(store, client):
    token = store.add_rater("alice")
    fields = form_fields(page(client, token))
    for url in ("/r/nope", "/r/" + "x" * 300):
        assert client.get(url).status_code == 403
        assert client.post(url + "/vote", data={**fields, "answer": "left"}).status_code == 403
    assert client.get("/r/").status_code == 404
    admin = store.new_admin_token()
    assert client.get("/admin/wrong").status_code == 403
    assert client.get(f"/admin/{token}").status_code == 403   # a rater is not an admin
    assert client.get("/admin/wrong/judgements.jsonl").status_code == 403
    assert client.get(f"/admin/{admin}").status_code == 200
    assert store.counts()["total"] == 0


def test_forms_need_the_csrf_token(store, client):
    token = store.add_rater("alice")
    fields = form_fields(page(client, token))
    for csrf in (None, "", "forged", fields["csrf_token"][:-2] + "xx"):
        data = {"assignment": fields["assignment"], "answer": "left"}
        if csrf is not None:
            data["csrf_token"] = csrf
        r = client.post(f"/r/{token}/vote", data=data)
        assert r.status_code == 400, csrf
    other = create_app(store).test_client()   # another browser: its own session
    r = other.post(f"/r/{token}/vote", data={**fields, "answer": "left"})
    assert r.status_code == 400
    assert store.counts()["total"] == 0


@pytest.mark.parametrize("change, status", [
    ({"answer": None}, 400), ({"answer": "maybe"}, 400), ({"answer": "LEFT"}, 400),
    ({"assignment": None}, 400), ({"assignment": "x"}, 400), ({"assignment": "1e3"}, 400),
    ({"assignment": "99999"}, 404), ({"assignment": "9" * 30}, 400),
    ({"assignment": "\u0663"}, 400), ({"assignment": " 1"}, 400), ({"assignment": "-1"}, 400), ({"left_rating": "6"}, 400), ({"left_rating": "0"}, 400),
    ({"right_rating": "abc"}, 400), ({"right_rating": "3.5"}, 400),
], ids=lambda v: repr(v) if isinstance(v, dict) else str(v))
def test_bad_fields_answer_4xx(store, client, change, status):
    token = store.add_rater("alice")
    data = {**form_fields(page(client, token)), "answer": "left"}
    for key, value in change.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    r = client.post(f"/r/{token}/vote", data=data)
    assert r.status_code == status
    assert store.counts()["total"] == 0


def test_other_raters_pairs_oversized_bodies_and_second_votes(store, client):
    alice, bob = store.add_rater("alice"), store.add_rater("bob")
    fields = form_fields(page(client, alice))
    bob_page = create_app(store).test_client()
    bob_fields = form_fields(page(bob_page, bob))
    r = bob_page.post(f"/r/{bob}/vote", data={**bob_fields, "answer": "left",
                                               "assignment": fields["assignment"]})
    assert r.status_code == 404
    assert client.post(f"/r/{alice}/vote", data={**fields, "answer": "right"}).status_code == 303
    assert client.post(f"/r/{alice}/vote", data={**fields, "answer": "left"}).status_code == 409
    big = client.post(f"/r/{alice}/vote", data={**fields, "answer": "x" * 100_000})
    assert big.status_code == 413
    assert client.get(f"/r/{alice}/vote").status_code == 405
    assert [j["answer"] for j in store.judgements() if j["rater"] == "alice"] == ["right"]


# ---------------------------------------------------------------- export, import, reports

def test_a_database_serves_one_run(store, tmp_path):
    assert store.load_results(make_results(tmp_path / "results.jsonl")) == 0   # same run: no-op
    other = make_results(tmp_path / "other.jsonl")
    other.write_text(other.read_text().replace('"model": "test"', '"model": "other"', 1))
    with pytest.raises(ValueError, match="another run.*use another --db"):
        store.load_results(other)


def test_admin_export_lists_every_vote(store, client):
    token, admin = store.add_rater("alice"), store.new_admin_token()
    vote(client, token, "right", right_rating="2")
    r = client.get(f"/admin/{admin}/judgements.jsonl")
    assert r.status_code == 200 and r.mimetype == "application/x-ndjson"
    lines = [json.loads(x) for x in r.data.decode().splitlines()]
    assert lines == store.judgements() and lines[0]["right_rating"] == 2
    assert token not in r.data.decode()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/r/{t}/vote", "/r/{t}", "/admin/{a}", "/r/{t}/vote/x", "/"]),
       method=st.sampled_from(["GET", "POST", "PUT"]),
       form=st.dictionaries(st.sampled_from(["csrf_token", "assignment", "answer",
                                             "left_rating", "right_rating", "other"]),
                            st.text(max_size=30), max_size=6),
       keep_csrf=st.booleans())
def test_no_request_gets_a_500(store, client, path, method, form, keep_csrf):
    token, admin = store.add_rater("fuzz"), store.new_admin_token()
    fields = form_fields(page(client, token))
    if keep_csrf:
        form = {**form, "csrf_token": fields["csrf_token"]}
    r = client.open(path.format(t=token, a=admin), method=method, data=form)
    assert r.status_code in (200, 303) or 400 <= r.status_code < 500, r.status_code


def test_export_import_round_trip(store, client, tmp_path):
    token = store.add_rater("alice")
    for answer in ("left", "right", "both_bad"):
        vote(client, token, answer, left_rating="5")
    assert store.export(tmp_path / "j.jsonl") == 3
    votes = read_judgements(tmp_path / "j.jsonl")
    other = open_store(tmp_path / "other.sqlite")
    assert other.import_judgements(votes) == (3, 0)
    assert other.import_judgements(votes) == (0, 3)
    strip = [{k: v for k, v in j.items()} for j in other.judgements()]
    assert strip == store.judgements()
    assert other.rater(token) is None   # tokens are never exported


def test_read_judgements_names_the_bad_line(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_text('{"format": "other"}\n')
    with pytest.raises(ValueError, match="line 1 is not"):
        read_judgements(p)
    p.write_text('{"type": "header", "format": "creative-sparse/human-judgements", '
                 '"format_version": 1}\n{"type": "judgement", "rater": "a"}\n')
    with pytest.raises(ValueError, match=r"j.jsonl:2: field 'task'"):
        read_judgements(p)


def test_cli_reports_fill_the_human_column(store, client, tmp_path, capsys):
    for k in range(3):
        token = store.add_rater(f"r{k}")
        for _ in range(len(store.pairs())):
            fields = form_fields(page(client, token))
            j = store.assignment(store.rater(token)["id"])
            # creative_sparse always wins, top_p always loses
            rank = {"creative_sparse": 2, "fixed": 1, "top_p": 0}
            left, right = (j["left"].split()[0], j["right"].split()[0])
            answer = "left" if rank[left] > rank[right] else "right"
            client.post(f"/r/{token}/vote", data={**fields, "answer": answer,
                                                  "left_rating": str(1 + 2 * rank[left])})
    store.export(tmp_path / "j.jsonl")
    results = tmp_path / "results.jsonl"
    out = tmp_path / "hr"
    assert main(["human", "report", str(tmp_path / "j.jsonl"), "--out-dir", str(out),
                 "--results", str(results), "--bootstrap", "50"]) == 0
    md = (out / "human.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["Creative-Sparse", "Fixed Sparse",
                                                           "Dense top-p"]
    assert md.count("| 12 | 0 |") == 3   # 3 raters x 6 pairs, each method in 2 of 3
    report = (out / "report.md").read_text()
    tables = report.split("**Frontier verdict")[0]      # the main table, not the gap table
    human = [line.rsplit("|", 2)[1].strip() for line in tables.splitlines()
             if line.startswith("| Creative-Sparse") or line.startswith("| Dense top-p")]
    assert human == ["0.000", "1.000"]
    csv = (out / "human.csv").read_text().splitlines()
    assert csv[0].startswith("task,method,votes") and len(csv) == 4
    assert main(["report", str(results), "--out-dir", str(tmp_path / "r2"), "--no-plots",
                 "--human", str(tmp_path / "h.sqlite")]) == 0
    assert (tmp_path / "r2" / "report.md").read_text() == report


def test_cli_export_import_and_invite(store, tmp_path, capsys):
    db = str(tmp_path / "h.sqlite")
    assert main(["human", "invite", "--db", db, "carol", "--admin",
                 "--base-url", "http://host:9/"]) == 0
    out = capsys.readouterr().out
    token = re.search(r"carol: http://host:9/r/(\S+)", out).group(1)
    admin = re.search(r"admin: http://host:9/admin/(\S+)", out).group(1)
    assert store.rater(token)["name"] == "carol" and store.is_admin(admin)
    client = create_app(store).test_client()
    vote(client, token, "tie")
    assert main(["human", "export", str(tmp_path / "e.jsonl"), "--db", db]) == 0
    assert main(["human", "import", str(tmp_path / "e.jsonl"), "--db",
                 str(tmp_path / "new.sqlite")]) == 0
    assert "1 vote(s) added" in capsys.readouterr().err
    lines = (tmp_path / "e.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["answer"] == "tie"
    with pytest.raises(SystemExit) as exc:
        main(["human", "report", str(tmp_path / "missing.jsonl")])
    assert exc.value.code == 2
    assert "missing.jsonl: no such judgements file" in capsys.readouterr().err


def test_the_first_pair_after_loading_is_served_inside_one_transaction(store):
    # the pair list is built inside the serving transaction (SQLite: BEGIN IMMEDIATE);
    # a second connection there would wait on the first one's lock and fail
    rid = store.rater(store.add_rater("alice"))["id"]
    store._pairs = None
    pair = store.assignment(rid)
    assert pair is not None and pair["task"] == "poetry"
