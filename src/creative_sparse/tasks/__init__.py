"""Task prompt sets: ``creative_writing``, ``poetry``, ``ad_copy``, ``code``, ``music``.

Each task is one JSON file under ``prompts/`` in the package, written by the
team: a description, the length budget (``max_new_tokens``), the validators that
count violations (``"python"``: the output parses as Python; ``"abc"``:
well-formed ABC notation; see :func:`creative_sparse.generation.wrapper.build_constraints`),
and three fixed, disjoint splits of prompts:

* ``tune``: what tuning may look at (autotune's sweeps, any hand tuning).
* ``held_out``: prompts tuning never sees; autotune reports its tuned s* on them
  (``creative-sparse tune --held-out``). Having been looked at in those reports,
  they are no longer fresh for a final evaluation.
* ``evaluation``: the evaluation protocol's held-back prompts (issue 17), written
  after tuning, never used to choose any setting: only to report the settings
  chosen on the other two. In a task validated as Python (``code``) every item
  also carries a :class:`CodeTest` (asserts on the function the prompt asks for,
  and the team's reference solution, which is never shown to the model), in
  :attr:`Task.evaluation_tests`, aligned with :attr:`Task.evaluation`.

The splits are part of the file, not drawn at random, so they are the same
everywhere. Prompts are compared case- and whitespace-insensitively: no prompt
may appear twice, within a split or across splits.

A task file without an ``"evaluation"`` list still loads (its other splits work
as before) and ``task.prompts("evaluation")`` then raises a ``ValueError`` naming
the file: the split is only required where it is used. Every shipped file has one.

:attr:`Task.fingerprint` covers the settings and the ``tune`` and ``held_out``
splits only, exactly as before the evaluation split existed, so autotune results
keyed by it (the shipped ones included) stay valid;
:attr:`Task.evaluation_fingerprint` covers the settings and the evaluation split.

Example:
    >>> list_tasks()
    ('ad_copy', 'code', 'creative_writing', 'music', 'poetry')
    >>> task = load_task("code")
    >>> len(task.tune) >= 16 and len(task.held_out) >= 8, task.validators
    (True, ('python',))
    >>> len(task.evaluation) >= 20, task.evaluation_tests[0].function
    (True, 'run_length_encode')
    >>> load_task("poetry").evaluation_tests
    ()
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import keyword
from dataclasses import dataclass
from importlib import resources

__all__ = ["CodeTest", "Task", "list_tasks", "load_task"]

_PACKAGE = __name__
_FOLDER = "prompts"
_VALIDATORS = ("python", "abc")
SPLITS = ("tune", "held_out", "evaluation")
_CODE_FIELDS = ("prompt", "function", "tests", "reference")


@dataclass(frozen=True)
class CodeTest:
    """The test of one code evaluation prompt.

    Fields: ``function`` (the name the prompt asks for, written in it in
    backticks with its arguments); ``tests`` (Python source: 3-5 ``assert``
    lines calling the function; standard library only, no I/O, fast);
    ``reference`` (the team's solution, source defining ``function``; it passes
    ``tests``, which the package's tests check; never shown to the model).

    Example:
        >>> t = CodeTest("double", "assert double(2) == 4", "def double(x):\\n    return 2 * x\\n")
        >>> namespace = {}
        >>> exec(t.reference + "\\n" + t.tests, namespace)   # raises if a test fails
    """

    function: str
    tests: str
    reference: str


@dataclass(frozen=True)
class Task:
    """One task's prompt set.

    Fields: ``name``; ``description``; ``max_new_tokens`` (length budget per
    output); ``validators`` (names understood by ``build_constraints``);
    ``tune``, ``held_out`` and ``evaluation`` (disjoint tuples of prompts; see
    the module doc; ``evaluation`` is empty when the file has none);
    ``evaluation_tests`` (one :class:`CodeTest` per evaluation prompt for a task
    validated as Python, else empty).
    """

    name: str
    description: str
    max_new_tokens: int
    validators: tuple[str, ...]
    tune: tuple[str, ...]
    held_out: tuple[str, ...]
    evaluation: tuple[str, ...] = ()
    evaluation_tests: tuple[CodeTest, ...] = ()

    def prompts(self, split: str = "tune") -> tuple[str, ...]:
        """The prompts of ``split`` (``"tune"``, ``"held_out"`` or ``"evaluation"``).

        Raises:
            ValueError: an unknown split, or one the task file does not have.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        prompts = getattr(self, split)
        if not prompts:
            raise ValueError(f"task {self.name!r} has no {split!r} split: task file "
                             f"{self.name}.json has no {split!r} list")
        return prompts

    @property
    def fingerprint(self) -> str:
        """sha256 of the settings and the ``tune`` and ``held_out`` prompts: changes
        whenever one of them does, not with the evaluation split (module doc)."""
        blob = json.dumps([self.name, self.description, self.max_new_tokens,
                           self.validators, self.tune, self.held_out])
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def evaluation_fingerprint(self) -> str:
        """sha256 of the settings and the evaluation split (its prompts and code
        tests): changes whenever one of them does. The reference solutions are left
        out: they are never shown to the model, so they change no result."""
        tests = [[t.function, t.tests] for t in self.evaluation_tests]
        blob = json.dumps([self.name, self.description, self.max_new_tokens,
                           self.validators, self.evaluation, tests])
        return hashlib.sha256(blob.encode()).hexdigest()


def list_tasks() -> tuple[str, ...]:
    """Names of the tasks shipped with the package, sorted."""
    folder = resources.files(_PACKAGE) / _FOLDER
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")))


@functools.lru_cache(maxsize=None)
def load_task(name: str) -> Task:
    """Load task ``name``; a ``ValueError`` lists the known tasks when it does not exist.

    A malformed file (a split missing or empty, a prompt repeated, a code test
    without its fields) is a ``ValueError`` naming the file and what is wrong.

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
    evaluation, tests = _read_evaluation(data.get("evaluation"), f"task file {name}.json")
    task = Task(name=data["task"], description=data["description"],
                max_new_tokens=int(data["max_new_tokens"]),
                validators=tuple(data.get("validators", ())),
                tune=tuple(data["tune"]), held_out=tuple(data["held_out"]),
                evaluation=evaluation, evaluation_tests=tests)
    _check(task, name)
    return task


def _read_evaluation(items, where: str) -> tuple[tuple, tuple[CodeTest, ...]]:
    """The ``"evaluation"`` list: plain prompts, or objects with a code test each."""
    if items is None:
        return (), ()
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: \"evaluation\" must be a non-empty list, got {items!r}")
    if not any(isinstance(item, dict) for item in items):
        return tuple(items), ()
    prompts, tests = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != set(_CODE_FIELDS):
            got = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise ValueError(f"{where}: evaluation item {i} must be an object with exactly "
                             f"the fields {list(_CODE_FIELDS)} (as every other item), got {got}")
        prompts.append(item["prompt"])
        tests.append(CodeTest(item["function"], item["tests"], item["reference"]))
    return tuple(prompts), tuple(tests)


def _check(task: Task, name: str) -> None:
    where = f"task file {name}.json"
    if task.name != name:
        raise ValueError(f"{where} names itself {task.name!r}")
    if task.max_new_tokens < 1:
        raise ValueError(f"{where}: max_new_tokens = {task.max_new_tokens} must be >= 1")
    unknown = set(task.validators) - set(_VALIDATORS)
    if unknown:
        raise ValueError(f"{where}: unknown validators {sorted(unknown)}; allowed {_VALIDATORS}")
    seen: dict[str, str] = {}
    for split in SPLITS:
        prompts = getattr(task, split)
        if split != "evaluation" and not prompts:
            raise ValueError(f"{where}: split {split!r} must hold non-empty strings")
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"{where}: split {split!r} must hold non-empty strings")
        for prompt in prompts:   # case and spacing do not make a prompt new
            key = " ".join(prompt.split()).casefold()
            if key in seen:
                raise ValueError(f"{where}: the {split!r} prompt {prompt[:60]!r} repeats a "
                                 f"prompt of split {seen[key]!r}; splits must be disjoint")
            seen[key] = split
    _check_code_tests(task, where)


def _check_code_tests(task: Task, where: str) -> None:
    tests, prompts = task.evaluation_tests, task.evaluation
    if not prompts:
        if tests:
            raise ValueError(f"{where}: {len(tests)} code tests but no evaluation prompts")
        return
    python = "python" in task.validators
    if python != bool(tests) or (tests and len(tests) != len(prompts)):
        raise ValueError(f"{where}: evaluation items of a task validated as Python are objects "
                         f"with {list(_CODE_FIELDS)}, of other tasks plain strings; this "
                         f"task {'is' if python else 'is not'} validated as Python and has "
                         f"{len(tests)} code tests for {len(prompts)} prompts")
    for i, (prompt, test) in enumerate(zip(prompts, tests)):
        item = f"{where}: evaluation item {i}"
        if not isinstance(test, CodeTest) or not all(
                isinstance(v, str) and v.strip()
                for v in (test.function, test.tests, test.reference)):
            raise ValueError(f"{item}: function, tests and reference must be non-empty strings")
        fn = test.function
        if not fn.isidentifier() or keyword.iskeyword(fn):
            raise ValueError(f"{item}: function {fn!r} is not a Python name")
        if f"`{fn}(" not in prompt:
            raise ValueError(f"{item}: the prompt must ask for the function as `{fn}(...)`")
        try:
            tree = ast.parse(test.tests), ast.parse(test.reference)
        except SyntaxError as exc:
            raise ValueError(f"{item} ({fn}): tests or reference do not parse: {exc}") from None
        asserts = [n for n in ast.walk(tree[0]) if isinstance(n, ast.Assert)]
        if not asserts or fn not in test.tests:
            raise ValueError(f"{item} ({fn}): tests must assert on calls of {fn}")
        if not any(isinstance(n, ast.FunctionDef) and n.name == fn for n in tree[1].body):
            raise ValueError(f"{item}: the reference must define {fn}() at top level")
