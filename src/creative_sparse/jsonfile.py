"""The small JSON files the library keeps: read with errors that name the file, written atomically.

Three formats live on disk: the model cache manifest (`creative_sparse.models.cache`),
the autotune cache (`creative_sparse.autotune.cache`) and tuned diffusers threshold
files (`creative_sparse.models.diffusers.params`). Each checks the *content* of what
:func:`read_json` returns; this module only turns the ways a file can fail to be
JSON at all (a directory in its place, binary bytes, broken or absurdly nested JSON)
into one `JsonFileError` whose message starts with the path. Caches catch it and
rebuild; user files let it through (it is a `ValueError`).

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.json"
    >>> write_text_atomic(path, '{"a": 1}')
    >>> read_json(path)
    {'a': 1}
    >>> read_json(path.parent)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    creative_sparse.jsonfile.JsonFileError: /...: is a directory, not a JSON file
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["JsonFileError", "read_json", "write_text_atomic"]


class JsonFileError(ValueError):
    """A file exists but does not hold JSON (the message starts with its path)."""


def read_json(path: str | os.PathLike) -> Any:
    """The parsed content of the JSON file ``path``.

    Raises:
        JsonFileError: ``path`` is a directory, is not UTF-8 text, is not valid JSON
            or nests deeper than Python's recursion limit (a `ValueError`; the
            message starts with the path).
        OSError: the file is missing or cannot be read (``FileNotFoundError``,
            ``PermissionError``; these name the path themselves).
    """
    path = Path(path)
    if path.is_dir():
        raise JsonFileError(f"{path}: is a directory, not a JSON file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise JsonFileError(f"{path}: is not UTF-8 text (a binary file?): {err}") from None
    except IsADirectoryError:   # made a directory since the check above
        raise JsonFileError(f"{path}: is a directory, not a JSON file") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise JsonFileError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as err:
        raise JsonFileError(f"{path}: is not valid JSON: {err}") from None


def write_text_atomic(path: str | os.PathLike, text: str, *, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one.

    The text goes to a temporary sibling first, which is then renamed over ``path``;
    if anything fails, ``path`` is left as it was and the temporary file is removed.
    ``mode`` is the new file's permission bits (a temporary file starts private).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
