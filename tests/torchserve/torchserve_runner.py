"""Start and stop a real TorchServe for tests: loopback only, isolated temp folders, bounded waits.

The config is the shipped ``config.properties`` rendered by the container entry point's own code
(``docker/torchserve/render_config.py``) with 127.0.0.1 as the bind address and exactly the models
asked for; only the ports are then moved to free ones. TorchServe keeps its pid file in
``$TMPDIR/.model_server.pid``, its Java temp files (worker sockets, unpacked archives) in ``$TEMP``,
its logs in ``$LOG_LOCATION`` and the token file ``key_file.json`` in its working directory: all
four point into the test's own folder, so parallel runs and other TorchServes are never touched.
Keys are read from ``key_file.json`` on every use and renewed with the API key once expired.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
TORCHSERVE_DIR = REPO / "docker" / "torchserve"
SHIPPED_CONFIG = TORCHSERVE_DIR / "config.properties"
# Keys rewritten for the test after rendering: the ports only (to free loopback ports).
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")
GRPC_PORT_KEYS = ("grpc_inference_port", "grpc_management_port")
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
TOKEN_REFUSED = "Token Authorization failed"


def load_render_config() -> ModuleType:
    """``docker/torchserve/render_config.py``, as the entry point and the health check import it."""
    spec = importlib.util.spec_from_file_location("render_config", TORCHSERVE_DIR / "render_config.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load docker/torchserve/render_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_config = load_render_config()
read_properties = render_config.read_properties


def free_loopback_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM))) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def key_expired(entry: Mapping[str, str]) -> bool:
    """Whether a ``key_file.json`` entry's ``expiration time`` (a Java ``Instant``) has passed."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", entry["expiration time"]).replace("Z", "+00:00")
    return datetime.fromisoformat(text) <= datetime.now(UTC)


def current_key(key_file: Path, management_url: str, kind: str) -> str:
    """The ``inference`` or ``management`` key in ``key_file``, renewed with the API key once expired."""
    keys = json.loads(key_file.read_text())
    if kind == "API" or not key_expired(keys[kind]):
        return keys[kind]["key"]
    r = httpx.get(f"{management_url}/token", params={"type": kind},
                  headers={"Authorization": f"Bearer {keys['API']['key']}"}, timeout=10.0)
    r.raise_for_status()
    return json.loads(key_file.read_text())[kind]["key"]


@dataclass(frozen=True)
class TorchServe:
    """A running TorchServe: its loopback URLs, the config it runs with, current keys on demand."""

    root: Path
    config: Path
    inference_url: str
    management_url: str
    metrics_url: str
    pid: int
    stop: Callable[[], list[str]] = field(repr=False)

    @property
    def key_file(self) -> Path:
        return self.root / "key_file.json"

    def key(self, kind: str = "inference") -> str:
        return current_key(self.key_file, self.management_url, kind)

    def auth(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(kind)}"}

    def logs(self, limit: int = 6000) -> str:
        """The tail of every TorchServe log (for assertion messages)."""
        parts = []
        for path in sorted((self.root / "logs").glob("*.log")) + [self.root / "stdout.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-limit:]}")
        return "\n".join(parts)


def write_config(root: Path, model_store: Path, models: Sequence[str],
                 overrides: Mapping[str, str] | None = None) -> Path:
    """The shipped config rendered as the entry point renders it (bind address 127.0.0.1, exactly
    ``models``, this model store), then only its ports moved to free loopback ports."""
    props = render_config.render(read_properties(SHIPPED_CONFIG), bind="127.0.0.1", models=models,
                                 model_store=str(model_store))
    ports = free_loopback_ports(len(ADDRESS_KEYS) + len(GRPC_PORT_KEYS))
    for key, port in zip(ADDRESS_KEYS, ports, strict=False):
        url = urlsplit(props[key])
        props[key] = f"{url.scheme}://{url.hostname}:{port}"
    for key, port in zip(GRPC_PORT_KEYS, ports[len(ADDRESS_KEYS):], strict=True):
        props[key] = str(port)
    props.update(overrides or {})
    path = root / "config.properties"
    path.write_text(render_config.format_properties(props))
    return path


def _models_ready(management_url: str, token: str, models: Sequence[str]) -> str | None:
    """``None`` when each of ``models`` is registered with all its workers READY, else what is missing."""
    headers = {"Authorization": f"Bearer {token}"}
    registered = {m["modelName"] for m in httpx.get(f"{management_url}/models", headers=headers,
                                                      timeout=5.0).json()["models"]}
    for name in models:
        if name not in registered:
            return f"{name} not registered (yet)"
        (desc,) = httpx.get(f"{management_url}/models/{name}", headers=headers, timeout=5.0).json()
        states = [w["status"] for w in desc["workers"]]
        if not states or any(s != "READY" for s in states):
            return f"{name} workers {states}"
    return None


def _wait_ready(proc: subprocess.Popen, urls: dict[str, str], key_file: Path, models: Sequence[str],
                deadline: float) -> None:
    """Poll (bounded by ``deadline``) until ``/ping`` says Healthy and every model's workers are READY.

    ``/ping`` answers Healthy while workers are still loading, hence the management check. Both need
    keys, so this waits for ``key_file.json`` first.
    """
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"torchserve exited with status {proc.returncode} before it was ready")
        try:
            token = current_key(key_file, urls["management"], "inference")
            r = httpx.get(f"{urls['inference']}/ping", headers={"Authorization": f"Bearer {token}"}, timeout=5.0)
            last = f"/ping: {r.status_code} {r.text.strip()}"
            if r.status_code == 200 and r.json().get("status") == "Healthy":
                missing = _models_ready(urls["management"], current_key(key_file, urls["management"], "management"),
                                        models)
                if missing is None:
                    return
                last = missing
        except (OSError, ValueError, KeyError) as exc:  # key file not written yet, or a partial answer
            last = repr(exc)
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1.0)
    raise TimeoutError(f"torchserve was not ready within {START_TIMEOUT_S:.0f} s (last: {last})")


@contextmanager
def run_torchserve(root: Path, model_store: Path, models: Sequence[str],
                   overrides: Mapping[str, str] | None = None) -> Iterator[TorchServe]:
    """Start TorchServe (foreground, config snapshots off) in ``root`` serving ``models`` (``NAME.mar`` in
    ``model_store``); stop it and every worker after. ``overrides`` replace config keys (tests only)."""
    torchserve = Path(sys.executable).with_name("torchserve")
    if not torchserve.is_file():
        raise FileNotFoundError(f"{torchserve} is missing: pip install -e '.[dev]' (TorchServe is in the dev extra)")
    if not java_available():
        raise FileNotFoundError("TorchServe needs Java 11+ (`java` on PATH or JAVA_HOME); "
                                "scripts/setup-system.sh installs openjdk-17-jre-headless as root")
    config = write_config(root, model_store, models, overrides)
    props = read_properties(config)
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
        urls = {kind: props[f"{kind}_address"] for kind in ("inference", "management", "metrics")}
        _wait_ready(proc, urls, key_file, models, time.monotonic() + START_TIMEOUT_S)
        java = next(p for p in psutil.Process(proc.pid).children() if "java" in p.name())
        yield TorchServe(
            root=root,
            config=config,
            inference_url=urls["inference"],
            management_url=urls["management"],
            metrics_url=urls["metrics"],
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
