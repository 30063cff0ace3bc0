"""The paired-comparison web application (Flask), served by waitress.

Routes:

* ``GET /r/<token>``: the rater page: the prompt and two outputs of different methods
  (side random, method names hidden), the answers "left better / right better / tie /
  both bad", an optional 1-5 rating of each, the rater's progress. Keys: ``A``/``←``
  left better, ``D``/``→`` right better, ``S``/``↓`` tie, ``X`` both bad; ``1``-``5``
  rate the left output, ``Shift`` + ``1``-``5`` (or ``6``-``0``) the right one.
* ``POST /r/<token>/vote``: records the vote in its own transaction, then redirects
  (303) to the rater page, which serves the next pair.
* ``GET /admin/<token>``: votes per task and method pair, per rater, and the running
  Bradley-Terry table (:mod:`.aggregate`); ``GET
  /admin/<token>/judgements.jsonl``: the export.

Generated text is untrusted: Jinja2 autoescapes every template and a Content Security
Policy forbids inline script and anything from elsewhere. Forms carry Flask-WTF's CSRF
token (the synchronizer token kept in the signed session cookie). Tokens travel in the
URL path, so pages send no Referer. A bad or missing token answers 403, a bad field 400,
a vote on a pair not served to the rater 404, a second vote on a pair 409.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, abort, redirect, render_template, request, url_for
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from .store import ANSWERS, Store, VoteError

__all__ = ["ANSWER_LABELS", "create_app", "serve"]

logger = logging.getLogger(__name__)

ADMIN_BOOTSTRAP = 200   # resamples behind the admin page's intervals (the report: --bootstrap)
ANSWER_LABELS = {"left": "Left is better", "right": "Right is better", "tie": "Tie",
                 "both_bad": "Both bad"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; form-action 'self'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def create_app(store: Store) -> Flask:
    """The Flask application over ``store`` (its secret key signs the sessions)."""
    app = Flask(__name__)
    app.config.update(SECRET_KEY=store.secret_key(), SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", WTF_CSRF_TIME_LIMIT=None,
                      MAX_CONTENT_LENGTH=64 * 1024)
    CSRFProtect(app)

    def rater_or_403(token: str) -> dict:
        rater = store.rater(token)
        if rater is None:
            abort(403, "unknown rater token: use the invitation link you were given")
        return rater

    @app.get("/")
    def index():
        return render_template("message.html", title="Paired comparisons",
                               message="Open the invitation link you were given."), 200

    @app.get("/r/<token>")
    def rate(token: str):
        rater = rater_or_403(token)
        done, total = store.progress(rater["id"])
        pair = store.assignment(rater["id"])
        return render_template("rate.html", rater=rater, token=token, pair=pair, done=done,
                               total=total, answers=ANSWER_LABELS)

    @app.post("/r/<token>/vote")
    def vote(token: str):
        rater = rater_or_403(token)
        form = request.form
        raw = form.get("assignment", "")
        # ASCII digits only, and short: int() takes other scripts' digits, SQLite 64 bits
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            abort(400, "field 'assignment' must be the integer id of the pair shown")
        assignment = int(raw)
        answer = form.get("answer", "")
        if answer not in ANSWERS:
            abort(400, f"field 'answer' must be one of {', '.join(ANSWERS)}")
        ratings = []
        for side in ("left", "right"):
            raw = form.get(side + "_rating", "")
            if raw == "":
                ratings.append(None)
            elif raw in ("1", "2", "3", "4", "5"):
                ratings.append(int(raw))
            else:
                abort(400, f"field '{side}_rating' must be 1-5 or empty")
        try:
            store.vote(rater["id"], assignment, answer, *ratings)
        except VoteError as exc:
            abort(exc.status, str(exc))
        return redirect(url_for("rate", token=token), code=303)

    @app.get("/admin/<token>")
    def admin(token: str):
        if not store.is_admin(token):
            abort(403, "the admin page needs the admin token")
        from ..evaluation.methods import METHODS
        from .aggregate import summarise
        votes = store.judgements()
        summaries = summarise(votes, bootstrap=ADMIN_BOOTSTRAP) if votes else []
        labels = {m: METHODS[m].label if m in METHODS else m for m in
                  {s.method for s in summaries}}
        return render_template("admin.html", counts=store.counts(), token=token,
                               summaries=sorted(summaries, key=lambda s: (s.task, -s.strength)),
                               labels=labels, bootstrap=ADMIN_BOOTSTRAP)

    @app.get("/admin/<token>/judgements.jsonl")
    def export(token: str):
        if not store.is_admin(token):
            abort(403, "the export needs the admin token")
        import json
        lines = [json.dumps(r, ensure_ascii=False) for r in store.judgements()]
        return Response("\n".join(lines) + ("\n" if lines else ""),
                        mimetype="application/x-ndjson")

    @app.errorhandler(CSRFError)
    def csrf_error(exc):
        return render_template("message.html", title="Bad request",
                               message=f"The form was stale or forged ({exc.description}). "
                                       "Reload the page and answer again."), 400

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return render_template("message.html", title=f"{exc.code} {exc.name}",
                               message=exc.description), exc.code

    @app.after_request
    def headers(response):
        for key, value in _HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    return app


def serve(store: Store, host: str = "127.0.0.1", port: int = 8000, threads: int = 8,
          ready=None) -> None:
    """Serve the application with waitress until interrupted. ``port=0`` picks a free
    port; ``ready(base_url)`` is called once the socket listens."""
    from waitress import create_server

    server = create_server(create_app(store), host=host, port=port, threads=threads)
    base = f"http://{host}:{server.effective_port}"
    if ready is not None:
        ready(base)
    try:
        server.run()
    finally:
        server.close()
