"""Constraint-aware decoding and validators."""

import re

import pytest

from creative_sparse.generation.constraints import (BannedPhrases, ConstraintSet, MinLength,
                                                    RequiredKeywords, abc_notation, python_syntax,
                                                    regex_validator)

GOOD_ABC = """X:1
T:Morning Air
M:6/8
K:D
|:A|dfa afd|efg gfe|dfa afd|e3 d2:|
"""


def test_python_syntax():
    assert python_syntax("def f(x):\n    return x + 1\n") == 0
    assert python_syntax("Here:\n```python\nprint('hi')\n```\nDone.") == 0
    assert python_syntax("def f(x) return x") == 1
    assert python_syntax("```python\nfor i in range(3) print(i)\n```") == 1


def test_abc_notation():
    assert abc_notation(GOOD_ABC) == 0
    assert abc_notation(GOOD_ABC.replace("X:1\n", "")) == 1                 # no X: first
    assert abc_notation(GOOD_ABC.replace("K:D\n", "")) >= 1                 # no key
    assert abc_notation("X:1\nT:t\nK:C\nhello there\n") == 1                # no notes/bars
    assert abc_notation(GOOD_ABC.replace("|:A|", "|:[A|")) == 1             # unbalanced
    assert abc_notation("just some prose about music") >= 3


def test_regex_validator():
    yes_no = regex_validator(r"(yes|no)[.!]?", re.IGNORECASE)
    assert yes_no("Yes.") == 0 and yes_no(" no ") == 0 and yes_no("maybe") == 1
    with pytest.raises(ValueError, match="invalid regex"):
        regex_validator("(unclosed")


def test_constraint_set_counts_violations():
    constraints = ConstraintSet(validators=[python_syntax, regex_validator(r"print.*")])
    assert constraints.violations("print(1)") == 0
    assert constraints.violations("print(") == 1
    assert constraints.violations("x = (") == 2


@pytest.mark.parametrize("bad", [[], [""], "robot", [3]])
def test_bad_phrase_lists(smollm2, bad):
    _, tokenizer = smollm2
    if bad == []:
        assert BannedPhrases(tokenizer, bad).sequences == []
        return
    with pytest.raises(ValueError, match="non-empty strings"):
        BannedPhrases(tokenizer, bad)


@pytest.mark.slow
def test_constraints_reduce_violations_on_the_real_model(smollm2):
    from creative_sparse.generation.engine import generate
    from creative_sparse.generation.knobs import SamplingParams
    from creative_sparse.models.transformers import AttentionKnobs
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "Write two sentences about a robot who paints."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    schedule = (SamplingParams(temperature=0.8, top_p=0.95), AttentionKnobs())
    seeds = list(range(6))
    budget = 40

    def count(texts, check):
        return sum(check(t) for t in texts)

    free = generate(model, tokenizer, ids, num_rows=6, max_new_tokens=budget,
                    schedule=schedule, seeds=seeds)
    banned = BannedPhrases(tokenizer, ["robot", "paint"])
    required = RequiredKeywords(tokenizer, ["moon", "violin"], budget)
    constraints = ConstraintSet([banned, required,
                                 MinLength([tokenizer.eos_token_id], 10)])
    steered = generate(model, tokenizer, ids, num_rows=6, max_new_tokens=budget,
                       schedule=schedule, seeds=seeds, logit_processor=constraints)
    uses_banned = lambda t: bool(re.search(r"\b(robot|paint)\b", t, re.I))  # noqa: E731
    misses = lambda t: sum(k not in t.lower() for k in ("moon", "violin"))  # noqa: E731
    print("free:", free.texts, "\nsteered:", steered.texts)
    assert count(free.texts, uses_banned) >= 3
    assert count(steered.texts, uses_banned) == 0
    assert count(free.texts, misses) >= 10
    assert count(steered.texts, misses) == 0
    assert all(len(t) >= 10 for t in steered.token_ids)


@pytest.mark.slow
def test_banned_phrase_from_other_pieces_is_taken_back(smollm2):
    """" rob" + "ot" is not a tokenization the mask knows ("robot" encodes as one token);
    the engine's one-token backtrack must still keep "robot" out of the text."""
    from creative_sparse.generation.engine import generate

    model, tok = smollm2
    ban = BannedPhrases(tok, ["robot"])
    rob = tok.encode(" rob", add_special_tokens=False)[0]
    ot = tok.encode("ot", add_special_tokens=False)[0]
    assert (rob, ot) not in ban.sequences
    assert ban.rejects(tok.encode("The old rob", add_special_tokens=False), ot)
    assert not ban.rejects(tok.encode("The old rob", add_special_tokens=False),
                           tok.encode("in", add_special_tokens=False)[0])      # "robin" is fine
    assert not ban.rejects(tok.encode("A carrob", add_special_tokens=False), ot)  # not a word start

    def push(step, generated, logits):      # steer hard towards " rob" then "ot"
        logits = logits.clone()
        logits[:, rob if step == 0 else ot] += 50.0
        return logits

    ids = tok("Once upon a time there was a", return_tensors="pt").input_ids
    pushed = generate(model, tok, ids, num_rows=2, max_new_tokens=4, seeds=[1, 2],
                      logit_processor=ConstraintSet([push]))
    assert all("robot" in t for t in pushed.texts), "the push alone must produce the phrase"
    guarded = generate(model, tok, ids, num_rows=2, max_new_tokens=4, seeds=[1, 2],
                       logit_processor=ConstraintSet([push, ban]))
    assert all(g[0] == rob for g in guarded.token_ids)
    assert not any(re.search(r"\brobot", t, re.I) for t in guarded.texts), guarded.texts
