"""Static checks of the container files that need no Docker engine.

hadolint and ``docker-compose config`` (scripts/lint-docker.sh) check syntax and schema; these
check the project's own rules: one source of truth for dependencies, the images' security
posture, compose wiring to the service's real settings, and TorchServe's locked-down config.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil
import pytest
import yaml

from service.settings import Settings
from tests.torchserve.torchserve_runner import SHIPPED_CONFIG, read_properties, render_config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile", "cuda": REPO / "docker" / "Dockerfile.cuda"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
PROJECT_WHEEL = "/tmp/dist/*.whl"


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions per named build stage."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for word, rest in instructions(path):
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            out[current] = []
        elif current:
            out[current].append((word, rest))
    return out


def pip_installs(path: Path) -> list[list[str]]:
    """The argument lists of every ``pip install`` in RUN instructions."""
    found = []
    for word, rest in instructions(path):
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            args = shlex.split(command)
            if "pip" in args and "install" in args:
                found.append(args[args.index("install") + 1:])
    return found


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_pip_installs_only_from_pyproject(flavour: str) -> None:
    """Every pip line installs the project (with extras), a -r file printed from pyproject.toml, or pip's tools."""
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    installs = pip_installs(DOCKERFILES[flavour])
    assert installs
    for args in installs:
        packages = [a for a in args if not a.startswith("-") and not a.startswith("${") and "://" not in a]
        if "-r" in args:
            # files that pyproject_requirements.py printed (checked below: every one is written by it)
            assert all(p.endswith(".txt") for p in packages), args
        elif packages == [PROJECT_WHEEL]:
            pass  # the project's own wheel, built from the checkout (test_the_project_wheel_is_built_from_the_checkout)
        elif packages and packages[0].startswith("."):
            (target,) = packages
            match = re.fullmatch(r"\.(\[([a-z,]+)\])?", target)
            assert match, args
            used = set((match.group(2) or "").split(",")) - {""}
            assert used <= extras - {"dev"}, f"unknown or dev extra in {args}"
        else:
            names = {re.split(r"[<>=]", p)[0] for p in packages}
            assert names <= {"pip", "setuptools", "wheel"}, f"a package named outside pyproject.toml: {args}"


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_requirement_files_come_from_pyproject(flavour: str) -> None:
    """Every `pip install -r FILE` reads a file that the same RUN wrote with pyproject_requirements.py."""
    runs = [rest for word, rest in instructions(DOCKERFILES[flavour]) if word == "RUN" and " -r " in rest]
    assert runs
    for run in runs:
        for name in re.findall(r"pip install[^&;]* -r (\S+)", run):
            assert re.search(rf"pyproject_requirements\.py pyproject\.toml [^&;]*> {re.escape(name)}\b", run), run


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_the_project_wheel_is_built_from_the_checkout(flavour: str) -> None:
    """`builder` makes the wheel from the copied sources; the torch images install it from there."""
    all_stages = stages(DOCKERFILES[flavour])
    assert ("RUN", "pip wheel --no-deps --wheel-dir /dist .") in all_stages["builder"]
    for name in ("api", "torchserve", "train"):
        assert ("COPY", "--from=builder /dist/ /tmp/dist/") in all_stages[name], name
        assert any(word == "RUN" and rest.startswith(f"pip install {PROJECT_WHEEL} && rm -rf /tmp/dist")
                   for word, rest in all_stages[name]), name


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_torch_images_share_one_dependency_layer(flavour: str) -> None:
    """torch is installed once, in `deps`, and api/torchserve/train build FROM it (one copy on disk for all three;
    a code change rebuilds only the wheel layers)."""
    text = re.sub(r"\\\n", " ", DOCKERFILES[flavour].read_text())
    froms = {stage: parent for parent, stage in re.findall(r"^FROM (\S+) AS (\S+)$", text, flags=re.MULTILINE)}
    for name in ("api", "torchserve", "train", "builder"):
        assert froms[name] == "deps", f"{name} is FROM {froms[name]}"
    assert froms["deps"] == "runtime"
    torch_lines = [rest for word, rest in instructions(DOCKERFILES[flavour]) if word == "RUN" and "--torch" in rest]
    assert len(torch_lines) == 1, torch_lines
    assert not any(word == "COPY" and "/opt/venv" in rest for word, rest in instructions(DOCKERFILES[flavour]))


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_every_project_package_is_copied(flavour: str) -> None:
    copied = {rest.split()[0] for word, rest in stages(DOCKERFILES[flavour])["builder"] if word == "COPY"}
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied, f"{package}/ is a project package but the image does not COPY it"


@pytest.mark.parametrize(("flavour", "index"), [("cpu", "/whl/cpu"), ("cuda", "/whl/cu")])
def test_torch_comes_from_the_flavours_index(flavour: str, index: str) -> None:
    text = DOCKERFILES[flavour].read_text()
    (url,) = re.findall(r"ARG TORCH_INDEX_URL=(\S+)", text)
    assert url.startswith("https://download.pytorch.org" + index)
    assert '--index-url "${TORCH_INDEX_URL}" -r torch.txt' in text


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_runtime_stages_are_non_root_with_healthchecks(flavour: str) -> None:
    all_stages = stages(DOCKERFILES[flavour])
    assert list(all_stages)[-1] == "api", "api must be the default (last) target"
    for name in ("api", "torchserve", "train"):
        users = [rest for word, rest in all_stages[name] if word == "USER"]
        assert users, f"{name} has no USER"
        assert users[-1] == "10001:10001", f"{name}: last USER is {users}"
    for name, probe in (("api", "/healthz"), ("torchserve", "healthcheck.py")):
        checks = [rest for word, rest in all_stages[name] if word == "HEALTHCHECK"]
        assert len(checks) == 1, f"{name}: {checks}"
        assert probe in checks[0], f"{name}: {checks}"


def test_requirement_printer_reads_pyproject() -> None:
    script = REPO / "docker" / "pyproject_requirements.py"

    def run(*args: str) -> list[str]:
        out = subprocess.run([sys.executable, str(script), str(REPO / "pyproject.toml"), *args],
                             check=True, capture_output=True, text=True, timeout=60)
        return out.stdout.splitlines()

    deps = PYPROJECT["project"]["dependencies"]
    torch = run("--torch")
    assert torch == [d for d in deps if re.match(r"torch(vision)?\b", d)]
    assert len(torch) == 2
    assert run() == [d for d in deps if d not in torch]
    assert run("--extra", "torchserve")[-2:] == PYPROJECT["project"]["optional-dependencies"]["torchserve"]
    assert run("--extra", "loadtest", "--extras-only") == PYPROJECT["project"]["optional-dependencies"]["loadtest"]


def test_compose_api_env_names_are_service_settings() -> None:
    fields = {f"GNWS_{name.upper()}" for name in Settings.model_fields}
    weights_env = {"GNWS_HOME", "GNWS_OFFLINE", "GNWS_ZOO_MIRROR"}  # read by models/ and the entrypoint
    for service in ("api", "api-gpu"):
        env = set(COMPOSE["services"][service]["environment"])
        unknown = env - fields - weights_env
        assert not unknown, f"{service} sets variables the service does not read: {sorted(unknown)}"


def test_compose_services_and_profiles() -> None:
    services = COMPOSE["services"]
    profiles = {name: tuple(s.get("profiles", ())) for name, s in services.items()}
    assert profiles == {
        "api": (), "api-gpu": ("gpu",), "torchserve": ("torchserve",), "train": ("train",),
        "train-gpu": ("train-gpu",), "loadtest": ("loadtest",),
    }
    api = services["api"]
    assert api["ports"] == ["${GNWS_BIND:-127.0.0.1}:${GNWS_API_PORT:-8000}:8000"]
    assert "gnws-weights:/var/lib/gnws" in api["volumes"]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["restart"] == "unless-stopped"
    for name in ("api-gpu", "train-gpu"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
    train = services["train"]
    assert {"gnws-weights:/var/lib/gnws", "gnws-runs:/runs"} <= set(train["volumes"])
    assert train["environment"]["GNWS_MODEL_STORE"] == api["environment"]["GNWS_MODEL_STORE"]
    loadtest = services["loadtest"]
    # no health condition: podman never reports one; the entrypoint waits for /readyz instead
    assert loadtest["depends_on"] == ["api"]
    assert loadtest["environment"]["GNWS_LOADTEST_WAIT_URL"] == "${GNWS_LOADTEST_HOST:-http://api:8000}/readyz"
    assert loadtest["entrypoint"][-1] == "loadtest"
    assert loadtest["entrypoint"][2].endswith('exec python -m loadtest "$$@"')
    assert "./loadtest:/app/loadtest:ro" in loadtest["volumes"]
    assert (REPO / "loadtest" / "locustfile.py").is_file()
    assert "--out=/reports" in loadtest["command"]


def test_loadtest_reports_are_writable_by_default() -> None:
    """Reports default to a named volume, which Docker fills from the image's /reports: owned by the uid the
    service runs as. A bind mount (created by Docker as root) would not be writable by uid 10001."""
    loadtest = COMPOSE["services"]["loadtest"]
    reports = next(v for v in loadtest["volumes"] if v.endswith(":/reports"))
    assert reports == "${GNWS_LOADTEST_REPORTS:-gnws-loadtest}:/reports"
    assert COMPOSE["volumes"]["gnws-loadtest"] == {"name": "${GNWS_LOADTEST_VOLUME:-gnws-loadtest}"}
    assert loadtest["user"] == "${GNWS_UID:-10001}:${GNWS_GID:-10001}"
    stage = stages(DOCKERFILES["cpu"])["loadtest"]
    run = " ".join(rest for word, rest in stage if word == "RUN")
    assert "mkdir /reports" in run
    assert "chown gnws:gnws /reports" in run
    assert "--uid 10001" in run
    assert ("VOLUME", '["/reports"]') in stage
    users = [rest for word, rest in stage if word == "USER"]
    assert users[-1] == "10001:10001"


def test_loadtest_entrypoint_explains_an_unwritable_reports_folder(tmp_path: Path) -> None:
    """The compose entrypoint's shell, as the container runs it (compose turns $$ into $), with /reports moved."""
    script = COMPOSE["services"]["loadtest"]["entrypoint"][2].replace("$$", "$")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(reports: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", script.replace("/reports", str(reports)), "loadtest", "--help"],
                              env=env, capture_output=True, text=True, timeout=60)

    missing = run(tmp_path / "not-there")  # not writable, whoever runs this (root included)
    assert missing.returncode == 2
    assert "cannot write the reports folder" in missing.stderr
    assert "GNWS_UID=$(id -u)" in missing.stderr
    ok = run(tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "--out" in ok.stdout


def test_loadtest_entrypoint_waits_for_readyz(tmp_path: Path) -> None:
    """The load test starts once GNWS_LOADTEST_WAIT_URL answers 200, and gives up after GNWS_LOADTEST_WAIT_S with a
    sentence, instead of depending on a health state that podman never reports."""
    import http.server
    import threading

    script = COMPOSE["services"]["loadtest"]["entrypoint"][2].replace("$$", "$").replace("/reports", str(tmp_path))

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/readyz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        def run(url: str) -> subprocess.CompletedProcess[str]:
            env = {**os.environ, "PYTHONPATH": str(REPO), "GNWS_LOADTEST_WAIT_URL": url, "GNWS_LOADTEST_WAIT_S": "1"}
            return subprocess.run(["sh", "-c", script, "loadtest", "--help"], env=env, capture_output=True, text=True,
                                  timeout=60)

        ready = run(f"{base}/readyz")
        assert ready.returncode == 0, ready.stderr
        assert "--out" in ready.stdout
        never = run(f"{base}/not-ready")
        assert never.returncode == 3
        assert "did not answer 200 within 1 s" in never.stderr
    finally:
        server.shutdown()


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_compose_file_reads_the_same_in_podman_compose() -> None:
    """Constructs that podman-compose (>= 1.5) reads differently from Docker Compose are absent:
    - it splits a string `command`/`entrypoint` into words *before* substituting variables, so a `${...}` in one
      (e.g. `${GNWS_TRAIN_ARGS:---images-per-gpu 2}`) fails to parse or reaches the container as one word;
    - it substitutes a service's own `environment` values into the rest of that service when the host does not
      set the variable, so an environment name must not also be a `${NAME}` used elsewhere in the service
      (other than in its own value)."""
    for name, service in COMPOSE["services"].items():
        for key in ("command", "entrypoint"):
            if isinstance(service.get(key), str):
                assert "${" not in service[key], f"{name}.{key} interpolates inside a command string"
        env = service.get("environment") or {}
        if isinstance(env, dict):
            others = _strings({k: v for k, v in service.items() if k != "environment"})
            for var in env:
                pattern = re.compile(r"(?<!\$)\$\{" + re.escape(var) + r"\b")
                used = [s for s in others if pattern.search(s)]
                assert not used, f"{name}: environment {var} is also interpolated in {used}"


LISTENER_KEYS = ("inference_address", "management_address", "metrics_address")
GRPC_ADDRESS_KEYS = ("grpc_inference_address", "grpc_management_address")


def listener_hosts(props: dict[str, str]) -> dict[str, str]:
    """The host of every listener in a TorchServe config (HTTP and gRPC)."""
    hosts = {}
    for key in LISTENER_KEYS:
        match = re.fullmatch(r"http://(\[[0-9a-fA-F:.]+\]|[0-9.]+):\d+", props[key])
        assert match, f"{key}={props[key]}: expected http://<IP literal>:<port>"
        hosts[key] = match.group(1).strip("[]")
    for key in GRPC_ADDRESS_KEYS:
        hosts[key] = props[key]
    return hosts


def test_shipped_torchserve_config_is_locked_down() -> None:
    props = read_properties(SHIPPED_CONFIG)
    hosts = listener_hosts(props)
    assert set(hosts.values()) == {"127.0.0.1"}, hosts  # explicit, never a wildcard such as 0.0.0.0
    assert "0.0.0.0" not in SHIPPED_CONFIG.read_text().replace("# ", "")
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    assert props["allowed_urls"] == f"file://{props['model_store']}/.*"
    assert props["install_py_dep_per_model"] == "false"
    assert props["metrics_mode"] == "prometheus"
    assert props["enable_metrics_api"] == "true"
    assert "load_models" not in props, "the entry point names the models; `all` would serve stale archives"


def test_rendered_config_binds_one_interface_and_names_the_models() -> None:
    """What entrypoint.sh starts TorchServe with: public listeners on the given address, the rest on the
    loopback, exactly the configured models."""
    shipped = read_properties(SHIPPED_CONFIG)
    props = render_config.render(shipped, bind="172.18.0.5", models=["a", "b", "a"], model_store="/srv/mar")
    hosts = listener_hosts(props)
    assert hosts == {"inference_address": "172.18.0.5", "metrics_address": "172.18.0.5",
                     "management_address": "127.0.0.1", **dict.fromkeys(GRPC_ADDRESS_KEYS, "127.0.0.1")}
    assert props["inference_address"].endswith(":8080")
    assert props["metrics_address"].endswith(":8082")
    assert props["load_models"] == "a=a.mar,b=b.mar"
    assert (props["model_store"], props["allowed_urls"]) == ("/srv/mar", "file:///srv/mar/.*")
    v6 = render_config.render(shipped, bind="fd00::5", models=["a"])
    assert v6["inference_address"] == "http://[fd00::5]:8080"
    for wildcard in ("0.0.0.0", "::"):
        with pytest.raises(ValueError, match="wildcard"):
            render_config.render(shipped, bind=wildcard, models=["a"])
    with pytest.raises(ValueError, match="IP address"):
        render_config.render(shipped, bind="eth0", models=["a"])
    with pytest.raises(ValueError, match="GNWS_TORCHSERVE_MODELS"):
        render_config.render(shipped, bind="172.18.0.5", models=[])
    with pytest.raises(ValueError, match="must stay on the loopback"):
        render_config.render({**shipped, "management_address": "http://10.0.0.1:8081"}, bind="10.0.0.1",
                             models=["a"])


def test_default_bind_address_is_an_address_of_this_machine() -> None:
    """Without TS_BIND_ADDRESS the entry point binds to this machine's (the container's) own address."""
    chosen = render_config.bind_address({})
    assert not ipaddress.ip_address(chosen).is_unspecified
    local = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    assert chosen in local, f"{chosen} is not an address of any interface here: {sorted(local)}"
    assert render_config.bind_address({"TS_BIND_ADDRESS": "10.1.2.3"}) == "10.1.2.3"
    with pytest.raises(ValueError, match="wildcard"):
        render_config.bind_address({"TS_BIND_ADDRESS": "0.0.0.0"})


def test_render_config_cli_as_the_entrypoint_calls_it(tmp_path: Path) -> None:
    out = tmp_path / "effective.properties"
    script = REPO / "docker" / "torchserve" / "render_config.py"
    env = {**os.environ, "TS_BIND_ADDRESS": "127.0.0.1"}
    subprocess.run([sys.executable, str(script), "--template", str(SHIPPED_CONFIG), "--model-store", str(tmp_path),
                    "--out", str(out), "m1", "m2"], check=True, env=env, capture_output=True, timeout=60)
    props = read_properties(out)
    assert props["load_models"] == "m1=m1.mar,m2=m2.mar"
    assert set(listener_hosts(props).values()) == {"127.0.0.1"}
    env.update(TS_BIND_ADDRESS="0.0.0.0", TS_CONFIG_FILE=str(SHIPPED_CONFIG))  # the image sets TS_CONFIG_FILE
    bad = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "no.properties"), "m1"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "wildcard" in bad.stderr
    assert not (tmp_path / "no.properties").exists()
    entrypoint = (REPO / "docker" / "torchserve" / "entrypoint.sh").read_text()
    assert 'render_config.py" --template' in entrypoint
    assert '--ts-config "$effective"' in entrypoint
    # TorchServe 0.12 prefers TS_CONFIG_FILE (set in the image to the template) over --ts-config
    start = entrypoint.index("exec torchserve")
    assert 'export TS_CONFIG_FILE="$effective"' in entrypoint[:start]


@pytest.mark.parametrize("script", ["docker/entrypoint.sh", "docker/torchserve/entrypoint.sh",
                                    "docker/train-job.sh", "scripts/lint-docker.sh", "scripts/container-test.sh"])
def test_shell_scripts_parse_and_are_executable(script: str) -> None:
    path = REPO / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    shell = "bash" if path.read_text().startswith("#!/usr/bin/env bash") else "sh"
    subprocess.run([shell, "-n", str(path)], check=True, timeout=30)


def test_paths_named_in_container_files_and_docs_exist() -> None:
    """Files the container files and their docs point at (e.g. hadolint.yaml naming a test) exist; paths under
    /opt/gnws/torchserve/ are docker/torchserve/ copied into the image."""
    sources = [*sorted((REPO / "docker").rglob("*")), REPO / "docker-compose.yml", REPO / "docs" / "containers.md",
               REPO / "README.md", REPO / "scripts" / "lint-docker.sh", REPO / "scripts" / "setup-system.sh"]
    named: set[tuple[str, Path]] = set()
    for source in sources:
        if not source.is_file() or source.suffix in {".mar", ".pyc"}:
            continue
        text = source.read_text()
        for path in re.findall(r"\b((?:tests|scripts|docker)/[\w./-]+\.(?:py|sh|yaml|yml|properties))\b", text):
            named.add((path, source))
        for name in re.findall(r"/opt/gnws/torchserve/([\w.-]+\.(?:py|sh))", text):
            named.add((f"docker/torchserve/{name}", source))
    assert len(named) > 10
    missing = sorted(f"{path} (named in {source.relative_to(REPO)})" for path, source in named
                     if not (REPO / path).exists())
    assert not missing, missing
