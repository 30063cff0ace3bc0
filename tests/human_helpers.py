"""Helpers of the human-evaluation tests: a small results file, a served app, a rater
that votes over HTTP."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from pathlib import Path

from creative_sparse.evaluation.records import FORMAT, FORMAT_VERSION, unit_id

REAL_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "evaluation_run" / "results.jsonl"
HOSTILE = ('<script>window.__pwned = 1</script><b>bold</b><img src=x onerror="__pwned=2">'
           '"quotes" & {{ 7*7 }}')


def make_results(path: Path, *, methods=("top_p", "fixed", "creative_sparse"), prompts=2,
                 outputs=2, text=lambda task, p, m, k: f"{m} output {k} for prompt {p}") -> Path:
    """A results file of the poetry task: one unit per (prompt, method), ``outputs`` texts."""
    with open(REAL_RESULTS, encoding="utf-8") as f:   # a real unit's fields, texts replaced
        template = next(r for r in map(json.loads, f) if r["type"] == "unit")
    lines = [{"type": "header", "format": FORMAT, "format_version": FORMAT_VERSION,
              "split": "evaluation", "model": "test", "num_outputs": outputs}]
    for p in range(prompts):
        for m in methods:
            setting = 1.0 if m in ("top_p", "min_p") else 0.6
            lines.append({"type": "unit", "id": unit_id("poetry", p, m, setting, 0),
                          "task": "poetry", "prompt_index": p, "method": m,
                          "knob": "temperature" if m in ("top_p", "min_p") else "level",
                          "setting": setting, "seed": 0,
                          "outputs": [dict(template["outputs"][k % len(template["outputs"])],
                                           text=text("poetry", p, m, k))
                                      for k in range(outputs)],
                          "set": template["set"], "cost": template["cost"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return path


@contextlib.contextmanager
def served(store, threads: int = 8):
    """The app over ``store`` served by waitress on a free localhost port; yields the base
    URL."""
    from waitress import create_server

    from creative_sparse.human.app import create_app

    server = create_server(create_app(store), host="127.0.0.1", port=0, threads=threads)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(timeout=10)


def form_fields(html: str) -> dict | None:
    """The CSRF token and pair id of a rater page, or None when no pair is shown."""
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', html)
    pair = re.search(r'name="assignment" value="(\d+)"', html)
    if not (csrf and pair):
        return None
    return {"csrf_token": csrf.group(1), "assignment": pair.group(1)}


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def chromium(tmp_path: Path, width: int = 1280, height: int = 900):
    """A headless Chromium driven by Debian's chromedriver, with a fresh profile and the
    background services off (they stall on a closed network)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
