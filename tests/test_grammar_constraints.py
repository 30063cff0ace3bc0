"""Guaranteed constraints (llguidance token masks): regex, JSON schema and a small
context-free grammar on a tiny random Llama with a byte-level BPE tokenizer built
here, against the rejection path; and 0 regex violations from the real model's
refine stage."""

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("llguidance")
tokenizers = pytest.importorskip("tokenizers")

from creative_sparse.generation.constraints import ConstraintSet, MinLength  # noqa: E402
from creative_sparse.generation.engine import generate  # noqa: E402
from creative_sparse.generation.grammar import (  # noqa: E402
    GrammarMask, grammar_source, grammar_validator)
from creative_sparse.generation.knobs import SamplingParams  # noqa: E402
from creative_sparse.generation.wrapper import build_constraints  # noqa: E402
from creative_sparse.models.transformers import AttentionKnobs  # noqa: E402

SAMPLED = (SamplingParams(temperature=1.0), AttentionKnobs())
GREEDY = (SamplingParams(temperature=0), AttentionKnobs())
YES_NO = r"(yes|no), because [a-z ]{3,20}\."
SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]},
                                           "n": {"type": "integer", "maximum": 99}},
          "required": ["colour", "n"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}
LARK = 'start: greeting " " name "."\ngreeting: "hi" | "hello"\nname: /[a-z]{2,5}/\n'


@pytest.fixture(scope="module")
def tiny():
    """A byte-level BPE tokenizer (fast, as llguidance needs) and a random Llama over it."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    corpus = ["yes, because the sky is blue.", "no, because it is late.",
              '{"colour":"red","n":12}', "hi bob. hello alice.", "the quick brown fox"] * 20
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1,
                            special_tokens=["<eos>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer,
                                               eos_token="<eos>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                                      max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def _run(tiny, constraints, rows=8, max_new_tokens=60, schedule=SAMPLED):
    model, tok = tiny
    cs = build_constraints(tok, constraints, max_new_tokens, [tok.eos_token_id])
    prompt = tok("the", return_tensors="pt").input_ids
    out = generate(model, tok, prompt, num_rows=rows, max_new_tokens=max_new_tokens,
                   schedule=schedule, seeds=list(range(rows)), logit_processor=cs)
    return out, cs


@pytest.mark.parametrize("spec,check", [
    ({"regex": YES_NO}, lambda t: re.fullmatch(YES_NO, t.strip())),
    ({"json_schema": SCHEMA},
     lambda t: json.loads(t)["colour"] in ("red", "blue")
     and set(json.loads(t)) == {"colour", "n"}),
    ({"grammar": LARK}, lambda t: re.fullmatch(r"(hi|hello) [a-z]{2,5}\.", t)),
], ids=["regex", "json_schema", "lark_cfg"])
def test_masked_rows_end_in_the_language(tiny, spec, check):
    out, cs = _run(tiny, spec)
    assert out.finish_reasons == ["eos"] * 8          # every row closed its match
    for text in out.texts:
        assert check(text), text
    assert cs.violations(out.texts[0]) == 0
    assert sum(cs.violations(t) for t in ["nonsense", "{}"]) == 2


def test_without_the_mask_the_random_model_breaks_the_regex(tiny):
    """The same rows, unconstrained: violations are counted (the test of the mask
    above can fail)."""
    model, tok = tiny
    validator = build_constraints(tok, {"regex": YES_NO}, 30, [tok.eos_token_id]).validators[0]
    out = generate(model, tok, tok("the", return_tensors="pt").input_ids, num_rows=8,
                   max_new_tokens=30, schedule=SAMPLED, seeds=list(range(8)))
    assert sum(validator(t) for t in out.texts) == 8


def test_rows_sharing_a_history_keep_their_own_parser(tiny):
    """Greedy rows are identical; then a resumed subset continues (states found from
    the history, not from row positions)."""
    model, tok = tiny
    mask = GrammarMask(tok, grammar_source(regex=YES_NO), [tok.eos_token_id])
    prompt = tok("the", return_tensors="pt").input_ids
    first = generate(model, tok, prompt, num_rows=3, max_new_tokens=5, schedule=GREEDY,
                     logit_processor=mask, keep_state=True)
    assert first.token_ids[0] == first.token_ids[1] == first.token_ids[2]
    second = generate(model, tok, first.state.select([2, 0]), num_rows=2, max_new_tokens=60,
                      schedule=SAMPLED, seeds=[4, 5], logit_processor=mask)
    for row, old in zip(second.token_ids, [first.token_ids[2], first.token_ids[0]]):
        assert re.fullmatch(YES_NO, tok.decode(old + row, skip_special_tokens=True).strip())


def test_the_mask_wins_over_softer_steering(tiny):
    """A minimum length far beyond what the regex allows: MinLength masks the end of
    sequence that the grammar alone allows, and the set gives the mask's row back."""
    model, tok = tiny
    mask = GrammarMask(tok, grammar_source(regex="(yes|no)"), [tok.eos_token_id])
    cs = ConstraintSet([MinLength([tok.eos_token_id], 30), mask])
    out = generate(model, tok, tok("the", return_tensors="pt").input_ids, num_rows=4,
                   max_new_tokens=40, schedule=SAMPLED, logit_processor=cs)
    assert out.finish_reasons == ["eos"] * 4
    assert all(t.strip() in ("yes", "no") for t in out.texts)


def test_validator_prefix_check_and_counting(tiny):
    _, tok = tiny
    valid = grammar_validator(tok, grammar_source(lark=LARK))
    assert valid("hi bob.") == 0 and valid(" hello al. ") == 0 and valid("hi bob") == 1
    assert not valid.rejects_prefix("hel") and valid.rejects_prefix("hey")


def test_reject_path_is_still_there_and_says_what_it_covers(tiny):
    _, tok = tiny
    rejecting = build_constraints(tok, {"regex": YES_NO, "enforce": "reject"}, 20, [0])
    assert not any(isinstance(p, GrammarMask) for p in rejecting.processors)
    with pytest.raises(ValueError, match="regexes only"):
        build_constraints(tok, {"grammar": LARK, "enforce": "reject"}, 20, [0])
    with pytest.raises(ValueError, match="enforce must be"):
        build_constraints(tok, {"regex": "a", "enforce": "maybe"}, 20, [0])


@pytest.mark.parametrize("spec,message", [
    ({"regex": "(unclosed"}, "invalid regex"),
    ({"json_schema": "[1, 2]"}, "JSON object"),
    ({"json_schema": "{bad"}, "not valid JSON"),
    ({"grammar": "start: undefined_rule"}, "invalid grammar"),
], ids=["regex", "schema_not_object", "schema_not_json", "lark"])
def test_bad_grammars_fail_clearly(tiny, spec, message):
    _, tok = tiny
    with pytest.raises(ValueError, match=message):
        build_constraints(tok, spec, 20, [0])


def test_grammar_source_needs_exactly_one():
    with pytest.raises(ValueError, match="exactly one"):
        grammar_source()
    with pytest.raises(ValueError, match="exactly one"):
        grammar_source(regex="a", lark="start: \"a\"")


@pytest.mark.slow
def test_refine_returns_no_regex_violation_with_the_real_model(smollm2):
    """Diverge and refine under a regex mask: every candidate matches (0 violations)."""
    from creative_sparse.generation.wrapper import CreativeSparseWrapper

    model, tok = smollm2
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tok)
    pattern = r"(Yes|No), because [a-z ,]{10,80}\."
    result = wrapper.generate_candidates("Is the sea blue? Answer yes or no and why.",
                                         max_length=60, num_candidates=3, seed=0,
                                         constraints={"regex": pattern})
    for cand in result.candidates:
        assert re.fullmatch(pattern, cand.text.strip()), cand.text
        assert cand.quality.violations == 0


def test_regex_holds_in_model_generate(tiny):
    """Our regex constraint as a transformers LogitsProcessor in model.generate: every
    sampled row that ends is a full match; without it, none is."""
    from creative_sparse.generation.processors import as_logits_processor

    model, tok = tiny
    prompt = tok("the", return_tensors="pt").input_ids

    def sample(processors):
        torch.manual_seed(0)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                             top_k=0, max_new_tokens=60, num_return_sequences=6,
                             pad_token_id=tok.eos_token_id,
                             logits_processor=transformers.LogitsProcessorList(processors))
        return [tok.decode(row[prompt.shape[1]:], skip_special_tokens=True)
                for row in out]
    proc = as_logits_processor(tok, {"regex": YES_NO}, prompt_length=prompt.shape[1])
    assert not any(re.fullmatch(YES_NO, t.strip()) for t in sample([]))
    texts = sample([proc])
    assert all(re.fullmatch(YES_NO, t.strip()) for t in texts), texts


class NoEAfterBecause:
    """A validator no grammar here expresses (enforced by rejection): no letter "e"
    after the word "because"."""

    __name__ = "no_e"

    def __call__(self, text):
        return int("e" in text.split("because", 1)[1]) if "because" in text else 0

    def rejects_prefix(self, text):
        return self(text) > 0


def test_mask_composes_with_a_rejection_validator(tiny):
    """The mask first, then the guard: rows match the regex and keep the validator;
    with the mask alone, the validator is broken (so this test can fail)."""
    spec = {"regex": YES_NO, "validators": [NoEAfterBecause()]}
    model, tok = tiny
    cs = build_constraints(tok, spec, 60, [tok.eos_token_id])
    assert [type(p).__name__ for p in cs.processors] == ["GrammarMask", "ValidatorGuard"]
    assert [v.__name__ for v in cs.processors[1].validators] == ["no_e"]   # not the regex
    masked_only, _ = _run(tiny, {"regex": YES_NO})
    assert sum(NoEAfterBecause()(t) for t in masked_only.texts) >= 2
    out, _ = _run(tiny, spec)
    assert out.finish_reasons == ["eos"] * 8
    for text in out.texts:
        assert re.fullmatch(YES_NO, text.strip()) and NoEAfterBecause()(text) == 0, text
