"""Fill the ``reference`` fields of the calibration suite with the embedded model's greedy answers.

The reference is what `CreativeSparseWrapper` measures novelty against: the model's
greedy, dense answer to the prompt ("what it would say anyway"). It is made once and
shipped, so the calibration tests need no generation. Length budgets are the tasks'.

    python scripts/make_calibration_refs.py [--refresh]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from creative_sparse.tasks import load_task
from creative_sparse.generation import SamplingParams, generate
from creative_sparse.models import load_model
from creative_sparse.models.transformers import AttentionKnobs

PATH = Path(__file__).resolve().parents[1] / "src/creative_sparse/quality/data/calibration.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refresh", action="store_true", help="replace existing references")
    args = p.parse_args()
    data = json.loads(PATH.read_text(encoding="utf-8"))
    model, tok = load_model()
    rows = [r for r in data["items"] + data["novelty_pairs"] if args.refresh or not r["reference"]]
    for row in tqdm(rows, desc="greedy references"):
        ids = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        out = generate(model, tok, ids, max_new_tokens=load_task(row["domain"]).max_new_tokens,
                       schedule=(SamplingParams(temperature=0), AttentionKnobs()))
        row["reference"] = out.texts[0] or " "
    PATH.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} references to {PATH}")


if __name__ == "__main__":
    main()
