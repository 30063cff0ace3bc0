"""Copy measured autotune results from the local cache into the package's shipped set.

After running, for example, ``creative-sparse tune --task creative_writing --held-out``
on the embedded model at the default budget, this writes every cached entry of
that model into ``src/creative_sparse/autotune/measured/<model>.json`` with the
version fields removed from the keys, so `find_optimal_sparsity` answers from it
on a fresh machine (see `creative_sparse.autotune`).

Usage::

    python scripts/ship_autotune_results.py [--model smollm2-135m] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from creative_sparse.autotune import UNSTABLE_KEY_FIELDS
from creative_sparse.models.cache import default_cache_dir

OUT = Path(__file__).resolve().parents[1] / "src" / "creative_sparse" / "autotune" / "measured"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    root = (args.cache or default_cache_dir()) / "autotune"
    entries = {}
    for path in sorted(root.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        key = {k: v for k, v in data["key"].items() if k not in UNSTABLE_KEY_FIELDS}
        if key["model"] != f"name:{args.model}":
            continue
        entries[json.dumps(key, sort_keys=True)] = {"key": key, "measured_with": {
            k: data["key"][k] for k in UNSTABLE_KEY_FIELDS}, "result": data["result"]}
    OUT.mkdir(parents=True, exist_ok=True)
    target = OUT / f"{args.model}.json"
    target.write_text(json.dumps({"entries": list(entries.values())}, indent=1) + "\n",
                      encoding="utf-8")
    print(f"{len(entries)} entries -> {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
