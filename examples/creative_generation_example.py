#!/usr/bin/env python3
"""Creative-Sparse, end to end, through the seed library's import path.

    python examples/creative_generation_example.py --demo all
    python examples/creative_generation_example.py --demo attention
    python examples/creative_generation_example.py --demo generation
    python examples/creative_generation_example.py --demo optimization
    python examples/creative_generation_example.py --demo quality

Demos:

* ``attention``: the seed's sparse attention call on random tensors (CPU or GPU),
  with the sparsity it reached and its error against dense attention.
* ``generation``: ``CreativeSparseWrapper.generate_creative`` on the seed's prompts,
  with the Q breakdown of every candidate.
* ``optimization``: ``find_optimal_sparsity`` for a task (cached on disk after the
  first call), then generation at that level: the seed's quick start.
* ``quality``: ``compute_quality_score`` on hand-written outputs.

Everything runs offline on the embedded SmolLM2-135M-Instruct unless ``--model``
names another model.
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPTS = [
    "Write a creative story about a robot learning to paint",
    "Describe a world where colors have sounds",
]


def rule(title: str) -> None:
    print(f"\n{title}\n{'-' * len(title)}")


def demo_attention(args) -> None:
    from spas_sage_attn import spas_sage2_attn_meansim_cuda

    rule("Sparse attention (spas_sage2_attn_meansim_cuda)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    # Random tensors have nothing to skip (no block is self-similar): here each stretch
    # of 256 tokens shares a topic direction, as runs of related tokens do in real text.
    topics = 2.0 * torch.randn(8, 8, 64, generator=g).repeat_interleave(256, dim=1)
    q = (topics + 0.5 * torch.randn(8, 2048, 64, generator=g))[None].to(device, dtype)
    k = (topics + 0.5 * torch.randn(8, 2048, 64, generator=g))[None].to(device, dtype)
    v = torch.randn(1, 8, 2048, 64, generator=g).to(device, dtype)
    out, sparsity = spas_sage2_attn_meansim_cuda(q, k, v, simthreshd1=0.6, cdfthreshd=0.97,
                                                 pvthreshd=15, is_causal=True,
                                                 return_sparsity=True)
    dense = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                             is_causal=True)
    rel_l1 = float((out.float() - dense).abs().sum() / dense.abs().sum())
    print(f"device {device}, q/k/v {tuple(q.shape)}, causal")
    print(f"blocks skipped: {sparsity:.1%}   relative L1 vs dense: {rel_l1:.4f}")


def demo_generation(args) -> None:
    from spas_sage_attn import CreativeSparseWrapper, QualityWeights

    rule("Creative-Sparse generation (diverge -> refine)")
    wrapper = CreativeSparseWrapper(model_name=args.model, sparsity_schedule=(0.7, 0.3),
                                    quality_weights=QualityWeights(alpha=0.4, beta=0.3,
                                                                   gamma=0.3))
    for prompt in PROMPTS:
        start = time.perf_counter()
        result = wrapper.generate_candidates(prompt, max_length=args.max_tokens,
                                             num_candidates=args.candidates, seed=args.seed)
        print(f"\nPrompt: {prompt}   ({time.perf_counter() - start:.1f} s)")
        for rank, cand in enumerate(result.candidates, 1):
            q = cand.quality
            print(f"  #{rank} Q={q.q:+.3f} (N {q.novelty:.2f}, D {q.diversity:.2f}, "
                  f"I {q.incoherence:.2f}, violations {q.violations:g})")
            print("     " + " ".join(cand.text.split())[:300])


def demo_optimization(args) -> None:
    from spas_sage_attn import CreativeSparseWrapper
    from spas_sage_attn.autotune import find_optimal_sparsity

    rule("The seed's quick start: find_optimal_sparsity, then generate at s*")
    wrapper = CreativeSparseWrapper(model_name=args.model, sparsity_schedule=(0.7, 0.3),
                                    quality_weights=(0.4, 0.3, 0.3))
    start = time.perf_counter()
    optimal_sparsity = find_optimal_sparsity(model_name=args.model, task_type=args.task,
                                             compute_budget=args.budget)
    print(f"task {args.task}, budget {args.budget}: s* = {optimal_sparsity:.3f} "
          f"({time.perf_counter() - start:.1f} s; cached on disk for the next call)")
    output = wrapper.generate_creative(prompt=PROMPTS[0], max_length=args.max_tokens,
                                       sparsity_level=optimal_sparsity, seed=args.seed)
    print("Output: " + " ".join(output.split()))


def demo_quality(args) -> None:
    from spas_sage_attn import compute_quality_score

    rule("Quality assessment (compute_quality_score)")
    outputs = ["The robot painted a beautiful sunset with vibrant colors.",
               "Color sounds like music, each hue a different note."]
    reference = ["The robot learned to paint a picture."]
    # With the prompt, Q also judges whether each output answers it (docs/quality.md).
    scores = compute_quality_score(outputs, reference_data=reference,
                                   prompt="Describe a robot learning to paint.")
    for i, (output, score) in enumerate(zip(outputs, scores), 1):
        print(f"  {i}. Q={score:+.3f}  {output}")


DEMOS = {"attention": demo_attention, "generation": demo_generation,
         "optimization": demo_optimization, "quality": demo_quality}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", choices=[*DEMOS, "all"], default="all")
    parser.add_argument("--model", default="smollm2-135m",
                        help="model name or path (default: the embedded SmolLM2-135M)")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="creative_writing")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="compute budget of find_optimal_sparsity (1.0 = the default)")
    args = parser.parse_args(argv)
    names = list(DEMOS) if args.demo == "all" else [args.demo]
    for name in names:
        DEMOS[name](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
