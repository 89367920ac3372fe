"""Static checks of the container files that need no Docker engine.

hadolint and ``docker-compose config`` (scripts/lint-docker.sh) check syntax and schema; these
check the project's own rules: one source of truth for dependencies, the images' security
posture, compose wiring to the service's real settings, and TorchServe's locked-down config.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from service.settings import Settings
from tests.docker.torchserve_runner import SHIPPED_CONFIG, read_properties

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile", "cuda": REPO / "docker" / "Dockerfile.cuda"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


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
            assert all(p.startswith("/tmp/") and p.endswith(".txt") for p in packages), args
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
    assert '--index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt' in text


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
    assert loadtest["depends_on"] == {"api": {"condition": "service_healthy"}}
    assert loadtest["entrypoint"] == ["python", "-m", "loadtest"]
    assert "./loadtest:/app/loadtest:ro" in loadtest["volumes"]
    assert (REPO / "loadtest" / "locustfile.py").is_file()
    assert "--out=/reports" in loadtest["command"]


def test_torchserve_config_is_locked_down() -> None:
    props = read_properties(SHIPPED_CONFIG)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert re.fullmatch(r"http://(127\.0\.0\.1|0\.0\.0\.0):\d+", props[key]), key
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    assert props["allowed_urls"] == f"file://{props['model_store']}/.*"
    assert props["install_py_dep_per_model"] == "false"
    assert props["metrics_mode"] == "prometheus"
    assert props["load_models"] == "all"


@pytest.mark.parametrize("script", ["docker/entrypoint.sh", "docker/torchserve/entrypoint.sh",
                                    "docker/train-job.sh", "scripts/lint-docker.sh"])
def test_shell_scripts_parse_and_are_executable(script: str) -> None:
    path = REPO / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    shell = "bash" if path.read_text().startswith("#!/usr/bin/env bash") else "sh"
    subprocess.run([shell, "-n", str(path)], check=True, timeout=30)
