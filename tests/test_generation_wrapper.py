"""CreativeSparseWrapper on the real embedded model (small budgets)."""

import re

import pytest

from creative_sparse.generation.wrapper import CreativeSparseWrapper, build_constraints

pytestmark = pytest.mark.slow

PROMPT = "Write a short story opening about a robot who learns to paint."


@pytest.fixture(scope="module")
def wrapper(smollm2):
    model, tokenizer = smollm2
    return CreativeSparseWrapper(model=model, tokenizer=tokenizer)


def test_seed_quick_start_shape(wrapper):
    best = wrapper.generate_creative(PROMPT, max_length=30, num_candidates=3, seed=1)
    every = wrapper.generate_creative(PROMPT, max_length=30, num_candidates=3, seed=1,
                                      return_best=False)
    assert isinstance(best, str) and best
    assert every[0] == best and len(every) == 3      # num_candidates, from 6 drafts


def test_candidates_are_ranked_and_reproducible(wrapper):
    a = wrapper.generate_candidates(PROMPT, max_length=30, num_candidates=4, seed=2)
    b = wrapper.generate_candidates(PROMPT, max_length=30, num_candidates=4, seed=2)
    c = wrapper.generate_candidates(PROMPT, max_length=30, num_candidates=4, seed=3)
    assert [x.text for x in a.candidates] == [x.text for x in b.candidates]
    assert a.drafts != c.drafts
    qs = [x.quality.q for x in a.candidates]
    assert qs == sorted(qs, reverse=True)
    assert all(x.text.startswith(x.draft[:20]) for x in a.candidates)
    assert a.diverge_stats.attended_fraction < 1.0   # the diverge level is sparse


def test_equal_compute_drafts_as_many_as_it_returns(wrapper):
    """num_drafts = num_candidates and a given reference: no reference row, no choice,
    every draft refined; the decoded tokens are at most num_candidates * max_length."""
    ref = wrapper.greedy_reference(PROMPT, 20)
    result = wrapper.generate_candidates(PROMPT, max_length=20, num_candidates=3, seed=5,
                                         num_drafts=3, reference=ref)
    assert result.reference == ref and len(result.drafts) == 3 and len(result.candidates) == 3
    assert sorted(c.draft for c in result.candidates) == sorted(result.drafts)
    decoded = result.diverge_stats.generated_tokens + sum(
        s.generated_tokens for s in result.refine_stats)
    assert decoded <= 3 * 20
    default = wrapper.generate_candidates(PROMPT, max_length=20, num_candidates=3, seed=5)
    assert len(default.drafts) == 6       # num_candidates / keep_fraction, plus the reference
    assert default.diverge_stats.generated_tokens > result.diverge_stats.generated_tokens


def test_constraints_apply_in_refine(wrapper):
    result = wrapper.generate_candidates(PROMPT, max_length=40, num_candidates=4, seed=4,
                                         constraints={"banned": ["the"], "min_tokens": 5,
                                                      "validators": ["regex:.*\\."]})
    for cand in result.candidates:
        refined_part = cand.text[len(cand.draft):]
        assert not re.search(r"\bthe\b", refined_part, re.I)
        assert cand.quality.violations in (0.0, 1.0)


def test_banned_phrases_stay_out_of_the_whole_text(wrapper):
    """Issue 21: the drafts (40% of the tokens) were unconstrained, so "robot" reached
    9 of 10 final candidates while their violations said 0."""
    robot = re.compile(r"\brobots?\b", re.I)
    args = dict(max_length=30, num_candidates=4, seed=5)
    free = wrapper.generate_candidates(PROMPT, **args)
    assert sum(bool(robot.search(d)) for d in free.drafts) >= 2, free.drafts   # it can fail
    result = wrapper.generate_candidates(PROMPT, constraints={"banned": ["robot", "robots"]},
                                         **args)
    print("drafts:", result.drafts, "\ncandidates:", [c.text for c in result.candidates])
    assert not [d for d in result.drafts if robot.search(d)]
    for cand in result.candidates:
        assert not robot.search(cand.text) and cand.quality.violations == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=""), "prompt must be a non-empty string"),
    (dict(max_length=0), "max_length must be an int >= 1"),
    (dict(num_candidates=0), "num_candidates must be an int >= 1"),
    (dict(sparsity_level=1.5), "outside the allowed range"),
    (dict(constraints={"rhyme": True}), "unknown constraint types"),
    (dict(constraints={"validators": ["lisp"]}), "unknown validator"),
    (dict(num_drafts=1), r"num_drafts must be an int >= num_candidates \(2\)"),
    (dict(num_drafts=2.0), "num_drafts must be an int"),
    (dict(reference=b"bytes"), "reference"),
])
def test_bad_arguments(wrapper, kwargs, match):
    args = dict(prompt=PROMPT, max_length=10, num_candidates=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        wrapper.generate_candidates(**args)


def test_seed_weights_tuple_and_quality_functional_name(smollm2):
    model, tokenizer = smollm2
    w = CreativeSparseWrapper(model=model, tokenizer=tokenizer, quality_weights=(0.5, 0.2, 0.3))
    assert (w.quality.weights.alpha, w.quality.weights.beta, w.quality.weights.gamma) == \
        (0.5, 0.2, 0.3)
    assert w.quality_functional is w.quality
    with pytest.raises(ValueError, match=r"\(alpha, beta, gamma\) tuple, got \(0.5, 0.5\)"):
        CreativeSparseWrapper(model=model, tokenizer=tokenizer, quality_weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="all 0"):
        CreativeSparseWrapper(model=model, tokenizer=tokenizer, quality_weights=(0, 0, 0))


def test_bad_schedule(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(ValueError, match="refine .* must not exceed diverge"):
        CreativeSparseWrapper(model=model, tokenizer=tokenizer, sparsity_schedule=(0.3, 0.7))
    with pytest.raises(ValueError, match="outside the allowed range"):
        CreativeSparseWrapper(model=model, tokenizer=tokenizer, sparsity_schedule=(1.2, 0.3))


def test_apply_sparse_attention_uses_the_dial(wrapper):
    import torch
    q = k = v = torch.randn(1, 2, 300, 32)
    out = wrapper.apply_sparse_attention(q, k, v, 0.5, is_causal=True)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_build_constraints_passthrough(smollm2):
    _, tokenizer = smollm2
    assert build_constraints(tokenizer, None, 10, [0]).processors == []
    with pytest.raises(ValueError, match="dict or a ConstraintSet"):
        build_constraints(tokenizer, ["banned"], 10, [0])


def test_chat_messages_with_a_system_prompt(wrapper, monkeypatch):
    """A chat (system prompt included) reaches the model through the chat template, and Q
    judges relevance against the user turn, not the instructions."""
    chat = [{"role": "system", "content": "You answer in French."},
            {"role": "user", "content": PROMPT}]
    ids = wrapper.prompt_ids(chat)
    text = wrapper.tokenizer.decode(ids[0])
    assert "You answer in French." in text and PROMPT in text
    assert "You answer in French." not in wrapper.tokenizer.decode(wrapper.prompt_ids(PROMPT)[0])
    seen = []
    breakdown = wrapper.quality.breakdown
    monkeypatch.setattr(wrapper.quality, "breakdown",
                        lambda *a, **k: seen.append(a[2]) or breakdown(*a, **k))
    result = wrapper.generate_candidates(chat, max_length=12, num_candidates=2, seed=1)
    assert len(result.candidates) == 2 and seen and set(seen) == {PROMPT}
    with pytest.raises(ValueError, match="the chat must end with a user message"):
        wrapper.generate_candidates(chat[:1], max_length=12, num_candidates=2)
