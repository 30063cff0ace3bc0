"""The evaluation results file: JSON lines, appended and flushed as they are made.

One record per line (format ``creative-sparse/evaluation-results``, version 1):

* ``{"type": "header", ...}``: first line; the run's identity (library version, model,
  split, outputs per unit, length budgets, the safety checker's name or null). A file
  whose header disagrees with the run
  that would extend it is refused, never mixed.
* ``{"type": "reference", "task", "prompt_index", "text"}``: the dense greedy answer
  to a prompt (the novelty reference), once per prompt.
* ``{"type": "unit", "id", "task", "prompt_index", "method", "knob", "setting",
  "seed", "outputs": [...], "set": {...}, "cost": {...}}``: one method at one setting
  on one prompt with one seed (see :mod:`creative_sparse.evaluation.runner`).

Every append is flushed and fsynced, so a killed run loses at most the unit it was
making; reading skips a corrupt line (a torn last line, say) with a warning that names
the file and line, and keeps every other line.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "FORMAT_VERSION", "Results", "ResultsWriter", "combine_results", "comparable",
           "merge_shards", "read_results", "unit_id"]

FORMAT = "creative-sparse/evaluation-results"
FORMAT_VERSION = 1
_TYPES = ("header", "reference", "unit")
# fields of a header that must match for two runs to share a file
IDENTITY = ("format", "format_version", "library_version", "model", "split", "num_outputs",
            "max_new_tokens", "compute", "safety",   # safety: the checker that screens
            "constrained")                            # decoded under the tasks' validators
# What a header written before a field existed means by its absence.
_ABSENT = {"compute": "outputs", "constrained": False}


def unit_id(task: str, prompt_index: int, method: str, setting: float, seed: int) -> str:
    """The key of one unit: ``"poetry/3/top_p/0.7/0"``."""
    return f"{task}/{prompt_index}/{method}/{setting:g}/{seed}"


@dataclass
class Results:
    """What a results file holds: the header, the references by ``(task, prompt_index)``,
    the units by id, and the lines that were skipped as corrupt (line numbers; for
    :func:`combine_results`, ``"file:line"``)."""

    path: Path
    header: dict | None = None
    references: dict[tuple[str, int], str] = field(default_factory=dict)
    units: dict[str, dict] = field(default_factory=dict)
    skipped: list[int | str] = field(default_factory=list)

    def records(self) -> list[dict]:
        """Header, references and units as records (units in id order)."""
        out = [self.header] if self.header else []
        out += [{"type": "reference", "task": t, "prompt_index": i, "text": text}
                for (t, i), text in sorted(self.references.items())]
        return out + [self.units[k] for k in sorted(self.units)]


def _check_record(record) -> str | None:
    """The problem with one parsed line, or None."""
    if not isinstance(record, dict) or record.get("type") not in _TYPES:
        return f"not a record of type {', '.join(_TYPES)}"
    if record["type"] == "unit":
        for key, kind in (("id", str), ("task", str), ("method", str), ("outputs", list),
                          ("set", dict), ("cost", dict), ("prompt_index", int), ("seed", int)):
            if not isinstance(record.get(key), kind):
                return f"unit field {key!r} missing or not {kind.__name__}"
    if record["type"] == "reference":
        if not isinstance(record.get("task"), str) or not isinstance(record.get("text"), str) \
                or not isinstance(record.get("prompt_index"), int):
            return "reference needs task, prompt_index and text"
    return None


def read_results(path: str | Path) -> Results:
    """Parse a results file; a missing file gives empty :class:`Results`.

    Raises ``ValueError`` naming the file when it is not a results file (a directory,
    a first line that is not our header, another format version). Corrupt or
    unknown lines after the header are skipped with a warning naming the line.
    """
    path = Path(path)
    results = Results(path)
    if not path.exists():
        return results
    if not path.is_file():
        raise ValueError(f"{path}: not a file (expected an evaluation results file)")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                record = None
            problem = "not valid JSON" if record is None else _check_record(record)
            if number == 1:
                if problem or record["type"] != "header" or record.get("format") != FORMAT:
                    raise ValueError(f"{path}: line 1 is not a creative-sparse evaluation "
                                     "results header; refusing to read or extend this file")
                if record.get("format_version") != FORMAT_VERSION:
                    raise ValueError(f"{path} has results format version "
                                     f"{record.get('format_version')!r}; this creative-sparse "
                                     f"reads version {FORMAT_VERSION}")
                results.header = record
                continue
            if problem or record["type"] == "header":
                logger.warning("%s:%d: skipped a corrupt line (%s)", path, number,
                               problem or "a second header")
                results.skipped.append(number)
                continue
            if record["type"] == "reference":
                results.references[(record["task"], record["prompt_index"])] = record["text"]
            else:
                results.units[record["id"]] = record
    return results


def check_header(found: Mapping | None, expected: Mapping, path: Path) -> None:
    """``ValueError`` when an existing file's header names another run."""
    if found is None:
        return
    for key in IDENTITY:
        if found.get(key, _ABSENT.get(key)) != expected.get(key, _ABSENT.get(key)):
            raise ValueError(f"{path} holds results of another run ({key}: "
                             f"{found.get(key)!r} there, {expected.get(key)!r} now); "
                             "use another --out file or the same settings")


class ResultsWriter:
    """Appends records to a results file, each flushed and fsynced before the next.

    Opening an existing file checks its header against ``header`` and repairs a torn
    last line (one the kill cut short) by starting the next record on a new line.
    """

    def __init__(self, path: str | Path, header: Mapping):
        self.path = Path(path)
        existing = read_results(self.path)
        check_header(existing.header, header, self.path)
        self.results = existing
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        if existing.header is None:
            if self.path.stat().st_size:
                raise ValueError(f"{self.path}: not empty and not a results file")
            self.write(dict(header))
            existing.header = dict(header)
        elif self._needs_newline():
            self._file.write(b"\n")

    def _needs_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def write(self, record: Mapping) -> None:
        line = json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        if record.get("type") == "unit":
            self.results.units[record["id"]] = dict(record)
        elif record.get("type") == "reference":
            self.results.references[(record["task"], record["prompt_index"])] = record["text"]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def comparable(unit: Mapping) -> dict:
    """A unit without what legitimately differs between two runs of it (wall times)."""
    out = dict(unit)
    out["cost"] = {k: v for k, v in unit.get("cost", {}).items()
                   if k not in ("wall_time", "unit_seconds")}
    return out


# what may differ between runs whose units one report compares: the tasks (each task's
# budget must agree where two files share it) and the library version (named in the report)
_COMBINED_FREELY = ("max_new_tokens", "library_version")


def combine_results(paths: Iterable[str | Path]) -> Results:
    """Several results files read as one, for one report (nothing is written).

    The files are runs of the same protocol (model, split, outputs per unit, compute
    control, safety checker, format), typically over different tasks or methods: say
    ``--tasks code music`` run apart from the rest. Each task's length budget must
    agree where two files share a task; a unit or reference that two files share must
    agree too (wall time aside). The combined header's ``max_new_tokens`` is the union
    (``tasks`` and ``methods`` too) and ``library_version`` lists every version seen,
    comma-separated. Errors name the
    file and the field: nothing is mixed silently.

    Raises:
        ValueError: no paths, a path that is not a results file, or files that
            disagree as above.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no results files to combine")
    combined = Results(paths[0])
    origin: dict[str, Path] = {}
    budgets: dict[str, int] = {}
    versions: list[str] = []
    methods: list[str] = []
    for path in paths:
        part = read_results(path)
        if part.header is None:
            raise ValueError(f"{path}: no such results file")
        if combined.header is None:
            combined.header = dict(part.header)
        for key in IDENTITY:
            if key in _COMBINED_FREELY:
                continue
            mine, theirs = (h.get(key, _ABSENT.get(key)) for h in (combined.header, part.header))
            if mine != theirs:
                raise ValueError(f"{path} is a run of another protocol than {paths[0]} "
                                 f"({key}: {theirs!r} there, {mine!r} in {paths[0]}); "
                                 "only runs that differ in tasks, methods or seeds combine")
        for task, budget in (part.header.get("max_new_tokens") or {}).items():
            if budgets.setdefault(task, budget) != budget:
                raise ValueError(f"{path} gives {task} a length budget of {budget} tokens, "
                                 f"another file {budgets[task]}; their units do not compare")
        methods += [m for m in part.header.get("methods") or () if m not in methods]
        version = str(part.header.get("library_version"))
        if version not in versions:
            versions.append(version)
        _absorb(combined, part, path, origin, "files")
        combined.skipped += [f"{path}:{n}" for n in part.skipped]
    combined.header.update(max_new_tokens=budgets, library_version=", ".join(versions),
                           tasks=list(budgets), methods=methods)
    return combined


def _absorb(into: Results, part: Results, path: Path, origin: dict[str, Path],
            what: str) -> None:
    """Add ``part``'s references and units to ``into``; one that ``into`` already holds
    must agree (wall time aside), else ``ValueError`` naming both ``what`` (files or
    shards). ``origin`` remembers which file each unit came from."""
    for key, text in part.references.items():
        if into.references.setdefault(key, text) != text:
            raise ValueError(f"{what} disagree on the reference answer of {key[0]} prompt "
                             f"{key[1]}: {path} and another of the {what}")
    for uid, unit in part.units.items():
        if uid in into.units and comparable(into.units[uid]) != comparable(unit):
            raise ValueError(f"{what} disagree on unit {uid}: {origin[uid]} and {path}")
        into.units.setdefault(uid, unit)
        origin.setdefault(uid, path)


def merge_shards(shards: Iterable[str | Path], out: str | Path) -> Results:
    """Merge per-rank files into ``out`` (header, references, units in id order).

    Shards must share one header; a unit or reference present in two shards must agree
    (wall time aside), else ``ValueError`` naming both files. ``out`` is written to a
    temporary file and renamed, so a failed merge leaves no half file.
    """
    shards = [Path(p) for p in shards]
    merged = Results(Path(out))
    origin: dict[str, Path] = {}
    for shard in shards:
        part = read_results(shard)
        if part.header is None:
            continue
        if merged.header is None:
            merged.header = part.header
        check_header(part.header, merged.header, shard)
        _absorb(merged, part, shard, origin, "shards")
    if merged.header is None:
        raise ValueError(f"no results in {', '.join(map(str, shards))}")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in merged.records():
            f.write(json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n")
    tmp.replace(out)
    return merged
