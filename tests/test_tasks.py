"""Task prompt sets shipped as package data."""

import dataclasses
import difflib
import json
import re
import subprocess
import sys
from importlib import resources

import pytest

from creative_sparse.evaluation import Task, list_tasks, load_task
from creative_sparse import tasks as tasks_module
from creative_sparse.tasks import CodeTest
from creative_sparse.generation.constraints import abc_notation, python_syntax

TASKS = ("ad_copy", "code", "creative_writing", "music", "poetry")

# Task.fingerprint before the evaluation split existed: the shipped autotune results
# are keyed by it, so adding that split must leave it exactly as it was.
FINGERPRINTS = {
    "ad_copy": "d41775d869fcd428e0af4ffc88a1a67787d6448a4f48cc9f9e7f6c0d58b4812e",
    "code": "dc83fa3a4ece808871d1a2ee7915410bc17f8d7600c463059fbc90f3fcad316a",
    "creative_writing": "5a521166faed5616d90719d54d738c2f9bd314c9b9245e1238a72bb81f02d119",
    "music": "67a7838e64211b9f67d036f24d8fe4bd78264cef1ab21bf47517f1cba4c7b3b4",
    "poetry": "9b9eccb902694de0189c40504aefa9683584738df6b22890f8c8ae200fb7d71a",
}


def _normal(prompt):
    return " ".join(prompt.split()).casefold()


def test_every_task_is_shipped():
    assert list_tasks() == TASKS


@pytest.mark.parametrize("name", TASKS)
def test_task_has_enough_disjoint_prompts(name):
    task = load_task(name)
    assert isinstance(task, Task) and task.name == name
    assert len(task.tune) + len(task.held_out) >= 20
    assert len(task.tune) >= 16 and len(task.held_out) >= 8
    assert not set(task.tune) & set(task.held_out)
    assert len(set(task.tune)) == len(task.tune) and len(set(task.held_out)) == len(task.held_out)
    assert task.prompts("tune") == task.tune and task.prompts("held_out") == task.held_out
    assert 16 <= task.max_new_tokens <= 256


def test_validators_per_task():
    assert load_task("code").validators == ("python",)
    assert load_task("music").validators == ("abc",)
    assert load_task("poetry").validators == ()


def test_music_prompts_ask_for_abc_with_headers_the_validator_accepts():
    music = load_task("music")
    for prompt in music.tune + music.held_out + music.evaluation:
        assert "ABC notation" in prompt
        headers = prompt[prompt.index("X:"):]
        # the given headers plus one bar of notes make a valid tune
        assert abc_notation(headers + "\n|: GABc dedB | c2 A2 G4 :|") == 0


def test_code_prompts_ask_for_python():
    code = load_task("code")
    for prompt in code.tune + code.held_out + code.evaluation:
        assert "Python function" in prompt and prompt.endswith("Reply with only the code.")
    assert python_syntax("```python\ndef f(x):\n    return x\n```") == 0


def test_fingerprint_changes_with_a_prompt():
    task = load_task("poetry")
    other = Task(task.name, task.description, task.max_new_tokens, task.validators,
                 task.tune[:-1] + ("Write a poem about a new thing.",), task.held_out)
    assert task.fingerprint != other.fingerprint and len(task.fingerprint) == 64


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown task type 'haiku'; known task types: "
                                         "ad_copy, code, creative_writing, music, poetry"):
        load_task("haiku")
    with pytest.raises(ValueError, match="split must be one of"):
        load_task("poetry").prompts("test")


def test_prompt_files_are_package_data():
    """Read through importlib.resources, as an installed wheel would be."""
    folder = resources.files("creative_sparse.tasks") / "prompts"
    for name in TASKS:
        data = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        assert data["task"] == name


# ---------------------------------------------------------------- evaluation split
def test_fingerprints_of_the_tuning_splits_are_unchanged():
    assert {name: load_task(name).fingerprint for name in TASKS} == FINGERPRINTS


@pytest.mark.parametrize("name", TASKS)
def test_evaluation_split_is_new_and_disjoint(name):
    task = load_task(name)
    evaluation = task.prompts("evaluation")
    assert evaluation == task.evaluation and len(evaluation) >= 20
    seen = task.tune + task.held_out
    assert not set(evaluation) & set(seen)
    assert not {_normal(p) for p in evaluation} & {_normal(p) for p in seen}
    assert len({_normal(p) for p in evaluation}) == len(evaluation)
    assert len(task.evaluation_tests) == (len(evaluation) if name == "code" else 0)


@pytest.mark.parametrize("name", ["ad_copy", "code", "creative_writing", "poetry"])
def test_evaluation_prompts_are_not_near_duplicates(name):
    """The prompts share templates ("Write a haiku about ..."), so a character ratio of
    0.85 still allows those and catches a prompt with only a word or two changed."""
    task = load_task(name)
    earlier = list(task.tune + task.held_out)
    for prompt in task.evaluation:
        for other in earlier:
            ratio = difflib.SequenceMatcher(None, _normal(prompt), _normal(other)).ratio()
            assert ratio < 0.85, (prompt, other)
        earlier.append(prompt)


def test_evaluation_code_functions_and_music_titles_are_new():
    def functions(prompts):
        return {f for p in prompts for f in re.findall(r"`(\w+)\(", p)}

    def titles(prompts):
        return [_normal(re.search(r"^T:(.*)$", p, re.M).group(1)) for p in prompts]

    code, music = load_task("code"), load_task("music")
    names = [t.function for t in code.evaluation_tests]
    assert len(set(names)) == len(names) and not set(names) & functions(code.tune + code.held_out)
    new = titles(music.evaluation)
    assert len(set(new)) == len(new) and not set(new) & set(titles(music.tune + music.held_out))


_RUNNER = """
import json, sys
outcomes = []
for source in json.load(sys.stdin):
    try:
        exec(source, {"__name__": "evaluation_test"})
        outcomes.append("ok")
    except BaseException as exc:
        outcomes.append(type(exc).__name__)
print(json.dumps(outcomes))
"""

_WRONG_BODIES = ("return None", "return a[0] if a else None", "return 0", "return ''",
                 "return []", "return True", "return False")


def test_code_tests_pass_the_reference_and_fail_trivially_wrong_code():
    """Every test passes against its reference solution and fails against code that
    ignores its input (None, the first argument, a constant): the tests can fail."""
    tests = load_task("code").evaluation_tests
    programs, expected = [], []
    for t in tests:
        programs.append(f"{t.reference}\n{t.tests}\n")
        expected.append((t.function, "reference", True))
        for body in _WRONG_BODIES:
            programs.append(f"def {t.function}(*a, **k):\n    {body}\n\n{t.tests}\n")
            expected.append((t.function, body, False))
    done = subprocess.run([sys.executable, "-I", "-c", _RUNNER], input=json.dumps(programs),
                          capture_output=True, text=True, timeout=60, check=True)
    outcomes = json.loads(done.stdout)
    wrong = [(fn, impl, got) for (fn, impl, passes), got in zip(expected, outcomes)
             if (got == "ok") != passes]
    assert len(outcomes) == len(programs) and not wrong
    assert all(3 <= t.tests.count("assert ") <= 5 for t in tests)


def test_evaluation_fingerprint_covers_prompts_and_tests_only():
    code = load_task("code")
    first = code.evaluation_tests[0]
    prompt = code.evaluation[:-1] + ("Write a Python function `f(x)`. Reply with only the code.",)
    variants = {
        "prompt": dataclasses.replace(code, evaluation=prompt),
        "tests": dataclasses.replace(code, evaluation_tests=(dataclasses.replace(
            first, tests=first.tests + "\nassert True"),) + code.evaluation_tests[1:]),
    }
    for what, other in variants.items():
        assert other.evaluation_fingerprint != code.evaluation_fingerprint, what
        assert other.fingerprint == code.fingerprint, what
    reference = dataclasses.replace(code, evaluation_tests=(dataclasses.replace(
        first, reference=first.reference + "\n# reworded"),) + code.evaluation_tests[1:])
    assert reference.evaluation_fingerprint == code.evaluation_fingerprint
    assert len(code.evaluation_fingerprint) == 64


def test_a_task_without_an_evaluation_split_says_so_when_asked():
    poetry = load_task("poetry")
    old = Task(poetry.name, poetry.description, poetry.max_new_tokens, poetry.validators,
               poetry.tune, poetry.held_out)
    tasks_module._check(old, "poetry")                       # loads: the split is optional
    assert old.prompts("held_out") == poetry.held_out
    with pytest.raises(ValueError, match="task 'poetry' has no 'evaluation' split: "
                                         "task file poetry.json has no 'evaluation' list"):
        old.prompts("evaluation")


def _code_task(**item):
    code = load_task("code")
    fields = {"prompt": "Write a Python function `double(x)` that doubles x. Reply with only "
                        "the code.", "function": "double", "tests": "assert double(2) == 4",
              "reference": "def double(x):\n    return 2 * x\n", **item}
    prompts, tests = tasks_module._read_evaluation([fields], "task file code.json")
    return dataclasses.replace(code, evaluation=prompts, evaluation_tests=tests)


_POETRY = load_task("poetry")
_BAD_TASKS = {
    "repeats-tune": (lambda: dataclasses.replace(_POETRY, evaluation=(
        "  WRITE a short poem about autumn rain in a city. ",)),
        "the 'evaluation' prompt .* repeats a prompt of split 'tune'"),
    "repeats-itself": (lambda: dataclasses.replace(_POETRY, evaluation=("A poem.", "a poem.")),
                       "repeats a prompt of split 'evaluation'"),
    "empty-prompt": (lambda: dataclasses.replace(_POETRY, evaluation=("  ",)),
                     "split 'evaluation' must hold non-empty strings"),
    "tests-on-poetry": (lambda: dataclasses.replace(_POETRY, evaluation=("A poem.",),
                                                    evaluation_tests=_code_task().evaluation_tests),
                        "task is not validated as Python and has 1 code tests for 1 prompts"),
    "code-without-tests": (lambda: dataclasses.replace(_code_task(), evaluation_tests=()),
                           "task is validated as Python and has 0 code tests for 1 prompts"),
    "function-not-in-prompt": (lambda: _code_task(function="triple", tests="assert triple(1)"),
                               r"the prompt must ask for the function as `triple\(...\)`"),
    "not-a-name": (lambda: _code_task(function="class"), "function 'class' is not a Python name"),
    "tests-do-not-parse": (lambda: _code_task(tests="assert double(2) ==="),
                           r"item 0 \(double\): tests or reference do not parse"),
    "tests-without-asserts": (lambda: _code_task(tests="double(2)"),
                              "tests must assert on calls of double"),
    "reference-without-the-function": (lambda: _code_task(reference="def twice(x):\n    pass"),
                                       r"the reference must define double\(\) at top level"),
}


@pytest.mark.parametrize("case", list(_BAD_TASKS), ids=list(_BAD_TASKS))
def test_a_bad_evaluation_split_names_the_file_and_the_problem(case):
    make, message = _BAD_TASKS[case]
    with pytest.raises(ValueError, match=r"task file (poetry|code)\.json: .*" + message):
        tasks_module._check(make(), make().name)


@pytest.mark.parametrize("items, message", [
    ([], "\"evaluation\" must be a non-empty list"),
    ({"prompt": "x"}, "\"evaluation\" must be a non-empty list"),
    ([{"prompt": "x", "function": "f", "tests": "assert f()"}], "evaluation item 0 must be an "
     "object with exactly the fields \\['prompt', 'function', 'tests', 'reference'\\]"),
    ([{"prompt": "x", "function": "f", "tests": "t", "reference": "r"}, "y"],
     "evaluation item 1 must be an object .* got str"),
], ids=["empty", "not-a-list", "missing-reference", "mixed"])
def test_malformed_evaluation_items_are_reported(items, message):
    with pytest.raises(ValueError, match="task file code.json: " + message):
        tasks_module._read_evaluation(items, "task file code.json")
