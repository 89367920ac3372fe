"""Start and stop a real TorchServe for tests: loopback only, isolated temp folders, bounded waits.

TorchServe keeps its pid file in ``$TMPDIR/.model_server.pid``, its Java temp files (worker
sockets, unpacked archives) in ``$TEMP``, its logs in ``$LOG_LOCATION`` and the token file
``key_file.json`` in its working directory: all four point into the test's own folder, so parallel
runs and other TorchServes on the machine are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "docker" / "torchserve" / "config.properties"
# Keys rewritten for the test: listeners (to free loopback ports) and the model store.
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")
GRPC_KEYS = ("grpc_inference", "grpc_management")
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


def read_properties(path: Path) -> dict[str, str]:
    """``key=value`` lines of a Java properties file (comments and blank lines skipped)."""
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def free_loopback_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM))) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass(frozen=True)
class TorchServe:
    """A running TorchServe: loopback URLs and the tokens from its ``key_file.json``."""

    root: Path
    inference_url: str
    management_url: str
    metrics_url: str
    inference_token: str
    management_token: str
    pid: int
    stop: Callable[[], list[str]] = field(repr=False)

    def auth(self, kind: str = "inference") -> dict[str, str]:
        token = self.inference_token if kind == "inference" else self.management_token
        return {"Authorization": f"Bearer {token}"}

    def logs(self, limit: int = 6000) -> str:
        """The tail of every TorchServe log (for assertion messages)."""
        parts = []
        for path in sorted((self.root / "logs").glob("*.log")) + [self.root / "stdout.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-limit:]}")
        return "\n".join(parts)


def write_config(root: Path, model_store: Path) -> tuple[Path, dict[str, int]]:
    """The shipped config.properties with listeners moved to free loopback ports and the store moved."""
    props = read_properties(SHIPPED_CONFIG)
    ports = dict(zip((*ADDRESS_KEYS, *GRPC_KEYS), free_loopback_ports(5), strict=True))
    for key in ADDRESS_KEYS:
        props[key] = f"http://127.0.0.1:{ports[key]}"
    for key in GRPC_KEYS:
        props[f"{key}_address"] = "127.0.0.1"
        props[f"{key}_port"] = str(ports[key])
    props["model_store"] = str(model_store)
    props["allowed_urls"] = props["allowed_urls"].replace("/home/model-server/model-store", str(model_store))
    path = root / "config.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return path, ports


def _models_ready(management_url: str, token: str) -> str | None:
    """``None`` when every registered model has all its workers READY, else what is missing."""
    headers = {"Authorization": f"Bearer {token}"}
    models = httpx.get(f"{management_url}/models", headers=headers, timeout=5.0).json()["models"]
    if not models:
        return "no models registered"
    for m in models:
        (desc,) = httpx.get(f"{management_url}/models/{m['modelName']}", headers=headers, timeout=5.0).json()
        states = [w["status"] for w in desc["workers"]]
        if not states or any(s != "READY" for s in states):
            return f"{m['modelName']} workers {states}"
    return None


def _wait_ready(proc: subprocess.Popen, urls: dict[str, str], key_file: Path, deadline: float) -> dict:
    """Poll (bounded by ``deadline``) until ``/ping`` says Healthy and every model's workers are READY.

    ``/ping`` answers Healthy while workers are still loading, hence the management check. Both need
    tokens, so this waits for ``key_file.json`` first; returns its keys.
    """
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"torchserve exited with status {proc.returncode} before it was ready")
        try:
            keys = json.loads(key_file.read_text())
            r = httpx.get(f"{urls['inference']}/ping", headers={"Authorization": f"Bearer {keys['inference']['key']}"},
                          timeout=5.0)
            last = f"/ping: {r.status_code} {r.text.strip()}"
            if r.status_code == 200 and r.json().get("status") == "Healthy":
                missing = _models_ready(urls["management"], keys["management"]["key"])
                if missing is None:
                    return keys
                last = missing
        except (OSError, ValueError, KeyError) as exc:  # key file not written yet, or a partial answer
            last = repr(exc)
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise TimeoutError(f"torchserve was not ready within {START_TIMEOUT_S:.0f} s (last: {last})")


@contextmanager
def run_torchserve(root: Path, model_store: Path) -> Iterator[TorchServe]:
    """Start TorchServe (foreground, config snapshots off) in ``root``; stop it and every worker after."""
    torchserve = Path(sys.executable).with_name("torchserve")
    if not torchserve.is_file():
        raise FileNotFoundError(f"{torchserve} is missing: pip install -e '.[dev]' (TorchServe is in the dev extra)")
    config, ports = write_config(root, model_store)
    for sub in ("tmp", "logs"):
        (root / sub).mkdir(exist_ok=True)
    env = {
        **os.environ,
        "TMPDIR": str(root / "tmp"), "TEMP": str(root / "tmp"),
        "LOG_LOCATION": str(root / "logs"), "METRICS_LOCATION": str(root / "logs"),
        # The worker runs this venv's python (TorchServe passes sys.executable); `models` comes from it.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    cmd = [str(torchserve), "--start", "--foreground", "--ncs", "--ts-config", str(config),
           "--model-store", str(model_store)]
    with (root / "stdout.log").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    key_file = root / "key_file.json"
    stopped: list[list[str]] = []

    def stop() -> list[str]:
        """Stop once; returns the processes that had to be killed (empty for a clean stop)."""
        if not stopped:
            stopped.append(_stop(proc, torchserve, root, env))
        return stopped[0]

    try:
        urls = {kind: f"http://127.0.0.1:{ports[f'{kind}_address']}" for kind in ("inference", "management", "metrics")}
        keys = _wait_ready(proc, urls, key_file, time.monotonic() + START_TIMEOUT_S)
        java = next(p for p in psutil.Process(proc.pid).children() if "java" in p.name())
        yield TorchServe(
            root=root,
            inference_url=urls["inference"],
            management_url=urls["management"],
            metrics_url=urls["metrics"],
            inference_token=keys["inference"]["key"],
            management_token=keys["management"]["key"],
            pid=java.pid,
            stop=stop,
        )
    finally:
        stop()


def _stop(proc: subprocess.Popen, torchserve: Path, root: Path, env: dict[str, str]) -> list[str]:
    """``torchserve --stop``, wait (bounded), then kill whatever of our process tree is left.

    Returns ``"name pid"`` of every process that had to be killed.
    """
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    with suppress(subprocess.TimeoutExpired):
        subprocess.run([str(torchserve), "--stop"], cwd=root, env=env, timeout=STOP_TIMEOUT_S,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    _gone, alive = psutil.wait_procs(tree, timeout=STOP_TIMEOUT_S)
    killed = []
    for p in alive:
        try:
            killed.append(f"{p.name()} {p.pid}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    return killed


def java_available() -> bool:
    java_home = os.environ.get("JAVA_HOME")
    return bool(shutil.which("java") or (java_home and (Path(java_home) / "bin" / "java").is_file()))
