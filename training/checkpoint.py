"""Training checkpoints: atomic writes, safe loads, RNG capture, retention.

A checkpoint is ``torch.save`` of plain containers and tensors only (so it loads with
``weights_only=True``): ``format``, ``model`` (detector state dict, WS unbaked), ``optimizer``,
``scheduler``, ``scaler``, ``position`` (``epoch``, ``batch`` within the epoch, ``iteration``),
``rng`` (per rank: torch, CUDA, numpy, python), ``config`` (the TrainConfig JSON), ``detector``
(the DetectorConfig JSON), ``best``, ``eval_due`` (an evaluation belongs to this point), ``lr``
(the effective base learning rate) and ``train_images``. A resumed run whose checkpoint has
``eval_due`` but no matching ``evaluated.json`` (killed between the save and the evaluation) runs
that evaluation first. Writes go to a temp file in the same folder,
are fsynced and renamed (:func:`models.files.atomic_writer`), so a killed run never leaves a
half-written file where ``--resume`` would read it. ``checkpoints/latest.json`` names the newest.
"""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.files import atomic_write_bytes

from .config import RESUMABLE_FIELDS, TrainConfig, config_differences
from .errors import ResumeError

logger = logging.getLogger(__name__)

FORMAT = "gnws-train-1"
LATEST = "latest.json"
BEST = "best.pt"
BEST_JSON = "best.json"
EVAL_DONE = "evaluated.json"


def capture_rng() -> dict[str, Any]:
    """The RNG states of this process, as weights-only-loadable values."""
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # legacy=True always gives the tuple form; this narrows the type
        raise TypeError(f"unexpected numpy RNG state of type {type(np_state).__name__}")
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format tag) to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True``."""
    if not path.is_file():
        raise ResumeError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ResumeError(f"{path} is not a readable training checkpoint: {exc}") from None
    if not is_training_checkpoint(obj):
        raise ResumeError(f"{path} is not a gnws training checkpoint (no format {FORMAT!r})")
    return obj


RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "position", "rng", "world_size", "config", "detector")


def check_resumable(state: dict[str, Any], path: Path, *, cfg: TrainConfig, world_size: int) -> None:
    """Raise :class:`ResumeError` unless ``state`` can continue this run exactly.

    It must hold the optimizer/scheduler/RNG state (``best.pt`` holds weights only), come from the
    same settings (except :data:`~training.config.RESUMABLE_FIELDS` and the run folder) and from
    the same number of processes: the sampler position, every rank's RNG stream and the
    linear-scaled learning rate depend on the world size. The configs are compared as parsed
    :class:`TrainConfig` objects, so a checkpoint written before a field existed compares with
    that field's default.
    """
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        what = "best.pt is the best evaluated weights only" if path.name == BEST else "it holds no training state"
        raise ResumeError(
            f"{path} cannot be resumed: {what} (no {', '.join(missing)}); resume the run folder "
            f"(--resume {path.parent.parent}) or one of its checkpoints/iter_*.pt"
        )
    try:
        saved = TrainConfig.from_json(state["config"])
    except (ValueError, TypeError) as exc:
        raise ResumeError(f"{path} holds no valid training config ({exc})") from None
    changed = config_differences(saved, cfg, ignore=(*RESUMABLE_FIELDS, "work_dir"))
    if changed:
        raise ResumeError(
            f"{path} was written with different settings ({', '.join(changed)}); resume with the run's config"
        )
    saved_world = int(state["world_size"])
    if saved_world != world_size or len(state["rng"]) != saved_world:
        raise ResumeError(
            f"{path} was written by {saved_world} process(es) but this run has {world_size}; resume with the "
            f"same number (torchrun --nproc-per-node/--nnodes giving WORLD_SIZE={saved_world}): the data order, "
            "RNG streams and learning rate depend on it"
        )


def read_best(ckpt_dir: Path) -> dict[str, Any]:
    """The ``best`` record stored inside ``best.pt`` (``{}`` when there is none).

    ``best.pt`` itself is the truth: ``best.json`` is a copy written after it, which a kill between
    the two writes can leave stale. Loaded memory-mapped, so the weights are not read.
    """
    path = ckpt_dir / BEST
    if not path.is_file():
        return {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        logger.warning("%s is unreadable (%s): the next evaluation replaces it", path, exc)
        return {}
    best = obj.get("best") if isinstance(obj, dict) else None
    return dict(best) if isinstance(best, dict) else {}


def write_eval_done(ckpt_dir: Path, iteration: int) -> None:
    """Record that the evaluation at ``iteration`` completed (metrics logged, ``best.pt`` updated)."""
    atomic_write_bytes(ckpt_dir / EVAL_DONE, json.dumps({"iteration": iteration}).encode())


def read_eval_done(ckpt_dir: Path) -> int:
    """The iteration of the last completed evaluation, ``-1`` if none is recorded."""
    try:
        return int(json.loads((ckpt_dir / EVAL_DONE).read_text())["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def epoch_of_position(position: dict[str, Any]) -> int:
    """The 1-based epoch of the last step taken before ``position`` (1 before any step).

    ``position`` counts completed epochs (``epoch``) and batches done in the current one
    (``batch``): at ``{"epoch": 1, "batch": 0}`` the last step ended epoch 1.
    """
    epoch, batch = int(position.get("epoch", 0)), int(position.get("batch", 0))
    return epoch if batch == 0 and epoch > 0 else epoch + 1


def is_training_checkpoint(obj: object) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def write_latest(ckpt_dir: Path, name: str) -> None:
    atomic_write_bytes(ckpt_dir / LATEST, json.dumps({"checkpoint": name}).encode())


def find_latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder's ``checkpoints/``, or ``None``.

    Checkpoint files are renamed into place whole, so the newest ``iter_*.pt`` is complete even
    when a kill came between writing it and updating ``latest.json``; the pointer is used when no
    ``iter_*.pt`` is newer than the file it names.
    """
    candidates = sorted(ckpt_dir.glob("iter_*.pt"))
    newest = candidates[-1] if candidates else None
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError):
            name = None
        if name and (ckpt_dir / name).is_file() and (newest is None or name >= newest.name):
            return ckpt_dir / name
    return newest


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:08d}.pt"


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``iter_*.pt`` files (``best.pt`` is never touched)."""
    for old in sorted(ckpt_dir.glob("iter_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
        logger.debug("removed old checkpoint %s", old)
