"""Serving benchmark: gnws service throughput at concurrency 1/4/8, `/segment` vs `/detect`, and
the gnws service vs TorchServe serving the same baked model, same machine, same client.

    python bench/bench_serving.py [--requests 8] [--threads 2] [--image-scale MAX,MIN] [--skip-torchserve]

Both servers get the same baked weights (the reference rule in ``tests/fixtures/make_weights.py``,
converted and baked by gnws), one inference worker with the same torch thread count, and the same
batching limits (up to 4 images, 5 ms delay). The client is one ``httpx`` client pool sending
``--requests`` requests per row with a fixed number in flight; throughput is requests / wall time.
Prints markdown tables of measured figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_service import _free_port, _wait_ready, baked_weights, percentile  # noqa: E402
from bench.common import IMAGES  # noqa: E402

FASTER = "faster_rcnn_r50_fpn_gn_ws-all_1x_coco"
MASK = "mask_rcnn_r50_fpn_gn_ws-all_2x_coco"
BATCH, DELAY_MS = 4, 5


def load_images() -> list[bytes]:
    """Three landscape coco-tiny images that share a padded shape (so either server can batch them)."""
    names = ["000000404484", "000000005001", "000000025603"]
    return [(IMAGES / f"{n}.jpg").read_bytes() for n in names]


def drive(url: str, images: list[bytes], n: int, concurrency: int, headers: dict[str, str]) -> dict[str, float]:
    """``n`` POSTs of raw JPEG bodies with ``concurrency`` in flight; throughput and latency."""
    latencies: list[float] = []
    inference_ms: list[float] = []  # the server's own forward-pass time per image (response timings)
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=600, limits=limits) as client:
        def one(i: int) -> None:
            nonlocal failures
            start = time.perf_counter()
            r = client.post(url, content=images[i % len(images)], headers={"Content-Type": "image/jpeg", **headers})
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                failures += 1
                return
            image = r.json()["images"][0]
            inference_ms.append(image["timings"]["inference_ms"] / image.get("batch_size", 1))

        one(0)  # warm-up, not timed
        latencies.clear()
        inference_ms.clear()
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
        wall = time.perf_counter() - start
    return {"rps": n / wall, "p50": statistics.median(latencies), "p90": percentile(latencies, 0.9),
            "failures": failures, "infer_ms": statistics.median(inference_ms) if inference_ms else float("nan")}


def start_gnws(detect: Path, segment: Path, threads: int, scale: str | None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GNWS_")}
    cmd = [sys.executable, "-m", "gnws.cli", "serve", "--port", str(port), "--detect-model", str(detect),
           "--segment-model", str(segment), "--device", "cpu", "--torch-threads", str(threads),
           "--max-batch-size", str(BATCH), "--max-batch-delay-ms", str(DELAY_MS), "--log-level", "warning"]
    if scale:
        cmd += ["--image-scale", scale]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=30) as client:
        _wait_ready(client, proc)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def torchserve_rows(weights: Path, images: list[bytes], n: int, concurrency: int, threads: int,
                    scale: str | None) -> dict[str, float]:
    from gnws.torchserve import archive
    from tests.torchserve.torchserve_runner import run_torchserve

    with tempfile.TemporaryDirectory(prefix="gnws-ts-bench-") as tmp:
        store = Path(tmp) / "store"
        settings = archive.ArchiveSettings(batch_size=BATCH, max_batch_delay_ms=DELAY_MS, device="cpu",
                                           image_scale=archive.parse_image_scale(scale) if scale else None)
        archive.build_archive(str(weights), store, model_name="detect", settings=settings)
        previous = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the worker's torch threads (read at its start)
        try:
            with run_torchserve(Path(tmp), store, ["detect"], None) as ts:
                return drive(f"{ts.inference_url}/predictions/detect", images, n, concurrency, ts.auth())
        finally:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = previous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=8, help="timed requests per row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server's worker")
    parser.add_argument("--image-scale", help="MAX,MIN instead of the full 1333,800")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--skip-torchserve", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gnws-bench")
    args = parser.parse_args()
    detect = baked_weights(FASTER, args.cache)
    segment = baked_weights(MASK, args.cache)
    images = load_images()
    levels = [int(c) for c in args.concurrency.split(",")]

    proc, url = start_gnws(detect, segment, args.threads, args.image_scale)
    try:
        service = {c: drive(f"{url}/v1/detect", images, args.requests, c, {}) for c in levels}
        det1 = service[1] if 1 in service else drive(f"{url}/v1/detect", images, max(2, args.requests // 2), 1, {})
        seg = drive(f"{url}/v1/segment", images, max(2, args.requests // 2), 1, {})
    finally:
        stop(proc)
    ts = None
    if not args.skip_torchserve:
        ts = torchserve_rows(detect, images, args.requests, max(levels), args.threads, args.image_scale)
        # gnws is measured at the TorchServe concurrency before and after TorchServe, and the
        # ratio uses the mean of the two, so a drift of the machine's speed hits both servers alike
        proc, url = start_gnws(detect, segment, args.threads, args.image_scale)
        try:
            gnws_after = drive(f"{url}/v1/detect", images, args.requests, max(levels), {})
        finally:
            stop(proc)

    scale = args.image_scale or "1333,800 (full)"
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}; worker torch threads {args.threads}; scale {scale}; {args.requests} requests "
          f"per row; 3 coco-tiny 4:3 images (one padded shape); batching up to {BATCH}, {DELAY_MS} ms\n")
    print("| gnws `/v1/detect` | requests/s | p50 ms | p90 ms | server forward ms/image | failures |")
    print("|---|---:|---:|---:|---:|---:|")
    for c, r in service.items():
        print(f"| concurrency {c} | {r['rps']:.3f} | {r['p50'] * 1e3:.0f} | {r['p90'] * 1e3:.0f} | "
              f"{r['infer_ms']:.0f} | {r['failures']} |")
    print(f"\n`/v1/segment` vs `/v1/detect` at concurrency 1: p50 {seg['p50'] * 1e3:.0f} ms vs "
          f"{det1['p50'] * 1e3:.0f} ms, **ratio {seg['p50'] / det1['p50']:.3f}** (mask head + pasting + RLE)")
    if ts is not None:
        before = service[max(levels)]
        print(f"\n| server, concurrency {max(levels)} | requests/s | p50 ms | p90 ms | server forward ms/image "
              "| failures |")
        print("|---|---:|---:|---:|---:|---:|")
        rows = (("gnws (FastAPI/uvicorn), before TorchServe", before), ("TorchServe 0.12 (gnws handler)", ts),
                ("gnws (FastAPI/uvicorn), after TorchServe", gnws_after))
        for name, r in rows:
            print(f"| {name} | {r['rps']:.3f} | {r['p50'] * 1e3:.0f} | {r['p90'] * 1e3:.0f} | {r['infer_ms']:.0f} | "
                  f"{r['failures']} |")
        gnws_rps = (before["rps"] + gnws_after["rps"]) / 2
        print(f"\n**gnws (mean of before/after) / TorchServe throughput = {gnws_rps / ts['rps']:.3f}** (goal ≥ 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
