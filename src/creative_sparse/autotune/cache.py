"""The on-disk cache of sweep results, and the measurements that ship with the library."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != json.loads(json.dumps(key)):
            return None
        return dataclasses.replace(SweepResult.from_dict(data["result"]), from_cache=True)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable autotune cache %s (%s)", path, err)
        return None


# Measurements that ship with the library (scripts/ship_autotune_results.py) are keyed
# without these fields: a result measured under another version still answers.
UNSTABLE_KEY_FIELDS = ("version", "transformers", "torch")
_SHIPPED = Path(__file__).parent.parent / "evaluation" / "measured"


def _read_shipped(key: Mapping[str, Any]) -> SweepResult | None:
    """The shipped measurement for ``key`` (the embedded model's default sweeps), if any."""
    stable = {k: v for k, v in json.loads(json.dumps(key)).items()
              if k not in UNSTABLE_KEY_FIELDS}
    for path in sorted(_SHIPPED.glob("*.json")):
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
        except (ValueError, KeyError) as err:
            logger.warning("ignoring unreadable shipped autotune results %s (%s)", path, err)
            continue
        for entry in entries:
            if entry.get("key") == stable:
                return dataclasses.replace(SweepResult.from_dict(entry["result"]),
                                           from_cache=True)
    return None


def _write_cache(path: Path, key: Mapping[str, Any], result: SweepResult) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "result": result.to_dict()}, f)
        os.chmod(tmp, 0o644)    # mkstemp makes it private; the cache is as shareable as its folder
        os.replace(tmp, path)   # readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise



def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"
