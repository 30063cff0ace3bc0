"""GPU: the integrations and the generation engine on CUDA, on random models (no weights
are downloaded or carried).

Checks, each reported as PASS/FAIL with its figures (the exit status is the count of
failures):

* ``transformers``: a random one-layer Llama (GQA, head dim 64) in bf16 on the GPU, its
  prefill with ``sparsity(model, AttentionKnobs(...))`` through the default backend (the
  Triton INT8 kernel on CUDA, spied on) against the PyTorch backend: the same block
  map, logits within the kernel's quantization error. One layer, because behind it a
  second layer's inputs already differ by that error, and top-k selection at near-ties
  then keeps other blocks (seen on the H200 with four layers: 4.8% relative L1).
* ``engine``: our engine's dense greedy decoding on the GPU (fp32) gives
  ``model.generate``'s tokens; sampling with the dial's knobs at s = 0.8 runs, counts
  sparse attention and is reproducible from its seeds.
* ``speed``: a random model of SmolLM2-135M's shape in bf16, 8 rows x 128 new tokens
  of top-p sampling: ``model.generate`` against our engine dense and at s = 0.8, same
  run (tokens per second and ratios).
* ``diffusers`` (when diffusers is importable): each tiny family (Flux, CogVideoX,
  Wan, HunyuanVideo) in bf16 on the GPU, patched, the Triton backend against the
  PyTorch one on the same maps.

``--device cpu`` is a dry run of the same code (under ``TRITON_INTERPRET=1`` for the
kernel; fp32; smaller), which a test keeps working between GPU sessions.

Usage::

    python benchmarks/gpu_integration.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().sum() / b.abs().sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _KernelSpy:
    """Counts calls of the Triton attention kernel while active."""

    def __init__(self):
        from creative_sparse.attention.backends import triton as backend
        self.backend, self.calls = backend, []

    def __enter__(self):
        kernel = self.original = self.backend.block_sparse_attention

        def spy(q, *args, **kwargs):
            self.calls.append(tuple(q.shape))
            return kernel(q, *args, **kwargs)
        self.backend.block_sparse_attention = spy
        return self

    def __exit__(self, *exc):
        self.backend.block_sparse_attention = self.original


def _digit_tokenizer():
    """The tests' stand-in tokenizer (decodes ids as numbers; no files)."""
    sys.path.insert(0, "tests")
    from _tiny import DigitTokenizer
    return DigitTokenizer()


def _llama(device, dtype, *, vocab=1000, hidden=512, heads=8, kv_heads=2, layers=4,
           intermediate=1024, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=8192, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval().to(device=device, dtype=dtype)


@torch.no_grad()
def check_transformers(device, small: bool) -> dict:
    from creative_sparse.attention.dispatch import select_backend, use_backend
    from creative_sparse.models.transformers import AttentionKnobs, sparsity

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _llama(device, dtype, layers=1)
    length = 384 if small else 2048
    prompt = torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    knobs = AttentionKnobs(keep_fraction=0.25, topk=0.25, simthreshd1=-0.1, sink_tokens=0)
    default = select_backend(device, dtype=dtype)
    runs = {}
    with _KernelSpy() as spy:
        for backend in ("torch", "triton"):
            with use_backend(backend), sparsity(model, knobs) as stats:
                logits = model(prompt).logits
                runs[backend] = (logits, stats.block_sparsity, stats.attended_fraction)
    (exact, *exact_stats), (ours, *our_stats) = runs["torch"], runs["triton"]
    dense = model(prompt).logits
    result = dict(default_backend=default, kernel_calls=len(spy.calls),
                  block_sparsity=our_stats[0], attended_fraction=our_stats[1],
                  same_maps=our_stats == exact_stats,
                  rel_l1_vs_torch_backend=_rel_l1(ours, exact),
                  rel_l1_sparse_vs_dense=_rel_l1(exact, dense))
    tolerance = 0.03 if dtype == torch.bfloat16 else 5e-3
    result["ok"] = bool(
        (device.type != "cuda" or default == "triton")
        and len(spy.calls) == model.config.num_hidden_layers
        and result["same_maps"] and 0.3 < our_stats[0] < 0.8
        and result["rel_l1_vs_torch_backend"] < tolerance)
    return result


@torch.no_grad()
def check_engine(device, small: bool) -> dict:
    from creative_sparse.generation.engine import generate
    from creative_sparse.generation.knobs import SamplingParams, dial
    from creative_sparse.models.transformers import AttentionKnobs

    model = _llama(device, torch.float32, vocab=96, hidden=128, heads=4, kv_heads=2, layers=2)
    tokenizer = _digit_tokenizer()
    ids = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(2)).to(device)
    ours = generate(model, tokenizer, ids, num_rows=2, max_new_tokens=24,
                    schedule=(SamplingParams(temperature=0), AttentionKnobs()))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
    greedy_equal = all(row == ref[0, ids.shape[1]:].tolist() for row in ours.token_ids)
    knobs = dial(0.8)
    schedule = (knobs.sampling, knobs.attention)
    first = generate(model, tokenizer, ids, num_rows=4, max_new_tokens=32, schedule=schedule,
                     seeds=[10, 11, 12, 13])
    again = generate(model, tokenizer, ids, num_rows=4, max_new_tokens=32, schedule=schedule,
                     seeds=[10, 11, 12, 13])
    stats = first.stats
    result = dict(greedy_equals_hf=greedy_equal, sampled_rows=len(first.token_ids),
                  reproducible=first.token_ids == again.token_ids,
                  distinct_rows=len({tuple(t) for t in first.token_ids}),
                  attended_fraction=getattr(stats, "attended_fraction", None))
    result["ok"] = bool(greedy_equal and result["reproducible"] and result["distinct_rows"] > 1)
    return result


@torch.no_grad()
def check_speed(device, small: bool, prompt_tokens: int = 512) -> dict:
    from creative_sparse.generation.engine import generate
    from creative_sparse.generation.knobs import SamplingParams, dial
    from creative_sparse.models.transformers import AttentionKnobs

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if small:
        model = _llama(device, dtype, vocab=500, hidden=64, heads=4, kv_heads=2, layers=2,
                       intermediate=96)
        rows, new, length = 2, 8, 64
    else:   # SmolLM2-135M's shape: 30 layers, 576 wide, 9 heads of 64, 3 KV heads
        model = _llama(device, dtype, vocab=49152, hidden=576, heads=9, kv_heads=3, layers=30,
                       intermediate=1536)
        rows, new, length = 8, 128, prompt_tokens
    ids = torch.randint(0, model.config.vocab_size, (1, length),
                        generator=torch.Generator().manual_seed(3)).to(device)
    tokenizer = _digit_tokenizer()

    def hf():
        torch.manual_seed(0)
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                              top_p=0.9, top_k=0, temperature=1.0, num_return_sequences=rows,
                              max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

    def ours(schedule):
        return lambda: generate(model, tokenizer, ids, num_rows=rows, max_new_tokens=new,
                                schedule=schedule)

    knobs = dial(0.8)
    runs = {"hf_generate": hf,
            "engine_dense": ours((SamplingParams(top_p=0.9), AttentionKnobs())),
            "engine_s0.8": ours((knobs.sampling, knobs.attention))}
    times = {}
    for name, fn in runs.items():
        fn()                                           # warm-up (Triton compiles here)
        best = float("inf")
        for _ in range(1 if small else 3):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - start)
        times[name] = best
    tokens = rows * new
    result = {f"{name}_tok_per_s": round(tokens / t, 1) for name, t in times.items()}
    result["engine_dense_over_hf_time"] = round(times["engine_dense"] / times["hf_generate"], 3)
    result["engine_s0.8_over_hf_time"] = round(times["engine_s0.8"] / times["hf_generate"], 3)
    result["rows"], result["new_tokens"], result["prompt_tokens"] = rows, new, length
    result["ok"] = True   # a measurement: it passes when it runs
    return result


@torch.no_grad()
def check_diffusers(device, small: bool) -> dict:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return {"skipped": "diffusers is not installed", "ok": True}
    from creative_sparse.attention.dispatch import use_backend
    from creative_sparse.models.diffusers import FAMILIES, SparseParams, layer_stats, patched
    from creative_sparse.models.diffusers.tiny import tiny_inputs, tiny_transformer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = {"flux": dict(height=40, width=36),
             "cogvideox": dict(frames=2, height=24, width=20),
             "wan": dict(frames=3, height=20, width=22),
             "hunyuanvideo": dict(frames=2, height=20, width=18, batch=2, pad_text=5)}
    result, ok = {}, True
    for family in FAMILIES:
        model = tiny_transformer(family, head_dim=64 if not small else 16)
        inputs = tiny_inputs(model, **sizes[family])
        model = model.to(device=device, dtype=dtype)
        inputs = {k: (v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                      if torch.is_tensor(v) else v) for k, v in inputs.items()}
        params = SparseParams.uniform(model, simthreshd1=0.0, cdfthreshd=0.5)
        runs = {}
        with _KernelSpy() as spy:
            for backend in ("torch", "triton"):
                with use_backend(backend), patched(model, params):
                    out = model(**inputs).sample
                    runs[backend] = (out, {n: s["sparsity"] for n, s in layer_stats(model).items()})
        (exact, exact_sp), (ours, our_sp) = runs["torch"], runs["triton"]
        rel = _rel_l1(ours, exact)
        tolerance = 0.03 if dtype == torch.bfloat16 else 0.005
        passed = bool(spy.calls and our_sp == exact_sp and rel < tolerance)
        result[family] = dict(kernel_calls=len(spy.calls), same_maps=our_sp == exact_sp,
                              min_sparsity=round(min(exact_sp.values()), 3),
                              rel_l1=rel, ok=passed)
        ok &= passed
    result["ok"] = ok
    return result


CHECKS = {"transformers": check_transformers, "engine": check_engine,
          "speed": check_speed, "diffusers": check_diffusers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[512],
                        help="prompt lengths of the speed check (one run each)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU; use --device cpu for a dry run")
    small = device.type == "cpu"
    results, failures = {}, 0
    jobs = [(name, {}) for name in args.checks if name != "speed"]
    if "speed" in args.checks:
        jobs += [(f"speed@{n}" if len(args.prompt_tokens) > 1 else "speed",
                  {"prompt_tokens": n}) for n in args.prompt_tokens]
    for name, kwargs in jobs:
        start = time.perf_counter()
        try:
            results[name] = CHECKS[name.split("@")[0]](device, small, **kwargs)
        except Exception:   # report and go on: one broken check must not hide the others
            results[name] = {"ok": False, "error": traceback.format_exc(limit=8)}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        failures += not results[name]["ok"]
        print(f"{'PASS' if results[name]['ok'] else 'FAIL'} {name}: "
              f"{json.dumps(results[name], default=str, indent=1)}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
    return failures


if __name__ == "__main__":
    sys.exit(main())
