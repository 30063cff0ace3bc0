"""Logit processors both ways, on a tiny random Llama: transformers' processors in our
engine (what they see, and the same tokens as ``model.generate``), and our
constraints inside ``model.generate``."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from creative_sparse.generation.engine import generate  # noqa: E402
from creative_sparse.generation.knobs import SamplingParams  # noqa: E402
from creative_sparse.generation.processors import (  # noqa: E402
    TokenGuard, as_logits_processor, combine, is_transformers_convention)
from creative_sparse.models.transformers import AttentionKnobs  # noqa: E402

GREEDY = (SamplingParams(temperature=0), AttentionKnobs())
SAMPLED = (SamplingParams(temperature=1.0), AttentionKnobs())
VOCAB = 96


class Tokenizer:
    """Token i is the word "w<i>"; enough for decoding-based constraints."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [int(w[1:]) for w in text.split()]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, eos_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


PROMPT = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(1))


class Spy:
    """A transformers-convention processor that records what it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append((input_ids.clone(), scores.clone()))
        return scores


def _hf_greedy(model, processor, n):
    out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False,
                         max_new_tokens=n, logits_processor=transformers.LogitsProcessorList(
                             [processor] if processor is not None else []), pad_token_id=0)
    return out[0, PROMPT.shape[1]:].tolist()


@pytest.mark.parametrize("make", [
    lambda: transformers.RepetitionPenaltyLogitsProcessor(penalty=3.0),
    lambda: transformers.NoRepeatNGramLogitsProcessor(2),
], ids=["repetition_penalty", "no_repeat_2gram"])
def test_greedy_with_a_transformers_processor_matches_model_generate(tiny, make):
    n = 24
    ours = generate(tiny, Tokenizer(), PROMPT, max_new_tokens=n, schedule=GREEDY,
                    logit_processor=make()).token_ids[0]
    plain = generate(tiny, Tokenizer(), PROMPT, max_new_tokens=n, schedule=GREEDY).token_ids[0]
    assert ours == _hf_greedy(tiny, make(), n)
    assert ours != plain                 # the processor changed something on this prompt


def test_no_repeat_ngram_holds_in_sampled_rows(tiny):
    rows = generate(tiny, Tokenizer(), PROMPT, num_rows=3, max_new_tokens=30, schedule=SAMPLED,
                    seeds=[1, 2, 3],
                    logit_processor=transformers.NoRepeatNGramLogitsProcessor(2)).token_ids
    for row in rows:
        seq = PROMPT[0].tolist() + row
        bigrams = list(zip(seq, seq[1:]))
        assert len(bigrams) == len(set(bigrams))


@pytest.mark.parametrize("make", [
    lambda: transformers.TypicalLogitsWarper(mass=0.5),
    lambda: transformers.EpsilonLogitsWarper(epsilon=0.02),
], ids=["typical", "epsilon"])
def test_warpers_see_prompt_plus_rows_and_only_kept_tokens_are_sampled(tiny, make):
    """Between two spies, the warper's output equals transformers' own call on the
    ids the engine built (prompt + each row's tokens), and every sampled token is
    one the warper kept, through row exits and a resumed continuation."""
    before, after, warper = Spy(), Spy(), make()
    first = generate(tiny, Tokenizer(), PROMPT, num_rows=4, max_new_tokens=6, schedule=SAMPLED,
                     seeds=[5, 6, 7, 8], logit_processor=[before, warper, after],
                     keep_state=True)
    second = generate(tiny, Tokenizer(), first.state.select([3, 1]), num_rows=2,
                      max_new_tokens=5, schedule=SAMPLED, seeds=[8, 6],
                      logit_processor=[before, warper, after])
    prompt = PROMPT[0].tolist()
    rows = [first.token_ids[r] + second.token_ids[i] for i, r in enumerate([3, 1])]
    for (ids, raw), (ids_after, kept) in zip(before.calls, after.calls):
        assert torch.equal(ids, ids_after)
        assert torch.equal(make()(ids, raw.clone()), kept)
    assert len(after.calls) == 6 + 5
    for k, (ids, kept) in enumerate(after.calls):
        seqs, t = (first.token_ids, k) if k < 6 else (rows, k)
        assert ids.shape[0] == len(seqs)
        for i, seq in enumerate(seqs):
            assert ids[i].tolist() == prompt + seq[:t]
            assert torch.isfinite(kept[i, seq[t]])          # the sampled token was kept
        assert bool(torch.isinf(kept).any())                 # the warper did cut something


def test_rows_of_different_lengths_get_exact_sequences():
    """Resumed rows with histories of different lengths: one call per length group,
    no padding token ever reaches the processor."""
    spy = Spy()
    hook = combine([spy])
    logits = torch.randn(3, VOCAB)
    out = hook(0, [[1, 2], [3], [4, 5]], [[9], [9], [9]], logits)
    assert torch.equal(out, logits)
    seen = sorted(tuple(map(tuple, ids.tolist())) for ids, _ in spy.calls)
    assert seen == [((9, 1, 2), (9, 4, 5)), ((9, 3),)]


def test_conventions_are_told_apart():
    assert is_transformers_convention(transformers.RepetitionPenaltyLogitsProcessor(1.2))
    assert is_transformers_convention(transformers.LogitsProcessorList([]))
    assert is_transformers_convention(lambda input_ids, scores: scores)
    assert not is_transformers_convention(lambda step, generated, logits: logits)
    with pytest.raises(ValueError, match="expected \\(input_ids, scores\\)"):
        combine([lambda a: a])
    with pytest.raises(ValueError, match="must be callable"):
        combine([3])


# --- the other way: our constraints inside model.generate -------------------------

def test_banned_phrase_never_appears_in_model_generate(tiny):
    """A single-token word and a two-token phrase that the same sampling produces
    without the processor are banned through it, and never appear."""
    def sample(processors):
        torch.manual_seed(0)
        out = tiny.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=True,
                            top_k=0, max_new_tokens=30, num_return_sequences=4, pad_token_id=0,
                            logits_processor=transformers.LogitsProcessorList(processors))
        return out[:, PROMPT.shape[1]:].tolist()
    plain = sample([])
    word, pair = plain[0][2], (plain[1][5], plain[1][6])
    proc = as_logits_processor(Tokenizer(), {"banned": [f"w{word}", f"w{pair[0]} w{pair[1]}"]},
                               prompt_length=PROMPT.shape[1], eos_ids=[])
    for row in sample([proc]):
        assert word not in row
        assert pair not in set(zip(row, row[1:]))
    assert isinstance(proc.constraints.processors[0], TokenGuard)


def test_as_logits_processor_rejects_bad_input():
    with pytest.raises(ValueError, match="prompt_length"):
        as_logits_processor(Tokenizer(), {"banned": ["w1"]}, prompt_length=-1)
    with pytest.raises(ValueError, match="unknown constraint types"):
        as_logits_processor(Tokenizer(), {"colour": "red"}, prompt_length=3)


# --- through the wrapper (both stages) and the strategies --------------------------

from test_generation_constraints import tiny_wrapper  # noqa: E402,F401  (fixture)


def test_a_transformers_processor_acts_in_diverge_and_refine(tiny_wrapper):  # noqa: F811
    """The tiny wrapper's model is biased towards "sea": suppressed by transformers'
    own processor, it appears in no draft and no refined candidate; the processor
    saw the prompt in front of every row in both stages."""
    tok = tiny_wrapper.tokenizer
    sea = tok.convert_tokens_to_ids("sea")
    spy = Spy()
    args = dict(max_length=10, num_candidates=3, seed=1)
    free = tiny_wrapper.generate_candidates("the deep blue", **args)
    assert any("sea" in d for d in free.drafts)                 # the bias works
    result = tiny_wrapper.generate_candidates(
        "the deep blue", logits_processor=[transformers.SuppressTokensLogitsProcessor([sea]),
                                           spy], **args)
    assert not [d for d in result.drafts if "sea" in d.split()]
    assert not [c.text for c in result.candidates if "sea" in c.text.split()]
    prompt = tiny_wrapper.prompt_ids("the deep blue")[0].tolist()
    rows = {ids.shape[0] for ids, _ in spy.calls}
    assert 7 in rows and min(rows) <= 3                          # 6 drafts + reference; refine
    assert all(ids[:, :len(prompt)].tolist() == [prompt] * ids.shape[0] for ids, _ in spy.calls)


def test_strategies_take_a_transformers_processor(tiny_wrapper):  # noqa: F811
    from creative_sparse.generation.strategies import DenseTopP, Fixed

    model, tok = tiny_wrapper.model, tiny_wrapper.tokenizer
    sea = tok.convert_tokens_to_ids("sea")
    suppress = transformers.SuppressTokensLogitsProcessor([sea])
    for strategy in (DenseTopP(), Fixed(0.5)):
        free = strategy.generate(model, tok, "the deep blue", num_candidates=3,
                                 max_new_tokens=8)
        assert any("sea" in t.split() for t in free.texts)
        texts = strategy.generate(model, tok, "the deep blue", num_candidates=3,
                                  max_new_tokens=8, logits_processor=suppress).texts
        assert not [t for t in texts if "sea" in t.split()]


def test_progress_ticks_once_per_step(tiny):
    ticks = []
    out = generate(tiny, Tokenizer(), PROMPT, num_rows=2, max_new_tokens=9, schedule=SAMPLED,
                   progress=ticks.append)
    assert ticks == [1] * out.stats.steps and out.stats.steps == 9
