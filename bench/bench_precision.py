"""Precision modes: forward-pass speed, peak memory, service throughput and distance from fp32.

    python bench/bench_precision.py [--repeats 7] [--requests 8] [--closeness-images 8] [--compile]

One run, four parts, every mode the device can run (:func:`models.precision.supported_precisions`:
fp32 and bf16 on a CPU with AVX-512 BF16 or AMX; fp32, bf16 and fp16 on a recent CUDA GPU):

1. **Forward pass** of GN+WS R-50 Faster R-CNN at mmdetection's full test scale (800x1216 padded)
   on one image: fp32 (exact), naive ``torch.autocast`` around the fp32 model, and each reduced
   mode as :class:`~models.predictor.Predictor` sets it up (``--compile`` adds the reduced mode
   with ``torch.compile`` on the backbone, inductor with weight freezing). The variants run
   interleaved, one pass each per round, after two warm-up passes, so load drifts hit all alike;
   the table gives the median and the minimum, and the fp32/mode ratio of the medians and of each
   round's pair (median).
2. **Peak RSS** per mode, each in its own child process (``ru_maxrss`` is per process): after
   loading the model, and after ``--repeats`` forward passes.
3. **Service throughput** per mode: the FastAPI app (``service.create_app``) in this process under
   uvicorn, one server per mode loaded with ``Predictor.load(..., precision=mode)``; POST
   ``/v1/detect`` with the fixture JPEGs at ``--concurrency`` in flight, the modes alternating in
   blocks of ``--block`` requests. Requests/s over all blocks, client p50, and the server's own
   forward-pass time per image.
4. **Closeness** to fp32 on ``--closeness-images`` coco-tiny val images (``--data``; the test
   fixtures if it is missing), Mask R-CNN R-50 at full scale: relative error
   ``‖x − x_fp32‖ / ‖x_fp32‖`` of every FPN level, the RPN objectness and deltas, and the box-head
   class logits and deltas and mask logits on the fp32 model's RoIs (``tests/models/closeness.py``);
   median and worst image per mode, naive autocast included for comparison.

Weights are the deterministic reference weights (``tests/fixtures/make_weights.py``), converted
and baked by gnws, as in the other bench scripts. The process uses gnws's glibc malloc settings.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_service import _free_port, baked_weights  # noqa: E402
from bench.common import IMAGES, machine_line, markdown_table, time_once  # noqa: E402
from models import roi_extractor  # noqa: E402
from models.allocator import tune_malloc  # noqa: E402
from models.precision import DTYPES, Precision, supported_precisions  # noqa: E402
from models.predictor import Predictor  # noqa: E402
from models.preprocess import PreparedImage  # noqa: E402

FASTER = "faster_rcnn_r50_fpn_gn_ws-all_1x_coco"
MASK = "mask_rcnn_r50_fpn_gn_ws-all_2x_coco"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "coco-tiny" / "val2017"
WARMUP = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=7, help="forward passes per variant (interleaved)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (all parts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image", default="000000010764", help="fixture image of the forward-pass part")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(backbone) in each reduced mode")
    parser.add_argument("--requests", type=int, default=8, help="timed service requests per mode (0: skip)")
    parser.add_argument("--block", type=int, default=4, help="requests per mode before switching to the next")
    parser.add_argument("--concurrency", type=int, default=2, help="service requests in flight")
    parser.add_argument("--closeness-images", type=int, default=8, help="coco-tiny val images (0: skip)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of images for the closeness part")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gnws-bench",
                        help="where the baked reference weights are kept")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)  # one mode's memory, in a child process
    args = parser.parse_args(argv)
    tuned = tune_malloc()
    torch.set_num_threads(args.threads)
    faster = baked_weights(FASTER, args.cache)
    if args.rss_child:
        print(json.dumps(_rss_of_mode(faster, args.rss_child, args)))
        return 0

    modes = supported_precisions(args.device)
    reduced = [m for m in modes if m != "fp32"]
    print(f"Machine: {machine_line()}; glibc malloc tuning {'on' if tuned else 'off'}; device {args.device}; "
          f"modes {', '.join(modes)}\n")
    if not reduced:
        print(f"only fp32 runs on {args.device}: nothing to compare")
    forward = _forward_part(faster, reduced, args)
    rss = {} if args.skip_rss else {m: _rss_in_child(m, args) for m in tqdm(modes, desc="peak RSS", unit="mode")}
    service = _service_part(faster, modes, args) if args.requests > 0 else {}
    closeness = (_closeness_part(baked_weights(MASK, args.cache), reduced, args)
                 if args.closeness_images and reduced else {})
    _print_summary(modes, forward, rss, service, closeness)
    return 0


# -- 1. forward pass ----------------------------------------------------------------------------


def _forward_part(weights: Path, reduced: Sequence[Precision], args: argparse.Namespace) -> dict[str, list[float]]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    fp32 = Predictor.load(weights, device=device)
    prepared = fp32.prepare(IMAGES / f"{args.image}.jpg")
    batch = prepared.image_chw[None].to(device)
    variants: dict[str, Callable[[], object]] = {"fp32 (exact)": functools.partial(_forward, fp32, batch, prepared)}
    if device.type == "cpu":
        def one_thread_roi_align() -> object:
            with _roi_align_on_one_thread():
                return fp32.model(batch, [prepared])

        variants["fp32, RoIAlign on one thread (gnws before precision modes)"] = one_thread_roi_align
    for mode in reduced:
        def autocast(mode: Precision = mode) -> object:
            with torch.autocast(device.type, dtype=DTYPES[mode]):
                return fp32.model(batch, [prepared])

        predictor = Predictor.load(weights, device=device, precision=mode)
        variants[f"fp32 weights + naive torch.autocast({mode})"] = autocast
        variants[f"{mode} (Predictor precision={mode!r})"] = functools.partial(_forward, predictor, batch, prepared)
        if args.compile:
            compiled = Predictor.load(weights, device=device, precision=mode)
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # weights are constants at inference: prepacked for oneDNN
            compiled.model.backbone = torch.compile(compiled.model.backbone)  # type: ignore[assignment]
            start = time.perf_counter()
            compiled.model(batch, [prepared])
            print(f"torch.compile({mode} backbone): first pass (compilation) {time.perf_counter() - start:.1f} s")
            variants[f"{mode} + torch.compile(backbone), inductor freezing"] = functools.partial(
                _forward, compiled, batch, prepared)
    for run in variants.values():
        for _ in range(WARMUP):
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in tqdm(range(args.repeats), desc="forward passes, interleaved", unit="round"):
        for name, run in variants.items():
            times[name].append(time_once(run, cuda=cuda))
    h, w = prepared.img_shape
    print(f"\nForward pass: {FASTER}, image {args.image} ({prepared.ori_shape[1]}x{prepared.ori_shape[0]} -> {w}x{h}, "
          f"padded {prepared.pad_shape[1]}x{prepared.pad_shape[0]}), {args.repeats} interleaved rounds\n")
    base = times["fp32 (exact)"]
    rows: list[list[object]] = []
    for name, t in times.items():
        paired = statistics.median(b / x for b, x in zip(base, t, strict=True))
        rows.append([name, f"{statistics.median(t) * 1e3:.0f}", f"{min(t) * 1e3:.0f}",
                     f"{statistics.median(base) / statistics.median(t):.2f}x", f"{paired:.2f}x"])
    print(markdown_table(["variant", "median ms", "min ms", "fp32 / variant (medians)", "fp32 / variant (paired)"],
                         rows))
    return times


def _forward(predictor: Predictor, batch: torch.Tensor, prepared: PreparedImage) -> object:
    return predictor.model(batch, [prepared])


@contextlib.contextmanager
def _roi_align_on_one_thread() -> Iterator[None]:
    """RoIAlign in one call per level, as before it was split over threads (same results)."""
    saved = roi_extractor.MIN_CHUNK
    roi_extractor.MIN_CHUNK = sys.maxsize
    try:
        yield
    finally:
        roi_extractor.MIN_CHUNK = saved


# -- 2. peak RSS --------------------------------------------------------------------------------


def _rss_of_mode(weights: Path, mode: str, args: argparse.Namespace) -> dict[str, float]:
    """In the child: load ``mode``, run ``--repeats`` passes; resident memory in MiB.

    The peak is ``VmHWM`` (this process's own high-water mark; ``ru_maxrss`` would also count the
    parent's resident memory at ``fork``, which Linux keeps across ``exec``).
    """
    predictor = Predictor.load(weights, device=args.device, precision=mode)
    after_load = _proc_status_mib("VmHWM")
    prepared = predictor.prepare(IMAGES / f"{args.image}.jpg")
    for _ in range(args.repeats):
        predictor.infer([prepared])
    return {"peak_after_load_mib": after_load, "peak_mib": _proc_status_mib("VmHWM"),
            "rss_after_mib": _proc_status_mib("VmRSS")}


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise SystemExit(f"/proc/self/status has no {field}: peak RSS is measured on Linux only (use --skip-rss)")


def _rss_in_child(mode: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--rss-child", mode, "--repeats", str(args.repeats), "--threads",
           str(args.threads), "--device", args.device, "--image", args.image, "--cache", str(args.cache)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


# -- 3. service throughput ----------------------------------------------------------------------


@contextlib.contextmanager
def _serve(weights: Path, mode: Precision, args: argparse.Namespace) -> Iterator[str]:
    """The FastAPI app in this process under uvicorn, serving ``weights`` in ``mode``; yields its URL."""
    import httpx
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(detect_model=str(weights), segment_model=None, extra_models=[], device=args.device,
                        torch_threads=args.threads, max_batch_size=1, warmup=True)

    def load(ref: object) -> Predictor:
        return Predictor.load(ref, device=args.device, precision=mode)  # type: ignore[arg-type]

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, loader=load), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{mode}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        with httpx.Client(base_url=url, timeout=10) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/readyz").status_code == 200:
                        break
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise SystemExit(f"the {mode} service did not become ready")
                time.sleep(0.2)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _service_part(weights: Path, modes: tuple[Precision, ...], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from bench.bench_serving import drive

    images = [p.read_bytes() for p in sorted(IMAGES.glob("*.jpg"))]
    blocks = max(1, -(-args.requests // args.block))
    with contextlib.ExitStack() as stack:
        urls = {m: stack.enter_context(_serve(weights, m, args)) for m in tqdm(modes, desc="starting services")}
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for _ in tqdm(range(blocks), desc=f"POST /v1/detect, modes alternating in blocks of {args.block}"):
            for mode, url in urls.items():
                runs[mode].append(drive(f"{url}/v1/detect", images, args.block, args.concurrency, {}))
    out = {}
    for mode, blocks_run in runs.items():
        wall = sum(args.block / r["rps"] for r in blocks_run)
        out[mode] = {"rps": args.block * len(blocks_run) / wall,
                     "p50_ms": statistics.median(r["p50"] for r in blocks_run) * 1e3,
                     "infer_ms": statistics.median(r["infer_ms"] for r in blocks_run),
                     "failures": sum(r["failures"] for r in blocks_run)}
    print(f"\nService: POST /v1/detect (FastAPI + uvicorn in-process, one server per mode, {len(images)} fixture "
          f"JPEGs), {args.concurrency} in flight, {args.block * blocks} timed requests per mode in blocks of "
          f"{args.block}, modes alternating\n")
    base = out["fp32"]["rps"]
    print(markdown_table(
        ["mode", "requests/s", "vs fp32", "client p50 ms", "server forward ms/image", "failures"],
        [[m, f"{r['rps']:.3f}", f"{r['rps'] / base:.2f}x", f"{r['p50_ms']:.0f}", f"{r['infer_ms']:.0f}",
          int(r["failures"])] for m, r in out.items()],
    ))
    return out


# -- 4. closeness -------------------------------------------------------------------------------


def _closeness_part(weights: Path, reduced: Sequence[Precision], args: argparse.Namespace
                    ) -> dict[str, dict[str, list[float]]]:
    from tests.models.closeness import closeness

    data = args.data if args.data.is_dir() else IMAGES
    paths = sorted(data.glob("*.jpg"))[: args.closeness_images]
    device = args.device
    fp32 = Predictor.load(weights, device=device)
    models = {m: Predictor.load(weights, device=device, precision=m).model for m in reduced}
    results: dict[str, dict[str, list[float]]] = {}
    for path in tqdm(paths, desc="closeness to fp32", unit="image"):
        prepared = fp32.prepare(path)
        for mode, model in models.items():
            _collect(results, mode, closeness(model, fp32.model, prepared))
            naive = closeness(fp32.model, fp32.model, prepared, autocast_dtype=DTYPES[mode])
            _collect(results, f"naive autocast({mode})", naive)
    keys = list(next(iter(results.values())))
    print(f"\nCloseness to fp32: {MASK} at full scale, {len(paths)} images from {data}; relative error "
          "‖x − x_fp32‖ / ‖x_fp32‖, median / worst image\n")
    print(markdown_table(["mode", *keys], [
        [mode, *(f"{statistics.median(v[k]):.2e} / {max(v[k]):.2e}" for k in keys)] for mode, v in results.items()
    ]))
    return results


def _collect(results: dict[str, dict[str, list[float]]], mode: str, errors: dict[str, float]) -> None:
    per_key = results.setdefault(mode, {})
    for key, value in errors.items():
        per_key.setdefault(key, []).append(value)


# -- summary ------------------------------------------------------------------------------------


def _print_summary(modes: tuple[Precision, ...], forward: dict[str, list[float]], rss: dict[str, dict[str, float]],
                   service: dict[str, dict[str, float]], closeness: dict[str, dict[str, list[float]]]) -> None:
    print("\nSummary per mode\n")
    base_fwd = statistics.median(forward["fp32 (exact)"])
    rows: list[list[object]] = []
    for mode in modes:
        name = next(n for n in forward if n.startswith(f"{mode} ("))  # "fp32 (exact)", "bf16 (Predictor ...)"
        fwd = statistics.median(forward[name])
        row: list[object] = [mode, f"{fwd * 1e3:.0f}", f"{base_fwd / fwd:.2f}x"]
        row += ([f"{rss[mode][k]:.0f}" for k in ("peak_after_load_mib", "peak_mib", "rss_after_mib")]
                if mode in rss else ["-", "-", "-"])
        if mode in service:
            row += [f"{service[mode]['rps']:.3f}", f"{service[mode]['rps'] / service['fp32']['rps']:.2f}x"]
        else:
            row += ["-", "-"]
        errors = closeness.get(mode)
        if mode == "fp32":
            row += ["0 (exact)", "0 (exact)"]
        elif errors:
            fpn = max(max(errors[f"P{i}"]) for i in range(2, 7))
            row += [f"{fpn:.3f}", f"{max(errors['cls_logits']):.3f}"]
        else:
            row += ["-", "-"]
        rows.append(row)
    print(markdown_table(["mode", "forward median ms", "fp32 / mode", "peak RSS after load MiB", "peak RSS MiB",
                          "RSS after passes MiB",
                          "service requests/s", "service vs fp32", "worst rel. error, FPN",
                          "worst rel. error, class logits"], rows))


if __name__ == "__main__":
    sys.exit(main())
