"""Atomic on-disk cache of converted models, stored as safetensors.

Converting the embedded GGUF model takes tens of seconds; reading the converted
safetensors back takes about one. This module owns the cache directory: where
it lives, how an entry is written so that no reader ever sees half of it, and
how a damaged entry is recognised and thrown away. It knows nothing about GGUF:
an entry is built by any callable returning ``(model, tokenizer)``.

Layout::

    <cache root>/models/<key>/            one entry (a `save_pretrained` directory)
        config.json, generation_config.json, model.safetensors, tokenizer files
        creative_sparse_cache.json        manifest (names, sizes, sha256), written last
        creative_sparse_verified.json     stamp of the last full checksum verification

Integrity: `cached_model_dir` returns an entry only after the sha256 of every file
matched the manifest. Hashing the default model's 538 MB of float32 safetensors
takes 0.36-0.5 s from the page cache (measured on 2 CPU cores; more from a cold
disk), and would double a warm `load_model` (0.3-0.55 s -> 0.75-1.1 s), so it is
not repeated on every load: after a verification the entry records each
file's (size, mtime_ns, ctime_ns, inode), and a later load re-hashes only when one
of them changed. Damage done in place (same size) changes mtime and ctime, so it
is caught; the entry is then rebuilt with a warning naming the file. A stamp that
cannot be written (read-only cache) only means every load verifies again.

The cache root is ``$CREATIVE_SPARSE_CACHE`` if set, else the platform's user
cache directory (``$XDG_CACHE_HOME/creative_sparse``, default
``~/.cache/creative_sparse`` on Linux).

Example:
    >>> from creative_sparse.models import cached_model_dir       # doctest: +SKIP
    >>> path = cached_model_dir("tiny-v1", build=make_tiny_model)  # doctest: +SKIP
    >>> verify_cache(path, checksums=True)                          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..jsonfile import JsonFileError, read_json, write_text_atomic

__all__ = [
    "CACHE_ENV",
    "MANIFEST_NAME",
    "STAMP_NAME",
    "CacheCorruptError",
    "cached_model_dir",
    "clear_cache",
    "default_cache_dir",
    "discard_entry",
    "verify_cache",
    "write_cache",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "CREATIVE_SPARSE_CACHE"
MANIFEST_NAME = "creative_sparse_cache.json"
STAMP_NAME = "creative_sparse_verified.json"
# Bump when the entry layout changes: old entries are then simply not found.
CACHE_FORMAT = 1
# A temporary directory this old belongs to a writer that died (SIGKILL, power loss).
_STALE_TMP_SECONDS = 3600.0


class CacheCorruptError(RuntimeError):
    """A cache entry exists but is incomplete or damaged; the message says why."""


def default_cache_dir() -> Path:
    """Root of the creative_sparse cache (not created).

    ``$CREATIVE_SPARSE_CACHE`` if set; otherwise ``$XDG_CACHE_HOME/creative_sparse``
    or ``~/.cache/creative_sparse`` on Linux, ``~/Library/Caches/creative_sparse`` on
    macOS, ``%LOCALAPPDATA%\\creative_sparse\\Cache`` on Windows.

    Example:
        >>> from unittest import mock
        >>> with mock.patch.dict("os.environ", {"CREATIVE_SPARSE_CACHE": "/tmp/cs"}):
        ...     str(default_cache_dir())
        '/tmp/cs'
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "creative_sparse" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "creative_sparse"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "creative_sparse"


def _models_root(cache_dir: str | os.PathLike | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "models"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_cache(path: str | os.PathLike, *, checksums: bool = False) -> dict[str, Any]:
    """Check a cache entry; return its manifest or raise `CacheCorruptError`.

    Always checks: the manifest exists, parses and has the expected shape (every
    field of the right type and range), every file it lists exists with the
    recorded size, and every ``.safetensors`` file opens (its header is
    consistent with its length). With ``checksums=True`` also compares the
    sha256 of every file (reads all bytes: about 0.5 s for the default model).
    The message names the entry and the file at fault.

    Example:
        >>> verify_cache("/nonexistent")
        Traceback (most recent call last):
        ...
        creative_sparse.models.cache.CacheCorruptError: /nonexistent: no manifest creative_sparse_cache.json
    """
    path = Path(path)
    manifest = _read_manifest(path)
    for name, info in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CacheCorruptError(f"{path}: missing file {name}")
        size = file.stat().st_size
        if size != info["size"]:
            raise CacheCorruptError(f"{path}: {name} has {size} bytes, manifest says {info['size']}")
        if name.endswith(".safetensors"):
            _check_safetensors(file)
        if checksums and _sha256(file) != info["sha256"]:
            raise CacheCorruptError(f"{path}: {name} does not match its sha256 (damaged on disk)")
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _read_manifest(path: Path) -> dict[str, Any]:
    """The entry's manifest, checked field by field (`CacheCorruptError` otherwise)."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CacheCorruptError(f"{path}: no manifest {MANIFEST_NAME}")
    try:
        manifest = read_json(manifest_path)
    except (JsonFileError, OSError) as err:
        raise CacheCorruptError(f"{path}: unreadable manifest ({err})") from err
    problem = _manifest_problem(manifest)
    if problem:
        raise CacheCorruptError(f"{path}: unreadable manifest ({manifest_path}: {problem})")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a parsed manifest, or None. Only plain file names are
    accepted: a manifest must not send the checks (or a loader) outside its entry."""
    if not isinstance(manifest, dict):
        return f"holds a JSON {type(manifest).__name__}, expected an object"
    fmt = manifest.get("format")
    if type(fmt) is not int or fmt != CACHE_FORMAT:
        return f"format = {fmt!r}, expected {CACHE_FORMAT}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"files = {_short(files)}, expected a non-empty object of file name -> size, sha256"
    for name, info in files.items():
        if not name or Path(name).name != name or name.startswith(".") or "\\" in name \
                or name in (MANIFEST_NAME, STAMP_NAME):
            return f"files holds {name!r}, expected a plain file name inside the entry"
        if not isinstance(info, dict):
            return f"files[{name!r}] = {_short(info)}, expected an object with size and sha256"
        size, digest = info.get("size"), info.get("sha256")
        if type(size) is not int or size < 0:
            return f"files[{name!r}].size = {_short(size)}, expected an int >= 0"
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"files[{name!r}].sha256 = {_short(digest)}, expected 64 lowercase hex digits"
    if not any(name.endswith(".safetensors") for name in files):
        return "files lists no .safetensors file"
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stamps(path: Path, manifest: dict[str, Any]) -> dict[str, list[int]]:
    """(size, mtime_ns, ctime_ns, inode) of the manifest and of every file it lists.

    Rewriting a file in place changes its mtime and ctime; replacing it changes
    the inode; ctime cannot be set back (unlike mtime), so a matching stamp means
    no byte was written since the stamp was taken.
    """
    stamps = {}
    for name in (MANIFEST_NAME, *manifest["files"]):
        st = (path / name).stat()
        stamps[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return stamps


def _write_stamp(path: Path, stamps: dict[str, list[int]]) -> None:
    try:
        write_text_atomic(path / STAMP_NAME, json.dumps({"format": CACHE_FORMAT, "files": stamps}))
    except OSError as err:   # a read-only shared cache: verify again next time
        logger.info("Cannot record the checksum verification of %s (%s); later loads verify "
                    "again", path, err)


def _read_stamp(path: Path) -> Any:
    try:
        return read_json(path / STAMP_NAME).get("files")
    except (JsonFileError, OSError, AttributeError):   # absent or damaged: verify again
        return None


def _verify_entry(path: Path) -> None:
    """`verify_cache` plus the checksums, unless a stamp says the files have not
    changed since they last matched (see the module docstring)."""
    try:
        manifest = verify_cache(path)
        stamps = _stamps(path, manifest)
        if _read_stamp(path) == stamps:
            return
        verify_cache(path, checksums=True)
        if _stamps(path, manifest) == stamps:   # nothing changed while we hashed
            _write_stamp(path, stamps)
    except OSError as err:   # unreadable, or removed under us by another process
        raise CacheCorruptError(f"{path}: {err}") from err


def _check_safetensors(file: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CacheCorruptError(f"{file}: not a valid safetensors file ({err})") from err


def write_cache(path: str | os.PathLike, model: Any, tokenizer: Any) -> Path:
    """Save ``model`` and ``tokenizer`` as cache entry ``path``, atomically.

    Everything is written into a temporary sibling directory, the manifest
    (file names, sizes, sha256) last, and the directory is then renamed into
    place. An exception or a killed process leaves no entry at ``path``. If
    another writer created ``path`` first and it verifies, it is kept and ours
    is dropped. Returns ``path``.

    Example:
        >>> write_cache(root / "models" / "tiny", model, tok)   # doctest: +SKIP
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        manifest = {"format": CACHE_FORMAT, "created": time.time(), "files": files}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _write_stamp(tmp, _stamps(tmp, manifest))   # just hashed: the first load need not
        tmp.chmod(0o755)  # mkdtemp makes it private; the entry is as shareable as its parent
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process renamed its entry into place first (ENOTEMPTY/EEXIST):
            # keep theirs if it is sound, else put ours in its place.
            try:
                verify_cache(final)
            except CacheCorruptError:
                discard_entry(final)
                os.replace(tmp, final)
            else:
                logger.info("Cache entry %s was written concurrently by another process; using it", final)
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def discard_entry(path: str | os.PathLike) -> None:
    """Remove a cache entry; readers never see it half-deleted (renamed away first)."""
    path = Path(path)
    trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:   # a file or a link where an entry belongs
        trash.unlink(missing_ok=True)


def _remove_stale_tmp(parent: Path) -> None:
    now = time.time()
    for p in parent.glob(".*.t*-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def cached_model_dir(
    key: str,
    build: Callable[[], tuple[Any, Any]],
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Directory of cache entry ``key``, building it with ``build()`` if needed.

    A valid entry is returned as is (no call to ``build``). A damaged one (a
    missing or extra-short file, a bad manifest, a byte changed on disk: the
    checksums are verified, see the module docstring) is logged as a warning
    naming the file, removed and rebuilt. ``build`` returns ``(model,
    tokenizer)``, both with ``save_pretrained``; the result is loadable with
    ``from_pretrained(path)``.

    Args:
        key: entry name, a single path component (e.g. ``"tiny-3f2a-tf5-v1"``).
        build: called at most once, only when the entry is missing or damaged.
        cache_dir: cache root; default `default_cache_dir()`.

    Example:
        >>> path = cached_model_dir("tiny", build=lambda: (model, tok))   # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(path)                    # doctest: +SKIP
    """
    if not key or Path(key).name != key or key.startswith("."):
        raise ValueError(f"cache key must be a plain, non-hidden file name, got {key!r}")
    final = _models_root(cache_dir) / key
    if final.exists() or final.is_symlink():
        try:
            _verify_entry(final)
            return final
        except CacheCorruptError as err:
            logger.warning("Corrupt model cache, rebuilding it: %s", err)
            discard_entry(final)
    model, tokenizer = build()
    return write_cache(final, model, tokenizer)


def clear_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete every cached model; return how many entries were removed.

    Example:
        >>> clear_cache("/tmp/empty-creative-sparse-cache")
        0
    """
    root = _models_root(cache_dir)
    if not root.is_dir():
        return 0
    removed = 0
    for p in root.iterdir():
        if not p.is_dir():
            continue
        if p.name.startswith("."):  # leftovers of interrupted writes or removals
            shutil.rmtree(p, ignore_errors=True)
        else:
            discard_entry(p)
            removed += 1
    return removed
