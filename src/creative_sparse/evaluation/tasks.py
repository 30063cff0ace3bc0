"""Task prompt sets: ``creative_writing``, ``poetry``, ``ad_copy``, ``code``, ``music``.

Each task is one JSON file under ``prompts/`` in the package, written by the
team: a description, the length budget (``max_new_tokens``), the validators that
count violations (``"python"``: the output parses as Python; ``"abc"``:
well-formed ABC notation; see :func:`creative_sparse.generation.wrapper.build_constraints`),
and two fixed splits: ``tune`` (what tuning may look at) and ``held_out``
(prompts tuning never sees, used to report its result). The split is part of
the file, not drawn at random, so it is the same everywhere.

Example:
    >>> list_tasks()
    ('ad_copy', 'code', 'creative_writing', 'music', 'poetry')
    >>> task = load_task("code")
    >>> len(task.tune) >= 16 and len(task.held_out) >= 8, task.validators
    (True, ('python',))
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources

__all__ = ["Task", "list_tasks", "load_task"]

_PACKAGE = "creative_sparse.evaluation"
_FOLDER = "prompts"
_VALIDATORS = ("python", "abc")
SPLITS = ("tune", "held_out")


@dataclass(frozen=True)
class Task:
    """One task's prompt set.

    Fields: ``name``; ``description``; ``max_new_tokens`` (length budget per
    output); ``validators`` (names understood by ``build_constraints``);
    ``tune`` and ``held_out`` (disjoint tuples of prompts).
    """

    name: str
    description: str
    max_new_tokens: int
    validators: tuple[str, ...]
    tune: tuple[str, ...]
    held_out: tuple[str, ...]

    def prompts(self, split: str = "tune") -> tuple[str, ...]:
        """The prompts of ``split`` (``"tune"`` or ``"held_out"``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.tune if split == "tune" else self.held_out

    @property
    def fingerprint(self) -> str:
        """sha256 of everything in the task file: changes whenever a prompt does."""
        blob = json.dumps([self.name, self.description, self.max_new_tokens,
                           self.validators, self.tune, self.held_out])
        return hashlib.sha256(blob.encode()).hexdigest()


def list_tasks() -> tuple[str, ...]:
    """Names of the tasks shipped with the package, sorted."""
    folder = resources.files(_PACKAGE) / _FOLDER
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")))


@functools.lru_cache(maxsize=None)
def load_task(name: str) -> Task:
    """Load task ``name``; a ``ValueError`` lists the known tasks when it does not exist.

    Example:
        >>> load_task("haiku")
        Traceback (most recent call last):
        ...
        ValueError: unknown task type 'haiku'; known task types: ad_copy, code, creative_writing, music, poetry
    """
    known = list_tasks()
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"unknown task type {name!r}; known task types: {', '.join(known)}")
    path = resources.files(_PACKAGE) / _FOLDER / f"{name}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    task = Task(name=data["task"], description=data["description"],
                max_new_tokens=int(data["max_new_tokens"]),
                validators=tuple(data.get("validators", ())),
                tune=tuple(data["tune"]), held_out=tuple(data["held_out"]))
    _check(task, name)
    return task


def _check(task: Task, name: str) -> None:
    where = f"task file {name}.json"
    if task.name != name:
        raise ValueError(f"{where} names itself {task.name!r}")
    if task.max_new_tokens < 1:
        raise ValueError(f"{where}: max_new_tokens = {task.max_new_tokens} must be >= 1")
    unknown = set(task.validators) - set(_VALIDATORS)
    if unknown:
        raise ValueError(f"{where}: unknown validators {sorted(unknown)}; allowed {_VALIDATORS}")
    for split in SPLITS:
        prompts = task.prompts(split)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"{where}: split {split!r} must hold non-empty strings")
    overlap = set(task.tune) & set(task.held_out)
    if overlap:
        raise ValueError(f"{where}: {len(overlap)} prompt(s) are in both splits")
