"""`LikelihoodScorer`: mean per-token negative log-likelihood of texts under a causal LM.

Texts are batched (right padding, attention mask), each prefixed with a short
context so that its first token is predicted too: ``"<|im_start|>assistant\\n"``
for ChatML tokenizers (SmolLM2, Qwen), else the BOS (or EOS) token. The first
``skip_tokens`` text tokens (at most half of them) are left out of the average:
they are predicted from almost no context and would otherwise make short texts
look incoherent (mean NLL falls with length by construction). The average is in
fp32 over real tokens only.

Given a prompt (``nll(texts, prompt)``), each text is scored after the prompt's
generation context (the chat template with the generation prompt); when a batch
shares one prompt, the prompt's keys and values are computed once and shared by
its rows.

The LM head is applied only to the positions that are scored, in chunks of rows,
with `cross_entropy` on the logits: a full ``[B, T, vocab]`` log-softmax is never
materialised.

Example:
    >>> scorer = LikelihoodScorer()                  # loads nothing yet
    >>> scorer.nll(["The cat sat on the mat."])      # doctest: +SKIP
    tensor([3.9...])
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.nn.functional as F

from ..models.fast_linear import fast_linears
from ..models.kv_cache import cache_kwargs
from .metrics import check_texts

__all__ = ["LikelihoodScorer"]

logger = logging.getLogger(__name__)


class LikelihoodScorer:
    """Mean per-token NLL (nats) of texts under a causal LM, batched.

    Args:
        model, tokenizer: a loaded causal LM and its tokenizer; both ``None`` (default)
            means `creative_sparse.models.load_model` (the embedded SmolLM2), on first use.
        batch_size: texts per forward pass.
        max_tokens: texts are truncated to this many tokens.
        prefix: context before each text: ``"auto"`` (see module doc), a string, or ``""``
            (then the first token is not scored).
        skip_tokens: leading text tokens left out of the mean (capped at half the text).
        chunk_rows: scored positions per LM-head chunk (bounds memory: rows x vocab fp32).
        max_prompt_tokens: a prompt's context is cut to its last this many tokens.

    Example:
        >>> LikelihoodScorer(model, tok).nll(["hello world", ""])   # doctest: +SKIP
        tensor([5.1, inf])
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, batch_size: int = 64,
                 max_tokens: int = 512, prefix: str = "auto", skip_tokens: int = 4,
                 chunk_rows: int = 4096, max_prompt_tokens: int = 256) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither (to load the default)")
        for name, v, lo in (("batch_size", batch_size, 1), ("max_tokens", max_tokens, 1),
                            ("skip_tokens", skip_tokens, 0), ("chunk_rows", chunk_rows, 1),
                            ("max_prompt_tokens", max_prompt_tokens, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"LikelihoodScorer: {name} must be an int >= {lo}, got {v!r}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.prefix, self.skip_tokens, self.chunk_rows = prefix, skip_tokens, chunk_rows
        self.max_prompt_tokens = max_prompt_tokens
        self._prefix_ids: list[int] | None = None
        self._prompt_cache: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def load(self) -> tuple[Any, Any]:
        """``(model, tokenizer)``, loading the default model on first call."""
        with self._lock:
            if self.model is None:
                from creative_sparse.models import load_model

                self.model, self.tokenizer = load_model()
            if self._prefix_ids is None:
                self._prefix_ids = self._make_prefix()
        return self.model, self.tokenizer

    def _make_prefix(self) -> list[int]:
        tok = self.tokenizer
        if self.prefix != "auto":
            return tok(self.prefix, add_special_tokens=False).input_ids if self.prefix else []
        if "<|im_start|>" in tok.get_vocab():
            return tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return [start] if start is not None else []

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the context in which an answer to ``prompt`` is generated: the
        chat template with the generation prompt for chat tokenizers (as
        `CreativeSparseWrapper.prompt_ids` builds it), else the prompt and a newline."""
        _, tok = self.load()
        if prompt not in self._prompt_cache:
            if getattr(tok, "chat_template", None):
                ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]
            else:
                ids = tok(prompt + "\n").input_ids
            self._prompt_cache[prompt] = list(ids)[-self.max_prompt_tokens:]
        return self._prompt_cache[prompt]

    @torch.inference_mode()
    def nll(self, texts: list[str], prompts: str | list[str | None] | None = None) -> torch.Tensor:
        """Mean NLL per scored token, ``[N]`` float32, nats; ``inf`` for a text with no tokens.

        Without ``prompts`` each text is scored after the short prefix of the module
        doc (the text's NLL "alone"); with them, after the prompt's generation context
        (`prompt_ids`): the NLL "given the prompt". ``prompts`` is one prompt for every
        text or one per text (``None`` items use the short prefix).
        """
        texts = check_texts(texts, "texts")
        model, tok = self.load()
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts] * len(texts)
        if len(prompts) != len(texts):
            raise ValueError(f"prompts: got {len(prompts)} for {len(texts)} texts; pass one "
                             "prompt, or one per text")
        out = torch.full((len(texts),), float("inf"))
        ids = [tok(t, add_special_tokens=False).input_ids[: self.max_tokens] if t else []
               for t in texts]
        pre = [(self._prefix_ids or []) if p is None else self.prompt_ids(p) for p in prompts]
        todo = sorted((i for i in range(len(texts)) if ids[i]),
                      key=lambda i: len(ids[i]) + len(pre[i]))
        for s in range(0, len(todo), self.batch_size):
            idx = todo[s:s + self.batch_size]
            out[idx] = self._batch_nll([ids[i] for i in idx], [pre[i] for i in idx])
        return out

    def _batch_nll(self, batch: list[list[int]], prefixes: list[list[int]]) -> torch.Tensor:
        model = self.model
        device = next(model.parameters()).device
        # One prompt for the whole batch (how generation scores its candidates): its
        # keys and values are computed once and shared by the rows, so a long prompt
        # costs one row's prefill, not one per text. Its last token stays in the rows:
        # its output predicts each text's first token.
        shared = len(batch) > 1 and len(prefixes[0]) >= 2 and all(
            p == prefixes[0] for p in prefixes[1:])
        past = prefixes[0][:-1] if shared else []
        leads = [p[len(past):] for p in prefixes]
        seqs = [lead + t for lead, t in zip(leads, batch)]
        length = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        # score[b, t] = True where the token at t + 1 is a scored text token
        score = torch.zeros((len(seqs), length - 1), dtype=torch.bool)
        for b, (s, t, pre) in enumerate(zip(seqs, batch, leads)):
            input_ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
            first = len(pre) + min(self.skip_tokens, len(t) // 2)
            if not pre:
                first = max(first, 1)  # the very first token has nothing to be predicted from
            score[b, first - 1: len(s) - 1] = True
        input_ids, mask = input_ids.to(device), mask.to(device)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        plain = head is None or not hasattr(model, "get_decoder") or any(
            getattr(model.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
        net = model if plain else model.get_decoder()
        with fast_linears(model):       # the output head is one of the model's layers
            kwargs: dict[str, Any] = {}
            if past:
                from transformers import DynamicCache

                cache = DynamicCache()
                kwargs = dict(use_cache=True, **cache_kwargs(net, cache))
                net(input_ids=torch.tensor([past], device=device), **kwargs)
                cache.batch_repeat_interleave(len(seqs))
                mask = torch.cat([mask.new_ones(len(seqs), len(past)), mask], dim=1)
            out = net(input_ids=input_ids, attention_mask=mask, **kwargs)
            # models that post-process logits: take them from the full forward
            hidden = (out.logits if plain else out.last_hidden_state)[:, :-1]
            rows = hidden[score.to(device)]
            target = input_ids[:, 1:][score.to(device)]
            owner = score.nonzero()[:, 0]
            losses = torch.empty(rows.shape[0], dtype=torch.float32)
            for c in range(0, rows.shape[0], self.chunk_rows):
                h = rows[c:c + self.chunk_rows]
                logits = h if plain else head(h)
                losses[c:c + self.chunk_rows] = F.cross_entropy(
                    logits.float(), target[c:c + self.chunk_rows], reduction="none").cpu()
        total = torch.zeros(len(batch)).index_add_(0, owner, losses)
        return total / score.sum(1).clamp(min=1)
