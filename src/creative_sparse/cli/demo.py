"""``creative-sparse demo``: sparse attention against dense SDPA (accuracy, speed), then
Creative-Sparse beside plain top-p sampling on the embedded model."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


def structured_qkv(batch: int, heads: int, length: int, head_dim: int, *,
                   amplitude: float = 2.0, noise: float = 0.5, seed: int = 0):
    """Queries, keys and values with positional structure, like a real model's.

    Each row is a slowly rotating positional code (so nearby positions attend to
    each other and neighbouring rows are similar) plus Gaussian noise; values
    vary smoothly with position. Returns three ``[batch, heads, length, head_dim]``
    fp32 tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(length, dtype=torch.float32)
    half = head_dim // 2
    freqs = 0.05 / (200.0 ** (torch.arange(half, dtype=torch.float32) / max(half, 1)))
    angles = pos[:, None] * freqs[None, :]
    code = torch.cat([angles.cos(), angles.sin()], dim=-1)
    code = F.pad(code, (0, head_dim - code.shape[-1]))

    def noisy(scale_signal: float) -> torch.Tensor:
        shape = (batch, heads, length, head_dim)
        return scale_signal * code + noise * torch.randn(shape, generator=gen)

    return noisy(amplitude), noisy(amplitude), noisy(1.0)


def _timed(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def run_demo(length: int = 4096, heads: int = 9, head_dim: int = 64) -> None:
    from ..attention import sparse_attention
    from ..attention.dispatch import select_backend

    backend = select_backend("cpu")  # builds the compiled kernel on first use
    q, k, v = structured_qkv(1, heads, length, head_dim)
    print(f"Sparse attention demo: B=1, H={heads}, L={length}, D={head_dim}, backend "
          f"{backend}, {torch.get_num_threads()} threads")
    print(f"{'setting':<28} {'causal':<7} {'sparsity':>8} {'rel L1':>8} {'cos':>9} "
          f"{'dense ms':>9} {'sparse ms':>9} {'speedup':>8}")
    settings = [("cdfthreshd=0.99", dict(cdfthreshd=0.99)),
                ("cdfthreshd=0.97 (default)", dict(cdfthreshd=0.97)),
                ("topk=0.25", dict(topk=0.25, simthreshd1=-0.1))]
    for causal in (False, True):
        dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ref = dense()
        t_dense = _timed(dense)
        for name, params in settings:
            sparse = lambda: sparse_attention(q, k, v, is_causal=causal, return_sparsity=True,
                                              **params)
            out, sparsity = sparse()
            t_sparse = _timed(sparse)
            diff = (out - ref).abs().sum() / ref.abs().sum()
            cos = F.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0)
            print(f"{name:<28} {str(causal):<7} {sparsity:>8.3f} {diff.item():>8.4f} "
                  f"{cos.item():>9.6f} {t_dense * 1e3:>9.0f} {t_sparse * 1e3:>9.0f} "
                  f"{t_dense / t_sparse:>7.2f}x")
    print("sparse ms includes the block prediction; see benchmarks/attention.py for the "
          "kernel-only table.")


DEMO_PROMPTS = [
    "Describe a robot learning to paint in a way that's both technically accurate and "
    "emotionally engaging.",
    "Write the opening of a story set in a lighthouse at the edge of the world.",
    "Write a slogan and two lines of ad copy for a bicycle made of bamboo.",
]


def run_creative_demo(prompts=DEMO_PROMPTS, candidates: int = 5, max_tokens: int = 100,
                      seed: int = 0) -> None:
    """The main job: Creative-Sparse beside plain top-p sampling of as many candidates."""
    from ..generation import CreativeSparseWrapper
    from ..models import load_model
    from ..models.kv_cache import cache_bytes, returned_cache

    start = time.perf_counter()
    model, tokenizer = load_model()
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer)
    print(f"\nSmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.1f} s. "
          f"Creative-Sparse (schedule {wrapper.sparsity_schedule}) beside plain top-p "
          f"sampling (p=0.9), {candidates} candidates of {max_tokens} tokens each.")

    def line(name, texts, qualities, seconds, kv):
        mean = lambda f: sum(getattr(q, f) for q in qualities) / len(qualities)  # noqa: E731
        best = max(q.q for q in qualities)
        distinct = wrapper.quality.distinct_answers(texts)
        return (f"  {name:<15} best Q {best:+.3f} | mean novelty {mean('novelty'):.2f} "
                f"diversity {mean('diversity'):.2f} incoherence {mean('incoherence'):.2f} "
                f"relevance {mean('relevance'):.2f} | {distinct}/{len(texts)} distinct "
                f"| {seconds:5.1f} s, peak KV {kv / 2**20:.1f} MB")

    for i, prompt in enumerate(prompts, 1):
        print(f"\n[{i}/{len(prompts)}] {prompt}")
        ids = wrapper.prompt_ids(prompt)
        torch.manual_seed(seed)
        begin = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 top_p=0.9, top_k=0, num_return_sequences=candidates,
                                 max_new_tokens=max_tokens, pad_token_id=tokenizer.eos_token_id,
                                 return_dict_in_generate=True)
        t_plain = time.perf_counter() - begin
        plain = [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() or " "
                 for row in out.sequences]
        result = wrapper.generate_candidates(prompt, max_length=max_tokens,
                                             num_candidates=candidates, seed=seed)
        plain_q = wrapper.quality.breakdown(plain, [result.reference or " "], prompt)
        kv_creative = result.peak_cache_bytes
        print(line("top-p sampling", plain, plain_q, t_plain, cache_bytes(returned_cache(out))))
        print(line("Creative-Sparse", [c.text or " " for c in result.candidates],
                   [c.quality for c in result.candidates], result.wall_time, kv_creative))
        best_plain = plain[max(range(len(plain)), key=lambda j: plain_q[j].q)]
        print(f"  best top-p:          {best_plain[:300]}")
        print(f"  best Creative-Sparse: {result.best.text[:300]}")
    print(f"\nTop-p sampling here is model.generate. Creative-Sparse drafts "
          f"{math.ceil(candidates / wrapper.keep_fraction)} short candidates at its diverge "
          f"level ({wrapper.sparsity_schedule[0]:g}) and refines the {candidates} chosen as a "
          "set; its time includes the drafts, the "
          "greedy reference row and the scoring. benchmarks/generation.py times dense "
          "sampling in the same engine.")
