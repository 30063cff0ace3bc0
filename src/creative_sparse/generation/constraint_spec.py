"""A :class:`~creative_sparse.generation.constraints.ConstraintSet` from a dict spec.

:func:`build_constraints` turns the spec the wrapper, the CLI, the strategies and the
evaluation take (``{"banned": [...], "required": [...], "regex": ..., ...}``) into the
processors that act while decoding and the validators that count violations in the
finished texts. Its home is here, below the Creative-Sparse algorithm
(:mod:`~creative_sparse.generation.creative`) and the wrapper that re-exports it.

Example:
    >>> constraints = build_constraints(tokenizer, {"banned": ["robot"]}, budget=40,
    ...                                 eos_ids=[tokenizer.eos_token_id])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Mapping, Sequence

from .constraints import (BannedPhrases, ConstraintSet, MinLength, RequiredKeywords,
                          ValidatorGuard, abc_notation, python_syntax, regex_validator)
from .grammar import GrammarMask, grammar_source, grammar_validator
from .validators import banned_phrases

__all__ = ["build_constraints", "eos_ids"]


_VALIDATORS = {"python": python_syntax, "abc": abc_notation}


_KEYS = ("banned", "required", "min_tokens", "validators", "regex", "json_schema", "grammar",
         "enforce")


def eos_ids(tokenizer) -> list[int]:
    """The tokenizer's end-of-sequence ids as a list (none, one or several)."""
    eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def build_constraints(tokenizer, spec: Mapping[str, Any] | ConstraintSet | None, budget: int,
                      eos_ids: Sequence[int]) -> ConstraintSet:
    """A :class:`ConstraintSet` from a dict spec (or pass one through).

    Keys: ``banned`` (phrases), ``required`` (keywords), ``min_tokens`` (int),
    ``validators`` (``"python"``, ``"abc"``, ``"regex:<pattern>"`` or callables):
    counted as violations in the finished texts, and enforced while decoding
    when they can judge a prefix (ours can; see :class:`ValidatorGuard`).
    ``regex`` (a pattern, same as ``"regex:<pattern>"``), ``json_schema`` (a dict or
    JSON text) and ``grammar`` (Lark text): the whole answer must match; enforced by a
    token mask (:class:`~creative_sparse.generation.grammar.GrammarMask`, llguidance),
    so a finished answer matches by construction, and counted as violations.
    ``enforce``: ``"mask"`` (default) or ``"reject"``: regexes through the older
    rejection path (partial matching, take back and resample; no guarantee), kept
    for comparison. Without llguidance installed, a regex falls back to rejection
    with a warning; a JSON schema or grammar raises ``ImportError``.
    Banned phrases are both: masked while decoding (:class:`BannedPhrases`) and
    counted in the finished texts (:func:`~creative_sparse.generation.validators.banned_phrases`).
    """
    if spec is None:
        return ConstraintSet()
    if isinstance(spec, ConstraintSet):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"constraints must be a dict or a ConstraintSet, got "
                         f"{type(spec).__name__}")
    unknown = set(spec) - set(_KEYS)
    if unknown:
        raise ValueError(f"unknown constraint types {sorted(unknown)}; allowed: "
                         f"{', '.join(_KEYS)}")
    enforce = spec.get("enforce", "mask")
    if enforce not in ("mask", "reject"):
        raise ValueError(f"enforce must be 'mask' or 'reject', got {enforce!r}")
    processors, validators = [], []
    regexes = [item[len("regex:"):] for item in spec.get("validators", ())
               if isinstance(item, str) and item.startswith("regex:")]
    if spec.get("regex"):
        regexes.append(spec["regex"])
    masked = _grammar_masks(tokenizer, regexes, spec, eos_ids, enforce)
    processors.extend(mask for mask, _ in masked)
    validators.extend(v for _, v in masked)
    if enforce == "reject" or not masked:
        validators.extend(regex_validator(r) for r in regexes)
    if spec.get("banned"):
        processors.append(BannedPhrases(tokenizer, spec["banned"]))
        validators.append(banned_phrases(spec["banned"]))
    if spec.get("required"):
        processors.append(RequiredKeywords(tokenizer, spec["required"], budget))
    if spec.get("min_tokens"):
        processors.append(MinLength(list(eos_ids), int(spec["min_tokens"])))
    for item in spec.get("validators", ()):
        if callable(item):
            validators.append(item)
        elif isinstance(item, str) and item.startswith("regex:"):
            continue                                   # handled with spec["regex"] above
        elif item in _VALIDATORS:
            validators.append(_VALIDATORS[item])
        else:
            raise ValueError(f"unknown validator {item!r}; allowed: 'python', 'abc', "
                             "'regex:<pattern>' or a callable text -> violations")
    # The guard enforces by rejection what no mask covers (Python, ABC, a user's own).
    guarded = [v for v in validators if hasattr(v, "rejects_prefix")
               and not any(v is m for _, m in masked)]
    if guarded:
        processors.append(ValidatorGuard(tokenizer, guarded, eos_ids, budget))
    return ConstraintSet(processors, validators)


def _grammar_masks(tokenizer, regexes: list[str], spec: Mapping[str, Any],
                   eos_ids: Sequence[int], enforce: str) -> list[tuple[GrammarMask, Any]]:
    """``(mask, validator)`` for each regex, JSON schema and grammar of ``spec``."""
    sources = [("regex", dict(regex=r), f"regex({r})") for r in regexes]
    if spec.get("json_schema") is not None:
        sources.append(("json_schema", dict(json_schema=spec["json_schema"]), "json_schema"))
    if spec.get("grammar") is not None:
        sources.append(("grammar", dict(lark=spec["grammar"]), "grammar"))
    if enforce == "reject":
        if len(sources) > len(regexes):
            raise ValueError("enforce='reject' covers regexes only; a JSON schema or grammar "
                             "is enforced by its mask")
        return []
    if not sources:
        return []
    if importlib.util.find_spec("llguidance") is None:
        if len(sources) > len(regexes):
            raise ImportError("JSON-schema and grammar constraints need llguidance: pip "
                              "install 'creative-sparse[hf]' (or pip install llguidance)")
        warnings.warn("llguidance is not installed: regex constraints fall back to rejection "
                      "and resampling, which does not guarantee a match (pip install "
                      "'creative-sparse[hf]')", stacklevel=3)
        return []
    out = []
    for kind, kwargs, name in sources:
        source = grammar_source(**kwargs)
        try:
            mask = GrammarMask(tokenizer, source, eos_ids, name=name)
        except ValueError as exc:
            if kind != "regex":
                raise
            raise ValueError(f"{exc} (the mask takes Rust regex syntax: no look-around or "
                             "back-references; enforce='reject' takes Python's)") from None
        validator = (regex_validator(kwargs["regex"]) if kind == "regex"
                     else grammar_validator(tokenizer, source, name=name))
        out.append((mask, validator))
    return out

