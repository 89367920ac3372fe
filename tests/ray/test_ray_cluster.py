"""gnws on Ray Serve, on a real two-node Ray cluster whose nodes all listen on 127.0.0.1.

The cluster runs in a loopback-only network namespace (``unshare -n``, root), so no traffic leaves
127.0.0.1 (see ``scenario.py``). Bounded: a few minutes at a small image scale.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FASTER_R50, IMAGES

REPO = Path(__file__).resolve().parents[2]
ray = pytest.importorskip("ray", reason="pip install -e '.[dev]' (ray[serve])")


def _can_isolate() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip") is not None


@pytest.mark.slow
@pytest.mark.ray
def test_two_node_cluster_spreads_survives_a_killed_replica_and_stops_clean(baked_model, tmp_path: Path) -> None:
    if not _can_isolate():
        if os.environ.get("CI"):
            pytest.fail("the Ray cluster test needs root, unshare and ip (util-linux, iproute2) under CI")
        pytest.skip("needs root, unshare and ip to run the cluster in a loopback-only network namespace")
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(baked_model(FASTER_R50), store / f"{FASTER_R50}.safetensors")
    report = tmp_path / "report.json"
    script = (f"ip link set lo up && exec {sys.executable} -m tests.ray.scenario "
              f"{store / f'{FASTER_R50}.safetensors'} {IMAGES} {report}")
    result = subprocess.run(["unshare", "-n", "bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=900, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    seen = json.loads(report.read_text())
    print(json.dumps(seen, indent=1))  # the figures docs/scaling.md quotes

    assert seen["nodes"] == ["127.0.0.1", "127.0.0.1"]
    nodes = {worker.split("@")[1] for worker in seen["workers"]}
    assert len(nodes) == 2, f"requests were served on {nodes}, not on both nodes"
    for image in seen["equal"]:  # the tests' comparison rule (tests/torchserve/detections.py)
        assert "error" not in image, image
        assert image["detections"] > 0
    kill = seen["kill"]
    assert kill["transport_errors"] == []
    assert set(kill["statuses"]) <= {"200", "429", "503"}, kill
    assert kill["retryable_without_retry_after"] == 0
    assert seen["replicas_after_kill"] == 2
    assert seen["victim_replaced"]
    assert seen["replaced_after_s"] is not None, "no replacement replica ran within 120 s of the kill"
    assert seen["reload_status"] == 200
    assert seen["after_reload"]["generations"] == [1]
    assert seen["left_running"] == [], "ray stop left processes running"
