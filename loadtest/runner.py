"""``gnws loadtest``: run Locust headless for a bounded time and summarise client and server figures.

Writes ``<out>/gnws_stats.csv`` (and Locust's other CSVs), ``<out>/gnws.html``, ``<out>/summary.json``
and ``<out>/summary.md``: requests/s, p50/p90/p95/p99 latency, failures split by status (overload
429/503 vs 5xx vs other), and the server-side split of per-image time into prepare / queue /
inference / encode, read from the difference of two ``/metrics`` scrapes around the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
STAGE_METRIC = "gnws_inference_stage_seconds"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class LoadTestError(Exception):
    """The load test could not run (Locust missing, server unreachable, Locust failed)."""


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a Prometheus text exposition as ``{(name, sorted labels): value}``."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        try:
            samples[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return samples


def scrape(url: str, timeout: float = 10.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as resp:  # noqa: S310
            return parse_prometheus(resp.read().decode())
    except OSError as exc:
        raise LoadTestError(f"could not read {url.rstrip('/')}/metrics ({exc}); is the gnws service running?") from None


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Histogram quantile by linear interpolation inside the bucket (as Prometheus does)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            span = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / span if span > 0 else 0.0)
        prev_le, prev_count = le, count
    return None


def stage_split(before: dict, after: dict) -> dict[str, dict[str, float | None]]:
    """Per stage: images, mean, p50 and p95 seconds over the run (after − before), all models."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for (name, labels), value in after.items():
        if not name.startswith(STAGE_METRIC):
            continue
        d = dict(labels)
        stage = d.get("stage", "?")
        delta = value - before.get((name, labels), 0.0)
        if name == STAGE_METRIC + "_sum":
            sums[stage] += delta
        elif name == STAGE_METRIC + "_count":
            counts[stage] += delta
        elif name == STAGE_METRIC + "_bucket":
            buckets[stage][float(d["le"])] += delta
    split: dict[str, dict[str, float | None]] = {}
    known = [s for s in ("prepare", "queue", "inference", "encode") if s in counts]
    for stage in known + sorted(set(counts) - set(known)):
        n = counts[stage]
        ordered = sorted(buckets[stage].items())
        split[stage] = {
            "images": n,
            "mean_s": sums[stage] / n if n else None,
            "p50_s": _quantile(ordered, 0.5),
            "p95_s": _quantile(ordered, 0.95),
        }
    return split


def read_locust_csv(prefix: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The ``Aggregated`` stats row and failures by status label from Locust's CSV files."""
    stats_path = Path(f"{prefix}_stats.csv")
    if not stats_path.is_file():
        raise LoadTestError(f"Locust wrote no {stats_path}; see its output above")
    with open(stats_path, newline="") as f:
        rows = list(csv.DictReader(f))
    aggregated = next((r for r in rows if r.get("Name") == "Aggregated"), None)
    if aggregated is None:
        raise LoadTestError(f"{stats_path} has no Aggregated row")
    failures: dict[str, int] = defaultdict(int)
    failures_path = Path(f"{prefix}_failures.csv")
    if failures_path.is_file():
        with open(failures_path, newline="") as f:
            for row in csv.DictReader(f):
                m = re.search(r"HTTP (\d{3})", row.get("Error", ""))
                status = m.group(1) if m else "connection"
                failures[status] += int(row.get("Occurrences", 0))
    return aggregated, dict(failures)


def summarise(aggregated: dict[str, Any], failures: dict[str, int], split: dict, meta: dict[str, Any]) -> dict:
    def num(key: str) -> float | None:
        value = aggregated.get(key)
        return float(value) if value not in (None, "", "N/A") else None

    overload = sum(v for k, v in failures.items() if k in ("429", "503"))
    server_errors = sum(v for k, v in failures.items() if k.isdigit() and k.startswith("5") and k != "503")
    return {
        **meta,
        "requests": int(num("Request Count") or 0),
        "requests_per_s": num("Requests/s"),
        "latency_ms": {"p50": num("50%"), "p90": num("90%"), "p95": num("95%"), "p99": num("99%"),
                       "mean": num("Average Response Time"), "max": num("Max Response Time")},
        "failures": {"total": int(num("Failure Count") or 0), "overload_429_503": overload,
                     "server_5xx": server_errors, "by_status": failures},
        "server_stages": split,
    }


def render_markdown(summary: dict) -> str:
    lat = summary["latency_ms"]
    fail = summary["failures"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = [
        f"# Load test of {summary['url']}",
        "",
        f"{summary['users']} users, {summary['run_time']}, {summary['requests']} requests, "
        f"**{summary['requests_per_s'] or 0:.2f} requests/s**",
        "",
        "| latency (ms) | p50 | p90 | p95 | p99 | mean | max |",
        "|---|---|---|---|---|---|---|",
        f"| client | {ms(lat['p50'])} | {ms(lat['p90'])} | {ms(lat['p95'])} | {ms(lat['p99'])} | "
        f"{ms(lat['mean'])} | {ms(lat['max'])} |",
        "",
        f"Failures: {fail['total']} in all; overload (429/503): {fail['overload_429_503']}; "
        f"server errors (5xx except 503): {fail['server_5xx']}; by status: {json.dumps(fail['by_status'])}",
        "",
        "| server stage (per image) | images | mean ms | p50 ms | p95 ms |",
        "|---|---|---|---|---|",
    ]
    for stage, s in summary["server_stages"].items():
        def ms_s(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.1f}"

        lines.append(f"| {stage} | {s['images']:.0f} | {ms_s(s['mean_s'])} | {ms_s(s['p50_s'])} | {ms_s(s['p95_s'])} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    locust = shutil.which("locust") or (Path(sys.executable).parent / "locust")
    if not Path(locust).exists():
        raise LoadTestError("locust is not installed: pip install 'gnws[loadtest]'")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "gnws"
    before = scrape(args.url)
    cmd = [
        str(locust), "-f", str(args.locustfile), "--headless", "--host", args.url,
        "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.run_time,
        "--csv", str(prefix), "--html", str(out / "gnws.html"), "--only-summary", "--stop-timeout", "10",
        "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]
    env = dict(os.environ)
    if args.images:
        env["GNWS_LOADTEST_IMAGES"] = str(args.images)
    env["GNWS_LOADTEST_SEGMENT_WEIGHT"] = str(args.segment_weight)
    logger.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, env=env, timeout=_seconds(args.run_time) + 90, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise LoadTestError(f"Locust did not finish within {args.run_time} + 90 s") from None
    if proc.returncode != 0:
        raise LoadTestError(f"Locust exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    after = scrape(args.url)
    aggregated, failures = read_locust_csv(prefix)
    meta = {"url": args.url, "users": args.users, "run_time": args.run_time}
    summary = summarise(aggregated, failures, stage_split(before, after), meta)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(render_markdown(summary))
    return summary


def _seconds(run_time: str) -> int:
    total = 0
    for value, unit in re.findall(r"(\d+)\s*([hms]?)", run_time):
        total += int(value) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit]
    if total <= 0:
        raise LoadTestError(f"--run-time must be like 30s, 2m or 1h30m, got {run_time!r}")
    return total


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="base URL of the gnws service, e.g. http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=4, help="concurrent simulated clients (default: %(default)s)")
    p.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    p.add_argument("--run-time", default="60s", help="bounded duration, e.g. 30s, 2m (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("out/loadtest"), help="report folder (default: %(default)s)")
    p.add_argument("--images", type=Path, help="folder of images to send (default: the test images)")
    p.add_argument("--segment-weight", type=float, default=0.25, help="share of /segment requests (0: none)")
    p.add_argument("--locustfile", type=Path, default=LOCUSTFILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = run(args)
    except LoadTestError as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    print(render_markdown(summary))  # noqa: T201
    return 0
