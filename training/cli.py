"""``gnws train | eval | export``: command-line front end of :mod:`training`.

``gnws train`` runs one process; for several GPUs or nodes launch the same arguments with
``torchrun --nproc-per-node N -m training train ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import pickle
from pathlib import Path

import torch

from models.bake import load_model
from models.detector import GNWSDetector
from models.errors import CheckpointError
from models.store import convert_checkpoint

from .checkpoint import find_latest, is_training_checkpoint
from .config import SCHEDULES, TrainConfig
from .data import DataPaths
from .errors import ResumeError, TrainConfigError
from .export import detector_from_checkpoint, export_run
from .runtime import DistContext, broadcast_from_main, setup_distributed

logger = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a GN+WS detector on COCO-format data (torchrun for several GPUs)")
    p.add_argument("--model", help="zoo key naming the architecture (and the weights for --init zoo)")
    _add_data_args(p)
    p.add_argument("--work-dir", type=Path, help="run folder (default runs/<model>-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_OR_CKPT", help="continue a run folder (or a checkpoint in it)")
    p.add_argument(
        "--init",
        choices=("zoo", "imagenet", "scratch"),
        default="zoo",
        help="zoo checkpoint, JHU ImageNet GN+WS backbone, or scratch (default: %(default)s)",
    )
    p.add_argument("--init-checkpoint", type=Path, help="start from this .pth/.safetensors instead of the cached file")
    p.add_argument(
        "--schedule", choices=tuple(SCHEDULES), default=None, help="step schedule (default: the zoo model's)"
    )
    p.add_argument("--epochs", type=int, help="override the schedule's length (milestones kept)")
    p.add_argument("--max-iters", type=int, help="stop after N optimizer steps (smoke runs)")
    p.add_argument("--images-per-gpu", type=int, default=2, help="images per process per forward (default: 2)")
    p.add_argument("--accumulate", type=int, default=1, help="forwards per optimizer step (default: 1)")
    p.add_argument("--lr", type=float, help="learning rate (default: 0.02 x images per step / 16)")
    p.add_argument("--warmup-iters", type=int, default=500)
    p.add_argument("--warmup-ratio", type=float, default=0.001)
    p.add_argument("--frozen-stages", type=int, default=1)
    p.add_argument("--flip-prob", type=float, default=0.5)
    p.add_argument("--rpn-samples", type=int, default=256, help="anchors sampled per image (mmdet 256)")
    p.add_argument("--rcnn-samples", type=int, default=512, help="RoIs sampled per image (mmdet 512)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast on GPU")
    p.add_argument("--device", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="data-loading processes per GPU (default: 2)")
    p.add_argument("--checkpoint-interval", type=int, default=0, help="also checkpoint every N iterations")
    p.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=3)
    p.add_argument("--log-interval", type=int, default=20)
    p.add_argument("--no-tensorboard", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="COCO-evaluate a checkpoint (bbox, and segm for Mask R-CNN)")
    p.add_argument("--model", help="zoo key (needed for mmdetection .pth checkpoints)")
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="training checkpoint, gnws .safetensors or mmdet .pth"
    )
    _add_data_args(p, train=False)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="bake a run's best checkpoint into the model store")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--name", help="model name in the store (default: the run folder's name)")
    p.add_argument("-o", "--output", type=Path, help="write here instead of the model store")
    p.add_argument("--checkpoint", type=Path, help="export this checkpoint instead of the best")
    p.set_defaults(func=cmd_export)


def _add_data_args(p: argparse.ArgumentParser, *, train: bool = True) -> None:
    p.add_argument("--data", type=Path, metavar="ROOT", help="COCO layout: annotations/instances_{train,val}2017.json")
    if train:
        p.add_argument("--train-ann", type=Path)
        p.add_argument("--train-images", type=Path)
    p.add_argument("--val-ann", type=Path)
    p.add_argument("--val-images", type=Path)
    p.add_argument(
        "--image-scale",
        type=int,
        nargs=2,
        metavar=("MAX", "MIN"),
        help="keep-ratio resize to (long, short) sides; default 1333 800",
    )


def _resume_target(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) for ``--resume RUN_DIR`` or ``--resume RUN_DIR/checkpoints/X.pt``."""
    if path.is_file():
        return path.parent.parent, path
    ckpt = find_latest(path / "checkpoints")
    if ckpt is None:
        raise ResumeError(f"nothing to resume in {path}: no checkpoints/ with a complete checkpoint")
    return path, ckpt


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import run_training

    if args.resume is not None:
        run_dir, ckpt = _resume_target(args.resume)
        cfg = TrainConfig.read(run_dir / "config.json")
        # the run continues in the folder given, even if it was moved since it started
        overrides = {
            "max_iters": args.max_iters,
            "device": args.device,
            "workers": args.workers,
            "work_dir": str(run_dir),
        }
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        run_training(cfg, resume_from=ckpt)
        return 0
    if not args.model:
        raise TrainConfigError("--model NAME is required (a zoo key, see `gnws zoo`)")
    from models.zoo import get_entry

    entry = get_entry(args.model)
    if args.data is None and (args.val_ann is None) != (args.val_images is None):
        given, needed = ("--val-ann", "--val-images") if args.val_images is None else ("--val-images", "--val-ann")
        raise TrainConfigError(
            f"{given} needs {needed} too (the annotation file and the folder its file_name entries are in), "
            "or give --data ROOT"
        )
    paths = DataPaths.from_root(
        args.data,
        train_ann=args.train_ann,
        train_images=args.train_images,
        val_ann=args.val_ann,
        val_images=args.val_images,
    )
    has_val = paths.val_ann is not None and paths.val_images is not None
    if has_val and args.val_ann is None and paths.val_ann is not None and not paths.val_ann.is_file():
        logger.warning("no validation annotations at %s: training without evaluation", paths.val_ann)
        has_val = False  # an explicit --val-ann must exist: the Trainer checks it before the first step
    work_dir = args.work_dir or default_work_dir(args.model, setup_distributed(args.device or "auto"))
    if find_latest(work_dir / "checkpoints") is not None:
        raise TrainConfigError(
            f"{work_dir} already holds a run; continue it with --resume {work_dir} or pick another --work-dir"
        )
    cfg = TrainConfig(
        model=entry.key, work_dir=str(work_dir), train_ann=str(paths.train_ann), train_images=str(paths.train_images),
        val_ann=str(paths.val_ann) if has_val else None, val_images=str(paths.val_images) if has_val else None,
        init=args.init, init_checkpoint=str(args.init_checkpoint) if args.init_checkpoint else None,
        schedule=args.schedule or entry.schedule, epochs=args.epochs, max_iters=args.max_iters,
        images_per_gpu=args.images_per_gpu, accumulate=args.accumulate, lr=args.lr,
        warmup_iters=args.warmup_iters, warmup_ratio=args.warmup_ratio,
        image_scale=tuple(args.image_scale) if args.image_scale else (1333, 800),
        flip_prob=args.flip_prob, frozen_stages=args.frozen_stages, rpn_samples=args.rpn_samples,
        rcnn_samples=args.rcnn_samples, amp=args.amp, device=args.device or "auto", seed=args.seed,
        workers=2 if args.workers is None else args.workers,
        checkpoint_interval=args.checkpoint_interval, eval_interval=args.eval_interval if has_val else 0,
        keep_checkpoints=args.keep_checkpoints, log_interval=args.log_interval, tensorboard=not args.no_tensorboard,
    )  # fmt: skip
    run_training(cfg)
    return 0


def default_work_dir(model: str, ctx: DistContext, now: dt.datetime | None = None) -> Path:
    """``runs/<model>-<time>`` with rank 0's time on every rank of a torchrun job: one run folder, not one per rank."""
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{model}-{broadcast_from_main(ctx, stamp)}"


def load_for_eval(checkpoint: Path, model: str | None) -> GNWSDetector:
    """A detector from a training checkpoint, a gnws ``.safetensors`` or an mmdetection ``.pth``."""
    if not checkpoint.is_file():
        raise CheckpointError(f"no checkpoint file at {checkpoint}")
    if checkpoint.suffix == ".safetensors":
        return load_model(checkpoint)[0]
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = None  # a published zoo file with pickled meta: the converter checks its sha256
    except Exception as exc:
        raise CheckpointError(f"{checkpoint} is not a readable checkpoint: {exc}") from None
    if is_training_checkpoint(obj):
        return detector_from_checkpoint(obj)  # type: ignore[arg-type]
    if not model:
        raise CheckpointError(
            f"{checkpoint} is an mmdetection checkpoint: say which zoo architecture it is (--model NAME)"
        )
    return convert_checkpoint(checkpoint, model)[0]


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table

    paths = DataPaths.from_root(
        args.data, train_ann=Path("-"), train_images=Path("-"), val_ann=args.val_ann, val_images=args.val_images
    )
    if paths.val_ann is None or paths.val_images is None:
        raise TrainConfigError("give --data ROOT or both --val-ann and --val-images")
    ctx = setup_distributed(args.device)
    detector = load_for_eval(args.checkpoint, args.model).to(ctx.device)
    scale = tuple(args.image_scale) if args.image_scale else (detector.cfg.max_size, detector.cfg.min_size)
    result = evaluate(detector, paths.val_ann, paths.val_images, image_scale=scale, device=ctx.device)  # type: ignore[arg-type]
    if result is not None:
        print(format_table(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    dest = export_run(args.run_dir, name=args.name, output=args.output, checkpoint=args.checkpoint)
    print(dest)
    return 0
