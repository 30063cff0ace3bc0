"""Validators: finished-text violations and the prefix checks that enforce them while decoding."""

import re

import pytest
import torch

from creative_sparse.generation.constraints import ValidatorGuard
from creative_sparse.generation.validators import abc_notation, python_syntax, regex_validator

TUNE = "X:1\nT:Morning Air\nM:6/8\nK:D\n|:A|dfa afd|efg gfe|\n"


@pytest.mark.parametrize("text,dead", [
    ("Here is the code:", False),                                   # no block yet: free
    ("Sure!\n```python", False),                                    # still on the fence line
    ("```python\ndef f(x):\n", False),                              # incomplete is a valid start
    ("```python\ndef f(x):\n    return x +", False),                # the line is not finished
    ("```python\ndef f(x):\n    return x +\n", True),               # a finished invalid line
    ("```python\nfor i in range(3)\n", True),                       # missing colon
    ("```python\ndef f(x):\n    return x + 1\n```", False),         # closed on complete code
    ("```python\ndef f(x):\n```", True),                            # closed on unfinished code
    ("```python\nx = (1,\n     2", False),                          # open bracket: incomplete
])
def test_python_prefix(text, dead):
    assert python_syntax.rejects_prefix(text) is dead


def test_python_finished_text():
    assert python_syntax("def f(x):\n    return x + 1\n") == 0
    assert python_syntax("Intro\n```python\nprint('hi')\n```\nDone.") == 0
    assert python_syntax("```python\nfor i in range(3) print(i)\n```") == 1


@pytest.mark.parametrize("text,dead", [
    ("", False), ("  X", False), ("X:1\nT:tune\n", False), (TUNE, False),
    ("Y", True),                                   # must open with X:
    ("Here is a tune", True),
    ("X:1\nT:tune\nhello there\n", True),          # prose inside the header block
    ("X:1\nK:C\n", True),                          # K: before T:
    ("X:1\nT:tune\n7", True),                      # a header line must be <letter>:
    ("X:1\nT:a\nK:C\nhello there\n", True),        # a finished body line without notes / bars
    ("X:1\nT:a\nK:C\nw: la la\n|ABc|\n", False),   # inline fields are allowed in the body
    ("X:1\nT:a\nK:C\n|A]", True),                  # bracket closed out of order
    ("X:1\nT:a\nK:C\n|[A", False),                 # still open: can close later
    ("X:1\nT:a\nK:C\nThis r", True),               # prose on a body line, while written
    ("X:1\nT:a\nK:C\n|A B c|\nThe", True),        # ... also after a good line
    ('X:1\nT:a\nK:C\n|"Am"A2 "^lively"B|', False),  # chord symbols, annotations: free text
    ('X:1\nT:a\nK:C\n|"Am sw', False),             # ... still open at the line's end
    ("X:1\nT:a\nK:C\n|A [K:G] B !trill!c|", False),  # inline fields, long decorations
    ("X:1\nT:a\nK:C\n% a comment, any text\n|A|", False),
    ("X:1\nT:a\nK:C\n|ABc|\n\nThat was a reel.", False),  # an empty line ends the tune
    ("X:1\nT:a\nK:C\nM:6/8\n\nThat", True),      # ... but not before its notes
    ("X:1\nT:a\nK:C\nO:22\n", True),              # a header-only field is not a body line
    ("X:1\nT:a\nK:C\nY", True),
])
def test_abc_prefix(text, dead):
    assert abc_notation.rejects_prefix(text) is dead


def test_abc_finished_text_and_prefix_agree_on_a_tune():
    assert abc_notation(TUNE) == 0
    assert abc_notation("just some prose about music") >= 3
    assert abc_notation(TUNE.replace("|:A|", "|:[A|")) == 1     # left open
    # Every prefix of a well-formed tune is a valid start.
    assert not any(abc_notation.rejects_prefix(TUNE[:i]) for i in range(len(TUNE) + 1))


def test_abc_prose_in_the_body_is_a_violation():
    assert abc_notation(TUNE + "This reel is in D | lively\n") == 1
    assert abc_notation(TUNE + "\nThis reel is in D | lively\n") == 0     # after the tune
    assert abc_notation('X:1\nT:a\nK:C\n|"Am"A2 "^any text"B c|\n') == 0


@pytest.mark.parametrize("text,ending", [
    ("X:1\nT:a\nK:C\n(AB", ")|"),          # the slur's closer and a first bar line
    ("X:1\nT:a\nK:C\n|AB", None),           # already barred, nothing open
    ("X:1\nT:a\nK:C\n|A [c", "]"),
    ("X:1\nT:a\nK:C\n", None),              # no notes on the line yet
    ("X:1\nT:a\nM:4", None),                 # still in the header
    ('X:1\nT:a\nK:C\nAB "Am', None),        # inside an annotation
])
def test_abc_closing(text, ending):
    assert abc_notation.closing(text) == ending
    if ending:
        assert abc_notation(text + ending) == 0


def test_a_guard_without_closing_never_steers_but_still_refuses():
    """Creative-Sparse's drafts use the refinement's guard without its budget: a draft
    shorter than the refinement's closing window must not be closed."""
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    guard = ValidatorGuard(Tok(), [abc_notation], eos_ids=[0], budget=20)
    free = guard.without_closing()
    assert free.budget is None and guard.budget == 20
    text = [ord(c) for c in "X:1\nT:a\nK:C\n(AB"]
    logits = torch.zeros(1, 256)
    assert torch.isinf(guard(15, [text], logits)).any()          # steered: forces ')'
    assert torch.equal(free(15, [text], logits), logits)          # never steered
    assert free.rejects([ord(c) for c in "X:1\nT:a\nK:C\n"], ord("Y"))   # still refuses


def test_regex_prefix_uses_partial_matching():
    sentence = regex_validator(r"[A-Z][a-z ,']*\.")
    assert sentence("The sea is calm.") == 0 and sentence("the sea") == 1
    assert not sentence.rejects_prefix("The sea, calm")
    assert sentence.rejects_prefix("The sea!") and sentence.rejects_prefix("the")
    assert sentence.rejects_prefix("The sea. And")          # nothing may follow the period
    yes_no = regex_validator(r"(yes|no)\.", re.IGNORECASE)
    assert not yes_no.rejects_prefix("  YE") and yes_no.rejects_prefix("Yep")
    with pytest.raises(ValueError, match="invalid regex"):
        regex_validator("(unclosed")


class CharTokenizer:
    """One token per character; token 0 is the end of sequence."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def ids(text):
    return [ord(c) for c in text]


def test_guard_refuses_breaking_tokens_and_early_ends():
    guard = ValidatorGuard(CharTokenizer(), [regex_validator(r"(yes|no)\.")], eos_ids=[0])
    assert guard.rejects(ids("ye"), ord("p"))              # "yep" can never match
    assert not guard.rejects(ids("ye"), ord("s"))
    assert guard.rejects(ids("yes"), 0)                    # ending now leaves a fixable violation
    assert not guard.rejects(ids("yes."), 0)
    # A text already beyond repair is left alone: refusing tokens cannot help it.
    assert not guard.rejects(ids("maybe"), ord("!"))
    assert not guard.rejects(ids("maybe"), 0)


def test_guard_ignores_validators_without_a_prefix_check():
    guard = ValidatorGuard(CharTokenizer(), [lambda text: 1], eos_ids=[0])
    assert not guard.rejects(ids("anything"), ord("x")) and not guard.rejects(ids("a"), 0)


def test_guard_closes_an_open_block_whose_code_parses_near_the_budget_end():
    guard = ValidatorGuard(CharTokenizer(), [python_syntax], eos_ids=[0], budget=20,
                           closing_steps=3)
    logits = torch.zeros(3, 200)
    rows = [ids("```python\nx = 1\n"), ids("```python\nx = (1,"), ids("```python\nx = 1")]
    assert guard(10, rows, logits) is logits               # not yet near the end
    out = guard(18, rows, logits)
    assert int(out[0].argmax()) == ord("`") and int(torch.isinf(out[0]).sum()) == 199
    assert torch.equal(out[1], logits[1])                  # code that does not parse stays open
    assert int(out[2].argmax()) == ord("\n")               # the line ends first, then the fence


def test_a_validator_of_your_own_as_documented():
    """The example of docs/generation.md."""
    class EndsWithQuestion:
        def __call__(self, text):
            return 0 if text.rstrip().endswith("?") else 1

        def rejects_prefix(self, text):
            return "?" in text.rstrip()[:-1]

    guard = ValidatorGuard(CharTokenizer(), [EndsWithQuestion()], eos_ids=[0])
    assert not guard.rejects(ids("Why"), ord("?"))
    assert guard.rejects(ids("Why?"), ord(" ")) is False       # trailing space is fine
    assert guard.rejects(ids("Why? "), ord("x"))               # nothing after the question
    assert guard.rejects(ids("Why"), 0)                        # no end before the "?"
