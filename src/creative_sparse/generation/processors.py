"""Logit processors both ways: transformers' processors in our engine, ours in ``model.generate``.

Two conventions meet here:

* **transformers**: ``processor(input_ids [R, L], scores [R, V]) -> scores``, where
  ``input_ids`` is each row's whole sequence, prompt included (every
  ``transformers.LogitsProcessor`` and ``LogitsProcessorList``: repetition penalty,
  no-repeat-n-gram, typical and epsilon sampling, ...).
* **ours** (:class:`StepProcessor`): ``processor(step, generated, logits) -> logits``,
  with ``generated`` each running row's own tokens (a resumed row's history first).
  Our constraints need the step and the answer without the prompt, so they keep it.

A processor that can also take a sampled token back is a :class:`TokenGuard`
(``rejects(ids, token) -> bool`` on the row's generated ids): the engine then
resamples that row without the token (see ``engine._resample_rejected``).

:func:`~creative_sparse.generation.engine.generate` accepts either convention, or a
list mixing both (:func:`combine`): it hands transformers processors the rows'
real sequences (prompt + generated, one call per group of rows of equal length,
so no padding token is ever seen as text). The other way,
:func:`as_logits_processor` turns a constraints spec (or a ``ConstraintSet``) into a
``transformers.LogitsProcessor`` for ``model.generate``.

Example:
    >>> from transformers import RepetitionPenaltyLogitsProcessor    # doctest: +SKIP
    >>> generate(model, tok, "Once", logit_processor=[
    ...     RepetitionPenaltyLogitsProcessor(1.3)])                  # doctest: +SKIP
    >>> ban = as_logits_processor(tok, {"banned": ["robot"]},
    ...                           prompt_length=ids.shape[1])        # doctest: +SKIP
    >>> model.generate(ids, logits_processor=LogitsProcessorList([ban]))  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

__all__ = ["StepProcessor", "TokenGuard", "as_logits_processor", "combine",
           "is_transformers_convention"]


@runtime_checkable
class TokenGuard(Protocol):
    """Can refuse a sampled token: ``rejects(ids, token)`` on the row's generated ids."""

    def rejects(self, ids: list[int], token: int) -> bool: ...


class StepProcessor(Protocol):
    """Our convention: ``(step, generated ids per running row, logits [R, V]) -> logits``."""

    def __call__(self, step: int, generated: list[list[int]], logits: Tensor) -> Tensor: ...


def _positional_arity(fn) -> int | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
               for p in params)


def is_transformers_convention(processor) -> bool:
    """Whether ``processor`` takes ``(input_ids, scores)``: a transformers
    ``LogitsProcessor`` / ``LogitsProcessorList``, or any callable of two
    required positional arguments. Ours take three ``(step, generated, logits)``."""
    try:
        import transformers
        if isinstance(processor, (transformers.LogitsProcessor, transformers.LogitsProcessorList)):
            return True
    except ImportError:
        pass
    return _positional_arity(processor) == 2


class Combined:
    """Several processors of either convention, applied in order, as one hook of the
    engine: ``hook(step, generated, prompts, logits)``; ``rejects`` asks every
    :class:`TokenGuard` among them."""

    def __init__(self, processors: Sequence[Callable]):
        for p in processors:
            if not callable(p):
                raise ValueError(f"a logit processor must be callable, got {type(p).__name__}")
            if not is_transformers_convention(p) and _positional_arity(p) not in (3, None):
                raise ValueError(
                    f"logit processor {type(p).__name__} takes {_positional_arity(p)} "
                    "arguments; expected (input_ids, scores) like transformers' processors "
                    "or (step, generated, logits) like ours")
        self.processors = list(processors)
        self._hf = [is_transformers_convention(p) for p in self.processors]
        self.guards = [p for p in self.processors if isinstance(p, TokenGuard)]

    @property
    def needs_prompt(self) -> bool:
        return any(self._hf)

    def __call__(self, step: int, generated: list[list[int]], prompts: list[list[int]],
                 logits: Tensor) -> Tensor:
        for processor, hf in zip(self.processors, self._hf):
            if hf:
                logits = _call_transformers(processor, generated, prompts, logits)
            else:
                logits = processor(step, generated, logits)
        return logits

    def rejects(self, ids: list[int], token: int) -> bool:
        return any(g.rejects(ids, token) for g in self.guards)


def _call_transformers(processor, generated, prompts, logits: Tensor) -> Tensor:
    """Call ``processor(input_ids, scores)`` with each row's prompt + generated tokens.

    Rows of a batch usually have one length; rows resumed from different histories
    may not, and padding would make a penalty see pad tokens as text, so rows are
    grouped by length and each group gets its own exact rectangular tensor."""
    sequences = [list(p) + list(g) for p, g in zip(prompts, generated)]
    groups: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        groups.setdefault(len(seq), []).append(i)
    out = logits.clone() if len(groups) > 1 else None
    for rows in groups.values():
        ids = torch.tensor([sequences[i] for i in rows], dtype=torch.long, device=logits.device)
        if out is None:
            return processor(ids, logits)
        index = torch.tensor(rows, device=logits.device)
        out[index] = processor(ids, logits[index]).to(out.dtype)
    return out


def combine(processor) -> Combined | None:
    """The engine's hook for ``logit_processor=``: ``None``, one processor of either
    convention, or a list of them (a ``LogitsProcessorList`` included)."""
    if processor is None:
        return None
    if isinstance(processor, Combined):
        return processor
    try:
        import transformers
        single = isinstance(processor, transformers.LogitsProcessor)
    except ImportError:
        single = False
    if isinstance(processor, (list, tuple)) and not single:
        return Combined(list(processor))
    return Combined([processor])


def as_logits_processor(tokenizer, constraints: Mapping[str, Any] | Any, *, prompt_length: int,
                        max_new_tokens: int = 256, eos_ids: Sequence[int] | None = None,
                        guard_candidates: int = 50):
    """Our constraints as a ``transformers.LogitsProcessor`` for ``model.generate``.

    Args:
        tokenizer: the model's tokenizer.
        constraints: a constraints spec (the dict of
            :func:`~creative_sparse.generation.wrapper.build_constraints`: ``banned``,
            ``required``, ``min_tokens``, ``regex``, ``json_schema``, ``grammar``,
            ``validators``) or a ``ConstraintSet``.
        prompt_length: the prompt's length in tokens (``input_ids.shape[1]`` given to
            ``generate``): our constraints judge the answer, not the prompt.
        max_new_tokens: the length budget (required keywords are steered in before it).
        eos_ids: end-of-sequence ids (default: the tokenizer's).
        guard_candidates: ``model.generate`` cannot take a token back, so a token
            guard (banned phrases assembled from pieces, the Python/ABC validators)
            is applied up front: each row's best tokens are checked in order of
            logit until ``guard_candidates`` pass, and every other token is masked.
            The constraint then holds for whatever is sampled, at the price of a
            top-k of ``guard_candidates`` (transformers' own default top-k is 50).

    Returns:
        A ``transformers.LogitsProcessor``.

    Example:
        >>> proc = as_logits_processor(tok, {"banned": ["robot"]},
        ...                            prompt_length=ids.shape[1])          # doctest: +SKIP
        >>> model.generate(ids, logits_processor=LogitsProcessorList([proc]))  # doctest: +SKIP
    """
    import transformers

    from .constraint_spec import build_constraints

    if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
        raise ValueError(f"prompt_length must be an int >= 0, got {prompt_length!r}")
    if guard_candidates < 1:
        raise ValueError(f"guard_candidates must be >= 1, got {guard_candidates!r}")
    if eos_ids is None:
        eos = tokenizer.eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    constraint_set = build_constraints(tokenizer, constraints, max_new_tokens, eos_ids)
    hook = combine(constraint_set.processors)

    class ConstraintLogitsProcessor(transformers.LogitsProcessor):
        """Our constraints in transformers' convention (see :func:`as_logits_processor`)."""

        constraints = constraint_set

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] < prompt_length:
                raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, fewer than "
                                 f"prompt_length={prompt_length}")
            generated = input_ids[:, prompt_length:].tolist()
            step = len(generated[0]) if generated else 0
            scores = hook(step, generated, [[]] * len(generated), scores)
            if hook.guards:
                scores = _guard_up_front(scores, generated, hook, guard_candidates)
            return scores

    return ConstraintLogitsProcessor()


_GUARD_CHECKED = 1024   # as the engine's fallback (engine._FALLBACK_CANDIDATES)


def _guard_up_front(scores: Tensor, generated, hook: Combined, keep: int) -> Tensor:
    """Mask every token but the ``keep`` best that no guard refuses (per row)."""
    out = torch.full_like(scores, float("-inf"))
    for row, ids in enumerate(generated):
        order = torch.topk(scores[row], min(_GUARD_CHECKED, scores.shape[-1])).indices.tolist()
        kept = 0
        for token in order:
            if not torch.isfinite(scores[row, token]):
                break
            if not hook.rejects(ids, token):
                out[row, token] = scores[row, token]
                kept += 1
                if kept == keep:
                    break
        if kept == 0:   # nothing allowed among the best: say so, leave the row as it was
            warnings.warn(f"constraints refuse each of the {_GUARD_CHECKED} most probable "
                          "tokens of a row; that row is not guarded at this step", stacklevel=3)
            out[row] = scores[row]
    return out
