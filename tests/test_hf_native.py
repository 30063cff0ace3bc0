"""The dial as a native part of transformers: registration on import, a dial the model
carries (every forward, every thread), the context as a scoped override, the dial
saved in the config, and the sampling knobs exported to a ``GenerationConfig``.

Tiny randomly initialised models, except the threaded streaming recipe, which runs
on the real embedded model (slow).
"""

import subprocess
import sys
import threading
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import creative_sparse  # noqa: E402
from creative_sparse.control import SparsityController  # noqa: E402
from creative_sparse.generation.knobs import (Knobs, SamplingParams, dial, min_p_filter,  # noqa: E402
                                              top_k_filter, top_p_filter)
from creative_sparse.models.transformers import (ATTENTION_NAME, AttentionKnobs,  # noqa: E402
                                                 as_knobs, clear_sparsity, set_sparsity,
                                                 sparsity, sparsity_stats)

KNOBS = AttentionKnobs(keep_fraction=0.3, sink_tokens=0, local_window=0)


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_mixtral():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    model = _tiny_llama()
    yield model
    clear_sparsity(model)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(1))


def _in_thread(fn):
    out, errors = [], []

    def run():
        try:
            out.append(fn())
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def test_from_pretrained_knows_the_name_after_the_import_alone(tmp_path):
    """A fresh interpreter: importing the integration is all it takes (no register())."""
    _tiny_llama().save_pretrained(tmp_path)
    code = ("import creative_sparse.models.transformers, transformers; "
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, "
            "attn_implementation='creative_sparse'); print(m.config._attn_implementation)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == ATTENTION_NAME


@torch.no_grad()
def test_carried_dial_applies_on_every_forward_and_in_threads(tiny_llama, ids):
    ref = tiny_llama(ids).logits
    stats = set_sparsity(tiny_llama, KNOBS)
    assert tiny_llama.config._attn_implementation == ATTENTION_NAME
    assert sparsity_stats(tiny_llama) is stats
    here = tiny_llama(ids).logits
    after_one = stats.attended_fraction
    there = _in_thread(lambda: tiny_llama(ids).logits)
    assert torch.equal(here, there) and (here - ref).abs().max() > 1e-4
    assert stats.calls == 4 and stats.sparse_calls == 4          # 2 layers x 2 forwards
    assert after_one < 0.4 and stats.attended_fraction == pytest.approx(after_one)
    clear_sparsity(tiny_llama)
    assert tiny_llama.config._attn_implementation == "sdpa"
    assert not hasattr(tiny_llama.config, "creative_sparse")
    assert sparsity_stats(tiny_llama) is None
    assert torch.equal(tiny_llama(ids).logits, ref)


@torch.no_grad()
def test_context_overrides_the_carried_dial_and_threads_see_it(tiny_llama, ids):
    carried = set_sparsity(tiny_llama, 0.9)
    with sparsity(tiny_llama, AttentionKnobs()) as scoped:      # dense, scoped
        dense = tiny_llama(ids).logits
        # A thread started inside the block has no ContextVar: the block still applies.
        dense_in_thread = _in_thread(lambda: tiny_llama(ids).logits)
    assert scoped.attended_fraction == 1.0 and scoped.calls == 4 and carried.calls == 0
    assert torch.equal(dense, dense_in_thread)
    sparse = tiny_llama(ids).logits                              # the carried dial again
    assert carried.calls == 2 and carried.attended_fraction < 1.0
    assert (sparse - dense).abs().max() > 1e-4
    assert tiny_llama.config._attn_implementation == ATTENTION_NAME


@torch.no_grad()
def test_context_inside_a_thread_started_outside(tiny_llama, ids):
    def work():
        with sparsity(tiny_llama, KNOBS) as stats:
            tiny_llama(ids)
        return stats
    stats = _in_thread(work)
    assert stats.sparse_calls == 2 and stats.attended_fraction < 0.4
    assert tiny_llama.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_the_dial_survives_save_and_load(tiny_llama, ids, tmp_path):
    stats = set_sparsity(tiny_llama, KNOBS)
    expected = tiny_llama(ids).logits
    tiny_llama.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation=ATTENTION_NAME).eval()
    assert loaded.config.creative_sparse["keep_fraction"] == 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # a saved dial is a dial: no warning
        out = loaded(ids).logits
    assert torch.allclose(out, expected, atol=1e-5)
    assert sparsity_stats(loaded).attended_fraction == pytest.approx(stats.attended_fraction)


@torch.no_grad()
def test_a_saved_moe_dial_says_its_routing_needs_set_sparsity(tmp_path, ids):
    model = _tiny_mixtral()
    set_sparsity(model, AttentionKnobs(keep_fraction=0.5, experts_per_token=4))
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation=ATTENTION_NAME).eval()
    with pytest.warns(UserWarning, match="sets MoE routing, which needs the model: call "
                                         r"set_sparsity\(model, model.config.creative_sparse\)"):
        loaded(ids)
    from creative_sparse.models.moe import find_routers
    assert find_routers(loaded)[0].top_k == 2
    set_sparsity(loaded, loaded.config.creative_sparse)
    assert find_routers(loaded)[0].top_k == 4


@torch.no_grad()
def test_no_dial_runs_exact_and_says_so_once(tiny_llama, ids):
    ref = tiny_llama(ids).logits
    tiny_llama.set_attn_implementation(ATTENTION_NAME)
    try:
        with pytest.warns(UserWarning, match="carries no sparsity level: running exact"):
            out = tiny_llama(ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tiny_llama(ids)                              # once per model
    finally:
        tiny_llama.set_attn_implementation("sdpa")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("form", ["level", "params", "knobs", "dial", "dict"])
def test_every_form_of_the_dial_gives_the_same_knobs(form):
    expected = AttentionKnobs.from_params(SparsityController().get_sparsity_params(0.6))
    given = {"level": 0.6, "params": SparsityController().get_sparsity_params(0.6),
             "knobs": expected, "dial": dial(0.6),
             "dict": {k: v for k, v in vars(expected).items()
                      if k not in ("row_seeds", "dense_rows")}}[form]
    assert as_knobs(given) == expected


@torch.no_grad()
def test_sparsity_takes_the_controllers_params(tiny_llama, ids):
    """Issue 16: `sparsity(model, controller.get_sparsity_params(s))` used to raise."""
    with sparsity(tiny_llama, SparsityController().get_sparsity_params(0.9)) as stats:
        tiny_llama(ids)
    assert 0.0 < stats.attended_fraction < 1.0


@pytest.mark.parametrize("bad, match", [
    (1.5, r"outside the allowed range \[0, 1\]"),
    (True, "the dial must be a level s in"),
    ("0.5", "the dial must be a level s in"),
    ({"keep": 0.5}, r"unknown attention knobs \['keep'\]; allowed: keep_fraction"),
    ({"keep_fraction": 0.0}, r"keep_fraction must be in \(0, 1\]"),
])
def test_bad_dials_are_rejected(tiny_llama, bad, match):
    with pytest.raises(ValueError, match=match):
        set_sparsity(tiny_llama, bad)
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_set_sparsity_rejects_a_model_it_cannot_patch():
    with pytest.raises(ValueError, match="not a Hugging Face transformers model"):
        set_sparsity(torch.nn.Linear(2, 2), 0.5)


def test_a_model_that_carries_a_dial_can_still_be_freed():
    import gc
    import weakref

    from creative_sparse.models import transformers as integration

    model = _tiny_mixtral()           # MoE: the carried routing holds hooks on the model
    set_sparsity(model, AttentionKnobs(keep_fraction=0.5, router_temperature=2.0))
    gc.collect()                      # earlier tests' models: gone before counting
    before, gone = len(integration._DIALS), weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None and len(integration._DIALS) == before - 1


@torch.no_grad()
def test_layers_without_one_config_take_a_block_but_cannot_carry(ids):
    import copy

    model = _tiny_llama()
    layer = model.model.layers[1].self_attn
    layer.config = copy.deepcopy(layer.config)
    with pytest.raises(ValueError, match="do not share one config"):
        set_sparsity(model, 0.5)
    with sparsity(model, KNOBS) as stats:
        model(ids)
    # layer 0 ran sparse; layer 1's copied config still names "sdpa" (what it runs)
    assert stats.sparse_calls == 1 and model.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_moe_routing_is_carried_and_restored():
    model = _tiny_mixtral()
    from creative_sparse.models.moe import find_routers
    router = find_routers(model)[0]
    set_sparsity(model, AttentionKnobs(experts_per_token=5, router_temperature=2.0))
    assert router.top_k == 5 and len(router._forward_pre_hooks) == 1
    with sparsity(model, AttentionKnobs(experts_per_token=3, router_temperature=1.5)):
        # the block's routing replaces the carried one (one temperature, not two)
        assert router.top_k == 3 and len(router._forward_pre_hooks) == 1
    assert router.top_k == 5 and len(router._forward_pre_hooks) == 1
    set_sparsity(model, None)
    assert router.top_k == 2 and len(router._forward_pre_hooks) == 0


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("knobs", [
    dial(0.0), dial(0.7), dial(1.0),
    Knobs(0.5, SamplingParams(temperature=0.7, top_p=0.8, top_k=20, min_p=0.05), KNOBS),
], ids=["s=0", "s=0.7", "s=1", "topk-minp"])
@torch.no_grad()
def test_generation_config_samples_what_our_sampler_samples(knobs, ids):
    """transformers' warpers, built from the exported config (over a model whose own
    generation defaults differ), leave the same distribution as our `sample` filters."""
    model = _tiny_llama()
    model.lm_head.weight.mul_(40)              # peaked logits, so that top-p cuts too
    model.generation_config.top_k, model.generation_config.temperature = 50, 0.3
    config = knobs.generation_config(max_new_tokens=1, output_scores=True,
                                     return_dict_in_generate=True)
    out = model.generate(ids, generation_config=config)
    logits = model(ids).logits[:, -1].float() / knobs.sampling.temperature
    p = knobs.sampling
    ours = min_p_filter(top_p_filter(top_k_filter(logits, p.top_k), p.top_p), p.min_p)
    theirs = out.scores[0]
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.isfinite(ours).sum() < ours.shape[-1]          # the filters did cut
    assert torch.allclose(torch.softmax(ours, -1), torch.softmax(theirs, -1), atol=1e-6)


def test_greedy_level_exports_greedy_decoding():
    config = Knobs(0.0, SamplingParams(temperature=0.0), AttentionKnobs()).generation_config()
    assert config.do_sample is False


def test_the_root_exports_the_integration():
    from creative_sparse.models import transformers as integration
    assert creative_sparse.set_sparsity is integration.set_sparsity
    assert creative_sparse.sparsity is integration.sparsity
    assert creative_sparse.dial(0.3) == dial(0.3)


# --------------------------------------------------------------------------- real model
STORY = ("The lighthouse keeper climbed the spiral stairs every evening, counting the steps "
         "as his father had taught him, and at the top he wound the great clockwork that "
         "turned the lens. Ships far out at sea saw the beam sweep across the water, and "
         "the fishermen's wives on the cliffs watched it too, waiting for the boats to come "
         "home through the fog. Continue the story in two sentences.")


@pytest.mark.slow
@torch.no_grad()
def test_threaded_streaming_recipe_runs_sparse(smollm2):
    """The standard streaming recipe (`generate` in a Thread, text from a
    TextIteratorStreamer) with a carried dial: sparse, and the same as the same call
    made in this thread."""
    model, tokenizer = smollm2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": STORY}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    kwargs = dict(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    try:
        stats = set_sparsity(model, 0.8)
        direct = model.generate(**kwargs)
        direct_fraction, direct_calls = stats.attended_fraction, stats.calls
        stats = set_sparsity(model, 0.8)                         # fresh statistics
        streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True,
                                                     skip_special_tokens=True)
        thread = threading.Thread(target=model.generate, kwargs=dict(kwargs, streamer=streamer))
        thread.start()
        text = "".join(streamer)
        thread.join()
    finally:
        clear_sparsity(model)
    assert stats.calls == direct_calls == 12 * model.config.num_hidden_layers
    assert stats.attended_fraction == pytest.approx(direct_fraction)
    assert stats.attended_fraction < 0.9
    assert text == tokenizer.decode(direct[0, ids.shape[1]:], skip_special_tokens=True)
    assert model.config._attn_implementation != ATTENTION_NAME
