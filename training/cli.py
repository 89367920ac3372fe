"""``gnws train | eval | export``: command-line front end of :mod:`training`.

``gnws train`` runs one process; for several GPUs or nodes launch the same arguments with
``torchrun --nproc-per-node N -m training train ...``.

Every ``gnws train`` option defaults to ``None`` ("not given"): the defaults live in
:class:`~training.config.TrainConfig` (the help texts read them from there). That is what lets
``--config RUN/config.json`` start a new run from a previous run's settings with only the options
given on top, and ``--resume`` tell a flag the user changed from one left alone: the flags in
:data:`~training.config.RESUMABLE_FIELDS` are applied on resume, any other that differs from the
run's value is refused with one sentence naming it and the run's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.detector import GNWSDetector
from models.errors import CheckpointError
from models.resolve import resolve_model

from .checkpoint import find_latest, is_training_checkpoint
from .config import (
    ADAMW_LR,
    ADAMW_WEIGHT_DECAY,
    BASE_BATCH,
    BASE_LR,
    RESUMABLE_FIELDS,
    SCHEDULES,
    SGD_WEIGHT_DECAY,
    TrainConfig,
    field_default,
)
from .data import DataPaths
from .errors import DatasetError, ResumeError, TrainConfigError
from .export import DEFAULT_KEEP_VERSIONS, detector_from_checkpoint, export_run
from .runtime import DistContext, broadcast_from_main, setup_distributed

logger = logging.getLogger(__name__)

LSJ_RANGE = (0.1, 2.0)  # Ghiasi et al. 2021 / detectron2's LSJ configs
DRAW_SCORE_THRESHOLD = 0.3
DATA_FLAGS = {"train_ann": "--train-ann", "train_images": "--train-images", "val_ann": "--val-ann",
              "val_images": "--val-images"}  # fmt: skip
# TrainConfig fields set by a flag of the same name (``--images-per-gpu`` -> images_per_gpu)
SIMPLE_FIELDS = (
    "init", "schedule", "epochs", "max_iters", "images_per_gpu", "accumulate", "optimizer", "lr", "momentum",
    "weight_decay", "warmup_iters", "warmup_ratio", "frozen_stages", "flip_prob", "rpn_samples", "rcnn_samples",
    "amp", "device", "seed", "workers", "skip_bad_data", "checkpoint_interval", "eval_interval",
    "keep_checkpoints", "log_interval", "tensorboard",
)  # fmt: skip


def _default(name: str) -> str:
    """``(default: X)`` from the TrainConfig field, for a help text."""
    value = field_default(name)
    if isinstance(value, tuple):
        value = " ".join(str(v) for v in value)
    return f"(default: {value})"


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a GN+WS detector on COCO-format data (torchrun for several GPUs)")
    p.add_argument("--model", help="zoo key naming the architecture (and the weights for --init zoo)")
    _add_data_args(p)
    p.add_argument("--work-dir", type=Path, help="run folder (default runs/<model>-<time>)")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", type=Path, metavar="RUN_OR_CKPT", help="continue a run folder (or a checkpoint in it)"
    )
    start.add_argument(
        "--config", type=Path, metavar="CONFIG_JSON",
        help="start a new run with the settings of a run's config.json; options given here override them",
    )  # fmt: skip
    p.add_argument("--init", choices=("zoo", "imagenet", "scratch"),
                   help=f"zoo checkpoint, JHU ImageNet GN+WS backbone, or scratch {_default('init')}")  # fmt: skip
    p.add_argument("--init-checkpoint", type=Path, help="start from this .pth/.safetensors instead of the cached file")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), help="step schedule (default: the zoo model's)")
    p.add_argument("--epochs", type=int, help="override the schedule's length (milestones kept)")
    p.add_argument("--lr-steps", type=int, nargs="+", metavar="EPOCH",
                   help="milestone epochs: lr x0.1 after each (default: the schedule's)")  # fmt: skip
    p.add_argument("--max-iters", type=int, help="stop after N optimizer steps (smoke runs)")
    p.add_argument("--images-per-gpu", type=int, help=f"images per process per forward {_default('images_per_gpu')}")
    p.add_argument("--accumulate", type=int, help=f"forwards per optimizer step {_default('accumulate')}")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), help=f"sgd is the zoo recipe {_default('optimizer')}")
    p.add_argument(
        "--lr", type=float,
        help=f"learning rate (default: SGD {BASE_LR} x images per step / {BASE_BATCH}, AdamW {ADAMW_LR:g})",
    )  # fmt: skip
    p.add_argument("--momentum", type=float, help=f"SGD momentum {_default('momentum')}")
    p.add_argument(
        "--weight-decay", type=float, help=f"(default: SGD {SGD_WEIGHT_DECAY:g}, AdamW {ADAMW_WEIGHT_DECAY:g})"
    )
    p.add_argument("--warmup-iters", type=int, help=_default("warmup_iters"))
    p.add_argument("--warmup-ratio", type=float, help=_default("warmup_ratio"))
    p.add_argument(
        "--multi-scale", type=_scale_token, nargs="+", metavar="SCALE",
        help="multi-scale training: per image one of these scales, MAXxMIN (1333x640) or a shorter side (640, "
        "the longer one from --image-scale)",
    )  # fmt: skip
    jitter = p.add_mutually_exclusive_group()
    jitter.add_argument(
        "--scale-jitter", type=float, nargs=2, metavar=("LOW", "HIGH"),
        help="large-scale jitter: resize by a random factor in [LOW, HIGH] of an S x S square (S: --image-scale's "
        "MAX), random crop, pad to S x S",
    )  # fmt: skip
    jitter.add_argument(
        "--lsj", dest="scale_jitter", action="store_const", const=LSJ_RANGE,
        help=f"--scale-jitter {LSJ_RANGE[0]} {LSJ_RANGE[1]} (use with --image-scale 1024 1024)",
    )  # fmt: skip
    p.add_argument("--frozen-stages", type=int, help=_default("frozen_stages"))
    p.add_argument("--flip-prob", type=float, help=_default("flip_prob"))
    p.add_argument("--rpn-samples", type=int, help=f"anchors sampled per image {_default('rpn_samples')}")
    p.add_argument("--rcnn-samples", type=int, help=f"RoIs sampled per image {_default('rcnn_samples')}")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help=f"autocast on GPU {_default('amp')}")
    p.add_argument("--device", help=f"auto, cpu, cuda {_default('device')}")
    p.add_argument("--seed", type=int, help=_default("seed"))
    p.add_argument("--workers", type=int, help=f"data-loading processes per GPU {_default('workers')}")
    p.add_argument(
        "--skip-bad-data", action=argparse.BooleanOptionalAction,
        help="leave out unusable images/annotations found by the data check instead of stopping",
    )  # fmt: skip
    p.add_argument("--checkpoint-interval", type=int,
                   help=f"also checkpoint every N iterations {_default('checkpoint_interval')}")  # fmt: skip
    p.add_argument("--eval-interval", type=int, help=f"evaluate every N epochs, 0: never {_default('eval_interval')}")
    p.add_argument("--keep-checkpoints", type=int, help=_default("keep_checkpoints"))
    p.add_argument("--log-interval", type=int, help=f"log every N iterations {_default('log_interval')}")
    p.add_argument(
        "--tensorboard", action=argparse.BooleanOptionalAction, help="TensorBoard logs in RUN/tb (default: on)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="COCO-evaluate a model (bbox, and segm for Mask R-CNN), per category too")
    p.add_argument("--model", help="zoo key: the model to evaluate, or the architecture of an mmdetection .pth")
    p.add_argument(
        "--checkpoint", metavar="REF",
        help="training checkpoint (.pt), gnws .safetensors, model-store name, zoo key or mmdet .pth (with --model)",
    )  # fmt: skip
    _add_data_args(p, train=False)
    p.add_argument("--device", default="auto")
    p.add_argument("--draw", type=Path, metavar="DIR", help="draw each evaluation image's detections into DIR")
    p.add_argument("--draw-score-threshold", type=float, default=DRAW_SCORE_THRESHOLD,
                   help="detections drawn with --draw (default: %(default)s)")  # fmt: skip
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="bake a run's best checkpoint into the model store as a new version")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--name", help="model name in the store (default: the run folder's name)")
    p.add_argument("--keep-versions", type=int, default=DEFAULT_KEEP_VERSIONS,
                   help="versions of the model kept in the store (default: %(default)s)")  # fmt: skip
    p.add_argument("-o", "--output", type=Path, help="write this file instead of a version in the model store")
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
        "--image-scale", type=int, nargs=2, metavar=("MAX", "MIN"),
        help=f"keep-ratio resize to (long, short) sides {_default('image_scale')}; eval: the model's",
    )  # fmt: skip


def _scale_token(text: str) -> tuple[int | None, int]:
    """``1333x640`` -> (1333, 640); ``640`` -> (None, 640): the longer side comes from --image-scale."""
    if match := re.fullmatch(r"(\d+)[xX](\d+)", text):
        return int(match[1]), int(match[2])
    if text.isdigit():
        return None, int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a scale: give MAXxMIN (e.g. 1333x640) or a shorter side (640)")


@dataclass(frozen=True)
class Option:
    """A TrainConfig value given on the command line, with the flag that gave it (for messages)."""

    flag: str
    value: Any


def _show(value: Any) -> str:
    if value is None:
        return "not set"
    if isinstance(value, tuple | list):
        return " ".join(_show(v) if isinstance(v, tuple | list) else str(v) for v in value)
    return str(value)


def _flag(field: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{field.replace('_', '-')}"
    if field == "multi_scale":
        return "--multi-scale " + " ".join(f"{a}x{b}" for a, b in value)
    return f"--{field.replace('_', '-')} {_show(value)}"


def train_options(args: argparse.Namespace, *, base: TrainConfig | None = None) -> dict[str, Option]:
    """The TrainConfig fields the command line sets, with absolute data paths (nothing for options not given)."""
    out: dict[str, Option] = {}
    if args.model is not None:
        from models.zoo import get_entry

        out["model"] = Option(f"--model {args.model}", get_entry(args.model).key)
    for field in SIMPLE_FIELDS:
        value = getattr(args, field)
        if value is not None:
            out[field] = Option(_flag(field, value), value)
    for field in ("image_scale", "lr_steps", "scale_jitter"):
        value = getattr(args, field)
        if value is not None:
            out[field] = Option(_flag(field, value), tuple(value))
    if args.multi_scale is not None:
        image_scale = (
            out["image_scale"].value
            if "image_scale" in out
            else (base.image_scale if base is not None else field_default("image_scale"))
        )
        scales = tuple((image_scale[0] if big is None else big, small) for big, small in args.multi_scale)
        out["multi_scale"] = Option(_flag("multi_scale", scales), scales)
    if args.init_checkpoint is not None:
        path = str(args.init_checkpoint.resolve())
        out["init_checkpoint"] = Option(f"--init-checkpoint {args.init_checkpoint}", path)
    out |= _data_options(args)
    return out


def _data_options(args: argparse.Namespace) -> dict[str, Option]:
    """``--data ROOT`` for all four paths (no validation set when ROOT has none), then the single-path flags."""
    found: dict[str, Option] = {}
    if args.data is not None:
        root: Path = args.data
        found["train_ann"] = Option(f"--data {root}", root / "annotations" / "instances_train2017.json")
        found["train_images"] = Option(f"--data {root}", root / "train2017")
        val_ann = root / "annotations" / "instances_val2017.json"
        has_val = args.val_ann is not None or val_ann.is_file()  # an explicit --val-ann is checked before step 1
        if not has_val:
            logger.warning("no validation annotations at %s: training without evaluation", val_ann)
        found["val_ann"] = Option(f"--data {root}", val_ann if has_val else None)
        found["val_images"] = Option(f"--data {root}", root / "val2017" if has_val else None)
    for field, flag in DATA_FLAGS.items():
        if (value := getattr(args, field, None)) is not None:
            found[field] = Option(f"{flag} {value}", value)
    return {k: Option(o.flag, None if o.value is None else str(Path(o.value).resolve())) for k, o in found.items()}


def _check_data_fields(fields: dict[str, Any]) -> None:
    if not fields.get("train_ann") or not fields.get("train_images"):
        raise DatasetError("give --data ROOT, or both --train-ann and --train-images")
    if (fields.get("val_ann") is None) != (fields.get("val_images") is None):
        given, needed = ("--val-ann", "--val-images")
        if fields.get("val_ann") is None:
            given, needed = needed, given
        raise TrainConfigError(
            f"{given} needs {needed} too (the annotation file and the folder its file_name entries are in), "
            "or give --data ROOT"
        )


def new_run_config(args: argparse.Namespace, *, ctx: DistContext | None = None) -> TrainConfig:
    """The config of a new run: TrainConfig's defaults (or ``--config``'s values), then the options given."""
    base = TrainConfig.read(args.config) if args.config is not None else None
    given = train_options(args, base=base)
    if base is None:
        if "model" not in given:
            raise TrainConfigError("--model NAME is required (a zoo key, see `gnws zoo`)")
        from models.zoo import get_entry

        fields: dict[str, Any] = {"schedule": get_entry(given["model"].value).schedule}  # the zoo model's schedule
    else:
        fields = {k: v for k, v in dataclasses.asdict(base).items() if k != "work_dir"}
    fields |= {k: o.value for k, o in given.items()}
    _check_data_fields(fields)  # without a validation set eval_interval is moot: nothing is evaluated
    if args.work_dir is not None:
        work_dir = args.work_dir
    else:
        work_dir = default_work_dir(fields["model"], ctx or setup_distributed(fields.get("device") or "auto"))
    if find_latest(work_dir / "checkpoints") is not None:
        raise TrainConfigError(
            f"{work_dir} already holds a run; continue it with --resume {work_dir} or pick another --work-dir"
        )
    return TrainConfig(work_dir=str(work_dir.resolve()), **fields)


def _same(field: str, given: Any, current: Any) -> bool:
    if field in DATA_FLAGS or field in ("init_checkpoint", "work_dir"):
        if given is None or current is None:
            return given is current
        return Path(given).resolve() == Path(current).resolve()
    if isinstance(current, list | tuple) and isinstance(given, list | tuple):
        return [list(c) if isinstance(c, list | tuple) else c for c in current] == [
            list(g) if isinstance(g, list | tuple) else g for g in given
        ]
    return bool(given == current)


def resume_config(run_cfg: TrainConfig, args: argparse.Namespace, run_dir: Path) -> TrainConfig:
    """The run's config with the resumable flags given applied; raises when another flag differs from it."""
    given = train_options(args, base=run_cfg)
    if args.work_dir is not None:
        given["work_dir"] = Option(f"--work-dir {args.work_dir}", str(args.work_dir))
    changes: dict[str, Any] = {}
    refused: list[str] = []
    for field, option in given.items():
        if field == "work_dir":
            current: Any = str(run_dir)
        else:
            current = getattr(run_cfg, field)
        if _same(field, option.value, current):
            continue
        if field in RESUMABLE_FIELDS:
            changes[field] = option.value
        else:
            refused.append(f"{option.flag} (the run's {field}: {_show(current)})")
    if refused:
        allowed = ", ".join("--tensorboard/--no-tensorboard" if f == "tensorboard" else f"--{f.replace('_', '-')}"
                            for f in RESUMABLE_FIELDS)  # fmt: skip
        raise ResumeError(
            f"cannot resume {run_dir} with {'; '.join(refused)}: a resumed run keeps the settings it started with "
            f"except {allowed}; to change the others start a new run with --config {run_dir / 'config.json'}"
        )
    if changes:
        logger.info("resuming with %s", ", ".join(given[f].flag for f in changes))
    # the run continues in the folder given, even if it was moved since it started
    return dataclasses.replace(run_cfg, work_dir=str(run_dir), **changes)


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
        cfg = resume_config(TrainConfig.read(run_dir / "config.json"), args, run_dir)
        run_training(cfg, resume_from=ckpt)
        return 0
    run_training(new_run_config(args))
    return 0


def default_work_dir(model: str, ctx: DistContext, now: dt.datetime | None = None) -> Path:
    """``runs/<model>-<time>`` with rank 0's time on every rank of a torchrun job: one run folder, not one per rank."""
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{model}-{broadcast_from_main(ctx, stamp)}"


def load_for_eval(ref: str, model: str | None) -> GNWSDetector:
    """The network to evaluate: a training checkpoint (``.pt``, read here), else any model reference.

    Everything but a ``.pt`` goes through :func:`models.resolve.resolve_model` (zoo key, model-store
    name, gnws ``.safetensors``, mmdetection ``.pth`` with ``model`` as its architecture).
    """
    path = Path(ref).expanduser()
    if path.suffix != ".pt":
        return resolve_model(ref, zoo_key=model).load()[0]
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint at {path}; check the run folder's checkpoints/")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from None
    if not is_training_checkpoint(obj):
        raise CheckpointError(f"{path} is not a gnws training checkpoint; evaluate .safetensors/.pth files directly")
    return detector_from_checkpoint(obj)


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_eval_coco
    from .evaluate import draw_evaluation, evaluate, format_per_class, format_table

    ref = args.checkpoint or args.model
    if ref is None:
        raise TrainConfigError("give --checkpoint REF or --model NAME: the model to evaluate")
    paths = DataPaths.from_root(
        args.data, train_ann=Path("-"), train_images=Path("-"), val_ann=args.val_ann, val_images=args.val_images
    )
    if paths.val_ann is None or paths.val_images is None:
        raise TrainConfigError("give --data ROOT or both --val-ann and --val-images")
    if args.draw is not None:
        if args.draw.exists() and not args.draw.is_dir():
            raise TrainConfigError(f"--draw {args.draw} is a file; name a folder for the drawn images")
        args.draw.mkdir(parents=True, exist_ok=True)
    coco_gt = load_eval_coco(paths.val_ann, paths.val_images)
    ctx = setup_distributed(args.device)
    detector = load_for_eval(ref, args.model).to(ctx.device)
    scale = tuple(args.image_scale) if args.image_scale else (detector.cfg.max_size, detector.cfg.min_size)
    result = evaluate(
        detector, paths.val_ann, paths.val_images, image_scale=scale, device=ctx.device, coco_gt=coco_gt,  # type: ignore[arg-type]
    )  # fmt: skip
    if result is None:
        return 0
    print(format_table(result))
    for iou_type in result.per_class:
        print(format_per_class(result, iou_type))
    if args.draw is not None:
        names = dict(zip(detector.cfg.category_ids, detector.cfg.classes, strict=True))
        count = draw_evaluation(
            result, coco_gt, paths.val_images, args.draw, names=names, score_threshold=args.draw_score_threshold
        )
        print(f"drew {count} images into {args.draw}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    exported = export_run(
        args.run_dir, name=args.name, output=args.output, checkpoint=args.checkpoint, keep_versions=args.keep_versions
    )
    if exported.version is not None:
        print(f"version {exported.version} of {exported.name}")
    print(exported.path)
    return 0
