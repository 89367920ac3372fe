#!/usr/bin/env bash
# Container test (scripts/test.sh runs it, and so CI does): build the images and run them as docs/containers.md
# tells users to, then compare their answers with the in-process Predictor's on the same weights and images.
#
#   engine     Docker when `docker info` answers; else podman. Where ../shared/tools/podman-env.sh exists (this
#              kind of machine; root) it is run first: it installs podman and builds a local stand-in for
#              python:3.11-slim-bookworm, and its last line is the `podman build` flags. podman-compose comes
#              from PyPI into .venv-podman-compose/ (PODMAN_COMPOSE_VERSION).
#   wheelhouse podman only: the wheels of exactly the versions in the host's .venv, fetched with its pip (on
#              this kind of machine from local package folders; no multi-GB download), mounted into the build
#              with a pip.conf that says `no-index`. The Dockerfile is unchanged by it; users' builds use the
#              indexes (TORCH_INDEX_URL) as before. Skipped when .venv is not Python 3.11 (the image's).
#   build      targets api, torchserve and loadtest of docker/Dockerfile (api and torchserve share the layer
#              with torch), labelled gnws.container-test=1.
#   weights    the tests' synthetic reference weights (tests/fixtures/make_weights.py, digest-checked against
#              tests/fixtures/manifests/digests.json) baked with `gnws convert --bake`, packed by this (non-10001)
#              user and imported into a new volume with the offline recipe of docs/containers.md.
#   api        GNWS_OFFLINE=1 compose up -d (the default service); /readyz; the README's curl; /v1/detect and
#              /v1/segment answers equal the in-process Predictor's (tests/torchserve/detections.py's rule); the
#              health check command; the volume's files are not uid 10001's and the service (uid 10001) reads them.
#   torchserve the torchserve profile; its answers equal the API's JSON.
#   loadtest   the loadtest profile against api for GNWS_CT_LOADTEST_TIME; no server errors.
#   down       compose down keeps the weights volume.
# Stage times, image sizes and disk use are printed at the end. Images, containers, volumes and the network
# made here are removed on exit (GNWS_CT_KEEP=1 keeps the images and the wheelhouse for a faster rerun).
#
# Settings: GNWS_CT_IMAGES (image ids in tests/fixtures/images), GNWS_CT_LOADTEST_TIME (15s), GNWS_CT_KEEP,
# GNWS_WHEELHOUSE (a folder kept between runs), GNWS_PODMAN_ENV, GNWS_CT_ENGINE (docker|podman), GNWS_CT_OUT.
# Exit status: 0 passed, or skipped because no engine can be had and CI is not set; 1 failed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

PROJECT=gnws-ct
LABEL=gnws.container-test=1
IMAGES_TAG=(gnws-ct:cpu gnws-ct-torchserve:cpu gnws-ct-loadtest:latest)
TARGETS=(api torchserve loadtest)
WEIGHTS_VOLUME=gnws-ct-weights
LOADTEST_VOLUME=gnws-ct-loadtest
FASTER=faster_rcnn_r50_fpn_gn_ws-all_1x_coco
MASK=mask_rcnn_r50_fpn_gn_ws-all_2x_coco
PODMAN_COMPOSE_VERSION=${PODMAN_COMPOSE_VERSION:-1.6.0}
PODMAN_ENV=${GNWS_PODMAN_ENV:-$REPO/../shared/tools/podman-env.sh}
CT_IMAGES=${GNWS_CT_IMAGES:-000000010764 000000125952 000000417285}
LOADTEST_TIME=${GNWS_CT_LOADTEST_TIME:-15s}
OUT=${GNWS_CT_OUT:-$REPO/out/container-test}
PY=$REPO/.venv/bin/python

say() { echo "container-test: $*"; }
fail() { echo "container-test: FAILED: $*" >&2; exit 1; }

# ------------------------------------------------------------------ stage clock
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
gib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1073741824 }'; }
disk_used() { df -B1 --output=used / | tail -n 1; }
declare -a STAGES=()
stage_name="" stage_start=$EPOCHREALTIME t0=$EPOCHREALTIME
stage() {
    if [ -n "$stage_name" ]; then STAGES+=("$(printf '%-40s %7s s' "$stage_name" "$(since "$stage_start")")"); fi
    stage_name=$1 stage_start=$EPOCHREALTIME
    [ -z "$1" ] || echo "== container-test: $1"
}

# ------------------------------------------------------------------ engine
stage "engine"
ENGINE=${GNWS_CT_ENGINE:-}
if [ -z "$ENGINE" ]; then
    if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
BUILD_FLAGS=()
if [ "$ENGINE" = podman ]; then
    if [ -f "$PODMAN_ENV" ] && [ "$(id -u)" = 0 ]; then
        env_out=$(bash "$PODMAN_ENV") || fail "$PODMAN_ENV failed"
        read -r -a BUILD_FLAGS <<< "$(tail -n 1 <<< "$env_out")"
    elif command -v podman >/dev/null; then
        BUILD_FLAGS=(--format docker)  # keeps HEALTHCHECK (OCI images have none)
    fi
    if ! command -v podman >/dev/null || ! podman info >/dev/null 2>&1; then
        why="no Docker engine answers and podman is not usable (podman-env.sh: $PODMAN_ENV, needs root)"
        if [ -n "${CI:-}" ]; then fail "$why"; fi
        say "SKIPPED: $why"
        exit 0
    fi
    pc=$REPO/.venv-podman-compose/$PODMAN_COMPOSE_VERSION
    if ! "$pc/bin/python" -m pip show podman-compose 2>/dev/null | grep -qx "Version: $PODMAN_COMPOSE_VERSION"; then
        mkdir -p "$REPO/.venv-podman-compose"
        echo "*" > "$REPO/.venv-podman-compose/.gitignore"
        python3 -m venv "$pc"
        "$pc/bin/python" -m pip install -q "podman-compose==$PODMAN_COMPOSE_VERSION"
    fi
    COMPOSE=("$pc/bin/podman-compose")
    say "podman $(podman version --format '{{.Client.Version}}'), podman-compose $PODMAN_COMPOSE_VERSION"
else
    if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
    say "docker $(docker version --format '{{.Server.Version}}'), $("${COMPOSE[@]}" version 2>/dev/null | head -n 1)"
fi
[ -x "$PY" ] || fail ".venv is missing: run scripts/setup.sh first (the comparison runs the in-process Predictor)"
command -v curl >/dev/null || fail "curl is missing (the README's requests use it)"

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/gnws-container-test.XXXXXX")
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
API_PORT=$(free_port) TS_PORT=$(free_port) TS_METRICS_PORT=$(free_port)
export COMPOSE_PROJECT_NAME=$PROJECT GNWS_OFFLINE=1 GNWS_BIND=127.0.0.1 \
    GNWS_IMAGE=${IMAGES_TAG[0]} GNWS_TORCHSERVE_IMAGE=${IMAGES_TAG[1]} GNWS_LOADTEST_IMAGE=${IMAGES_TAG[2]} \
    GNWS_WEIGHTS_VOLUME=$WEIGHTS_VOLUME GNWS_LOADTEST_VOLUME=$LOADTEST_VOLUME \
    GNWS_API_PORT=$API_PORT GNWS_TS_INFERENCE_PORT=$TS_PORT GNWS_TS_METRICS_PORT=$TS_METRICS_PORT
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f docker-compose.yml "$@"; }
ALL_PROFILES=(--profile torchserve --profile loadtest)
container_of() {  # the container of a compose service (Compose and podman-compose both set these labels)
    "$ENGINE" ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" | head -n 1
}

cleanup() {
    local rc=$1
    set +e
    cleanup_start=$EPOCHREALTIME
    stage ""
    if [ "$rc" != 0 ]; then
        for service in api torchserve loadtest; do
            c=$(container_of "$service")
            [ -z "$c" ] || { echo "---- logs of $service (last 60 lines)"; "$ENGINE" logs --tail 60 "$c" 2>&1; }
        done
    fi
    compose "${ALL_PROFILES[@]}" down >/dev/null 2>&1
    for c in $("$ENGINE" ps -aq --filter "label=com.docker.compose.project=$PROJECT"); do "$ENGINE" rm -f "$c" >/dev/null 2>&1; done
    for v in "$WEIGHTS_VOLUME" "$LOADTEST_VOLUME" "${PROJECT}_gnws-mar"; do "$ENGINE" volume rm -f "$v" >/dev/null 2>&1; done
    "$ENGINE" network rm "${PROJECT}_default" >/dev/null 2>&1
    if [ "${GNWS_CT_KEEP:-0}" != 1 ]; then
        "$ENGINE" rmi -f "${IMAGES_TAG[@]}" >/dev/null 2>&1
        mapfile -t made < <("$ENGINE" images -aq --filter "label=$LABEL" | sort -u)
        [ "${#made[@]}" = 0 ] || "$ENGINE" rmi -f "${made[@]}" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
    echo "container-test: $([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)"); clean-up took" \
        "$(since "$cleanup_start") s"
    exit "$rc"
}
trap 'cleanup $?' EXIT
trap 'exit 130' INT TERM
mkdir -p "$OUT"
disk_before=$(disk_used)
free=$(df -B1 --output=avail / | tail -1)
[ "$free" -gt $((16 * 1073741824)) ] || fail "only $(gib "$free") GiB free on /; the images, their build and the wheelhouse need about 16"

# ------------------------------------------------------------------ wheelhouse (podman builds only)
WHEEL_FLAGS=()
if [ "$ENGINE" = podman ]; then
    stage "wheelhouse"
    if [ "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = 3.11 ]; then
        WHEELHOUSE=${GNWS_WHEELHOUSE:-$WORK/wheelhouse}
        mkdir -p "$WHEELHOUSE"
        {
            echo "pip>=24"; echo setuptools; echo wheel
            "$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))'
            "$PY" docker/pyproject_requirements.py pyproject.toml --torch
            "$PY" docker/pyproject_requirements.py pyproject.toml --extra torchserve --extra train --extra loadtest
        } > "$WORK/requirements.txt"
        "$PY" -m pip freeze --all --exclude-editable | grep -E '^[A-Za-z0-9._-]+==' > "$WORK/constraints.txt"
        if "$PY" -m pip download -q --only-binary=:all: -d "$WHEELHOUSE" -r "$WORK/requirements.txt" \
                -c "$WORK/constraints.txt" 2> >(grep -v 'is ignored: it is neither' >&2); then
            printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\nno-index = true\nfind-links = /wheelhouse\n' \
                > "$WORK/pip.conf"
            # replace podman-env's pip.conf mount (it only names the CA bundle, which this one names too)
            for i in "${!BUILD_FLAGS[@]}"; do
                if [[ "${BUILD_FLAGS[$i]}" == *:/etc/pip.conf* ]]; then unset "BUILD_FLAGS[$((i - 1))]" "BUILD_FLAGS[$i]"; fi
            done
            WHEEL_FLAGS=(-v "$WHEELHOUSE:/wheelhouse:ro" -v "$WORK/pip.conf:/etc/pip.conf:ro")
            say "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
        else
            say "pip download failed: building from the package indexes instead"
        fi
    else
        say ".venv is not Python 3.11 (the image's): building from the package indexes"
    fi
fi

# ------------------------------------------------------------------ build
for i in 0 1 2; do
    stage "build ${TARGETS[$i]}"
    if [ "$ENGINE" = podman ]; then
        podman build --layers "${BUILD_FLAGS[@]}" "${WHEEL_FLAGS[@]}" --label "$LABEL" \
            -f docker/Dockerfile --target "${TARGETS[$i]}" -t "${IMAGES_TAG[$i]}" . > "$WORK/build-${TARGETS[$i]}.log" 2>&1 \
            || { tail -n 40 "$WORK/build-${TARGETS[$i]}.log"; fail "podman build --target ${TARGETS[$i]}"; }
    else
        docker build ${GNWS_CT_TORCH_INDEX_URL:+--build-arg TORCH_INDEX_URL="$GNWS_CT_TORCH_INDEX_URL"} --label "$LABEL" \
            -f docker/Dockerfile --target "${TARGETS[$i]}" -t "${IMAGES_TAG[$i]}" . > "$WORK/build-${TARGETS[$i]}.log" 2>&1 \
            || { tail -n 40 "$WORK/build-${TARGETS[$i]}.log"; fail "docker build --target ${TARGETS[$i]}"; }
    fi
done
disk_built=$(disk_used)

# ------------------------------------------------------------------ weights: reference weights into a volume
stage "weights (make, bake, import, export)"
mkdir -p "$WORK/weights/models"
for stem in "$FASTER" "$MASK"; do
    line=$("$PY" tests/fixtures/make_weights.py "tests/fixtures/manifests/$stem.json" "$WORK/$stem.pth")
    want=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
        tests/fixtures/manifests/digests.json "$stem")
    [[ "$line" == *"sha256 $want "* ]] || fail "make_weights gave other weights for $stem than digests.json: $line"
    "$REPO/.venv/bin/gnws" convert "$WORK/$stem.pth" --model "$stem" -o "$WORK/weights/models/$stem.safetensors" \
        --bake 2>&1 | tail -n 1
    rm -f "$WORK/$stem.pth"
done
# docs/containers.md, "Offline hosts": a folder with the volume's layout, packed, imported into a new volume
tar -cf "$WORK/gnws-weights.tar" -C "$WORK/weights" .
"$ENGINE" volume create "$WEIGHTS_VOLUME" >/dev/null
(cd "$WORK" && "$ENGINE" run --rm --user 0 -v "$WEIGHTS_VOLUME":/v -v "$PWD":/in:ro --entrypoint tar "${IMAGES_TAG[0]}" \
    -xf /in/gnws-weights.tar -C /v)
# ... and its export command, as this user, gives the same files back
mkdir -p "$WORK/export"
(cd "$WORK/export" && "$ENGINE" run --rm --user "$(id -u):$(id -g)" -v "$WEIGHTS_VOLUME":/v:ro -v "$PWD":/out \
    --entrypoint tar "${IMAGES_TAG[0]}" -cf /out/gnws-weights.tar -C /v .)
diff <(tar -tvf "$WORK/gnws-weights.tar" | awk '{print $3, $6}' | sort) \
    <(tar -tvf "$WORK/export/gnws-weights.tar" | awk '{print $3, $6}' | sort) || fail "the exported volume differs"
rm -rf "$WORK/export" "$WORK/gnws-weights.tar"
say "volume $WEIGHTS_VOLUME: imported and exported with the offline recipe of docs/containers.md"

# ------------------------------------------------------------------ api: compose up, offline
stage "api: compose up until /readyz"
compose up -d > "$WORK/up-api.log" 2>&1 || { cat "$WORK/up-api.log"; fail "compose up"; }
API=http://127.0.0.1:$API_PORT
api_c=$(container_of api)
[ -n "$api_c" ] || fail "compose up started no api container"
deadline=$((SECONDS + 300))
until curl -fsS "$API/readyz" >/dev/null 2>&1; do
    [ "$("$ENGINE" inspect -f '{{.State.Running}}' "$api_c")" = true ] || fail "the api container stopped"
    [ "$SECONDS" -lt "$deadline" ] || fail "$API/readyz did not answer 200 within 300 s"
    sleep 1
done
ready_s=$(since "$stage_start")

stage "api: volume, health check, README curl"
"$ENGINE" exec "$api_c" python -c '
import os, pathlib, sys
uid = os.getuid()
files = sorted(pathlib.Path("/var/lib/gnws/models").glob("*.safetensors"))
if uid != 10001 or len(files) != 2:
    sys.exit(f"expected uid 10001 and two model files, got uid {uid} and {files}")
for f in files:
    st = f.stat()
    with f.open("rb") as fh:
        fh.read(1 << 20)
    print(f"{f.name}: owner uid {st.st_uid}, mode {st.st_mode & 0o777:o}, read by uid {uid}")
    if st.st_uid == 10001:
        sys.exit("the files belong to uid 10001: this checks nothing")
' || fail "the service's uid cannot read the volume filled by uid $(id -u)"
if [ "$ENGINE" = podman ]; then
    podman healthcheck run "$api_c" || fail "podman healthcheck run: unhealthy"
    say "health check (podman healthcheck run): healthy"
else
    mapfile -t hc < <(docker inspect -f '{{range .Config.Healthcheck.Test}}{{println .}}{{end}}' "$api_c" | sed '/^$/d')
    [ "${hc[0]}" = CMD ] || fail "unexpected health check form: ${hc[*]}"
    docker exec "$api_c" "${hc[@]:1}" || fail "the health check command failed"
    say "health check command: ok (engine state: $(docker inspect -f '{{.State.Health.Status}}' "$api_c"))"
fi
# The README's request, as written there (but for the port)
n=$(curl -fsS -F file=@tests/fixtures/images/000000010764.jpg "$API/v1/detect" \
    | "$PY" -c 'import json, sys; print(len(json.load(sys.stdin)["images"][0]["detections"]))')
say "README curl: 000000010764.jpg, $n detections"

stage "api: answers vs in-process Predictor"
compare() { "$PY" - "$@" <<'PY'
"""Answers of the containers compared with the in-process Predictor's, by tests/torchserve/detections.py's rule."""
import json
import sys
import time
import urllib.request
import warnings
from pathlib import Path

sys.path.insert(0, ".")
with warnings.catch_warnings():  # fastapi.testclient's deprecation notice (detections.py imports it)
    warnings.simplefilter("ignore")
    from tests.torchserve.detections import assert_same_detections, assert_same_response

FASTER, MASK = "faster_rcnn_r50_fpn_gn_ws-all_1x_coco", "mask_rcnn_r50_fpn_gn_ws-all_2x_coco"
ENDPOINT = {FASTER: "/v1/detect", MASK: "/v1/segment"}
IMAGES = Path("tests/fixtures/images")


def post(url, body, headers=None):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg", **(headers or {})})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.load(r)


def worst(got, want):
    ds = max((abs(g["score"] - w["score"]) for g, w in zip(got, want)), default=0.0)
    db = max((abs(a - b) for g, w in zip(got, want) for a, b in zip(g["bbox_xyxy"], w["bbox_xyxy"])), default=0.0)
    return f"max |d score| {ds:.1e}, max |d box| {db:.1e} px"


mode, *args = sys.argv[1:]
if mode == "api":
    api, weights, out, *ids = args
    import torch
    from models.predictor import Predictor

    torch.set_num_threads(2)
    answers = {}
    for stem in (FASTER, MASK):
        predictor = Predictor.load(f"{weights}/{stem}.safetensors", device="cpu", model_name=stem)
        for image_id in ids:
            body = (IMAGES / f"{image_id}.jpg").read_bytes()
            t = time.monotonic()
            got = post(api + ENDPOINT[stem], body)
            t_api = time.monotonic() - t
            t = time.monotonic()
            want = predictor.predict(body)
            t_local = time.monotonic() - t
            (image,) = got["images"]
            if not want:
                sys.exit(f"{stem} found nothing in {image_id}: the reference weights give detections there")
            assert_same_detections(image["detections"], want)
            if stem == MASK:
                assert all("segmentation" in d for d in image["detections"])
            answers[f"{stem}/{image_id}"] = got
            print(f"  {ENDPOINT[stem]:<12} {image_id}: {len(want):3d} detections, equal to the Predictor's "
                  f"({worst(image['detections'], want)}; {t_api:.1f} s in the container, {t_local:.1f} s here)")
    Path(out).write_text(json.dumps(answers))
elif mode == "torchserve":
    url, token, answers_file, *ids = args
    answers = json.loads(Path(answers_file).read_text())
    for stem in (FASTER, MASK):
        for image_id in ids:
            body = (IMAGES / f"{image_id}.jpg").read_bytes()
            got = post(f"{url}/predictions/{stem}", body, {"Authorization": f"Bearer {token}"})
            want = answers[f"{stem}/{image_id}"]
            assert_same_response(got, want, compare_batch_size=False)
            print(f"  {stem} {image_id}: {len(got['images'][0]['detections']):3d} detections, the API's JSON "
                  f"({worst(got['images'][0]['detections'], want['images'][0]['detections'])})")
elif mode == "loadtest":
    summary = json.loads(Path(args[0]).read_text())
    fails = summary["failures"]
    print(f"  {summary['requests']} requests in {summary['run_time']} with {summary['users']} users, "
          f"{summary['requests_per_s'] or 0:.2f}/s, p50 {summary['latency_ms']['p50']} ms; failures {fails['total']} "
          f"(overload {fails['overload_429_503']}, server errors {fails['server_5xx']})")
    if not summary["requests"] or fails["server_5xx"]:
        sys.exit("the load test made no request or got server errors")
PY
}
# shellcheck disable=SC2086  # the image ids are words
compare api "$API" "$WORK/weights/models" "$WORK/api-answers.json" $CT_IMAGES | tee "$OUT/api.txt" \
    || fail "the API's answers differ from the in-process Predictor's"

# ------------------------------------------------------------------ torchserve
stage "torchserve: up until healthy"
compose --profile torchserve up -d torchserve > "$WORK/up-torchserve.log" 2>&1 || { cat "$WORK/up-torchserve.log"; fail "compose up torchserve"; }
ts_c=$(container_of torchserve)
[ -n "$ts_c" ] || fail "compose started no torchserve container"
deadline=$((SECONDS + 600))
healthy() {
    if [ "$ENGINE" = podman ]; then podman healthcheck run "$ts_c" >/dev/null 2>&1
    else docker exec "$ts_c" python /opt/gnws/torchserve/healthcheck.py >/dev/null 2>&1; fi
}
until healthy; do
    [ "$("$ENGINE" inspect -f '{{.State.Running}}' "$ts_c")" = true ] || fail "the torchserve container stopped"
    if [ "$SECONDS" -ge "$deadline" ]; then
        "$ENGINE" exec "$ts_c" python /opt/gnws/torchserve/healthcheck.py
        fail "torchserve was not healthy within 600 s"
    fi
    sleep 3
done
ts_ready_s=$(since "$stage_start")
stage "torchserve: answers vs the API's"
token=$(compose --profile torchserve exec -T torchserve python /opt/gnws/torchserve/keys.py inference 2>/dev/null | tail -n 1)
[ -n "$token" ] || fail "keys.py printed no inference key"
# shellcheck disable=SC2086
compare torchserve "http://127.0.0.1:$TS_PORT" "$token" "$WORK/api-answers.json" $CT_IMAGES | tee "$OUT/torchserve.txt" \
    || fail "TorchServe's answers differ from the API's"
"$ENGINE" stop "$ts_c" >/dev/null  # frees the CPU for the load test

# ------------------------------------------------------------------ loadtest
stage "loadtest: $LOADTEST_TIME against api"
GNWS_LOADTEST_RUN_TIME=$LOADTEST_TIME GNWS_LOADTEST_USERS=2 GNWS_LOADTEST_SPAWN_RATE=2 \
    compose --profile loadtest up -d loadtest > "$WORK/up-loadtest.log" 2>&1 || { cat "$WORK/up-loadtest.log"; fail "compose up loadtest"; }
lt_c=$(container_of loadtest)
[ -n "$lt_c" ] || fail "compose started no loadtest container"
lt_rc=$(timeout 300 "$ENGINE" wait "$lt_c" | tail -n 1) || fail "the load test did not end within 300 s"
"$ENGINE" logs "$lt_c" > "$OUT/loadtest.log" 2>&1
[ "$lt_rc" = 0 ] || { tail -n 30 "$OUT/loadtest.log"; fail "the load test exited with $lt_rc"; }
rm -rf "$OUT/reports" && mkdir -p "$OUT/reports"
"$ENGINE" cp "$lt_c:/reports/." "$OUT/reports/"
compare loadtest "$OUT/reports/summary.json" | tee "$OUT/loadtest.txt" || fail "load test"

# ------------------------------------------------------------------ down
stage "compose down"
compose "${ALL_PROFILES[@]}" down > "$WORK/down.log" 2>&1 || { cat "$WORK/down.log"; fail "compose down"; }
"$ENGINE" volume inspect "$WEIGHTS_VOLUME" >/dev/null 2>&1 || fail "compose down removed the weights volume"
say "compose down kept the volume $WEIGHTS_VOLUME"
stage ""

# ------------------------------------------------------------------ report
{
    echo "container test: $ENGINE, $(date -u +%FT%TZ), $(nproc) CPUs"
    echo "stage times:"
    printf '  %s\n' "${STAGES[@]}"
    printf '  %-40s %7s s\n' "total (before clean-up)" "$(since "$t0")"
    printf 'time to ready: api %.1f s after compose up, torchserve %.1f s\n' "$ready_s" "$ts_ready_s"
    echo "image sizes:"
    for tag in "${IMAGES_TAG[@]}"; do
        printf '  %-28s %s GB\n' "$tag" "$(awk -v b="$("$ENGINE" image inspect -f '{{.Size}}' "$tag")" 'BEGIN { printf "%.2f", b / 1e9 }')"
    done
    echo "disk: +$(gib $((disk_built - disk_before))) GiB after the builds, +$(gib $(($(disk_used) - disk_before))) GiB at the end (before clean-up)"
} | tee "$OUT/summary.txt"
