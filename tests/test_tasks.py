"""Task prompt sets shipped as package data."""

import json
from importlib import resources

import pytest

from creative_sparse.evaluation import Task, list_tasks, load_task
from creative_sparse.generation.constraints import abc_notation, python_syntax

TASKS = ("ad_copy", "code", "creative_writing", "music", "poetry")


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
    for prompt in load_task("music").tune + load_task("music").held_out:
        assert "ABC notation" in prompt
        headers = prompt[prompt.index("X:"):]
        # the given headers plus one bar of notes make a valid tune
        assert abc_notation(headers + "\n|: GABc dedB | c2 A2 G4 :|") == 0


def test_code_prompts_ask_for_python():
    for prompt in load_task("code").tune + load_task("code").held_out:
        assert "Python function" in prompt
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
    folder = resources.files("creative_sparse.evaluation") / "prompts"
    for name in TASKS:
        data = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        assert data["task"] == name
