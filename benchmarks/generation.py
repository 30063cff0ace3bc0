"""Creative-Sparse generation against plain top-p sampling of the same candidates.

Same run, same prompts, same number of candidates and the same token budget:

* dense: ``model.generate(..., do_sample=True, top_p=0.9, top_k=0,
  num_return_sequences=N, max_new_tokens=T)``;
* Creative-Sparse: ``CreativeSparseWrapper.generate_candidates(prompt, max_length=T,
  num_candidates=N)`` (reference, diverge, selection, refine, scoring).

Prints wall time and peak KV-cache memory of Creative-Sparse as percentages of
dense. The seed reports 79% latency and 69% memory.

Usage::

    python benchmarks/generation.py [--candidates 5] [--max-tokens 120]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from creative_sparse.cli import DEMO_PROMPTS
from creative_sparse.generation import CreativeSparseWrapper
from creative_sparse.models import load_model
from creative_sparse.models.kv_cache import cache_bytes

PROMPTS = DEMO_PROMPTS  # the prompts of `make demo`


@torch.inference_mode()
def dense_run(model, tokenizer, ids, n: int, max_new_tokens: int, seed: int):
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.9,
                         top_k=0, temperature=1.0, num_return_sequences=n,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                         return_dict_in_generate=True)
    return time.perf_counter() - start, cache_bytes(out.past_key_values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, tokenizer = load_model()
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer)
    wrapper.generate_candidates("warm up", max_length=4, num_candidates=2)  # loads MiniLM
    print(f"# SmolLM2-135M-Instruct, N={args.candidates}, {args.max_tokens} new tokens, "
          f"schedule {wrapper.sparsity_schedule}, {torch.get_num_threads()} threads")
    print("| prompt | dense s | creative s | time % | dense KV MB | creative KV MB | memory % |")
    print("|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0, 0, 0]
    for i, prompt in enumerate(PROMPTS):
        ids = wrapper.prompt_ids(prompt)
        t_dense, kv_dense = dense_run(model, tokenizer, ids, args.candidates, args.max_tokens,
                                      args.seed)
        result = wrapper.generate_candidates(prompt, max_length=args.max_tokens,
                                             num_candidates=args.candidates, seed=args.seed)
        kv_creative = result.peak_cache_bytes
        totals = [totals[0] + t_dense, totals[1] + result.wall_time,
                  max(totals[2], kv_dense), max(totals[3], kv_creative)]
        print(f"| {i + 1} | {t_dense:.1f} | {result.wall_time:.1f} "
              f"| {100 * result.wall_time / t_dense:.0f}% | {kv_dense / 2**20:.1f} "
              f"| {kv_creative / 2**20:.1f} | {100 * kv_creative / kv_dense:.0f}% |", flush=True)
    print(f"| all | {totals[0]:.1f} | {totals[1]:.1f} | {100 * totals[1] / totals[0]:.0f}% "
          f"| {totals[2] / 2**20:.1f} | {totals[3] / 2**20:.1f} "
          f"| {100 * totals[3] / totals[2]:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
