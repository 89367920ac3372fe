"""Model-level benchmark: baked vs on-the-fly WS, vs torchvision frozen-BN Faster R-CNN, and
eager vs torch.compile vs channels_last (fp32 vs bf16 on GPU), all measured in one run.

    python bench/bench_models.py [--repeats 5] [--threads 2] [--compile] [--device cpu|cuda]

Each row is the median wall time of a full forward pass (backbone, RPN, heads, post-processing)
of GN+WS R-50 Faster R-CNN on one coco-tiny image at mmdetection's 800x1333 test scale
(800x1216 padded), with the deterministic reference weights. Ratios are against the baked model.
The process runs with gnws's glibc malloc settings (``models/allocator.py``), as ``gnws`` commands
and the TorchServe handler do; one more row times the baked model in a child process without
them (``GNWS_MALLOC_TUNING=0``), with its page faults per forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import IMAGES, machine_line, make_reference_checkpoint, markdown_table, median_ms, time_call  # noqa: E402
from models.allocator import tune_malloc  # noqa: E402
from models.bake import bake  # noqa: E402
from models.predictor import Predictor  # noqa: E402
from models.store import convert_checkpoint  # noqa: E402

STEM = "faster_rcnn_r50_fpn_gn_ws-all_1x_coco"
WARMUP = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image", default="000000010764")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--baked-only", action="store_true", help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args(argv)
    tuned = tune_malloc()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_reference_checkpoint(STEM, Path(tmp))
        unbaked = Predictor(*convert_checkpoint(ckpt, STEM), name=STEM, device=device)
        model, info = convert_checkpoint(ckpt, STEM)
        baked = Predictor(model=bake(model), info=info, name=STEM, device=device)

    prepared = baked.prepare(IMAGES / f"{args.image}.jpg")
    batch = prepared.image_chw[None].to(device)

    def run(pred: Predictor, images: torch.Tensor = batch) -> object:
        return pred.model(images, [prepared])

    rows: list[tuple[str, list[float]]] = []
    # Warm-up: the first passes grow the heap (and, untuned, every pass faults its memory in).
    for _ in range(WARMUP):
        run(baked)
        if not args.baked_only:
            run(unbaked)
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    baked_s: list[float] = []
    unbaked_s: list[float] = []
    for _ in tqdm(range(args.repeats), desc="baked / on-the-fly WS", unit="pair", disable=args.baked_only):
        baked_s += time_call(lambda: run(baked), repeats=1, warmup=0, cuda=cuda)
        if args.baked_only:
            continue
        unbaked_s += time_call(lambda: run(unbaked), repeats=1, warmup=0, cuda=cuda)  # interleaved: drifts hit both
    if args.baked_only:
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / args.repeats
        print(json.dumps({"median_ms": median_ms(baked_s), "faults": faults, "tuned": tuned}))
        return 0
    rows.append(("GN+WS baked (plain convs), fp32", baked_s))
    rows.append(("GN+WS on-the-fly WS (mmcv ConvWS2d), fp32", unbaked_s))
    untuned = _baked_without_malloc_tuning(args) if not cuda else None
    tuned_faults = _baked_faults(run, baked) if tuned else float("nan")

    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=800, max_size=1333).eval().to(device)
    h, w = prepared.img_shape
    raw = torch.rand(3, h, w, device=device)

    def run_tv() -> object:
        with torch.inference_mode():
            return tv([raw])

    rows.append(("torchvision fasterrcnn_resnet50_fpn (frozen BN), fp32",
                 time_call(run_tv, repeats=args.repeats, cuda=cuda)))

    baked.model.to(memory_format=torch.channels_last)
    cl_batch = batch.contiguous(memory_format=torch.channels_last)
    rows.append(("GN+WS baked, channels_last", time_call(lambda: run(baked, cl_batch), repeats=args.repeats,
                                                             cuda=cuda)))
    baked.model.to(memory_format=torch.contiguous_format)

    if args.compile:
        eager_backbone = baked.model.backbone
        baked.model.backbone = torch.compile(eager_backbone)  # type: ignore[assignment]
        rows.append(("GN+WS baked, torch.compile(backbone)",
                     time_call(lambda: run(baked), repeats=args.repeats, warmup=2, cuda=cuda)))
        baked.model.backbone = eager_backbone
    if cuda:
        def run_bf16() -> object:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return run(baked)

        rows.append(("GN+WS baked, bf16 autocast", time_call(run_bf16, repeats=args.repeats, warmup=2, cuda=cuda)))

    base = median_ms(rows[0][1])
    print(f"Machine: {machine_line()}; glibc malloc tuning {'on' if tuned else 'unavailable'}; device {device}; "
          f"image {args.image} "
          f"({prepared.ori_shape[1]}x{prepared.ori_shape[0]} -> {w}x{h}, padded "
          f"{prepared.pad_shape[1]}x{prepared.pad_shape[0]}); median of {args.repeats} runs\n")
    print(markdown_table(
        ["variant", "median ms", "time / baked"],
        [[name, f"{median_ms(t):.0f}", f"{median_ms(t) / base:.3f}"] for name, t in rows],
    ))
    ratio = median_ms(rows[1][1]) / base
    print(f"\nbaked is {ratio:.3f}x faster than on-the-fly WS (unbaked / baked time)")
    if untuned is not None:
        print(f"\nmalloc tuning: baked forward {base:.0f} ms with it ({tuned_faults:.0f} minor page faults per pass), "
              f"{untuned['median_ms']:.0f} ms without ({untuned['faults']:.0f} faults per pass, child process): "
              f"**{untuned['median_ms'] / base:.3f}x**")
    return 0


def _baked_faults(run: Callable[[Predictor], object], baked: Predictor) -> float:
    """Minor page faults of two more baked passes, per pass."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        run(baked)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2


def _baked_without_malloc_tuning(args: argparse.Namespace) -> dict[str, float]:
    """The baked row again, in a child process running with glibc's default malloc settings."""
    cmd = [sys.executable, __file__, "--baked-only", "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--device", args.device, "--image", args.image]
    env = {**os.environ, "GNWS_MALLOC_TUNING": "0"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=3600).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    sys.exit(main())
