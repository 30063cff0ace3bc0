"""Safety (issue 23): checkers, run_checks, the gate, screening in refine, monitoring.

Planted phrases: a word list flags words the models do produce ("robot" in SmolLM2's
stories about a robot, "sea" in the tiny model's vocabulary), so the checks have
something real to catch; refine must never return them and the monitoring must
count them.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from creative_sparse.safety import (CompositeChecker, Flag, HighSparsityError, SafetyReport,
                                    TransformersClassifier, WordListChecker, check_gate,
                                    redact, resolve_checker, run_checks, segments)

transformers = pytest.importorskip("transformers")

from _tiny import DigitTokenizer, tiny_llama96  # noqa: E402


# --------------------------------------------------------------------------- checkers

def test_word_list_flags_whole_words_case_insensitively_with_spans():
    checker = WordListChecker(["gloop", "bad word"], patterns=[r"zz+t"])
    text = "Gloop! not gloopy; a BAD  word and zzzt."
    flags = checker.check([text, "clean"])
    spans = [(text.index(w), text.index(w) + len(w)) for w in ("Gloop", "BAD  word", "zzzt")]
    assert [(f.start, f.end) for f in flags[0]] == spans
    assert [f.text for f in flags[0]] == ["Gloop", "BAD  word", "zzzt"]
    assert all(text[f.start:f.end] == f.text for f in flags[0])
    assert flags[1] == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(words=[""]), "words\\[0\\] = '' is empty"),
    (dict(words=["ok", "   "]), "words\\[1\\] .* is empty"),
    (dict(words="gloop"), "single string"),
    (dict(words=[3]), "must be strings"),
    (dict(patterns=[""]), "patterns\\[0\\] is empty"),
    (dict(patterns=["(unclosed"]), "not a valid regular expression"),
    (dict(patterns=["a*"]), "matches the empty string"),
    (dict(), "at least one word or pattern"),
], ids=["empty-word", "blank-word", "bare-string", "not-a-string", "empty-pattern",
        "invalid-regex", "matches-empty", "nothing"])
def test_misconfigured_word_lists_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WordListChecker(**kwargs)


def test_word_list_from_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# team list\ngloop\n\nre:zz+t\n", encoding="utf-8")
    checker = WordListChecker.from_file(path)
    assert checker.words == ["gloop"] and checker.patterns == ["zz+t"]
    (tmp_path / "bad.txt").write_text("re:(\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        WordListChecker.from_file(tmp_path / "bad.txt")


def test_profanity_check_narrows_to_the_offending_words():
    pytest.importorskip("profanity_check")
    from creative_sparse.safety import ProfanityCheck

    text = "The robot painted a sunset. You are a stupid idiot, and nobody cares. It rained."
    (flags, clean) = ProfanityCheck().check([text, "The robot painted a sunset."])
    assert {f.text for f in flags} == {"stupid", "idiot"} and clean == []
    assert all(text[f.start:f.end] == f.text and f.score >= 0.5 for f in flags)
    with pytest.raises(ValueError, match="threshold"):
        ProfanityCheck(threshold=1.5)


def test_transformers_classifier_with_a_tiny_random_model():
    """A random 2-label classifier (no download): flags follow its scores and threshold."""
    scores = []

    def pipeline(pieces, **kwargs):   # the shape transformers' pipeline answers in
        out = [[{"label": "toxic", "score": 0.9 if "gloop" in p else 0.1},
                {"label": "ok", "score": 0.95}] for p in pieces]
        scores.append(len(pieces))
        return out
    checker = TransformersClassifier(pipeline, flag_labels=["TOXIC"])
    (flags,) = checker.check(["Fine words. A gloop here, calm there."])
    assert [f.text for f in flags] == ["gloop"] and flags[0].category == "toxic"
    with pytest.raises(ValueError, match="flag_labels"):
        TransformersClassifier(pipeline, flag_labels=[])


def test_transformers_classifier_runs_a_real_pipeline_object():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "[UNK] [PAD] [CLS] [SEP] gloop calm words here".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                               pad_token="[PAD]", cls_token="[CLS]",
                                               sep_token="[SEP]")
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16,
                                     id2label={0: "ok", 1: "toxic"},
                                     label2id={"ok": 0, "toxic": 1})
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=tok)
    low = TransformersClassifier(pipe, flag_labels=["toxic"], threshold=0.01)
    high = TransformersClassifier(pipe, flag_labels=["toxic"], threshold=0.99)
    text = "calm words here. gloop here."
    assert [text[a:b] for a, b in segments(text)] == ["calm words here.", "gloop here."]
    assert len(low.check([text])[0]) >= 2 and high.check([text]) == [[]]


def test_composite_checker_merges_and_sorts():
    a, b = WordListChecker(["zeta"], name="a"), WordListChecker(["alpha"], name="b")
    (flags,) = CompositeChecker([a, b]).check(["alpha then zeta"])
    assert [(f.text, f.checker) for f in flags] == [("alpha", "b"), ("zeta", "a")]
    with pytest.raises(ValueError, match="not a safety checker"):
        CompositeChecker([object()])


def test_redact_and_resolve():
    assert redact("ab cd ef", [Flag(3, 5, "x", "cd", 1.0, "w"), Flag(4, 8, "x", "d ef", 1, "w")]) \
        == "ab [flagged]"
    assert resolve_checker(None) is None
    with pytest.raises(ValueError, match="safety must be"):
        resolve_checker("strict")
    with pytest.raises(ValueError, match="safety must be"):
        resolve_checker(42)


# ---------------------------------------------------------------- a failing checker

class Raising:
    name = "raising"

    def check(self, texts):
        raise RuntimeError("moderation service down")


class Slow:
    name = "slow"

    def check(self, texts):
        time.sleep(2.0)
        return [[] for _ in texts]


class Nonsense:
    name = "nonsense"

    def check(self, texts):
        return ["fine"]


@pytest.mark.parametrize("checker,reason", [
    (Raising(), "raised RuntimeError: moderation service down"),
    (Slow(), "timed out after 0.2 s"),
    (Nonsense(), "expected one list of Flag per text"),
], ids=["raises", "times-out", "wrong-shape"])
def test_run_checks_turns_failures_into_reasons(checker, reason):
    start = time.perf_counter()
    outcome = run_checks(checker, ["a", "b"], timeout=0.2)
    assert not outcome.ok and outcome.flags is None and reason in outcome.reason
    assert time.perf_counter() - start < 1.5


def test_the_gate():
    check_gate(0.8, 0.8, False, "x")           # at the gate: fine
    check_gate(0.95, 0.8, True, "x")           # opted in
    with pytest.raises(HighSparsityError, match="above the safety gate 0.8.*allow_high_sparsity"):
        check_gate(0.85, 0.8, False, "Fixed(0.85)")


# ----------------------------------------------------------- strategies on a tiny model

Tokenizer = DigitTokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama96()


PROMPT = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(1))


def test_strategies_above_the_gate_need_the_opt_in(tiny):
    from creative_sparse.generation.strategies import Adaptive, Fixed, MoEOnly, Progressive

    args = dict(num_candidates=2, max_new_tokens=4)
    for strategy in (Fixed(0.9), Progressive(0.95, 0.2), MoEOnly(0.85), Adaptive(base=0.9)):
        with pytest.raises(HighSparsityError, match=re.escape(strategy.name)):
            strategy.generate(tiny, Tokenizer(), PROMPT, **args)
    assert len(Fixed(0.9, allow_high_sparsity=True).generate(tiny, Tokenizer(), PROMPT,
                                                             **args).texts) == 2
    assert len(Fixed(0.9, safety_gate=0.95).generate(tiny, Tokenizer(), PROMPT, **args).texts) == 2
    Fixed(0.8).generate(tiny, Tokenizer(), PROMPT, **args)       # at the gate


# ------------------------------------------------------------------- the runner monitors

def test_the_runner_counts_flagged_outputs_and_drafts(tmp_path):
    """Every output holding the planted word is counted, per method and level."""
    from test_evaluation_runner import namespace   # the tiny word-level model and Q

    model, tok, quality = namespace["tiny"]()
    path = tmp_path / "r.jsonl"
    from creative_sparse.evaluation.runner import evaluate

    checker = WordListChecker(["sea", "blue"])
    evaluate(model, tok, out=path, quality=quality, model_name="tiny", tasks=["poetry"],
             methods=["fixed", "creative_sparse"], seeds=[0, 1], prompts=1, num_outputs=3,
             max_new_tokens=8, settings={"fixed": [0.9], "creative_sparse": [0.9]},
             progress=False, safety=checker)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["safety"] == "word_list"
    units = [r for r in records if r["type"] == "unit"]
    pattern = re.compile(r"\b(sea|blue)\b", re.I)
    planted = 0
    for unit in units:
        expect = [bool(pattern.search(o["text"])) for o in unit["outputs"]]
        planted += sum(expect)
        assert [o["flagged"] for o in unit["outputs"]] == expect
        assert unit["set"]["flagged"] == pytest.approx(sum(expect) / len(expect))
        if unit["method"] == "creative_sparse":
            screen = unit["set"]["safety"]
            assert not any(expect), "refine returned a planted word"
            assert screen["flagged_drafts"] >= 1 and unit["set"]["flagged_drafts"] > 0
    assert planted >= 1            # the fixed method at 0.9 produced some (it can fail)
    from creative_sparse.evaluation.tables import aggregate, format_markdown

    rows = aggregate(records, bootstrap=10)
    assert all(r.flagged is not None for r in rows) and "flagged" in format_markdown(rows)


# ------------------------------------------------------- the wrapper on the real model

STORY = "Write a short story opening about a robot who learns to paint."
ROBOT = re.compile(r"\brobots?\b", re.I)


@pytest.fixture(scope="module")
def planted(smollm2):
    """The wrapper with "robot" planted as a flagged word: SmolLM2 writes it in most
    drafts of this prompt (issue 21 measured 9 of 10)."""
    from creative_sparse.generation.wrapper import CreativeSparseWrapper

    model, tokenizer = smollm2
    return CreativeSparseWrapper(model=model, tokenizer=tokenizer,
                                 safety=WordListChecker(["robot", "robots"]))


@pytest.mark.slow
def test_refine_never_returns_a_flagged_phrase(planted):
    result = planted.generate_candidates(STORY, max_length=30, num_candidates=4, seed=5)
    print("drafts:", result.drafts, "\ncandidates:", [c.text for c in result.candidates])
    assert result.flagged_drafts >= 2              # planted: the drafts do hold it (can fail)
    assert len(result.safety) == 4
    for cand in result.candidates:
        assert not ROBOT.search(cand.text) and not ROBOT.search(cand.draft)
        assert cand.safety.action in ("passed", "repaired")
    assert not [d for d in result.drafts if ROBOT.search(d)]    # redacted
    assert not ROBOT.search(result.reference)
    flagged = [r for r in result.safety if r.flags]
    assert flagged and all(r.action in ("repaired", "dropped") for r in flagged)
    assert result.flagged_outputs == len(flagged)
    for report in flagged:                          # what, where and what was done
        assert report.flags[0].text.lower().startswith("robot") and report.attempts >= 1
    assert all(ROBOT.fullmatch(f.text) for flags in result.draft_flags for f in flags)


@pytest.mark.slow
def test_without_repairs_flagged_candidates_are_dropped(smollm2):
    from creative_sparse.generation.wrapper import CreativeSparseWrapper

    model, tokenizer = smollm2
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer, safety_repairs=0,
                                    safety=WordListChecker(["robot", "robots", "the"]))
    result = wrapper.generate_candidates(STORY, max_length=20, num_candidates=3, seed=5)
    dropped = [r for r in result.safety if r.action == "dropped"]
    assert dropped and len(result.candidates) == 3 - len(dropped)
    assert all(r.reason == "flagged, and repairs are off" for r in dropped)


@pytest.mark.slow
@pytest.mark.parametrize("checker", [Raising(), Slow()], ids=["raises", "times-out"])
def test_a_failing_checker_withholds_instead_of_crashing(smollm2, checker):
    from creative_sparse.generation.wrapper import CreativeSparseWrapper

    model, tokenizer = smollm2
    wrapper = CreativeSparseWrapper(model=model, tokenizer=tokenizer, safety=checker,
                                    safety_timeout=0.3)
    result = wrapper.generate_candidates(STORY, max_length=12, num_candidates=2, seed=1)
    assert result.candidates == [] and result.drafts == [] and result.reference == ""
    assert checker.name in result.withheld
    assert [r.action for r in result.safety] == ["withheld", "withheld"]
    with pytest.raises(ValueError, match="no candidate to return"):
        result.best
    with pytest.warns(RuntimeWarning, match="no output returned"):
        assert wrapper.generate_creative(STORY, max_length=12, num_candidates=2) == ""


@pytest.mark.slow
def test_the_wrapper_gate(smollm2):
    from creative_sparse.generation.wrapper import CreativeSparseWrapper

    model, tokenizer = smollm2
    checked = CreativeSparseWrapper(model=model, tokenizer=tokenizer,
                                    safety=WordListChecker(["gloop"]))
    # Drafts at 0.95 are screened before they reach the caller: no opt-in needed.
    assert checked.generate_candidates(STORY, max_length=8, num_candidates=2,
                                       sparsity_level=0.95).candidates
    unchecked = CreativeSparseWrapper(model=model, tokenizer=tokenizer, safety=None)
    with pytest.raises(HighSparsityError, match="diverge level 0.95 without safety checks"):
        unchecked.generate_candidates(STORY, max_length=8, num_candidates=2,
                                      sparsity_level=0.95)
    with pytest.raises(HighSparsityError, match="refine level 0.9"):
        CreativeSparseWrapper(model=model, tokenizer=tokenizer, sparsity_schedule=(0.95, 0.9),
                              safety=WordListChecker(["gloop"])).generate_candidates(
            STORY, max_length=8, num_candidates=2)
    opted = CreativeSparseWrapper(model=model, tokenizer=tokenizer, safety=None,
                                  allow_high_sparsity=True)
    assert opted.generate_candidates(STORY, max_length=8, num_candidates=2,
                                     sparsity_level=0.95).candidates
    with pytest.raises(ValueError, match="safety_gate must be a level"):
        CreativeSparseWrapper(model=model, tokenizer=tokenizer, safety_gate=1.5)
    with pytest.raises(ValueError, match="safety_repairs"):
        CreativeSparseWrapper(model=model, tokenizer=tokenizer, safety_repairs=-1)


# ----------------------------------------------------------------- sweeps record it

def test_sweep_records_and_plots_the_flagged_rate(tmp_path, monkeypatch):
    """A fake measurer (the autotune tests' curves) whose samples are flagged more at
    higher s: the table, the cache round trip and the plot carry the rate."""
    pytest.importorskip("matplotlib")
    from creative_sparse import autotune
    from test_autotune import FakeMeasurer

    class Flagging(FakeMeasurer):
        safety = None

        def measure(self, index, prompt, s):
            values, text = super().measure(index, prompt, s)
            return (*values, float("nan") if self.safety is None else round(s, 1)), text

    monkeypatch.setattr(autotune, "_make_measurer", lambda *a: Flagging())
    args = dict(model_name="fake-model", task_type="poetry", compute_budget=0.5,
                cache_dir=tmp_path, progress=False, n_bootstrap=20,
                safety=WordListChecker(["gloop"]))
    result = autotune.sweep_sparsity(**args)
    rates = [row.flagged for row in result.table]
    assert rates == pytest.approx([round(row.s, 1) for row in result.table])
    assert "flagged" in result.format_table()
    again = autotune.sweep_sparsity(**args)                 # from the cache
    assert again.measurements.flagged == result.measurements.flagged
    assert result.plot(tmp_path / "sweep.png").stat().st_size > 0
    plain = autotune.sweep_sparsity(**{**args, "safety": None})   # another cache key
    assert plain.measurements.flagged == () and "flagged" not in plain.format_table()


@pytest.mark.parametrize("argv,match", [
    (["--schedule", "0.95,0.9"], "refine level returns text generated at sparsity 0.9"),
    (["--sparsity", "0.95", "--no-safety"], "diverge level with --no-safety"),
], ids=["refine-above-gate", "unchecked-diverge"])
def test_cli_generate_checks_the_gate_before_loading(capsys, argv, match):
    from creative_sparse.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", "A haiku about rain.", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and re.search(match, err) and "--allow-high-sparsity" in err
