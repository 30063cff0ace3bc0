"""``creative-sparse human``: paired comparisons by people, and their report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .args import _integer
from .evaluate import _human_votes, _store, _write_report


def run_human(args) -> None:
    base = args.base_url.rstrip("/") if getattr(args, "base_url", None) else None
    if args.action == "report":
        from ..human.aggregate import format_markdown, human_column, summarise, write_csv
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
        from ..human.app import serve
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
        from ..human.store import read_judgements
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
