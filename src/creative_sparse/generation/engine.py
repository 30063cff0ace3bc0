"""One decoding loop over ``model.forward`` with a KV cache.

:func:`generate` prefills the prompt once, repeats the cache for ``num_rows``
drafts and then, step by step: asks the schedule for the knobs of this step
(sampling and attention, so the sparsity can change during generation),
applies the caller's logit processor (constraints), samples one token per row
with that row's own generator, and feeds the tokens back. Rows stop
independently (EOS, a stop string, the length budget); finished rows leave the
batch, so the cost follows the rows still running. With ``max_cache_tokens``
the cache is pruned H2O-style after each step.

The pieces, in the order one call uses them: :func:`_check_call` (arguments, ids),
:func:`_prefill_or_resume` (the first logits), then per step :meth:`_Rows.next_tokens`
(processors, one draw per row, reference rows' argmax, take-backs),
:meth:`_Rows.record` (EOS, stop strings, streaming), :meth:`_Rows.keep` (finished rows
leave the batch and the cache) and :func:`_decode_forward` (one token per row); last
:func:`_flops`. :class:`_Rows` owns the rows: generators, histories, prompts, texts.

Example:
    >>> from creative_sparse.models import load_model          # doctest: +SKIP
    >>> model, tok = load_model()                              # doctest: +SKIP
    >>> result = generate(model, tok, "Once upon a time", num_rows=4, max_new_tokens=30,
    ...                   seeds=[1, 2, 3, 4])                  # doctest: +SKIP
    >>> result.texts[0], result.stats.generated_tokens          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from ..models.fast_linear import fast_linears
from ..models.kv_cache import CachePositions, cache_bytes, cache_kwargs, prefill, prune_cache
from ..models.attention_knobs import AttentionKnobs
from ..quality.metrics import check_text
from .knobs import SamplingParams, sample, sample_coded, sampling_probs, stratified_codes
from .processors import combine

__all__ = ["DecodeState", "GenerationResult", "GenerationStats", "StepKnobs", "generate"]

logger = logging.getLogger(__name__)

StepKnobs = tuple[SamplingParams, AttentionKnobs]
Schedule = Union[StepKnobs, Callable[[int], StepKnobs]]
# Ours: (step, token ids generated so far per running row, logits [rows, vocab]) -> logits;
# or transformers': (input_ids [rows, L] with the prompt, scores [rows, vocab]) -> scores;
# or a list of either (see processors.py).
LogitProcessor = Union[Callable[[int, list[list[int]], Tensor], Tensor],
                       Callable[[Tensor, Tensor], Tensor], Sequence[Callable]]


@dataclass
class GenerationStats:
    """Cost of one :func:`generate` call.

    ``flops`` is an estimate: ``2 * parameters`` per processed token (prompt once)
    plus ``4 * head_dim`` per (query, key) pair attended in every layer and head.
    ``peak_cache_bytes`` is the largest size the KV cache reached.
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    attended_fraction: float = 1.0
    pairs_attended: int = 0
    flops: float = 0.0
    wall_time: float = 0.0
    peak_cache_bytes: int = 0
    evicted_tokens: int = 0


@dataclass
class DecodeState:
    """Where a generation stopped, to continue some of its rows without recomputing
    their keys and values (the KV-reuse knob).

    ``cache`` holds one row per entry of ``rows`` (the original row indices);
    ``pending`` is each cache row's last sampled token, not yet fed to the model;
    ``history`` is each cache row's generated tokens so far (``pending`` included),
    which constraints see in front of the tokens a continuation adds;
    ``prompts`` is each cache row's prompt ids (transformers processors see
    prompt + history, as in ``model.generate``).
    """

    cache: object
    positions: CachePositions
    pending: Tensor
    rows: list[int]
    history: list[list[int]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)

    def select(self, rows: Sequence[int]) -> "DecodeState":
        """Keep only the original ``rows`` (in that order). Consumes this state."""
        missing = [r for r in rows if r not in self.rows]
        if missing or not rows:
            raise ValueError(f"rows {list(rows)} must be a non-empty subset of the rows still "
                             f"in the cache {self.rows}")
        index = torch.tensor([self.rows.index(r) for r in rows])
        _keep_rows(self.cache, index.to(self.pending.device))
        history = [self.history[i] for i in index.tolist()] if self.history else []
        prompts = [self.prompts[i] for i in index.tolist()] if self.prompts else []
        return DecodeState(self.cache, self.positions, self.pending[index], list(rows), history,
                           prompts)


@dataclass
class GenerationResult:
    """Texts (stop strings removed), token ids and why each row ended
    (``"eos"``, ``"stop"``, ``"length"``, or ``"refused"``: the constraints refused
    every next token tried, 8 resamples and then the 1,024 most probable, so the row
    ends where it was, with a warning), in row order; ``state`` (with ``keep_state=True``) lets rows that
    reached the length budget continue."""

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    stats: GenerationStats = field(default_factory=GenerationStats)
    state: DecodeState | None = None


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def _keep_rows(cache, rows: Tensor) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)


_MAX_RESAMPLES = 8
_FALLBACK_CANDIDATES = 1024


_CODE_SALT = 0x9E3779B97F4A7C15   # the stratification offset's seed: apart from the rows' own
_CODE_BITS = 40.0                 # a float64 code's usable precision, in bits


def _resample_rejected(tokens, logits, alive, context, generators, sampling, rejects,
                       skip=()) -> list[int]:
    """Backtrack one token: a sampled token the constraints refuse (it completes a
    banned phrase, or leaves a text no continuation can make valid) is taken back
    before it is fed, and the row samples again without it, up to
    ``_MAX_RESAMPLES`` times; then the most probable of the ``_FALLBACK_CANDIDATES``
    best tokens that is not refused is taken. Returns the batch positions where every
    one of those is refused too: those rows have no allowed next token here (their
    refused token is left in ``tokens``; the caller ends them, never feeds it).
    ``context(row)`` is the row's token history the constraints judge."""
    stuck = []
    for i, row in enumerate(alive):
        if i in skip:
            continue
        ids = context(row)
        if not rejects(ids, int(tokens[i])):
            continue
        row_logits = logits[i: i + 1].clone()
        found = False
        for _ in range(_MAX_RESAMPLES):
            row_logits[0, int(tokens[i])] = float("-inf")
            if torch.isinf(row_logits).all():
                break
            tokens[i] = sample(row_logits, sampling, [generators[row]])[0]
            if not rejects(ids, int(tokens[i])):
                found = True
                break
        if found:
            continue
        best = torch.topk(row_logits[0], min(_FALLBACK_CANDIDATES, row_logits.shape[-1])).indices
        allowed = next((int(t) for t in best if torch.isfinite(row_logits[0, t])
                        and not rejects(ids, int(t))), None)
        if allowed is None:
            stuck.append(i)
        else:
            tokens[i] = allowed
    return stuck


def _with_rows(knobs: AttentionKnobs, seeds: list[int], dense: Sequence[int] = ()
               ) -> AttentionKnobs:
    """``knobs`` for the running rows: their noise seeds and which of them stay dense."""
    if knobs.noise > 0:
        knobs = replace(knobs, row_seeds=tuple(seeds))
    return replace(knobs, dense_rows=tuple(dense)) if dense or knobs.dense_rows else knobs


class _Rows:
    """The rows of one call and what each owns: its generator (seeded by its seed), its
    token history (an earlier call's, then this call's), its prompt ids, its text and
    why it ended. ``alive`` lists the original indices of the rows still in the batch,
    in batch order; ``reference`` the rows decoded greedily with exact attention."""

    def __init__(self, seeds: list[int], prior: list[list[int]], prompts: list[list[int]],
                 reference: set[int]):
        n = len(seeds)
        self.seeds, self.prior, self.prompts, self.reference = seeds, prior, prompts, reference
        self.generators = [torch.Generator(device="cpu").manual_seed(s % 2**64) for s in seeds]
        self.alive = list(range(n))
        self.generated: list[list[int]] = [[] for _ in range(n)]
        self.texts = [""] * n
        self.reasons = ["length"] * n
        self.refused: set[int] = set()        # rows the constraints left no next token
        self.codes: dict[int, float] = {}     # row -> its arithmetic-sampling code
        self.code_bits: dict[int, float] = {}
        self.code_steps = 0

    def stratify(self, steps: int) -> None:
        """The first ``steps`` tokens of the sampled (non-reference) rows are drawn as one
        stratified set: codes spread evenly over [0, 1), one shared random offset drawn
        from the first such row's seed (:func:`~.knobs.stratified_codes`)."""
        rows = [r for r in range(len(self.seeds)) if r not in self.reference]
        if steps <= 0 or len(rows) < 2:
            return
        offset = torch.Generator(device="cpu").manual_seed((self.seeds[rows[0]] + _CODE_SALT)
                                                           % 2**64)
        self.codes = dict(zip(rows, stratified_codes(len(rows), offset).tolist()))
        self.code_bits = dict.fromkeys(rows, 0.0)
        self.code_steps = steps

    def _coded(self, step: int, logits: Tensor, sampling: SamplingParams,
               tokens: Tensor) -> list[int]:
        """Replace the coded rows' tokens by their arithmetic-sampling draws; returns their
        batch positions. A row stops being coded after ``code_steps`` steps or once its
        code has spent ``_CODE_BITS`` bits of precision (it then draws from its generator)."""
        if step >= self.code_steps or sampling.temperature == 0:
            self.codes.clear()
        positions = [i for i, r in enumerate(self.alive) if r in self.codes]
        if not positions:
            return []
        rows = [self.alive[i] for i in positions]
        probs = sampling_probs(logits[positions], sampling)
        drawn, codes, bits = sample_coded(probs, torch.tensor([self.codes[r] for r in rows],
                                                              dtype=torch.float64))
        tokens[positions] = drawn.to(tokens.device, tokens.dtype)
        for row, code, spent in zip(rows, codes.tolist(), bits.tolist()):
            self.code_bits[row] += spent
            self.codes[row] = code
            if self.code_bits[row] > _CODE_BITS:
                del self.codes[row]
        return positions

    def context(self, row: int) -> list[int]:
        """What the constraints judge: earlier calls' tokens, then this call's."""
        return self.prior[row] + self.generated[row]

    def dense_positions(self) -> list[int]:
        """Batch positions of the running reference rows."""
        return [i for i, r in enumerate(self.alive) if r in self.reference]

    def knobs(self, knobs: AttentionKnobs) -> AttentionKnobs:
        """``knobs`` for the running rows (their noise seeds, which of them stay dense)."""
        return _with_rows(knobs, [self.seeds[r] for r in self.alive], self.dense_positions())

    def next_tokens(self, step: int, logits: Tensor, sampling: SamplingParams, hook) -> Tensor:
        """One token per running row: the processors, a draw from each row's generator,
        the reference rows' argmax of the raw logits, and take-backs the guards ask for."""
        alive = self.alive
        greedy = self.dense_positions()
        raw = logits[greedy].argmax(dim=-1) if greedy else None
        if hook is not None:
            logits = hook(step, [self.context(r) for r in alive],
                          [self.prompts[r] for r in alive], logits)
        tokens = sample(logits, sampling, [self.generators[r] for r in alive]).cpu()
        coded = self._coded(step, logits, sampling, tokens) if self.codes else []
        if greedy:
            tokens[greedy] = raw.cpu().to(tokens.dtype)
        if hook is not None and hook.guards:
            before = tokens[coded].clone()
            stuck = _resample_rejected(tokens, logits, alive, self.context, self.generators,
                                       sampling, hook.rejects, skip=set(greedy))
            self.refused.update(alive[i] for i in stuck)
            for i in [i for i, a, b in zip(coded, before.tolist(), tokens[coded].tolist())
                      if a != b]:
                self.codes.pop(alive[i], None)      # a refused draw: the code no longer fits
        return tokens

    def record(self, tokens: Tensor, eos: set[int], tokenizer, stop_strings: Sequence[str],
               stream, watch_text: bool, stats: GenerationStats) -> list[int]:
        """Append each running row's token, end the rows that hit EOS or a stop string;
        returns the batch positions of the rows that go on."""
        still = []
        for i, row in enumerate(self.alive):
            token = int(tokens[i])
            if row in self.refused:     # no allowed token: the row ends before it
                self.reasons[row] = "refused"
                continue
            if token in eos:
                self.reasons[row] = "eos"
                continue
            self.generated[row].append(token)
            stats.generated_tokens += 1
            hit = []
            if watch_text:  # decoding every step is only needed to watch the text
                text = tokenizer.decode(self.generated[row], skip_special_tokens=True)
                hit = [text.index(s) for s in stop_strings if s and s in text]
                if hit:
                    text, self.reasons[row] = text[: min(hit)], "stop"
                if stream is not None and len(text) > len(self.texts[row]):
                    stream(row, text[len(self.texts[row]):])
                self.texts[row] = text
            if not hit:
                still.append(i)
        return still

    def state(self, cache, positions: CachePositions, tokens: Tensor) -> DecodeState:
        """The running rows' cache, pending tokens and histories, to continue them later."""
        return DecodeState(cache, positions, tokens, list(self.alive),
                           [self.context(r) for r in self.alive],
                           [self.prompts[r] for r in self.alive])

    def keep(self, still: list[int], cache, key_mass: dict, device) -> None:
        """Drop the finished rows from the batch: their cache rows and key mass too."""
        if len(still) == len(self.alive):
            return
        index = torch.tensor(still, device=device)
        _keep_rows(cache, index)
        for layer, mass in list(key_mass.items()):
            key_mass[layer] = mass.index_select(0, index)
        self.alive = [self.alive[i] for i in still]


def _check_call(model, tokenizer, prompt, num_rows, max_new_tokens, seeds, reference_rows):
    """The ids to start from (``[R, L]`` prompt ids, or a resumed state's pending tokens),
    the resumed state or None, one seed per row and the reference rows; clear errors."""
    resume = prompt if isinstance(prompt, DecodeState) else None
    if resume is not None:
        if num_rows != len(resume.rows):
            raise ValueError(f"num_rows ({num_rows}) must equal the rows of the DecodeState "
                             f"({len(resume.rows)})")
        ids = resume.pending.view(-1, 1).to(model.device)   # [rows, 1]: the tokens to feed
        used = resume.positions.next_position
    else:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; give at least one character")
            ids = tokenizer(check_text(prompt, "prompt"), return_tensors="pt").input_ids
        else:
            ids = prompt
        ids = ids.to(model.device)
        if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"prompt ids must have shape [R, L] with R, L >= 1, got "
                             f"{tuple(ids.shape)}")
        used = ids.shape[1]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and used + max_new_tokens > limit:
        raise ValueError(f"prompt ({used} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's context of {limit} tokens")
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1 \
            or num_rows % ids.shape[0]:
        raise ValueError(f"num_rows must be an int >= 1 and a multiple of the {ids.shape[0]} "
                         f"prompt(s), got {num_rows!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    seeds = list(range(num_rows)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != num_rows:
        raise ValueError(f"seeds: need one per row ({num_rows}), got {len(seeds)}")
    reference = {int(r) for r in reference_rows}
    if any(not 0 <= r < num_rows for r in reference):
        raise ValueError(f"reference_rows must be row indices in [0, {num_rows}), got "
                         f"{sorted(reference)}")
    return ids, resume, seeds, reference


def _decode_forward(model, tokens: Tensor, cache, positions: CachePositions) -> Tensor:
    """One token per running row through the model with the cache; the next logits."""
    out = model(input_ids=tokens.view(-1, 1).to(model.device), use_cache=True,
                **cache_kwargs(model, cache),
                **positions.model_kwargs(1, tokens.numel(), model.device))
    positions.advance(1)
    return out.logits[:, -1]


def _prefill_or_resume(model, ids: Tensor, resume: DecodeState | None, num_rows: int):
    """``(cache, logits, positions)``: the prompt prefilled once and repeated per row,
    or a resumed state's pending tokens fed to its cache (nothing recomputed)."""
    if resume is None:
        return prefill(model, ids, num_rows)
    logits = _decode_forward(model, resume.pending, resume.cache, resume.positions)
    return resume.cache, logits, resume.positions


def _flops(model, stats: GenerationStats, pairs_computed: int) -> float:
    """Matmul FLOPs: 2 per parameter per token, plus QK and PV over the computed pairs."""
    n_params = sum(p.numel() for p in model.parameters())
    head_dim = getattr(model.config, "head_dim", None) or (
        model.config.hidden_size // model.config.num_attention_heads)
    return 2.0 * n_params * (stats.prompt_tokens + stats.generated_tokens) \
        + 4.0 * head_dim * pairs_computed


@torch.inference_mode()
def generate(model, tokenizer, prompt: Union[str, Tensor, DecodeState], *, num_rows: int = 1,
             max_new_tokens: int = 64, schedule: Schedule | None = None,
             seeds: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
             logit_processor: LogitProcessor | None = None,
             stream: Callable[[int, str], None] | None = None,
             max_cache_tokens: int | None = None, keep_state: bool = False,
             reference_rows: Sequence[int] = (), stratified_steps: int = 0,
             progress: Callable[[int], None] | None = None) -> GenerationResult:
    """Generate ``num_rows`` continuations of one prompt in one batch.

    Args:
        prompt: text (tokenized as is; apply a chat template first if wanted), or
            ids ``[R, L]``: R prompts of one length, each continued by
            ``num_rows // R`` consecutive rows, or a :class:`DecodeState` of an
            earlier call (``num_rows`` = its rows): those rows continue from their
            cached keys and values, nothing is recomputed.
        num_rows: rows generated together from the prefilled prompt(s).
        max_new_tokens: length budget per row.
        schedule: ``(SamplingParams, AttentionKnobs)`` for every step, or a function
            ``step -> (SamplingParams, AttentionKnobs)``; the attention knobs of step
            ``t`` are used by the forward that produces step ``t``'s logits (step 0:
            the prefill).
            Default: plain sampling at T = 1, dense attention. Attention knobs with
            ``noise > 0`` get each row's seed as its sub-network seed.
        seeds: one int per row: its sampling generator and sub-network seed. Same
            seeds, same outputs. Default ``0 .. num_rows-1``. Any int: torch takes
            seeds in [-2**63, 2**64 - 1], and a seed outside is taken modulo 2**64
            (inside, that is what torch does with a negative seed), so derived seeds
            such as ``seed * 1000 + i`` never overflow.
        stop_strings: a row ends when its text contains one (the text is cut there).
        logit_processor: ours, ``(step, generated ids per running row, logits) ->
            logits`` (the ids of a row resumed from a :class:`DecodeState` start with
            its history), or transformers', ``(input_ids, scores) -> scores`` (any
            ``LogitsProcessor``: ``input_ids`` is each row's prompt + generated tokens),
            or a list of either, applied in order before temperature (constraints
            mask tokens here; see :mod:`~creative_sparse.generation.processors`). A
            processor that also has ``rejects(ids, token) -> bool`` (a ``TokenGuard``,
            e.g. a ``ConstraintSet``) takes a sampled token it refuses back before it
            is fed, and the row samples again.
        stream: called as ``stream(row, new_text)`` whenever a row's text grows.
        max_cache_tokens: prune the cache (attention-mass eviction, sinks and the
            recent window of the attention knobs kept) to at most this many tokens.
        keep_state: return the final cache in ``result.state`` (to continue rows).
        reference_rows: rows decoded greedily with exact attention whatever the
            schedule says (Creative-Sparse's novelty reference, generated in the
            same batch as the drafts instead of in a pass of its own). They share
            the prompt's prefill and the MoE routing with the other rows, and
            ignore ``logit_processor``.
        stratified_steps: the first this many tokens of the sampled rows are drawn as
            one stratified set (arithmetic sampling, Vilnis et al. 2023): the rows'
            uniform numbers are spread evenly over [0, 1) with one random offset and
            each row's number is rescaled inside the interval of the token it picked,
            so the rows spread over the distribution instead of repeating its mode,
            while each row alone is still an exact draw from it. A row falls back to
            its own generator after these steps, when its code's precision is spent
            (40 bits) or when a constraint refuses its draw. 0 (default): every row
            draws independently.
        progress: called as ``progress(1)`` after every decoding step (e.g. a tqdm
            bar's ``update``); the library itself shows nothing.

    Returns:
        A :class:`GenerationResult`.
    """
    # The integration registers the attention with transformers when imported: load it
    # with the first call, not with the package (importing transformers takes seconds).
    from ..models.transformers import set_knobs, sparsity

    ids, resume, seeds, reference = _check_call(model, tokenizer, prompt, num_rows,
                                                max_new_tokens, seeds, reference_rows)
    if schedule is None:
        schedule = (SamplingParams(), AttentionKnobs())
    knobs_at = schedule if callable(schedule) else (lambda step, fixed=schedule: fixed)
    hook = combine(logit_processor)
    if hook is not None and hook.needs_prompt and resume is not None and not resume.prompts:
        raise ValueError("a transformers logits processor needs the rows' prompts, and this "
                         "DecodeState has none (build it with generate(keep_state=True))")

    start = time.perf_counter()
    eos = _eos_ids(model, tokenizer)
    if resume is not None:
        prior = resume.history or [[]] * num_rows
        prompts = resume.prompts or [[]] * num_rows
    else:
        per_prompt, prompt_rows = num_rows // ids.shape[0], ids.tolist()
        prior, prompts = [[]] * num_rows, [prompt_rows[r // per_prompt] for r in range(num_rows)]
    rows = _Rows(seeds, prior, prompts, reference)
    if isinstance(stratified_steps, bool) or not isinstance(stratified_steps, int) \
            or stratified_steps < 0:
        raise ValueError(f"stratified_steps must be an int >= 0, got {stratified_steps!r}")
    rows.stratify(stratified_steps)
    stats = GenerationStats(prompt_tokens=0 if resume is not None else ids.numel())
    sampling, knobs = knobs_at(0)
    track = max_cache_tokens is not None
    watch_text = bool(stop_strings) or stream is not None
    state = None
    # The prompt is prefilled once, as one row: no per-row sub-network noise there.
    with sparsity(model, replace(knobs, noise=0.0, row_seeds=None),
                  track_key_mass=track) as attention, fast_linears(model):
        if resume is not None:
            set_knobs(rows.knobs(knobs))
        cache, logits, positions = _prefill_or_resume(model, ids, resume, num_rows)
        if resume is None:
            set_knobs(rows.knobs(knobs))
        stats.peak_cache_bytes = cache_bytes(cache)
        for step in range(max_new_tokens):
            tokens = rows.next_tokens(step, logits, sampling, hook)
            stats.steps += 1
            if progress is not None:
                progress(1)
            still = rows.record(tokens, eos, tokenizer, stop_strings, stream, watch_text, stats)
            if not still or step == max_new_tokens - 1:
                state = rows.state(cache, positions, tokens) if keep_state else None
                rows.alive = [rows.alive[i] for i in still]
                break
            rows.keep(still, cache, attention.key_mass, ids.device)
            tokens = tokens[still]
            # The forward below computes the logits of the next step: its knobs apply.
            sampling, knobs = knobs_at(step + 1)
            set_knobs(rows.knobs(knobs))
            logits = _decode_forward(model, tokens, cache, positions)
            if track:
                stats.evicted_tokens += prune_cache(
                    cache, attention.key_mass, positions, max_tokens=max_cache_tokens,
                    sink_tokens=knobs.sink_tokens, local_window=knobs.local_window)
            stats.peak_cache_bytes = max(stats.peak_cache_bytes, cache_bytes(cache))
    texts = rows.texts if watch_text else [
        tokenizer.decode(ids_, skip_special_tokens=True) for ids_ in rows.generated]
    stats.attended_fraction = attention.attended_fraction
    stats.pairs_attended = attention.pairs_computed
    stats.flops = _flops(model, stats, attention.pairs_computed)
    stats.wall_time = time.perf_counter() - start
    if rows.refused:
        logger.warning("the constraints refused every next token tried (%d resamples, then "
                       "the %d most probable) for %d row(s); those rows end there, unfinished "
                       "(finish reason 'refused')", _MAX_RESAMPLES, _FALLBACK_CANDIDATES,
                       len(rows.refused))
    return GenerationResult(texts, rows.generated, rows.reasons, stats, state)
