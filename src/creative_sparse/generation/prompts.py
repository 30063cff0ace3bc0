"""Prompts as a string or as chat messages, for the wrapper, the strategies and the CLI.

A prompt is either a non-empty string (one user turn) or a list of chat messages
``[{"role": "system" | "user" | "assistant", "content": str}, ...]``: an optional
system message first, then turns ending with a user turn (the model answers it).
:func:`prompt_ids` applies the tokenizer's chat template with the generation
prompt; :func:`prompt_text` is what the quality functional reads as the task (the
user turns; the system prompt and earlier answers are instructions and context,
not the request to judge relevance against).

Example:
    >>> prompt_text([{"role": "system", "content": "You are a poet."},
    ...              {"role": "user", "content": "A haiku about rain."}])
    'A haiku about rain.'
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import torch

__all__ = ["Prompt", "check_prompt", "prompt_ids", "prompt_text"]

Prompt = Union[str, Sequence[Mapping[str, str]]]
ROLES = ("system", "user", "assistant")


def _check_text(text: str, what: str) -> str:
    from ..quality.metrics import check_text
    return check_text(text, what)


def check_prompt(prompt: Any) -> str | list[dict[str, str]]:
    """``prompt`` validated: the string, or the messages as a list of plain dicts.

    ``ValueError`` (saying what was wrong and what is allowed) for an empty or
    non-Unicode text, a message that is not ``{"role", "content"}``, an unknown role,
    a system message after the first, or a conversation that does not end with a
    user turn.
    """
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        return _check_text(prompt, "prompt")
    if isinstance(prompt, Mapping) or not isinstance(prompt, Sequence) or not prompt:
        raise ValueError("prompt must be a non-empty string or a non-empty list of chat "
                         "messages {'role': 'system' | 'user' | 'assistant', 'content': str}, "
                         f"got {type(prompt).__name__} {prompt!r:.200}")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise ValueError(f"chat message {i} must be a dict with exactly the keys 'role' "
                             f"and 'content', got {message!r:.200}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"chat message {i} has role {role!r}; allowed: "
                             f"{', '.join(ROLES)}")
        if role == "system" and i > 0:
            raise ValueError(f"chat message {i} is a system message; only the first message "
                             "may be one")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"chat message {i} ({role}) must have a non-empty string "
                             f"content, got {content!r:.200}")
        messages.append({"role": role, "content": _check_text(content,
                                                              f"chat message {i} content")})
    if messages[-1]["role"] != "user":
        raise ValueError(f"the chat must end with a user message (the model answers it); "
                         f"the last one is {messages[-1]['role']!r}")
    return messages


def prompt_text(prompt: Prompt) -> str:
    """The request the quality functional judges relevance against: the prompt itself,
    or the user turns of a chat, joined by newlines."""
    prompt = check_prompt(prompt)
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m["role"] == "user")


def prompt_ids(tokenizer, prompt: Prompt) -> torch.Tensor:
    """``[1, L]`` ids: the chat template (with the generation prompt) when the tokenizer
    has one, for a string (one user turn) or messages; a raw string otherwise.

    ``ValueError`` for chat messages and a tokenizer without a chat template (there is
    no faithful way to flatten them).
    """
    prompt = check_prompt(prompt)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    if not isinstance(prompt, str):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template, so chat messages "
                         "cannot be rendered; pass the prompt as a string")
    return tokenizer(prompt, return_tensors="pt").input_ids
