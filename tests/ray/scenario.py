"""A two-node Ray cluster on 127.0.0.1 running gnws on Ray Serve, exercised and measured.

Run by ``test_ray_cluster.py`` inside a loopback-only network namespace (``unshare -n``), where
Ray keeps every node on 127.0.0.1 (outside one, Ray replaces a loopback node address with the
machine's own interface address). Usage::

    python -m tests.ray.scenario WEIGHTS.safetensors IMAGE_DIR REPORT.json

Starts a head node and a second node (own ports, own custom resource), deploys gnws with one
replica and measures throughput, redeploys with two replicas (one per node) and measures again,
checks that answers equal the local predictor's, kills a replica's process under traffic, reloads,
stops the cluster and checks that no Ray process is left. Writes what it saw to REPORT.json.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

RAY = str(Path(sys.executable).parent / "ray")
TEMP = "/tmp/gnws-ray"
PORT = 8000
SCALE = (320, 192)
COMMON = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={TEMP}",
          "--object-store-memory=200000000"]
HEAD = ["--head", "--port=6380", "--include-dashboard=false", "--resources={\"node_a\": 1}",
        "--node-manager-port=6390", "--object-manager-port=6391", "--min-worker-port=20000",
        "--max-worker-port=20099", "--ray-client-server-port=10011", "--dashboard-agent-listen-port=52370",
        "--dashboard-agent-grpc-port=52371", "--runtime-env-agent-port=52372", "--metrics-export-port=8090"]
NODE_B = ["--address=127.0.0.1:6380", "--resources={\"node_b\": 1}", "--include-log-monitor=false",
          "--node-manager-port=6392", "--object-manager-port=6393", "--min-worker-port=20100",
          "--max-worker-port=20199", "--dashboard-agent-listen-port=52380", "--dashboard-agent-grpc-port=52381",
          "--runtime-env-agent-port=52382", "--metrics-export-port=8091"]


# No usage reports, short drains, and no token authentication (a token file left by another Ray on the
# machine would otherwise be offered to this cluster, which does not use one).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5", "RAY_AUTH_MODE": "disabled"}


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **RAY_ENV}
    proc = subprocess.Popen([RAY, "start", "--block", *COMMON, *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while "block forever" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start failed: {log.read_text()[-3000:]}")
        time.sleep(0.3)
    return proc


def wait_ready(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{url}/readyz", timeout=5)
            if ready.status_code == 200:
                return
            if ready.json().get("status") == "failed":
                raise RuntimeError(f"gnws on Ray Serve failed to load its models: {ready.text}")
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError("gnws on Ray Serve did not get ready")


def deploy(settings: Any, replicas: int) -> None:
    from ray import serve

    from service.ray_serve import APP_NAME, build_app

    serve.run(build_app(settings, replicas=replicas, max_replicas_per_node=1, replica_cpus=1.0),
              name=APP_NAME, route_prefix="/", blocking=False)


def detect(client: httpx.Client, image: bytes) -> httpx.Response:
    return client.post("/v1/detect", content=image, headers={"Content-Type": "image/jpeg"})


def throughput(url: str, images: list[bytes], n: int, concurrency: int) -> tuple[float, Counter]:
    """Images per second over ``n`` requests, and the workers that served them."""
    workers: Counter = Counter()
    with httpx.Client(base_url=url, timeout=300) as client:
        for image in images[:concurrency]:  # warm every path once
            detect(client, image)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            responses = list(pool.map(lambda i: detect(client, images[i % len(images)]), range(n)))
        elapsed = time.perf_counter() - start
    for r in responses:
        if r.status_code != 200:
            raise RuntimeError(f"a measured request failed: {r.status_code} {r.text[:300]}")
        workers[r.json()["images"][0]["worker"]] += 1
    return n / elapsed, workers


def replica_names() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::gnws#InferenceReplica#")]


def replica_pids() -> dict[str, int]:
    import ray

    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::gnws#InferenceReplica#"):
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            pids[actor["name"]] = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
    return pids


def wait_replaced(victim: str, before: set[str], killed_at: float, timeout_s: float = 120) -> float | None:
    """Seconds from the kill until two replicas run again, one of them new; None if not within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = set(replica_names())
        if victim not in names and len(names) == 2 and names != before and replica_states().get("RUNNING") == 2:
            return time.perf_counter() - killed_at
        time.sleep(0.2)
    return None


def replica_states() -> dict[str, int]:
    from ray import serve

    status = serve.status().applications["gnws"].deployments["InferenceReplica"]
    return {str(k): v for k, v in status.replica_states.items()}


def main() -> int:
    weights, image_dir, report_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    os.environ.update(RAY_ENV)
    report: dict[str, Any] = {}
    run = Path(TEMP + "-logs")
    run.mkdir(parents=True, exist_ok=True)
    images = [p.read_bytes() for p in sorted(image_dir.glob("*.jpg"))][:6]
    url = f"http://127.0.0.1:{PORT}"
    t0 = time.perf_counter()
    nodes = [start_node(HEAD, run / "head.log"), start_node(NODE_B, run / "node_b.log")]
    report["cluster_start_s"] = time.perf_counter() - t0
    try:
        import ray
        from ray import serve

        from models import Predictor
        from service.settings import Settings

        ray.init(address="127.0.0.1:6380", log_to_driver=False)
        report["nodes"] = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        settings = Settings(detect_model=str(weights), segment_model="none", device="cpu", image_scale=SCALE,
                            model_store=weights.parent, api_key="ray-key", warmup=True, torch_threads=1,
                            max_in_flight=16, queue_size=16, request_timeout_s=120)

        deploy(settings, replicas=1)
        wait_ready(url)
        one, _ = throughput(url, images, n=16, concurrency=4)
        t0 = time.perf_counter()
        deploy(settings, replicas=2)
        wait_ready(url)
        report["redeploy_s"] = time.perf_counter() - t0
        two, workers = throughput(url, images, n=16, concurrency=4)
        report["img_per_s"] = {"1": one, "2": two}
        report["workers"] = dict(workers)

        # the same answers as the local predictor on the same weights, scale and thread count
        import torch

        from tests.torchserve.detections import assert_same_detections

        torch.set_num_threads(1)
        predictor = Predictor.load(weights, device="cpu", image_scale=SCALE)
        report["equal"] = []
        with httpx.Client(base_url=url, timeout=300) as client:
            for image in images[:3]:
                got = detect(client, image).json()["images"][0]["detections"]
                want = [dict(d) for d in predictor.predict(image)]
                try:
                    assert_same_detections(got, want)
                    report["equal"].append({"detections": len(got), "identical": got == want})
                except AssertionError as exc:
                    report["equal"].append({"detections": len(got), "error": str(exc)})

        # a replica's process killed under traffic: every request is answered
        pids = replica_pids()
        report["replicas_before_kill"] = len(pids)
        statuses: list[tuple[int, str | None]] = []
        errors: list[str] = []

        def client_loop(k: int) -> None:
            with httpx.Client(base_url=url, timeout=300) as client:
                for i in range(8):
                    try:
                        r = detect(client, images[(i + k) % len(images)])
                        statuses.append((r.status_code, r.headers.get("retry-after")))
                    except httpx.HTTPError as exc:
                        errors.append(repr(exc))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client_loop, k) for k in range(3)]
            time.sleep(2.0)
            victim = sorted(pids.items())[0]
            killed_at = time.perf_counter()
            os.kill(victim[1], signal.SIGKILL)
            # Serve's controller notices the death and starts a replacement: a new replica name, RUNNING.
            replaced = pool.submit(wait_replaced, victim[0], set(pids), killed_at)
            for f in futures:
                f.result()
            report["traffic_done_after_s"] = time.perf_counter() - killed_at
            report["replaced_after_s"] = replaced.result()
        report["kill"] = {"victim": victim[0], "statuses": Counter(s for s, _ in statuses),
                          "retryable_without_retry_after": sum(1 for s, ra in statuses if s in (429, 503) and not ra),
                          "transport_errors": errors}
        alive = replica_names()
        report["replicas_after_kill"] = len(alive)
        report["victim_replaced"] = victim[0] not in alive

        # a reload reaches every replica, then both still answer
        with httpx.Client(base_url=url, timeout=300, headers={"X-API-Key": "ray-key"}) as client:
            r = client.post(f"/v1/models/{weights.stem}/reload", json={"source": weights.name})
            report["reload_status"] = r.status_code
            after = [detect(client, images[i % len(images)]).json() for i in range(6)]
        report["after_reload"] = {"generations": sorted({a["model"]["generation"] for a in after}),
                                  "workers": sorted({a["images"][0]["worker"] for a in after})}
        serve.shutdown()
        ray.shutdown()
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
        for node in nodes:
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
        deadline = time.monotonic() + 60  # `ray stop` signals; its processes take a moment to exit
        while True:
            left = subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::|default_worker.py"], capture_output=True,
                                  text=True).stdout.split()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        report["left_running"] = left
        report_path.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
