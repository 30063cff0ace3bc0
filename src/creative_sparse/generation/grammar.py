"""Guaranteed constraints: regex, JSON schema and context-free grammars as token masks.

:class:`GrammarMask` asks `llguidance <https://github.com/guidance-ai/llguidance>`_
which tokens may come next in each row and masks every other one before sampling,
so a row can only ever spell a prefix of the language: what it ends with (end of
sequence) is a full match by construction. The rejection path
(:class:`~creative_sparse.generation.constraints.ValidatorGuard`: sample, test the
prefix, take back, resample up to 8 times, then the best of 1,024 candidates)
stays for the validators no grammar expresses (Python through ``codeop``, ABC
notation, validators a user writes in Python); the mask runs first, the guard
after it.

Grammars (:func:`grammar_source`): a regex (Rust ``regex`` syntax), a JSON schema,
or a Lark grammar (llguidance's dialect: rules in lower case, terminals in upper
case or ``/regex/`` literals; see the llguidance docs). The text a mask constrains
is the row's whole answer (a refined row's draft included); the matching
validator (:func:`grammar_validator`) counts a finished text as 1 violation
unless its stripped form is in the language.

What a mask cannot guarantee: a row cut by the length budget before the match is
complete (it ends as ``"length"``, mid-match). Give the budget room.

Why llguidance, not xgrammar or outlines: on this project's CPU (2 cores, SmolLM2's
49,152-token vocabulary, measured under load) llguidance compiles a regex in about
1 ms (xgrammar 0.2.9: 320 ms), its wheel is 7.6 MB (xgrammar and its runtime 16 MB)
and depends on nothing (xgrammar also pulls ``apache-tvm-ffi``); xgrammar's mask is
faster per token (0.06 ms against 0.27 ms median), a difference that vanishes
beside a decoding step of tens of ms. Grammars are built per call, so compile time
matters more here than the last 0.2 ms. outlines brings far more
(and builds its index per regex ahead of time).

Example:
    >>> mask = GrammarMask(tokenizer, grammar_source(regex=r"(yes|no)\\."),
    ...                    eos_ids=[tokenizer.eos_token_id])               # doctest: +SKIP
    >>> generate(model, tokenizer, prompt, logit_processor=mask)         # doctest: +SKIP
"""

from __future__ import annotations

import json
import weakref
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["GrammarMask", "grammar_source", "grammar_validator"]

NEG_INF = float("-inf")
_TOKENIZERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
        import llguidance.hf  # noqa: F401  (from_tokenizer)
    except ImportError:
        raise ImportError("regex, JSON-schema and grammar constraints need llguidance: "
                          "pip install 'creative-sparse[hf]' (or pip install llguidance)") from None
    return llguidance


def _ll_tokenizer(tokenizer):
    """llguidance's view of a fast Hugging Face tokenizer (built once per tokenizer:
    about 0.3 s for a 49k vocabulary)."""
    ll = _llguidance()
    try:
        cached = _TOKENIZERS.get(tokenizer)
    except TypeError:                       # not weak-referenceable
        cached = None
    if cached is None:
        try:
            cached = ll.hf.from_tokenizer(tokenizer)
        except ValueError as exc:
            raise ValueError(f"grammar constraints need a fast Hugging Face tokenizer "
                             f"(PreTrainedTokenizerFast): {exc}") from None
        try:
            _TOKENIZERS[tokenizer] = cached
        except TypeError:
            pass
    return cached


def grammar_source(*, regex: str | None = None, json_schema: Mapping | str | None = None,
                   lark: str | None = None) -> str:
    """An llguidance grammar from exactly one of ``regex``, ``json_schema`` (a dict or
    JSON text) or ``lark`` (grammar text). Leading/trailing whitespace around a
    regex match is allowed, as the regex validator strips the text.

    Raises ``ValueError`` for none or several of them and for a JSON schema that is
    not a JSON object (the grammar itself is checked by :class:`GrammarMask`).

    Example:
        >>> grammar_source(regex="a+").startswith("%llguidance")   # doctest: +SKIP
        True
    """
    given = [k for k, v in (("regex", regex), ("json_schema", json_schema), ("lark", lark))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of regex, json_schema, lark; got {given or 'none'}")
    M = _llguidance().LLMatcher
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise ValueError(f"regex must be a non-empty string, got {regex!r}")
        return M.grammar_from_regex(rf"\s*(?:{regex})\s*")
    if json_schema is not None:
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"json_schema is not valid JSON: {exc}") from None
        if not isinstance(json_schema, Mapping):
            raise ValueError(f"json_schema must be a JSON object (a dict), got "
                             f"{type(json_schema).__name__}")
        return M.grammar_from_json_schema(dict(json_schema))
    if not isinstance(lark, str) or not lark.strip():
        raise ValueError(f"lark must be a non-empty grammar text, got {lark!r}")
    return M.grammar_from_lark(lark)


def _matcher(tokenizer, grammar: str, what: str):
    ll = _llguidance()
    matcher = ll.LLMatcher(_ll_tokenizer(tokenizer), grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"invalid {what}: {' '.join(matcher.get_error().split())}")
    return matcher


class GrammarMask:
    """Mask, per row and step, every token the grammar does not allow next.

    A logit processor in our convention (``(step, generated, logits)``); each row's
    parser state is found from its token history, so rows leaving the batch,
    rows resumed from a :class:`~creative_sparse.generation.engine.DecodeState` and
    rows sharing a history all get the right state. End of sequence (any of
    ``eos_ids``) is allowed exactly when the text so far is a full match. A row whose
    history already left the language (e.g. a draft written without the mask) is
    left unmasked: nothing it adds can repair it (its violation is counted at the end).

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        grammar: from :func:`grammar_source`.
        eos_ids: the end-of-sequence ids the engine stops on.
        name: how errors and the validator name this grammar.
    """

    guarantees = True   # ConstraintSet applies it first and never lets softer steering undo it

    def __init__(self, tokenizer, grammar: str, eos_ids: Sequence[int] = (), name: str = "grammar"):
        self.tokenizer, self.grammar, self.name = tokenizer, grammar, name
        self.eos_ids = sorted({int(e) for e in eos_ids})
        self._root = _matcher(tokenizer, grammar, name)
        self._states: dict[tuple[int, ...], Any] = {(): self._root}
        self.vocab_size = _ll_tokenizer(tokenizer).vocab_size

    def _state(self, key: tuple[int, ...]) -> Any:
        """The parser state after ``key``: the last step's states are read, never advanced
        in place (a copy is), so rows sharing a history never share a parser."""
        found = self._states.get(key)
        if found is not None:
            return found
        parent = self._states.get(key[:-1]) if key else None
        matcher = (parent if parent is not None else self._root).deep_copy()
        matcher.consume_tokens(list(key[-1:] if parent is not None else key))
        return matcher

    def allowed(self, generated: list[list[int]], vocab: int) -> Tensor:
        """``[rows, vocab]`` bool: the tokens each row may take next (all ``True``
        for a row already outside the language)."""
        states = {}
        out = torch.ones(len(generated), vocab, dtype=torch.bool)
        for row, ids in enumerate(generated):
            key = tuple(ids)
            if key not in states:
                states[key] = self._state(key)
            matcher = states[key]
            if matcher.is_error():
                continue
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8),
                                 bitorder="little")[:min(vocab, self.vocab_size)]
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[: bits.shape[0]] = torch.from_numpy(bits.astype(bool))
            if self.eos_ids:
                mask[[e for e in self.eos_ids if e < vocab]] = matcher.is_accepting()
            out[row] = mask
        # Keep only this step's states (and the start): memory follows the running rows.
        states[()] = self._root
        self._states = states
        return out

    def __call__(self, step: int, generated: list[list[int]], logits: Tensor) -> Tensor:
        allowed = self.allowed(generated, logits.shape[-1]).to(logits.device)
        return logits.masked_fill(~allowed, NEG_INF)


class _GrammarValidator:
    def __init__(self, tokenizer, grammar: str, name: str):
        self._root = _matcher(tokenizer, grammar, name)
        self._ll = _ll_tokenizer(tokenizer)
        self.__name__ = name

    def __call__(self, text: str) -> int:
        """0 if the stripped text is a full match of the grammar, else 1."""
        matcher = self._root.deep_copy()
        tokens = self._ll.tokenize_str(text.strip())
        return 0 if matcher.consume_tokens(tokens) and matcher.is_accepting() else 1

    def rejects_prefix(self, text: str) -> bool:
        """True when no continuation of ``text`` can match (the rejection path)."""
        matcher = self._root.deep_copy()
        tokens = self._ll.tokenize_str(text.lstrip())
        return not matcher.consume_tokens(tokens)


def grammar_validator(tokenizer, grammar: str, name: str = "grammar") -> _GrammarValidator:
    """A validator: 0 if the whole (stripped) text is in the grammar's language, else 1;
    with ``rejects_prefix`` so :class:`~creative_sparse.generation.constraints.ValidatorGuard`
    can enforce it by rejection (the path :class:`GrammarMask` replaces).

    Example:
        >>> valid = grammar_validator(tok, grammar_source(regex=r"(yes|no)\\."))   # doctest: +SKIP
        >>> valid("yes."), valid("maybe")                                        # doctest: +SKIP
        (0, 1)
    """
    return _GrammarValidator(tokenizer, grammar, name)
