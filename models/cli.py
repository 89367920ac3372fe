"""``gnws zoo | fetch | convert | bake | predict``: command-line front end of :mod:`models`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .bake import bake_file, baked, read_model_info, save_model
from .draw import draw_detections
from .errors import CheckpointError, ImageDecodeError, UsageError
from .fetch import fetch
from .precision import PRECISIONS
from .predictor import Predictor
from .preprocess import decode_image
from .store import checkpoint_path, convert_checkpoint, ensure_baked_zoo_model, store_path
from .zoo import DEFAULT_DETECT_MODEL, ZOO

logger = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="list the 12 GN+WS zoo models, their published AP and whether cached")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("fetch", help="download a zoo checkpoint into the cache (sha256-checked)")
    p.add_argument("names", nargs="+", metavar="NAME", help="zoo key(s), or 'all'")
    p.add_argument("--mirror", help="base URL replacing https://download.openmmlab.com/ (env GNWS_ZOO_MIRROR)")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.add_argument("--bake", action="store_true", help="also convert and bake into the model store")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("convert", help="mmdetection .pth -> gnws .safetensors (exact key mapping)")
    p.add_argument("src", type=Path, help="mmdetection checkpoint (.pth)")
    p.add_argument("--model", required=True, help="zoo key naming the architecture")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors")
    p.add_argument("--bake", action="store_true", help="bake WS into the convs as well")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("bake", help="fold weight standardisation into plain conv weights")
    p.add_argument("src", type=Path, help="gnws .safetensors, or an mmdetection .pth with --model")
    p.add_argument("--model", help="zoo key, when SRC is an mmdetection .pth")
    p.add_argument("-o", "--output", type=Path, help="output file (default: the model store)")
    p.set_defaults(func=cmd_bake)

    p = sub.add_parser("predict", help="detect objects in images; writes COCO results JSON")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--model", help=f"zoo key (default: {DEFAULT_DETECT_MODEL}; with an mmdetection .pth "
                   "--checkpoint: its architecture)")
    p.add_argument("--checkpoint", type=Path, help="gnws .safetensors or mmdetection .pth instead of the zoo weights")
    p.add_argument("-o", "--output", type=Path, help="COCO results JSON (default: stdout)")
    p.add_argument("--draw", type=Path, help="image with detections drawn (first image; PNG or JPEG)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--score-threshold", type=float, default=0.05)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32: exact (default); bf16: CPUs with AVX-512 BF16 or AMX, CUDA GPUs from Ampere on; "
                   "fp16: CUDA GPUs. A mode the device cannot run is refused (docs/benchmarks.md: speed and "
                   "distance from fp32)")
    p.set_defaults(func=cmd_predict)


def cmd_zoo(args: argparse.Namespace) -> int:
    rows = []
    for key, e in ZOO.items():
        cached = store_path(key).is_file() or checkpoint_path(e).is_file()
        rows.append({"name": key, "arch": e.config.arch, "schedule": e.schedule, "box_ap": e.box_ap,
                     "mask_ap": e.mask_ap, "cached": cached, "url": e.url})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<52} {'box AP':>6} {'mask AP':>7}  cached")
    for r in rows:
        mask = f"{r['mask_ap']:.1f}" if r["mask_ap"] is not None else "-"
        print(f"{r['name']:<52} {r['box_ap']:>6.1f} {mask:>7}  {'yes' if r['cached'] else 'no'}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    names = list(ZOO) if args.names == ["all"] else args.names
    for name in names:
        if args.bake and not args.force and store_path(name).is_file():
            print(f"{name}: already baked at {store_path(name)}")
            continue
        path = fetch(name, mirror=args.mirror, force=args.force)
        print(f"{name}: {path}")
        if args.bake:
            print(f"{name}: baked {ensure_baked_zoo_model(name)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    model, info = convert_checkpoint(args.src, args.model)
    if args.bake:
        model, info = baked(model, info)
    save_model(model, args.output, info)
    print(f"{args.output}: {info.config.arch}, {info.config.num_classes} classes, baked={info.baked}")
    return 0


def cmd_bake(args: argparse.Namespace) -> int:
    if args.src.suffix == ".pth":
        if not args.model:
            raise CheckpointError(f"{args.src} is an mmdetection checkpoint: pass --model NAME")
        model, info = baked(*convert_checkpoint(args.src, args.model))
        out = args.output or store_path(args.model)
        save_model(model, out, info)
    else:
        src_info = read_model_info(args.src)
        out = args.output or store_path(src_info.zoo_key or args.src.stem)
        info = bake_file(args.src, out)
    print(f"{out}: baked {info.config.arch} ({info.zoo_key or 'custom'})")
    return 0


DRAW_SUFFIXES = (".png", ".jpg", ".jpeg")


def cmd_predict(args: argparse.Namespace) -> int:
    # Refuse unusable outputs before minutes of loading and inference.
    if args.draw and args.draw.suffix.lower() not in DRAW_SUFFIXES:
        raise UsageError(f"--draw {args.draw}: name a .png or .jpg file")
    for out in (args.output, args.draw):
        if out is not None and not out.parent.is_dir():
            raise UsageError(f"{out}: the folder {out.parent} does not exist")
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise ImageDecodeError(f"no image file at {', '.join(missing)}")
    if args.checkpoint:
        predictor = Predictor.load(args.checkpoint, device=args.device, model_name=args.model,
                                   precision=args.precision)
    else:
        predictor = Predictor.load(args.model or DEFAULT_DETECT_MODEL, device=args.device, precision=args.precision)
    results: list[dict[str, object]] = []
    all_dets = predictor.predict([str(p) for p in args.images])
    for image_id, (path, dets) in enumerate(zip(args.images, all_dets, strict=True)):
        kept = [d for d in dets if d["score"] >= args.score_threshold]
        results.extend({"image_id": image_id, "file_name": str(path), **d} for d in kept)
        logger.info("%s: %d detections", path, len(kept))
        if args.draw and image_id == 0:
            draw_detections(decode_image(str(path)), kept).save(args.draw)
    text = json.dumps(results)
    if args.output:
        args.output.write_text(text)
        print(f"{len(results)} detections in {len(args.images)} images -> {args.output}")
    else:
        print(text)
    return 0
