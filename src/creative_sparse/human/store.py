"""The judgement store: outputs to compare, raters, served pairs and votes, in a database.

Any SQLAlchemy URL works (``postgresql://...`` where a team has a server); a plain path
is a SQLite file, opened in WAL mode with ``synchronous=FULL`` and every transaction
``BEGIN IMMEDIATE`` (writers queue on the lock instead of failing on a stale snapshot).

Tables:

* ``items``: one output of one unit of a results file (task, prompt, method, setting,
  seed, output index, text).
* ``raters``: a name and the sha256 of the rater's token (the token itself is shown
  once, in the invitation link, and never stored).
* ``assignments``: a pair served to a rater, with the item shown on each side;
  ``UNIQUE(rater, pair)``, so no rater is served a pair twice.
* ``judgements``: the vote on an assignment, ``UNIQUE(assignment)`` and
  ``UNIQUE(rater, pair)``, so a repeated submit cannot count twice. A vote is
  committed before the next pair is served; a killed server loses none.
* ``meta``: the Flask secret key, the sha256 of the admin token and the identity of the
  run whose outputs are served (a database holds one run).
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

from sqlalchemy import (Column, Float, ForeignKey, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, event, func, insert, select)
from sqlalchemy.exc import IntegrityError

from .schedule import all_pairs, choose_pair, pair_key

__all__ = ["ANSWERS", "EXPORT_FORMAT", "Store", "VoteError", "open_store"]

ANSWERS = ("left", "right", "tie", "both_bad")
EXPORT_FORMAT = "creative-sparse/human-judgements"
EXPORT_VERSION = 1

metadata = MetaData()
meta = Table("meta", metadata, Column("key", String(64), primary_key=True),
             Column("value", Text, nullable=False))
items = Table(
    "items", metadata, Column("id", Integer, primary_key=True),
    Column("task", String(64), nullable=False), Column("prompt_index", Integer, nullable=False),
    Column("prompt", Text, nullable=False), Column("method", String(64), nullable=False),
    Column("setting", Float, nullable=False), Column("seed", Integer, nullable=False),
    Column("output_index", Integer, nullable=False), Column("text", Text, nullable=False),
    UniqueConstraint("task", "prompt_index", "method", "setting", "seed", "output_index"))
raters = Table("raters", metadata, Column("id", Integer, primary_key=True),
               Column("name", String(128), nullable=False, unique=True),
               Column("token_hash", String(64), unique=True),
               Column("created", Float, nullable=False))
assignments = Table(
    "assignments", metadata, Column("id", Integer, primary_key=True),
    Column("rater_id", Integer, ForeignKey("raters.id"), nullable=False),
    Column("pair_key", String(255), nullable=False),
    Column("left_item", Integer, ForeignKey("items.id"), nullable=False),
    Column("right_item", Integer, ForeignKey("items.id"), nullable=False),
    Column("created", Float, nullable=False), UniqueConstraint("rater_id", "pair_key"))
judgements = Table(
    "judgements", metadata, Column("id", Integer, primary_key=True),
    Column("assignment_id", Integer, ForeignKey("assignments.id"), unique=True),
    Column("rater_id", Integer, ForeignKey("raters.id"), nullable=False),
    Column("pair_key", String(255), nullable=False),
    Column("left_item", Integer, ForeignKey("items.id"), nullable=False),
    Column("right_item", Integer, ForeignKey("items.id"), nullable=False),
    Column("answer", String(16), nullable=False),
    Column("left_rating", Integer), Column("right_rating", Integer),
    Column("created", Float, nullable=False), UniqueConstraint("rater_id", "pair_key"))


class VoteError(ValueError):
    """A vote that cannot be recorded; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None   # SQLAlchemy's "begin" event below issues BEGIN
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def open_store(db: str | Path) -> "Store":
    """A :class:`Store` on ``db``: a SQLAlchemy URL or a SQLite file path (created)."""
    url = str(db)
    if "://" not in url:
        path = Path(url)
        if path.is_dir():
            raise ValueError(f"{path} is a directory; give a database file path or URL")
        if not path.parent.exists():
            raise ValueError(f"{path.parent} does not exist (the database's directory)")
        url = f"sqlite:///{path}"
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    metadata.create_all(engine)
    return Store(engine)


class Store:
    """Raters, pairs and votes in one database (see the module doc); thread-safe: every
    method runs in its own transaction."""

    def __init__(self, engine):
        self.engine = engine
        self._rng = random.Random(secrets.randbits(64))
        self._pairs: list[str] | None = None

    # ------------------------------------------------------------------ set-up
    def secret_key(self) -> str:
        """The Flask secret key, made once and kept, so sessions survive a restart."""
        with self.engine.begin() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == "secret_key")).scalar()
            if value is None:
                value = secrets.token_hex(32)
                conn.execute(insert(meta).values(key="secret_key", value=value))
            return value

    def load_results(self, path: str | Path) -> int:
        """Add every output of a results file's units as items; returns how many were new.

        A database holds one run: a results file whose header names another run
        (model, split, library version, outputs, budgets) is refused with ``ValueError``.

        Prompts are taken from the task files (the header's split); a unit of an unknown
        task or a missing prompt is refused with ``ValueError``."""
        from ..evaluation.records import read_results
        from ..tasks import load_task

        from ..evaluation.records import IDENTITY

        results = read_results(path)
        if results.header is None:
            raise ValueError(f"{path}: no such results file")
        identity = json.dumps({k: results.header.get(k) for k in IDENTITY}, sort_keys=True)
        with self.engine.begin() as conn:
            known = conn.execute(select(meta.c.value).where(meta.c.key == "results")).scalar()
            if known is None:
                conn.execute(insert(meta).values(key="results", value=identity))
            elif known != identity:
                raise ValueError(f"{path} is another run ({identity}) than the one this "
                                 f"database's outputs come from ({known}); pairs would mix "
                                 "them: use another --db")
        split = results.header.get("split", "evaluation")
        prompts: dict[str, tuple[str, ...]] = {}
        rows = []
        for unit in results.units.values():
            task = unit["task"]
            if task not in prompts:
                prompts[task] = load_task(task).prompts(split)
            if not 0 <= unit["prompt_index"] < len(prompts[task]):
                raise ValueError(f"{path}: unit {unit['id']} has prompt_index "
                                 f"{unit['prompt_index']}; task {task!r} has "
                                 f"{len(prompts[task])} {split!r} prompts")
            for k, out in enumerate(unit["outputs"]):
                text = out.get("text") if isinstance(out, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}: unit {unit['id']} output {k} has no text")
                rows.append(dict(task=task, prompt_index=unit["prompt_index"],
                                 prompt=prompts[task][unit["prompt_index"]],
                                 method=unit["method"], setting=float(unit["setting"]),
                                 seed=unit["seed"], output_index=k, text=text))
        return self.add_items(rows)

    def add_items(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Insert items that are not there yet (by their identity); returns how many."""
        new = 0
        with self.engine.begin() as conn:
            have = {tuple(r) for r in conn.execute(select(
                items.c.task, items.c.prompt_index, items.c.method, items.c.setting,
                items.c.seed, items.c.output_index))}
            for row in rows:
                key = (row["task"], row["prompt_index"], row["method"], float(row["setting"]),
                       row["seed"], row["output_index"])
                if key not in have:
                    conn.execute(insert(items).values(**dict(row)))
                    have.add(key)
                    new += 1
        self._pairs = None
        return new

    def pairs(self, conn=None) -> list[str]:
        """Every pair that can be served (two methods with outputs on one prompt).

        ``conn``: the caller's open transaction, if any (a second connection would wait
        on the first one's SQLite write lock)."""
        if self._pairs is None:
            if conn is None:
                with self.engine.connect() as own:
                    return self.pairs(own)
            by_prompt: dict[tuple[str, int], set[str]] = {}
            for task, prompt, method in conn.execute(select(
                    items.c.task, items.c.prompt_index, items.c.method).distinct()):
                by_prompt.setdefault((task, prompt), set()).add(method)
            self._pairs = all_pairs(by_prompt)
        return self._pairs

    def add_rater(self, name: str) -> str:
        """A new rater; returns the token (shown once: only its hash is stored)."""
        if not isinstance(name, str) or not name.strip() or len(name) > 128:
            raise ValueError(f"a rater name must be 1-128 characters, got {name!r}")
        token = secrets.token_urlsafe(24)
        with self.engine.begin() as conn:
            old = conn.execute(select(raters.c.id).where(raters.c.name == name)).scalar()
            if old is not None:
                conn.execute(raters.update().where(raters.c.id == old)
                             .values(token_hash=_hash(token)))
            else:
                conn.execute(insert(raters).values(name=name, token_hash=_hash(token),
                                                   created=time.time()))
        return token

    def new_admin_token(self) -> str:
        """A new admin token (replacing any earlier one); only its hash is stored."""
        token = secrets.token_urlsafe(24)
        with self.engine.begin() as conn:
            conn.execute(meta.delete().where(meta.c.key == "admin_token"))
            conn.execute(insert(meta).values(key="admin_token", value=_hash(token)))
        return token

    def has_admin_token(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(meta.c.value).where(meta.c.key == "admin_token")
                                ).scalar() is not None

    # ------------------------------------------------------------------ identity
    def rater(self, token: str) -> dict | None:
        """The rater (``{"id", "name"}``) whose token this is, or ``None``."""
        if not isinstance(token, str) or not token or len(token) > 200:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(raters.c.id, raters.c.name)
                               .where(raters.c.token_hash == _hash(token))).first()
        return None if row is None else {"id": row.id, "name": row.name}

    def is_admin(self, token: str) -> bool:
        if not isinstance(token, str) or not token or len(token) > 200:
            return False
        with self.engine.connect() as conn:
            stored = conn.execute(select(meta.c.value).where(meta.c.key == "admin_token")).scalar()
        return stored is not None and secrets.compare_digest(stored, _hash(token))

    # ------------------------------------------------------------------ serving
    def assignment(self, rater_id: int) -> dict | None:
        """The rater's open assignment, else a new one (:mod:`.schedule`); ``None`` when the
        rater has judged every pair. ``{"id", "task", "prompt", "left", "right"}``, where
        left and right are the texts."""
        with self.engine.begin() as conn:
            open_id = conn.execute(
                select(assignments.c.id)
                .outerjoin(judgements, judgements.c.assignment_id == assignments.c.id)
                .where(assignments.c.rater_id == rater_id, judgements.c.id.is_(None))
                .order_by(assignments.c.id)).scalar()
            if open_id is None:
                open_id = self._new_assignment(conn, rater_id)
                if open_id is None:
                    return None
            a = conn.execute(select(assignments).where(assignments.c.id == open_id)).one()
            left = conn.execute(select(items).where(items.c.id == a.left_item)).one()
            right = conn.execute(select(items).where(items.c.id == a.right_item)).one()
        return {"id": a.id, "task": left.task, "prompt": left.prompt, "left": left.text,
                "right": right.text}

    def _new_assignment(self, conn, rater_id: int) -> int | None:
        counts: Counter = Counter()
        for key, n in conn.execute(select(assignments.c.pair_key, func.count())
                                   .group_by(assignments.c.pair_key)):
            counts[key] += n
        for key, n in conn.execute(select(judgements.c.pair_key, func.count())
                                   .where(judgements.c.assignment_id.is_(None))
                                   .group_by(judgements.c.pair_key)):
            counts[key] += n   # imported votes have no assignment
        seen = set(conn.execute(select(assignments.c.pair_key)
                                .where(assignments.c.rater_id == rater_id)).scalars())
        seen |= set(conn.execute(select(judgements.c.pair_key)
                                 .where(judgements.c.rater_id == rater_id)).scalars())
        key = choose_pair(self.pairs(conn), counts, seen, self._rng)
        if key is None:
            return None
        task, prompt, methods = key.rsplit("/", 2)
        chosen = []
        for method in methods.split("|"):
            ids = conn.execute(select(items.c.id).where(
                items.c.task == task, items.c.prompt_index == int(prompt),
                items.c.method == method).order_by(items.c.id)).scalars().all()
            chosen.append(self._rng.choice(ids))
        self._rng.shuffle(chosen)   # the side is random; method names are never shown
        return conn.execute(insert(assignments).values(
            rater_id=rater_id, pair_key=key, left_item=chosen[0], right_item=chosen[1],
            created=time.time())).inserted_primary_key[0]

    def vote(self, rater_id: int, assignment_id: int, answer: str,
             left_rating: int | None = None, right_rating: int | None = None) -> int:
        """Record a vote and commit it; returns the judgement id.

        Raises :class:`VoteError`: an answer not in :data:`ANSWERS` or a rating outside
        1-5 (status 400), an assignment that is not this rater's (404), one already
        voted on (409)."""
        if answer not in ANSWERS:
            raise VoteError(f"answer must be one of {', '.join(ANSWERS)}, got {answer!r}")
        for side, r in (("left", left_rating), ("right", right_rating)):
            if r is not None and (isinstance(r, bool) or not isinstance(r, int)
                                  or not 1 <= r <= 5):
                raise VoteError(f"{side} rating must be an integer 1-5 or empty, got {r!r}")
        try:
            with self.engine.begin() as conn:
                a = conn.execute(select(assignments).where(
                    assignments.c.id == assignment_id,
                    assignments.c.rater_id == rater_id)).first()
                if a is None:
                    raise VoteError(f"no pair {assignment_id} was served to you", 404)
                return conn.execute(insert(judgements).values(
                    assignment_id=a.id, rater_id=rater_id, pair_key=a.pair_key,
                    left_item=a.left_item, right_item=a.right_item, answer=answer,
                    left_rating=left_rating, right_rating=right_rating,
                    created=time.time())).inserted_primary_key[0]
        except IntegrityError:
            raise VoteError(f"pair {assignment_id} already has your vote", 409) from None

    def progress(self, rater_id: int) -> tuple[int, int]:
        """``(judged, total)``: the rater's votes and the pairs there are."""
        with self.engine.connect() as conn:
            done = conn.execute(select(func.count()).select_from(judgements)
                                .where(judgements.c.rater_id == rater_id)).scalar()
        return done, len(self.pairs())

    # ------------------------------------------------------------------ reading
    def judgements(self) -> list[dict]:
        """Every vote as an export record (see :meth:`export`), in vote order."""
        left, right = items.alias("l"), items.alias("r")
        q = (select(judgements, raters.c.name, *[left.c[c].label("l_" + c) for c in _ITEM],
                    *[right.c[c].label("r_" + c) for c in _ITEM])
             .join(raters, raters.c.id == judgements.c.rater_id)
             .join(left, left.c.id == judgements.c.left_item)
             .join(right, right.c.id == judgements.c.right_item)
             .order_by(judgements.c.id))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [{"type": "judgement", "rater": r.name, "task": r.l_task,
                 "prompt_index": r.l_prompt_index, "prompt": r.l_prompt,
                 "left": _side(r, "l_"), "right": _side(r, "r_"), "answer": r.answer,
                 "left_rating": r.left_rating, "right_rating": r.right_rating,
                 "created": r.created} for r in rows]

    def counts(self) -> dict:
        """For the admin page: votes per (task, method pair), per rater, and in all."""
        per_pair: Counter = Counter()
        per_rater: Counter = Counter()
        for j in self.judgements():
            a, b = sorted((j["left"]["method"], j["right"]["method"]))
            per_pair[(j["task"], a, b)] += 1
            per_rater[j["rater"]] += 1
        with self.engine.connect() as conn:
            names = conn.execute(select(raters.c.name).order_by(raters.c.name)).scalars().all()
            served = conn.execute(select(func.count()).select_from(assignments)).scalar()
        return {"per_pair": dict(sorted(per_pair.items())),
                "per_rater": {n: per_rater.get(n, 0) for n in names},
                "total": sum(per_rater.values()), "served": served, "pairs": len(self.pairs())}

    def export(self, path: str | Path) -> int:
        """Write every vote as JSON lines (a header, then one ``judgement`` per vote);
        returns the number of votes. Written to a temporary file and renamed."""
        path = Path(path)
        records = self.judgements()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"type": "header", "format": EXPORT_FORMAT,
                                "format_version": EXPORT_VERSION}) + "\n")
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        tmp.replace(path)
        return len(records)

    def import_judgements(self, records: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
        """Add exported votes (:func:`read_judgements`); returns ``(added, skipped)``,
        skipped being votes already here (same rater and pair). Raters are created by
        name without a token (``invite`` gives them one)."""
        added = skipped = 0
        records = list(records)
        self.add_items(dict(r[side], task=r["task"], prompt_index=r["prompt_index"],
                            prompt=r["prompt"]) for r in records for side in ("left", "right"))
        for r in records:
            with self.engine.begin() as conn:
                rid = conn.execute(select(raters.c.id).where(raters.c.name == r["rater"])
                                   ).scalar()
                if rid is None:
                    rid = conn.execute(insert(raters).values(
                        name=r["rater"], token_hash=None, created=time.time())
                    ).inserted_primary_key[0]
                ids = [conn.execute(select(items.c.id).where(
                    items.c.task == r["task"], items.c.prompt_index == r["prompt_index"],
                    *[items.c[c] == r[side][c] for c in ("method", "seed", "output_index")],
                    items.c.setting == float(r[side]["setting"]))).scalar_one()
                    for side in ("left", "right")]
                key = pair_key(r["task"], r["prompt_index"], r["left"]["method"],
                               r["right"]["method"])
                if conn.execute(select(judgements.c.id).where(
                        judgements.c.rater_id == rid, judgements.c.pair_key == key)).first():
                    skipped += 1
                    continue
                conn.execute(insert(judgements).values(
                    assignment_id=None, rater_id=rid, pair_key=key, left_item=ids[0],
                    right_item=ids[1], answer=r["answer"], left_rating=r.get("left_rating"),
                    right_rating=r.get("right_rating"), created=r.get("created") or time.time()))
                added += 1
        return added, skipped


_ITEM = ("task", "prompt_index", "prompt", "method", "setting", "seed", "output_index", "text")


def _side(row, prefix: str) -> dict:
    return {c: getattr(row, prefix + c) for c in ("method", "setting", "seed", "output_index",
                                                  "text")}


def read_judgements(path: str | Path) -> list[dict]:
    """The votes of an export file (:meth:`Store.export`), each checked.

    Raises ``ValueError`` naming the file and line: not an export file, a line that is
    not JSON, a vote with a missing or malformed field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such judgements file")
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if number == 1:
                if not (isinstance(r, dict) and r.get("format") == EXPORT_FORMAT):
                    raise ValueError(f"{path}: line 1 is not a {EXPORT_FORMAT} header")
                if r.get("format_version") != EXPORT_VERSION:
                    raise ValueError(f"{path}: format version {r.get('format_version')!r}; "
                                     f"this creative-sparse reads {EXPORT_VERSION}")
                continue
            problem = _check_judgement(r)
            if problem:
                raise ValueError(f"{path}:{number}: {problem}")
            out.append(r)
    return out


def _check_judgement(r) -> str | None:
    if not isinstance(r, dict) or r.get("type") != "judgement":
        return "not a judgement record"
    for key, kind in (("rater", str), ("task", str), ("prompt_index", int), ("prompt", str),
                      ("left", dict), ("right", dict), ("answer", str)):
        if not isinstance(r.get(key), kind):
            return f"field {key!r} missing or not {kind.__name__}"
    if r["answer"] not in ANSWERS:
        return f"answer must be one of {ANSWERS}, got {r['answer']!r}"
    for side in ("left", "right"):
        s = r[side]
        for key, kind in (("method", str), ("setting", (int, float)), ("seed", int),
                          ("output_index", int), ("text", str)):
            if not isinstance(s.get(key), kind):
                return f"{side}.{key} missing or malformed"
        rating = r.get(side + "_rating")
        if rating is not None and (not isinstance(rating, int) or not 1 <= rating <= 5):
            return f"{side}_rating must be 1-5 or null, got {rating!r}"
    if r["left"]["method"] == r["right"]["method"]:
        return "left and right are the same method"
    return None
