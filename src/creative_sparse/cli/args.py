"""Argument types and limits of the ``creative-sparse`` command: every value is checked
here, before a model is loaded or a sweep runs."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import tempfile
from pathlib import Path

import torch


DEMO_MAX_LENGTH = 32768


DEMO_MAX_HEADS = 64


DEMO_MAX_HEAD_DIM = 256


DEMO_MAX_ELEMENTS = 2**26          # heads x length x head_dim


MAX_NEW_TOKENS = 32768             # also bounded by the model's context, once it is loaded


MAX_CANDIDATES = 64                # 2 x as many drafts share one batch


SEED_RANGE = (-(2**63), 2**64 - 1)     # what torch.manual_seed accepts


def _schedule(text: str) -> tuple[float, float]:
    try:
        diverge, refine = (float(x) for x in text.split(","))
    except ValueError:
        diverge = refine = math.nan
    if not (0.0 <= diverge <= 1.0 and 0.0 <= refine <= 1.0):
        raise argparse.ArgumentTypeError(
            f"must be two numbers 'diverge,refine' in [0, 1], got {text!r}")
    return diverge, refine


def _level(text: str) -> float:
    try:
        level = float(text)
    except ValueError:
        level = math.nan
    if not 0.0 <= level <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return level


def _integer(low: int, high: int):
    """An argparse type: an integer in [low, high], checked before anything loads."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}")
        return value
    return parse


def _prompt(text: str) -> str:
    from ..quality.metrics import check_text

    if not text.strip():
        raise argparse.ArgumentTypeError("must be a non-empty text")
    try:
        return check_text(text, "the prompt")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` (available here) or ``auto`` (cuda if any)."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    from ..models.loading import _resolve_device

    try:
        _resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or 'auto')") from None
    return text


def _regex(text: str) -> str:
    import re

    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regex {text!r}: {exc}") from None
    if importlib.util.find_spec("llguidance") is not None:
        # The mask speaks Rust's regex syntax (no look-around, no back-references).
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(LLMatcher.grammar_from_regex(text))
        if error and not error.startswith("WARNING"):
            raise argparse.ArgumentTypeError(
                f"regex {text!r} cannot be a token mask (Rust regex syntax: no look-around "
                f"or back-references): {' '.join(error.split())}")
    return text


def _text_file(text: str) -> str:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {exc}") from None


def _json_schema_file(text: str) -> dict:
    import json

    try:
        schema = json.loads(_text_file(text))
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must hold a JSON object (a schema), got "
                                         f"{type(schema).__name__}")
    return schema


def _plot_path(text: str) -> Path:
    """A plot file in an existing directory we can write to (never created for you)."""
    path = Path(text).expanduser()
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name, e.g. "
                                         f"{os.path.join(text, 'tune.png')!r}")
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"directory {str(folder)!r} {what} (it is not created "
                                         "for you)")
    try:   # the one reliable test of write access (root, ACLs, read-only mounts)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write in directory {str(folder)!r}: "
                                         f"{exc.strerror or exc}") from None
    if importlib.util.find_spec("matplotlib") is None:
        raise argparse.ArgumentTypeError("plotting needs matplotlib: pip install "
                                         "'creative-sparse[plots]'")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise argparse.ArgumentTypeError(f"{text!r}: the file name must end in one of "
                                         f"{', '.join('.' + f for f in sorted(formats))}")
    return path


def _settings(items: list[str]) -> dict[str, list[float]]:
    """``["top_p=0.7,1.0", ...]`` -> ``{"top_p": [0.7, 1.0]}`` (values checked by the runner)."""
    out: dict[str, list[float]] = {}
    for item in items:
        method, sep, values = item.partition("=")
        try:
            numbers = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            numbers = []
        if not sep or not numbers:
            raise ValueError(f"expected METHOD=V1,V2,... with numbers, got {item!r}")
        out[method.strip()] = numbers
    return out


def _chat_prompt(prompt: str | None, system: str | None, chat: Path | None):
    """The prompt of ``generate``: the text, or chat messages when ``--system`` or
    ``--chat`` is given (checked here, before the model loads)."""
    if system is None and chat is None:
        if prompt is None:
            raise ValueError("give a prompt, or --chat FILE.json")
        return prompt
    import json

    from ..generation.prompts import check_prompt

    messages = []
    if chat is not None:
        try:
            messages = json.loads(chat.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"argument --chat: cannot read {str(chat)!r} as JSON: "
                             f"{exc}") from None
        if not isinstance(messages, list):
            raise ValueError(f"argument --chat: {str(chat)!r} must hold a JSON list of "
                             f"messages, got {type(messages).__name__}")
    if system is not None:
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            raise ValueError("--system and a system message in --chat: give one of them")
        messages = [{"role": "system", "content": system}] + messages
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
    return check_prompt(messages)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` where there is a default to show (not for flags, empty
    lists, ``None`` or required arguments)."""

    def _get_help_string(self, action):
        default = action.default
        if action.required or default is None or default is False or default == [] \
                or default == argparse.SUPPRESS:   # (0 == False: hence "is")
            return action.help
        return super()._get_help_string(action)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
