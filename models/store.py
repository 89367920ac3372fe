"""Where weights live: the download cache and the model store.

``GNWS_HOME`` (default ``$XDG_CACHE_HOME/gnws`` or ``~/.cache/gnws``) holds
``checkpoints/`` (zoo ``.pth`` files as published) and ``models/`` (the model store: converted
and baked ``.safetensors`` files that the service, TorchServe handler and CLI read).
``GNWS_MODEL_STORE`` moves the model store elsewhere (training jobs export there).

The store holds two kinds of model:

- plain files, ``<store>/<name>.safetensors`` (zoo models baked by ``gnws fetch --bake``, files
  written by ``gnws bake``);
- versioned models, ``<store>/<name>/<version>.safetensors`` with whole-number versions from 1
  (``gnws export`` writes the next version and keeps the newest few), laid out like a Triton model
  repository. The newest version is the model's current one; the service can watch for new versions
  and roll back to older ones.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .bake import ModelInfo, baked, save_model
from .detector import GNWSDetector, build_detector
from .errors import CheckpointError, WeightsNotFoundError
from .files import file_sha256
from .mmdet_convert import config_for_checkpoint, convert_mmdet_state_dict, read_mmdet_checkpoint
from .zoo import ZOO, ZooEntry, get_entry

logger = logging.getLogger(__name__)

MODEL_SUFFIX = ".safetensors"


def gnws_home() -> Path:
    if env := os.environ.get("GNWS_HOME"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "gnws"


def checkpoint_dir() -> Path:
    return gnws_home() / "checkpoints"


def model_store() -> Path:
    if env := os.environ.get("GNWS_MODEL_STORE"):
        return Path(env).expanduser()
    return gnws_home() / "models"


def checkpoint_path(entry: ZooEntry) -> Path:
    """Where ``gnws fetch`` puts a zoo checkpoint."""
    return checkpoint_dir() / entry.filename


def store_path(name: str, store: Path | None = None) -> Path:
    """The model-store file for a model name (in ``store``, default :func:`model_store`)."""
    return (store or model_store()) / f"{name}{MODEL_SUFFIX}"


def versions_dir(name: str, store: Path | None = None) -> Path:
    """The folder of a versioned model."""
    return (store or model_store()) / name


def version_path(name: str, version: int, store: Path | None = None) -> Path:
    """The file of one version of a versioned model."""
    return versions_dir(name, store) / f"{version}{MODEL_SUFFIX}"


def list_versions(name: str, store: Path | None = None) -> list[int]:
    """The versions of ``name`` in the store, oldest first (empty for a plain or missing model)."""
    folder = versions_dir(name, store)
    try:
        return sorted(int(p.stem) for p in folder.glob(f"*{MODEL_SUFFIX}") if p.stem.isdigit() and int(p.stem) > 0)
    except (OSError, ValueError):  # a name no file system would hold (too long, a NUL byte, ...): no versions
        return []


def latest_version(name: str, store: Path | None = None) -> int | None:
    """The newest version of ``name``, ``None`` when it has none."""
    versions = list_versions(name, store)
    return versions[-1] if versions else None


def next_version_path(name: str, store: Path | None = None) -> tuple[int, Path]:
    """``(version, path)`` for a new version of ``name``: one past the newest (1 for the first)."""
    version = (latest_version(name, store) or 0) + 1
    return version, version_path(name, version, store)


def prune_versions(name: str, keep: int, store: Path | None = None) -> list[int]:
    """Delete all but the newest ``keep`` versions of ``name``; returns the versions removed."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    old = list_versions(name, store)[:-keep]
    for version in old:
        version_path(name, version, store).unlink(missing_ok=True)
    return old


def manual_download_hint(entry: ZooEntry) -> str:
    """How to supply a zoo checkpoint by hand (shared by fetch, predict and serve errors)."""
    return (
        f"download {entry.url} by hand and place it at {checkpoint_path(entry)} "
        "(or set GNWS_HOME to a folder that has it)"
    )


def missing_weights_message(entry: ZooEntry) -> str:
    """The sentence shown wherever zoo weights are missing (predict, serve, TorchServe)."""
    return (
        f"weights for {entry.key} are not on this machine: run `gnws fetch {entry.key}`, "
        f"or {manual_download_hint(entry)}."
    )


def convert_checkpoint(src: str | Path, model_name: str) -> tuple[GNWSDetector, ModelInfo]:
    """Convert an mmdetection ``.pth`` for zoo architecture ``model_name`` (not baked)."""
    entry = get_entry(model_name)
    ckpt = read_mmdet_checkpoint(src, trusted_sha256_prefix=entry.sha256_prefix)
    cfg = config_for_checkpoint(entry.config, ckpt)
    state = convert_mmdet_state_dict(ckpt.state_dict, cfg)
    with torch.device("meta"):  # skip random init: every tensor is assigned below
        model = build_detector(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    provenance = {"source": "mmdetection", "mmdet_config": entry.mmdet_config, "source_file": Path(src).name}
    info = ModelInfo(config=cfg, baked=False, zoo_key=entry.key, source_sha256=ckpt.sha256, provenance=provenance)
    return model.eval(), info


def verify_zoo_checkpoint(entry: ZooEntry, path: Path) -> None:
    """Check that ``path`` is the published checkpoint of ``entry`` (sha256 prefix of its file name).

    Raises:
        CheckpointError: another file (a different schedule's checkpoint, a partial download, ...).
    """
    digest = file_sha256(path)
    if not digest.startswith(entry.sha256_prefix):
        raise CheckpointError(
            f"{path} is not the published {entry.key} checkpoint: its sha256 starts with "
            f"{digest[:len(entry.sha256_prefix)]}, expected {entry.sha256_prefix}. Delete it and run "
            f"`gnws fetch {entry.key}`, or place the file from {entry.url} there."
        )


def is_zoo_name(source: str | os.PathLike[str]) -> bool:
    return str(source) in ZOO


def ensure_baked_zoo_model(name: str, store: Path | None = None) -> Path:
    """The baked model-store file for a zoo model, converting the cached ``.pth`` if needed.

    Raises:
        WeightsNotFoundError: neither a baked file nor the zoo checkpoint is on disk.
    """
    entry = get_entry(name)
    out = store_path(entry.key, store)
    if out.is_file():
        return out
    ckpt = checkpoint_path(entry)
    if not ckpt.is_file():
        raise WeightsNotFoundError(missing_weights_message(entry))
    verify_zoo_checkpoint(entry, ckpt)  # it may have been placed by hand
    logger.info("converting and baking %s into %s", ckpt, out)
    model, info = baked(*convert_checkpoint(ckpt, entry.key))
    save_model(model, out, info)
    return out
