"""Creative-Sparse generation against plain top-p sampling of the same candidates.

Same run, same prompts, same number of candidates and the same token budget:

* dense: ``model.generate(..., do_sample=True, top_p=0.9, top_k=0,
  num_return_sequences=N, max_new_tokens=T)``;
* Creative-Sparse: ``CreativeSparseWrapper.generate_candidates(prompt, max_length=T,
  num_candidates=N)`` (reference, diverge, selection, refine, scoring).

Prints wall time and peak KV-cache memory of Creative-Sparse as percentages of
dense. The seed reports 79% latency and 69% memory.

A third column separates the engine from the method: the same dense top-p
sampling of N candidates run by our own engine (``generation.engine.generate``
at s = 0, with its oneDNN linear layers and top-k-bounded nucleus), so
"creative / engine" is what the method itself costs over dense sampling with
the same kernels, and "engine / HF" is what the engine saves.

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
from creative_sparse.generation.engine import generate
from creative_sparse.generation.knobs import SamplingParams
from creative_sparse.models import load_model
from creative_sparse.models.kv_cache import cache_bytes, returned_cache
from creative_sparse.models.transformers import AttentionKnobs

PROMPTS = DEMO_PROMPTS  # the prompts of `make demo`


@torch.inference_mode()
def dense_run(model, tokenizer, ids, n: int, max_new_tokens: int, seed: int):
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.9,
                         top_k=0, temperature=1.0, num_return_sequences=n,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
                         return_dict_in_generate=True)
    return time.perf_counter() - start, cache_bytes(returned_cache(out))


@torch.inference_mode()
def verify(model, tokenizer, ids) -> None:
    """Before timing: our engine's dense greedy decoding (oneDNN linears and all) must
    reproduce ``model.generate``'s, token for token."""
    ours = generate(model, tokenizer, ids, num_rows=2, max_new_tokens=24,
                    schedule=(SamplingParams(temperature=0), AttentionKnobs()))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=24, pad_token_id=tokenizer.eos_token_id)
    expected = [t for t in ref[0, ids.shape[1]:].tolist() if t != tokenizer.eos_token_id]
    if ours.token_ids != [expected, expected]:
        raise SystemExit(f"engine and model.generate disagree: {ours.token_ids[0]} vs {expected}")


def engine_dense_run(model, tokenizer, ids, n: int, max_new_tokens: int, seed: int) -> float:
    start = time.perf_counter()
    generate(model, tokenizer, ids, num_rows=n, max_new_tokens=max_new_tokens,
             schedule=(SamplingParams(top_p=0.9), AttentionKnobs()),
             seeds=[seed * 1000 + i for i in range(n)])
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, tokenizer = load_model()
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer)
    verify(model, tokenizer, wrapper.prompt_ids(PROMPTS[0]))
    wrapper.generate_candidates("warm up", max_length=4, num_candidates=2)  # loads MiniLM
    print(f"# SmolLM2-135M-Instruct, N={args.candidates}, {args.max_tokens} new tokens, "
          f"schedule {wrapper.sparsity_schedule}, {torch.get_num_threads()} threads")
    print("| prompt | HF dense s | engine dense s | creative s (diverge / refine / rest) "
          "| time % of HF | % of engine | dense KV MB | creative KV MB | memory % |")
    print("|---|---|---|---|---|---|---|---|---|")
    hf = engine = creative = 0.0
    kv_dense = kv_creative = 0
    for i, prompt in enumerate(PROMPTS):
        ids = wrapper.prompt_ids(prompt)
        t_hf, kv_hf = dense_run(model, tokenizer, ids, args.candidates, args.max_tokens,
                                args.seed)
        t_engine = engine_dense_run(model, tokenizer, ids, args.candidates, args.max_tokens,
                                    args.seed)
        result = wrapper.generate_candidates(prompt, max_length=args.max_tokens,
                                             num_candidates=args.candidates, seed=args.seed)
        t_cs = result.wall_time
        t_div = result.diverge_stats.wall_time
        t_ref = sum(s.wall_time for s in result.refine_stats)
        hf, engine, creative = hf + t_hf, engine + t_engine, creative + t_cs
        kv_dense, kv_creative = max(kv_dense, kv_hf), max(kv_creative, result.peak_cache_bytes)
        print(f"| {i + 1} | {t_hf:.1f} | {t_engine:.1f} | {t_cs:.1f} ({t_div:.1f} / {t_ref:.1f} / "
              f"{t_cs - t_div - t_ref:.1f}) | {100 * t_cs / t_hf:.0f}% "
              f"| {100 * t_cs / t_engine:.0f}% | {kv_hf / 2**20:.1f} "
              f"| {result.peak_cache_bytes / 2**20:.1f} "
              f"| {100 * result.peak_cache_bytes / kv_hf:.0f}% |", flush=True)
    print(f"| all | {hf:.1f} | {engine:.1f} | {creative:.1f} | {100 * creative / hf:.0f}% "
          f"| {100 * creative / engine:.0f}% | {kv_dense / 2**20:.1f} "
          f"| {kv_creative / 2**20:.1f} | {100 * kv_creative / kv_dense:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
