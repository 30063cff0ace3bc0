"""Constraint-aware decoding and validators."""

import re

import pytest

from creative_sparse.generation.constraints import (BannedPhrases, ConstraintSet, MinLength,
                                                    RequiredKeywords, abc_notation, python_syntax,
                                                    regex_validator)
from creative_sparse.generation.validators import banned_phrases
from creative_sparse.generation.wrapper import build_constraints

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
    assert abc_notation("X:1\nT:t\nK:C\nhello there\n") == 2                # no notes/bars, prose
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


def test_banned_phrases_are_counted_as_whole_words_in_any_case():
    count = banned_phrases(["sea", "deep blue"])
    assert count("The Sea, the sea; the DEEP BLUE sea!") == 4
    assert count("seas, undersea, deep bluest") == 0
    assert banned_phrases([])("the sea") == 0
    with pytest.raises(ValueError, match="non-empty strings"):
        banned_phrases("sea")


@pytest.fixture(scope="module")
def tiny_wrapper():
    """The wrapper over a tiny random Llama with a word-level tokenizer, biased towards
    "sea" (so an unconstrained draft nearly always says it) and away from the end."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from creative_sparse.generation.wrapper import CreativeSparseWrapper
    from creative_sparse.quality import HiddenStateEmbedder, LikelihoodScorer, QualityFunctional
    vocab = {w: i for i, w in enumerate("<unk> <s> </s> the sea is a vast blue and deep".split())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    bias = torch.zeros(len(vocab))
    bias[vocab["sea"]], bias[vocab["</s>"]] = 4.0, -20.0
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tok)
    # The LM's own states as the embedder: no MiniLM to load for a tiny test.
    wrapper.quality = QualityFunctional(wrapper.quality.weights,
                                        embedder=HiddenStateEmbedder(model, tok),
                                        scorer=LikelihoodScorer(model, tok))
    return wrapper


def test_banned_phrases_are_kept_out_of_the_drafts_and_counted_anywhere(tiny_wrapper):
    """Issue 21: banned phrases were enforced only in refine, so the drafts (40% of
    the tokens) carried them into the final texts while `violations` said 0."""
    sea = re.compile(r"\bsea\b", re.I)
    args = dict(max_length=10, num_candidates=3, seed=1)
    free = tiny_wrapper.generate_candidates("the deep blue", **args)
    assert sum(bool(sea.search(d)) for d in free.drafts) >= 4      # the bias works
    result = tiny_wrapper.generate_candidates("the deep blue", constraints={"banned": ["sea"]},
                                              **args)
    assert not [d for d in result.drafts if sea.search(d)]
    assert not [c.text for c in result.candidates if sea.search(c.text)]
    assert all(c.quality.violations == 0 for c in result.candidates)
    # A banned phrase that reaches the final text is a violation, wherever it came from.
    constraints = build_constraints(tiny_wrapper.tokenizer, {"banned": ["sea"]}, 10, [2])
    parts = tiny_wrapper.quality.breakdown(["the sea is a sea", "the deep blue"], ["a"],
                                           "the deep blue", validators=constraints.validators)
    assert [p.violations for p in parts] == [2.0, 0.0]


class _NoSea:
    """A validator with a prefix check: "sea" may never appear."""
    __name__ = "no_sea"

    def __call__(self, text):
        return len(re.findall(r"\bsea\b", text))

    def rejects_prefix(self, text):
        return self(text) > 0


def test_validator_prefix_checks_hold_in_the_drafts_too(tiny_wrapper):
    """A draft opens the answer: one that broke a validator's prefix rule (a tune that
    does not open with X:) cannot be repaired by the refinement, so the guard decodes
    the drafts too, not only the refinement."""
    sea = re.compile(r"\bsea\b", re.I)
    args = dict(max_length=10, num_candidates=3, seed=1)
    result = tiny_wrapper.generate_candidates("the deep blue",
                                              constraints={"validators": [_NoSea()]}, **args)
    assert not [d for d in result.drafts if sea.search(d)]
    assert all(c.quality.violations == 0 for c in result.candidates)


@pytest.mark.parametrize("prompt", ["\ud800", "the sea \udcff is"], ids=["alone", "inside"])
def test_a_lone_surrogate_in_the_prompt_is_a_value_error_that_says_so(tiny_wrapper, prompt):
    """Issue 21: a prompt holding a lone surrogate gave the tokenizer's TypeError
    ("TextEncodeInput must be Union[...]"); it is refused with the reason."""
    from creative_sparse.generation.engine import generate
    with pytest.raises(ValueError, match="prompt is not valid Unicode: it holds a lone "
                                         "surrogate U\\+D[8C][0F]F?"):
        tiny_wrapper.generate_creative(prompt, max_length=4, num_candidates=1)
    with pytest.raises(ValueError, match="prompt is not valid Unicode"):
        generate(tiny_wrapper.model, tiny_wrapper.tokenizer, prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt is not valid Unicode"):
        tiny_wrapper.quality.breakdown(["the sea"], ["a"], prompt)
    with pytest.raises(ValueError, match="banned phrase 0 is not valid Unicode"):
        BannedPhrases(tiny_wrapper.tokenizer, [prompt])


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


def _chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def _free_and_guarded(smollm2, prompt, validator, budget, rows, temperature=None):
    """The same rows (seeds) without and with the validator enforced; by default at
    the refinement level of the dial, else plain sampling at ``temperature``."""
    from creative_sparse.generation.constraints import ValidatorGuard
    from creative_sparse.generation.engine import generate
    from creative_sparse.generation.knobs import SamplingParams
    from creative_sparse.generation.wrapper import CreativeSparseWrapper
    from creative_sparse.models.transformers import AttentionKnobs
    model, tokenizer = smollm2
    ids = _chat(tokenizer, prompt)
    seeds = list(range(rows))
    schedule = (SamplingParams(temperature=temperature, top_p=0.98), AttentionKnobs()) \
        if temperature else CreativeSparseWrapper(model=model, tokenizer=tokenizer).knobs(
            0.3, seeds)
    run = lambda processor: generate(  # noqa: E731
        model, tokenizer, ids, num_rows=rows, max_new_tokens=budget, schedule=schedule,
        seeds=seeds, logit_processor=processor)
    guard = ConstraintSet([ValidatorGuard(tokenizer, [validator], [tokenizer.eos_token_id],
                                          budget)], [validator])
    free, guarded = run(None), run(guard)
    print("free:", free.texts, "\nguarded:", guarded.texts)
    return [validator(t) for t in free.texts], [validator(t) for t in guarded.texts], guarded


@pytest.mark.slow
def test_regex_is_enforced_while_decoding_on_the_real_model(smollm2):
    """Partial matching refuses every token after which the answer can no longer match,
    and the end of the answer until it does."""
    yes_no = regex_validator(r"(yes|no)\.", re.IGNORECASE)
    free, guarded, _ = _free_and_guarded(
        smollm2, "Is the sky blue? Answer with one word, yes or no, then a period.", yes_no,
        budget=12, rows=6, temperature=1.3)
    assert sum(free) >= 3 and sum(guarded) == 0
    sentence = regex_validator(r"[A-Z][a-z ,']*\.")
    free, guarded, result = _free_and_guarded(
        smollm2, "Describe the sea in one short sentence.", sentence, budget=40, rows=6,
        temperature=1.3)
    # A sentence may still be cut by the length budget; every finished one matches.
    assert sum(free) >= 3 and sum(guarded) < sum(free)
    assert all(v == 0 for v, why in zip(guarded, result.finish_reasons) if why == "eos")


@pytest.mark.slow
def test_abc_structure_is_enforced_while_decoding_on_the_real_model(smollm2):
    free, guarded, result = _free_and_guarded(
        smollm2, "Write a short folk tune in ABC music notation, starting with X:1.", abc_notation,
        budget=100, rows=8, temperature=1.0)
    assert sum(guarded) < sum(free)
    assert all(t.lstrip().startswith("X:") for t in result.texts)


@pytest.mark.slow
def test_python_syntax_is_enforced_while_decoding_on_the_real_model(smollm2):
    """At the refinement level with a tight budget, unguarded code is often cut
    mid-block; the guard refuses invalid lines and closes a block whose code parses
    before the budget ends."""
    free = guarded = 0
    for prompt in ("Write a Python function `fizzbuzz(n)` that returns a list of the FizzBuzz "
                   "strings from 1 to n. Reply with only the code.",
                   "Write a Python function `word_count(text)` that returns a dictionary "
                   "mapping each word to how often it occurs. Reply with only the code."):
        f, g, _ = _free_and_guarded(smollm2, prompt, python_syntax, budget=60, rows=6)
        free, guarded = free + sum(f), guarded + sum(g)
    assert free >= 4 and guarded <= free // 2
