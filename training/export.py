"""Exporting a run: best checkpoint → baked ``.safetensors`` in the model store, with provenance.

The exported file is what :class:`models.Predictor` and the service load: WS folded into the
kernels (:func:`models.bake.bake`), the run's label space and test scale in the config metadata,
and provenance naming the data (absolute paths of the annotation files and their sha256), the
schedule, the starting weights, the iteration and the COCO AP of the exported checkpoint, and the
version. In the model store each export is a new version, ``<store>/<name>/<version>.safetensors``
(1, 2, ...; the newest ``keep_versions`` are kept), which the service can pick up and roll back;
``output`` writes one file anywhere instead.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.bake import ModelInfo, bake, save_model
from models.config import DetectorConfig, config_from_json
from models.detector import GNWSDetector, build_detector
from models.errors import CheckpointError
from models.files import file_sha256
from models.store import model_store, next_version_path, prune_versions
from models.zoo import ZOO

from .checkpoint import BEST, epoch_of_position, find_latest, load_checkpoint
from .config import TrainConfig, read_resolved
from .errors import TrainConfigError, TrainingError

logger = logging.getLogger(__name__)


DEFAULT_KEEP_VERSIONS = 5
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Exported:
    """Where an export went: ``path``, and the model-store ``name`` and ``version`` (``None`` with ``output``)."""

    path: Path
    name: str | None = None
    version: int | None = None


def _sha256_or_none(path: str | Path | None) -> str | None:
    """The file's sha256, ``None`` when there is no such file (data moved since training)."""
    return file_sha256(path) if path and Path(path).is_file() else None


def check_model_name(name: str) -> str:
    """A model-store name: a folder name of letters, digits, ``.``, ``_`` and ``-``, and no zoo key."""
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise TrainConfigError(
            f"--name {name!r} cannot name a model in the store: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit)"
        )
    if name in ZOO:
        raise TrainConfigError(
            f"--name {name} is a zoo key, which always means the zoo's own weights; pick another name (e.g. {name}-ft)"
        )
    return name


def detector_from_checkpoint(state: dict[str, Any]) -> GNWSDetector:
    """The (unbaked) detector stored in a training checkpoint."""
    try:
        cfg: DetectorConfig = config_from_json(state["detector"])
        model = build_detector(cfg)
        model.load_state_dict(state["model"], strict=True)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"training checkpoint does not hold a loadable detector: {exc}") from None
    return model.eval()


def _effective_world_size_and_lr(
    state: dict[str, Any], run_dir: Path, cfg: TrainConfig
) -> tuple[int | None, float | None]:
    """The run's process count and base learning rate (after linear scaling when ``--lr`` was not given).

    From the checkpoint (``world_size``, ``lr``, the scheduler's ``base_lr``), else from the
    ``resolved`` section of ``config.json``; ``None`` only for runs that recorded neither.
    """
    resolved = read_resolved(run_dir / "config.json")
    world_size = state.get("world_size", resolved.get("world_size"))
    lr = state.get("lr", (state.get("scheduler") or {}).get("base_lr", resolved.get("lr")))
    if lr is None and world_size is not None:
        lr = cfg.scaled_lr(int(world_size))
    return (int(world_size) if world_size is not None else None), (float(lr) if lr is not None else None)


def _metrics_at(run_dir: Path, best: dict[str, Any], iteration: int | None) -> dict[str, Any] | None:
    """The evaluation metrics of the exported iteration: ``best.pt``'s, else its ``val`` record in metrics.jsonl."""
    if iteration is None:
        return None
    if best.get("iteration") == iteration:
        return best.get("metrics")
    found = None
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("type") == "val" and record.get("iter") == iteration:
            found = {k: v for k, v in record.items() if k not in ("type", "iter", "epoch")}  # the last one wins
    return found


def pick_checkpoint(run_dir: Path) -> Path:
    """``best.pt`` when an evaluation scored above 0, else the latest checkpoint."""
    ckpt_dir = run_dir / "checkpoints"
    if (ckpt_dir / BEST).is_file():
        return ckpt_dir / BEST
    latest = find_latest(ckpt_dir)
    if latest is None:
        raise TrainingError(f"{run_dir} has no checkpoints; train first (gnws train ... --work-dir {run_dir})")
    logger.warning(
        "%s has no best.pt (never evaluated, or no evaluation scored above 0): exporting the latest checkpoint %s",
        run_dir, latest.name,
    )  # fmt: skip
    return latest


def export_run(
    run_dir: Path,
    *,
    name: str | None = None,
    output: Path | None = None,
    checkpoint: Path | None = None,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    store: Path | None = None,
) -> Exported:
    """Bake a run's best (or given) checkpoint into ``output``, or as a new version in the model store.

    Args:
        name: the model's name in the store (default: the run folder's name).
        output: write this file instead (no version, nothing pruned).
        checkpoint: export this checkpoint instead of ``best.pt`` / the latest one.
        keep_versions: versions of ``name`` kept in the store, the new one included; older ones
            are deleted after the new one is written.
        store: the model store (default :func:`models.store.model_store`).
    """
    if not run_dir.is_dir():
        raise TrainingError(f"no run folder at {run_dir}")
    if keep_versions < 1:
        raise TrainConfigError(f"--keep-versions must be >= 1 (the new version is always kept), got {keep_versions}")
    cfg = TrainConfig.read(run_dir / "config.json")
    model_name = None if output is not None else check_model_name(name or run_dir.name)
    ckpt_path = checkpoint or pick_checkpoint(run_dir)
    state = load_checkpoint(ckpt_path)
    model = detector_from_checkpoint(state)
    with torch.no_grad():
        bake(model)
    version: int | None = None
    if output is not None:
        dest = output
    else:
        version, dest = next_version_path(check_model_name(name or run_dir.name), store or model_store())
    best = state.get("best") or {}
    position = state.get("position") or {}
    schedule = cfg.schedule_spec
    world_size, lr = _effective_world_size_and_lr(state, run_dir, cfg)
    recorded = read_resolved(run_dir / "config.json").get("data") or {}
    provenance = {
        "source": "gnws-train",
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "name": model_name,
        "version": version,
        "run_dir": str(run_dir.resolve()),
        "checkpoint": ckpt_path.name,
        "iteration": position.get("iteration"),
        "epoch": epoch_of_position(position) if position else None,
        "init": {"kind": cfg.init, "model": cfg.model, "checkpoint": cfg.init_checkpoint},
        "data": {
            "train_ann": str(Path(cfg.train_ann).absolute()),
            "train_ann_sha256": recorded.get("train_ann_sha256") or _sha256_or_none(cfg.train_ann),
            "train_images": str(Path(cfg.train_images).absolute()),
            "val_ann": str(Path(cfg.val_ann).absolute()) if cfg.val_ann else None,
            "val_ann_sha256": recorded.get("val_ann_sha256") or _sha256_or_none(cfg.val_ann),
        },
        "schedule": {
            "name": schedule.name, "epochs": schedule.epochs, "milestones": list(schedule.milestones),
            "max_iters": cfg.max_iters, "images_per_gpu": cfg.images_per_gpu, "accumulate": cfg.accumulate,
            "optimizer": cfg.optimizer, "lr": lr, "lr_option": cfg.lr, "weight_decay": cfg.effective_weight_decay,
            "world_size": world_size, "images_per_step": cfg.effective_batch(world_size) if world_size else None,
            "warmup_iters": cfg.warmup_iters, "image_scale": list(cfg.image_scale),
            "multi_scale": [list(s) for s in cfg.multi_scale] if cfg.multi_scale else None,
            "scale_jitter": list(cfg.scale_jitter) if cfg.scale_jitter else None, "amp": cfg.amp,
        },
        "metrics": _metrics_at(run_dir, best, position.get("iteration")),
    }  # fmt: skip
    info = ModelInfo(
        config=model.cfg,
        baked=True,
        zoo_key=cfg.model if cfg.init == "zoo" else None,
        source_sha256=file_sha256(ckpt_path),
        provenance=provenance,
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, dest, info)
    if model_name is not None:
        removed = prune_versions(model_name, keep_versions, store or model_store())
        if removed:
            logger.info("removed old version(s) %s of %s (keeping %d)", removed, model_name, keep_versions)
    logger.info("exported %s (iteration %s) to %s", ckpt_path.name, position.get("iteration"), dest)
    return Exported(path=dest, name=model_name, version=version)
