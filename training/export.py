"""Exporting a run: best checkpoint → baked ``.safetensors`` in the model store, with provenance.

The exported file is what :class:`models.Predictor` and the service load: WS folded into the
kernels (:func:`models.bake.bake`), the run's label space and test scale in the config metadata,
and provenance naming the data (annotation files and their sha256), the schedule, the starting
weights, the iteration and the COCO AP of the exported checkpoint.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from models.bake import ModelInfo, bake, save_model
from models.config import DetectorConfig, config_from_json
from models.detector import GNWSDetector, build_detector
from models.errors import CheckpointError
from models.store import model_store

from .checkpoint import BEST, find_latest, load_checkpoint
from .config import TrainConfig, read_resolved
from .errors import TrainingError

logger = logging.getLogger(__name__)


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def pick_checkpoint(run_dir: Path) -> Path:
    """``best.pt`` when the run was evaluated, else the latest checkpoint."""
    ckpt_dir = run_dir / "checkpoints"
    if (ckpt_dir / BEST).is_file():
        return ckpt_dir / BEST
    latest = find_latest(ckpt_dir)
    if latest is None:
        raise TrainingError(f"{run_dir} has no checkpoints; train first (gnws train ... --work-dir {run_dir})")
    logger.warning("%s was never evaluated: exporting the latest checkpoint %s", run_dir, latest.name)
    return latest


def export_run(
    run_dir: Path, *, name: str | None = None, output: Path | None = None, checkpoint: Path | None = None
) -> Path:
    """Bake a run's best (or given) checkpoint into ``output`` or ``<model store>/<name>.safetensors``."""
    if not run_dir.is_dir():
        raise TrainingError(f"no run folder at {run_dir}")
    cfg = TrainConfig.read(run_dir / "config.json")
    ckpt_path = checkpoint or pick_checkpoint(run_dir)
    state = load_checkpoint(ckpt_path)
    model = detector_from_checkpoint(state)
    with torch.no_grad():
        bake(model)
    best = state.get("best") or {}
    position = state.get("position") or {}
    schedule = cfg.schedule_spec
    world_size, lr = _effective_world_size_and_lr(state, run_dir, cfg)
    provenance = {
        "source": "gnws-train",
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_dir": str(run_dir.resolve()),
        "checkpoint": ckpt_path.name,
        "iteration": position.get("iteration"),
        "epoch": position.get("epoch"),
        "init": {"kind": cfg.init, "model": cfg.model, "checkpoint": cfg.init_checkpoint},
        "data": {
            "train_ann": cfg.train_ann, "train_ann_sha256": _sha256(Path(cfg.train_ann)),
            "train_images": cfg.train_images, "val_ann": cfg.val_ann,
            "val_ann_sha256": _sha256(Path(cfg.val_ann)) if cfg.val_ann else None,
        },
        "schedule": {
            "name": schedule.name, "epochs": schedule.epochs, "milestones": list(schedule.milestones),
            "max_iters": cfg.max_iters, "images_per_gpu": cfg.images_per_gpu, "accumulate": cfg.accumulate,
            "lr": lr, "lr_option": cfg.lr, "world_size": world_size,
            "images_per_step": cfg.effective_batch(world_size) if world_size else None,
            "warmup_iters": cfg.warmup_iters, "image_scale": list(cfg.image_scale), "amp": cfg.amp,
        },
        "metrics": best.get("metrics") if best.get("iteration") == position.get("iteration") else None,
    }  # fmt: skip
    dest = output or model_store() / f"{name or run_dir.name}.safetensors"
    info = ModelInfo(
        config=model.cfg,
        baked=True,
        zoo_key=cfg.model if cfg.init == "zoo" else None,
        source_sha256=_sha256(ckpt_path),
        provenance=provenance,
    )
    save_model(model, dest, info)
    logger.info("exported %s (iteration %s) to %s", ckpt_path.name, position.get("iteration"), dest)
    return dest
