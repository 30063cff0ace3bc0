"""The decoding engine on the real embedded model."""

import pytest
import torch

from creative_sparse.generation.engine import generate
from creative_sparse.generation.knobs import SamplingParams
from creative_sparse.models.transformers import AttentionKnobs

pytestmark = pytest.mark.slow

HOT = (SamplingParams(temperature=0.9, top_p=0.95), AttentionKnobs(keep_fraction=0.6, noise=0.5))


@pytest.fixture(scope="module")
def chat_ids(smollm2):
    _, tokenizer = smollm2
    messages = [{"role": "user", "content": "Write one sentence about a robot who paints."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def test_dense_greedy_equals_hf_generate(smollm2, chat_ids):
    model, tokenizer = smollm2
    ours = generate(model, tokenizer, chat_ids, num_rows=2, max_new_tokens=20,
                    schedule=(SamplingParams(temperature=0), AttentionKnobs()))
    ref = model.generate(chat_ids, attention_mask=torch.ones_like(chat_ids), do_sample=False,
                         max_new_tokens=20, pad_token_id=tokenizer.eos_token_id)
    ref_ids = [t for t in ref[0, chat_ids.shape[1]:].tolist() if t != tokenizer.eos_token_id]
    assert ours.token_ids[0] == ref_ids and ours.token_ids[1] == ref_ids
    assert ours.stats.attended_fraction == 1.0


def test_reference_row_is_dense_greedy_inside_a_sparse_batch(smollm2, chat_ids):
    model, tokenizer = smollm2
    alone = generate(model, tokenizer, chat_ids, max_new_tokens=20,
                     schedule=(SamplingParams(temperature=0), AttentionKnobs()))
    batch = generate(model, tokenizer, chat_ids, num_rows=3, max_new_tokens=20, schedule=HOT,
                     seeds=[7, 1, 2], reference_rows=[0])
    assert batch.token_ids[0] == alone.token_ids[0]
    assert batch.token_ids[1] != batch.token_ids[0]          # the others still sample
    assert 0 < batch.stats.attended_fraction < 1.0
    with pytest.raises(ValueError, match=r"reference_rows must be row indices in \[0, 3\)"):
        generate(model, tokenizer, chat_ids, num_rows=3, max_new_tokens=2, reference_rows=[3])


def test_same_seeds_same_drafts_different_seeds_different(smollm2, chat_ids):
    model, tokenizer = smollm2
    a = generate(model, tokenizer, chat_ids, num_rows=3, max_new_tokens=24, schedule=HOT,
                 seeds=[1, 2, 3])
    b = generate(model, tokenizer, chat_ids, num_rows=3, max_new_tokens=24, schedule=HOT,
                 seeds=[1, 2, 3])
    c = generate(model, tokenizer, chat_ids, num_rows=3, max_new_tokens=24, schedule=HOT,
                 seeds=[4, 5, 6])
    assert a.texts == b.texts
    assert len(set(a.texts)) == 3 and not set(a.texts) & set(c.texts)
    assert 0.5 < a.stats.attended_fraction < 0.9


def test_stop_strings_streaming_and_stats(smollm2, chat_ids):
    model, tokenizer = smollm2
    pieces = {}
    result = generate(model, tokenizer, chat_ids, num_rows=2, max_new_tokens=40, schedule=HOT,
                      seeds=[7, 8], stop_strings=[","],
                      stream=lambda row, text: pieces.setdefault(row, []).append(text))
    for row, text in enumerate(result.texts):
        assert "," not in text
        assert "".join(pieces.get(row, [])).startswith(text)
        if result.finish_reasons[row] == "stop":
            assert len(result.token_ids[row]) < 40
    stats = result.stats
    assert stats.generated_tokens == sum(len(ids) for ids in result.token_ids)
    assert stats.prompt_tokens == chat_ids.shape[1] and stats.wall_time > 0
    assert stats.flops > 2 * 134e6 * stats.generated_tokens and stats.peak_cache_bytes > 0


def test_schedule_changes_knobs_during_generation(smollm2, chat_ids):
    model, tokenizer = smollm2

    def schedule(step):
        keep = 1.0 if step < 10 else 0.3
        return SamplingParams(temperature=0.7), AttentionKnobs(keep_fraction=keep, sink_tokens=0,
                                                               local_window=0)

    result = generate(model, tokenizer, chat_ids, num_rows=1, max_new_tokens=30,
                      schedule=schedule, seeds=[3])
    assert 0.3 < result.stats.attended_fraction < 1.0


def test_pruned_cache_is_bounded(smollm2, chat_ids):
    model, tokenizer = smollm2
    free = generate(model, tokenizer, chat_ids, num_rows=2, max_new_tokens=40, schedule=HOT,
                    seeds=[1, 2])
    pruned = generate(model, tokenizer, chat_ids, num_rows=2, max_new_tokens=40, schedule=HOT,
                      seeds=[1, 2], max_cache_tokens=48)
    per_token = free.stats.peak_cache_bytes / (chat_ids.shape[1] + 39) / 2
    assert pruned.stats.peak_cache_bytes <= 2 * 49 * per_token
    assert pruned.stats.evicted_tokens > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=""), "prompt is empty"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(num_rows=0), "num_rows must be an int >= 1"),
    (dict(seeds=[1]), "need one per row"),
    (dict(max_new_tokens=9000), "exceeds the model's context"),
])
def test_bad_arguments(smollm2, kwargs, match):
    model, tokenizer = smollm2
    args = dict(prompt="Hello", num_rows=2, max_new_tokens=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, tokenizer, args.pop("prompt"), **args)


def test_continuing_from_the_state_equals_one_long_run(smollm2, chat_ids):
    model, tokenizer = smollm2
    hot = (SamplingParams(temperature=0.9), AttentionKnobs())
    whole = generate(model, tokenizer, chat_ids, num_rows=3, max_new_tokens=24, schedule=hot,
                     seeds=[1, 2, 3])
    first = generate(model, tokenizer, chat_ids, num_rows=3, max_new_tokens=10, schedule=hot,
                     seeds=[1, 2, 3], keep_state=True)
    running = [r for r in range(3) if first.finish_reasons[r] == "length"]
    assert running and first.state.rows == [0, 1, 2]
    # Continue rows 2 and 0 (reordered) greedily from their cached keys and values,
    # and compare with the same rows decoded greedily from scratch.
    state = first.state.select(running[::-1])
    greedy = (SamplingParams(temperature=0), AttentionKnobs())
    rest = generate(model, tokenizer, state, num_rows=len(running), max_new_tokens=8,
                    schedule=greedy, seeds=[0] * len(running))
    assert rest.stats.prompt_tokens == 0
    for out_row, row in enumerate(running[::-1]):
        prefix = torch.cat([chat_ids, torch.tensor([first.token_ids[row]])], dim=1)
        ref = generate(model, tokenizer, prefix, max_new_tokens=8, schedule=greedy)
        assert rest.token_ids[out_row] == ref.token_ids[0]
    assert whole.token_ids[0][:10] == first.token_ids[0][:10]   # same seeds, same start
    with pytest.raises(ValueError, match="subset of the rows"):
        first.state.select([7])


def test_stratified_rows_spread_over_the_first_token_distribution(smollm2, chat_ids):
    from creative_sparse.generation.knobs import sampling_probs

    model, tokenizer = smollm2
    params = SamplingParams(temperature=1.2, top_p=0.99)
    with torch.inference_mode():
        probs = sampling_probs(model(chat_ids).logits[:, -1], params)[0]
    n = 12
    run = generate(model, tokenizer, chat_ids, num_rows=n + 1, max_new_tokens=6,
                   schedule=(params, AttentionKnobs()), seeds=list(range(40, 53)),
                   reference_rows=[0], stratified_steps=6)
    again = generate(model, tokenizer, chat_ids, num_rows=n + 1, max_new_tokens=6,
                     schedule=(params, AttentionKnobs()), seeds=list(range(40, 53)),
                     reference_rows=[0], stratified_steps=6)
    assert run.token_ids == again.token_ids                          # reproducible
    greedy = generate(model, tokenizer, chat_ids, max_new_tokens=6,
                      schedule=(SamplingParams(temperature=0), AttentionKnobs()))
    assert run.token_ids[0] == greedy.token_ids[0]                   # the reference is exact
    # evenly spread codes: a token of probability p opens floor(n p) or ceil(n p) rows
    first = torch.bincount(torch.tensor([ids[0] for ids in run.token_ids[1:]]),
                           minlength=probs.numel())
    expected = probs.double() * n
    assert bool(((first >= expected.floor() - 1e-6) & (first <= expected.ceil() + 1e-6)).all())
    independent = generate(model, tokenizer, chat_ids, num_rows=n, max_new_tokens=1,
                           schedule=(params, AttentionKnobs()), seeds=list(range(41, 53)))
    assert independent.token_ids != [ids[:1] for ids in run.token_ids[1:]]
    with pytest.raises(ValueError, match="stratified_steps must be an int >= 0, got -1"):
        generate(model, tokenizer, chat_ids, max_new_tokens=2, stratified_steps=-1)
