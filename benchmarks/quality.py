"""Benchmark: score 64 outputs of ~150 tokens vs one batched forward pass (the floor).

Scoring = MiniLM embeddings (outputs, reference, prompt) + diversity + relevance +
degeneration + SmolLM2 per-token NLL of each output *given the prompt*
(`QualityFunctional.scores(texts, reference, prompt)`), as generation scores its
candidates. The floor is one batched ``model(input_ids, attention_mask)`` over the
outputs alone, timed in the same run. Target: scoring <= 1.5x the floor. Before
timing, the batched NLL is checked against one-text-at-a-time NLL.

    python benchmarks/quality.py [--n 64] [--tokens 150] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from creative_sparse.models import load_model
from creative_sparse.quality import LikelihoodScorer, MiniLMEmbedder, QualityFunctional

WORDS = ("the river light stone morning keeper harbour wind slowly remembered quiet lantern "
         "children across village winter glass promise forty years storm shore watched "
         "and of to in was she he they a her his their over under after before because").split()
PROMPT = ("Write the opening paragraph of a story about a lighthouse keeper who finds a letter "
          "addressed to her from fifty years in the future.")


def make_texts(tok, n: int, tokens: int) -> list[str]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(tokens * 2)]
        ids = tok(" ".join(words).capitalize() + ".", add_special_tokens=False).input_ids
        out.append(tok.decode(ids[:tokens]))
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--tokens", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    model, tok = load_model()
    texts = make_texts(tok, args.n, args.tokens)
    scorer = LikelihoodScorer(model, tok, batch_size=args.n)
    embedder = MiniLMEmbedder()
    qf = QualityFunctional(None, embedder, scorer)
    reference = texts[:4]

    # verify: batched NLL equals one-by-one NLL
    batched = scorer.nll(texts[:8])
    alone = torch.cat([scorer.nll([t]) for t in texts[:8]])
    err = (batched - alone).abs().max().item()
    assert err < 5e-3, f"batched NLL differs from one-by-one by {err}"
    batched = scorer.nll(texts[:8], PROMPT)
    alone = torch.cat([scorer.nll([t], PROMPT) for t in texts[:8]])
    err = (batched - alone).abs().max().item()
    assert err < 5e-3, f"batched NLL given the prompt differs from one-by-one by {err}"

    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    @torch.inference_mode()
    def floor():
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    def score():
        qf.clear_cache()            # time the scoring, not the cache
        qf.scores(texts, reference_data=reference, prompt=PROMPT)

    floor(), score()  # warm-up: allocator, MiniLM load, lazy init
    t_floor = best_of(floor, args.repeats)
    t_score = best_of(score, args.repeats)
    t_nll = best_of(lambda: scorer.nll(texts, PROMPT), args.repeats)
    t_emb = best_of(lambda: embedder.embed(texts), args.repeats)
    print(f"texts: {args.n} x ~{enc['input_ids'].shape[1]} tokens, threads={torch.get_num_threads()}")
    print(f"floor (one batched forward, full logits): {t_floor * 1e3:8.1f} ms")
    print(f"scoring (embed + NLL + Q):                {t_score * 1e3:8.1f} ms  "
          f"= {t_score / t_floor:.2f}x floor (target <= 1.50x)")
    print(f"  of which NLL given the prompt:          {t_nll * 1e3:8.1f} ms  = {t_nll / t_floor:.2f}x")
    print(f"  of which MiniLM embeddings:             {t_emb * 1e3:8.1f} ms  = {t_emb / t_floor:.2f}x")


if __name__ == "__main__":
    main()
