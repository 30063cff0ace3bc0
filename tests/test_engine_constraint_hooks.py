"""The engine's constraint hooks on a tiny random Llama: backtracking and what
constraints see of a row's history."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from creative_sparse.generation.engine import generate  # noqa: E402
from creative_sparse.generation.knobs import SamplingParams  # noqa: E402
from creative_sparse.models.transformers import AttentionKnobs  # noqa: E402

SCHEDULE = (SamplingParams(temperature=1.0), AttentionKnobs())


class Tokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class Recorder:
    """Sees every step's histories; refuses every token but ``only`` (if set)."""

    def __init__(self, only=None):
        self.only, self.seen = only, []

    def __call__(self, step, generated, logits):
        self.seen.append([list(ids) for ids in generated])
        return logits

    def rejects(self, ids, token):
        return self.only is not None and token != self.only


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, eos_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


PROMPT = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(1))


def test_backtracking_falls_back_to_the_best_acceptable_token(tiny):
    """Refusing all but one token: resampling alone rarely finds it, the ranked
    fallback always does."""
    guard = Recorder(only=7)
    result = generate(tiny, Tokenizer(), PROMPT, num_rows=2, max_new_tokens=6,
                      schedule=SCHEDULE, seeds=[3, 4], logit_processor=guard)
    assert result.token_ids == [[7] * 6, [7] * 6]
    assert guard.seen[-1] == [[7] * 5, [7] * 5]


class Wall:
    """Refuses every token once a row has ``after`` tokens (nothing may follow them)."""

    def __init__(self, after):
        self.after = after

    def __call__(self, step, generated, logits):
        return logits

    def rejects(self, ids, token):
        return len(ids) >= self.after


def test_a_row_with_no_allowed_token_ends_there_with_a_warning(tiny, caplog):
    """Never a refused token fed: the row ends as "refused", the others go on."""
    free = generate(tiny, Tokenizer(), PROMPT, num_rows=2, max_new_tokens=6,
                    schedule=SCHEDULE, seeds=[3, 4])

    class OneRow(Wall):
        def rejects(self, ids, token):      # row 0 starts with a token row 1 does not
            return ids[:1] == free.token_ids[0][:1] and super().rejects(ids, token)
    assert free.token_ids[0][0] != free.token_ids[1][0]
    with caplog.at_level("WARNING", logger="creative_sparse.generation.engine"):
        walled = generate(tiny, Tokenizer(), PROMPT, num_rows=2, max_new_tokens=6,
                          schedule=SCHEDULE, seeds=[3, 4], logit_processor=OneRow(2))
    assert walled.finish_reasons == ["refused", "length"]
    assert walled.token_ids == [free.token_ids[0][:2], free.token_ids[1]]
    assert "refused every next token tried (8 resamples, then the 1024 most probable) " \
           "for 1 row(s)" in caplog.text
    with caplog.at_level("WARNING", logger="creative_sparse.generation.engine"):
        caplog.clear()
        assert generate(tiny, Tokenizer(), PROMPT, num_rows=2, max_new_tokens=6,
                        schedule=SCHEDULE, seeds=[3, 4]).finish_reasons == ["length"] * 2
    assert "refused" not in caplog.text


def test_a_continued_row_shows_its_history_to_the_constraints(tiny):
    first = generate(tiny, Tokenizer(), PROMPT, num_rows=3, max_new_tokens=4,
                     schedule=SCHEDULE, seeds=[1, 2, 3], keep_state=True)
    state = first.state.select([2, 0])
    assert state.history == [first.token_ids[2], first.token_ids[0]]
    recorder = Recorder()
    second = generate(tiny, Tokenizer(), state, num_rows=2, max_new_tokens=3,
                      schedule=SCHEDULE, seeds=[3, 1], logit_processor=recorder)
    assert recorder.seen[0] == [first.token_ids[2], first.token_ids[0]]
    assert recorder.seen[-1] == [first.token_ids[2] + second.token_ids[0][:2],
                                 first.token_ids[0] + second.token_ids[1][:2]]
    assert [len(t) for t in second.token_ids] == [3, 3]     # the result holds new tokens only


def test_any_int_seeds_a_row(tiny):
    """Seeds derived as seed * 1000 + i can pass 2**64 (torch's limit): taken modulo
    2**64, as torch itself takes a negative seed."""
    def run(seeds):
        return generate(tiny, Tokenizer(), PROMPT, num_rows=2, max_new_tokens=4,
                        schedule=SCHEDULE, seeds=seeds).token_ids
    assert run([2**64 * 1000 + 5, -1]) == run([5, 2**64 - 1])
