"""``gnws loadtest`` against a real ``gnws serve`` (uvicorn) on 127.0.0.1, bounded to seconds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.runner import parse_prometheus, stage_split
from tests.conftest import FASTER_R50, MASK_R50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_service(baked_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``gnws serve`` in a subprocess with the reference weights at a small test scale and a tiny
    queue, so a short run sees both answered and refused (429/503) requests."""
    port = _free_port()
    home = tmp_path_factory.mktemp("home")
    env = {
        **os.environ,
        "GNWS_HOME": str(home),
        "GNWS_DETECT_MODEL": str(baked_model(FASTER_R50)),
        "GNWS_SEGMENT_MODEL": str(baked_model(MASK_R50)),
        "GNWS_IMAGE_SCALE": "320,192",
        "GNWS_DEVICE": "cpu",
        "GNWS_TORCH_THREADS": "1",
        "GNWS_QUEUE_SIZE": "2",
        "GNWS_MAX_FILES": "1",
        "GNWS_MAX_BATCH_SIZE": "2",
        "GNWS_PORT": str(port),
    }
    log = (home / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "gnws.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gnws serve exited: {(home / 'serve.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("gnws serve was not ready within 180 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_loadtest_summary_has_every_figure(live_service: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "gnws.cli", "loadtest", "--url", live_service, "--users", "6", "--spawn-rate", "6",
         "--run-time", "8s", "--out", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] > 0
    assert summary["requests_per_s"] > 0
    for q in ("p50", "p90", "p95", "p99"):
        assert summary["latency_ms"][q] > 0
    failures = summary["failures"]
    assert failures["server_5xx"] == 0
    assert sum(failures["by_status"].values()) == failures["total"]
    assert failures["overload_429_503"] == failures["total"]  # refusals only, never errors
    # 6 users against a 2-image queue: both answered and refused requests are in the summary
    assert failures["overload_429_503"] > 0, failures
    assert summary["requests"] > failures["total"], summary
    stages = summary["server_stages"]
    for stage in ("queue", "inference", "encode"):
        assert stages[stage]["images"] > 0
        assert stages[stage]["mean_s"] is not None
    md = (out / "summary.md").read_text()
    assert "requests/s" in md
    assert "| inference |" in md
    assert (out / "gnws_stats.csv").is_file()
    assert (out / "gnws.html").is_file()
    assert "requests/s" in proc.stdout


def test_unreachable_service_is_one_sentence(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.run([sys.executable, "-m", "gnws.cli", "loadtest", "--url", url, "--run-time", "2s",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "is the gnws service running?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stage_split_from_two_scrapes() -> None:
    before = parse_prometheus(
        'gnws_inference_stage_seconds_bucket{model="m",stage="inference",le="0.5"} 1\n'
        'gnws_inference_stage_seconds_bucket{model="m",stage="inference",le="1.0"} 2\n'
        'gnws_inference_stage_seconds_bucket{model="m",stage="inference",le="+Inf"} 2\n'
        'gnws_inference_stage_seconds_sum{model="m",stage="inference"} 1.2\n'
        'gnws_inference_stage_seconds_count{model="m",stage="inference"} 2\n'
    )
    after = parse_prometheus(
        "# HELP gnws_inference_stage_seconds Per-image latency\n"
        'gnws_inference_stage_seconds_bucket{model="m",stage="inference",le="0.5"} 1\n'
        'gnws_inference_stage_seconds_bucket{model="m",stage="inference",le="1.0"} 6\n'
        'gnws_inference_stage_seconds_bucket{model="m",stage="inference",le="+Inf"} 6\n'
        'gnws_inference_stage_seconds_sum{model="m",stage="inference"} 4.4\n'
        'gnws_inference_stage_seconds_count{model="m",stage="inference"} 6\n'
    )
    split = stage_split(before, after)
    assert split["inference"]["images"] == 4
    assert split["inference"]["mean_s"] == pytest.approx(0.8)
    assert split["inference"]["p50_s"] == pytest.approx(0.75)  # all 4 new samples in (0.5, 1.0]
