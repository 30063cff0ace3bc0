"""The on-disk cache of sweep results, and the measurements that ship with the library."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from ..jsonfile import JsonFileError, read_json, write_text_atomic
from .results import SweepResult

logger = logging.getLogger("creative_sparse.autotune")


def _model_identity(model_name: str, model) -> str:
    if model is not None:
        import torch

        digest = hashlib.sha256(model.config.to_json_string().encode())
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                flat = p.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
                digest.update(name.encode() + sample.tobytes())
        return f"object:{getattr(model, 'name_or_path', '')}:{digest.hexdigest()[:16]}"
    ident = f"name:{model_name.strip().lower()}"
    local = Path(model_name).expanduser()
    if local.exists():   # a local directory or file: its files' sizes and times
        files = sorted(local.iterdir()) if local.is_dir() else [local]
        ident += ":" + ",".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                for f in files if f.is_file())
    return ident


def _embedder_kind() -> str:
    from ..quality import minilm_dir

    try:
        minilm_dir()
        return "minilm"
    except FileNotFoundError:
        return "hidden-state"


def _cache_file(cache_dir, task: str, split: str, key: Mapping[str, Any]) -> Path:
    from ..models.cache import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return root / "autotune" / f"{task}-{split}-{digest}.json"


def _read_cache(path: Path, key: Mapping[str, Any]) -> SweepResult | None:
    """The cached result for ``key`` at ``path``, or None (absent, or another key).

    The cache heals: a file that cannot be read or whose content is not a valid
    result (wrong shape, types or ranges) is logged as a warning naming it and
    treated as absent, so the sweep runs again and :func:`_write_cache` replaces it.
    """
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    except (JsonFileError, OSError) as err:
        logger.warning("ignoring unreadable autotune cache %s (%s); measuring again", path, err)
        return None
    if not isinstance(data, dict) or "key" not in data or "result" not in data:
        logger.warning("ignoring autotune cache %s: expected an object with 'key' and 'result', "
                       "got %.60r; measuring again", path, data)
        return None
    if data["key"] != json.loads(json.dumps(key)):
        return None
    try:
        result = SweepResult.from_dict(data["result"])
    except ValueError as err:
        logger.warning("ignoring autotune cache %s: %s; measuring again", path, err)
        return None
    return dataclasses.replace(result, from_cache=True)


# Measurements that ship with the library (scripts/ship_autotune_results.py) are keyed
# without these fields: a result measured under another version still answers.
UNSTABLE_KEY_FIELDS = ("version", "transformers", "torch")
_SHIPPED = Path(__file__).parent / "measured"


def _read_shipped(key: Mapping[str, Any]) -> SweepResult | None:
    """The shipped measurement for ``key`` (the embedded model's default sweeps), if any."""
    stable = {k: v for k, v in json.loads(json.dumps(key)).items()
              if k not in UNSTABLE_KEY_FIELDS}
    for path in sorted(_SHIPPED.glob("*.json")):
        try:
            entries = read_json(path)["entries"]
            if not isinstance(entries, list):
                raise TypeError(f"entries is a {type(entries).__name__}, expected a list")
        except (ValueError, OSError, KeyError, TypeError) as err:
            logger.warning("ignoring unreadable shipped autotune results %s (%s)", path, err)
            continue
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or entry.get("key") != stable:
                continue
            try:
                return dataclasses.replace(SweepResult.from_dict(entry.get("result")),
                                           from_cache=True)
            except ValueError as err:
                logger.warning("ignoring shipped autotune result %s entries[%d]: %s", path, i,
                               err)
    return None


def _write_cache(path: Path, key: Mapping[str, Any], result: SweepResult) -> None:
    """Store ``result`` atomically (readers see the old file or the whole new one).

    A cache that cannot be written (read-only, full, a directory in the file's
    place) costs the next call a new sweep, not this one its result: warn, go on.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
        write_text_atomic(path, json.dumps({"key": key, "result": result.to_dict()}))
    except OSError as err:
        logger.warning("could not write the autotune cache %s (%s); the result is not cached",
                       path, err)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"
