"""``gnws serve``: run the detection service under uvicorn.

Flags override ``GNWS_*`` environment variables (see :class:`service.settings.Settings`). Weights
are checked before uvicorn starts, so missing ones end the command at once with the
``gnws fetch`` message (exit status 2, printed by ``gnws/cli.py``). SIGINT (Ctrl+C) or SIGTERM
(``docker stop``, Kubernetes) shut the server down gracefully: open requests finish, and the
command exits with status 0.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gnws.request.errors import ConfigurationError

from .settings import Settings

logger = logging.getLogger(__name__)

# flag -> Settings field (None: same name with dashes as underscores)
_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--host", {"help": "address to bind (default 127.0.0.1; 0.0.0.0 exposes it on every interface)"}),
    ("--port", {"type": int, "help": "port (default 8000)"}),
    ("--detect-model", {"help": "zoo key or .safetensors behind /v1/detect ('none' disables)"}),
    ("--segment-model", {"help": "zoo key or .safetensors behind /v1/segment ('none' disables)"}),
    ("--extra-models", {"help": "comma-separated further models selectable with ?model=NAME"}),
    ("--device", {"help": "auto, cpu, cuda, cuda:1, ..."}),
    ("--precision", {"help": "fp32 (exact, default), bf16 (AVX-512 BF16/AMX CPUs, CUDA) or fp16 (CUDA)"}),
    ("--model-precision", {"metavar": "NAME=PRECISION,...", "help": "per served model, overriding --precision"}),
    ("--torch-threads", {"type": int, "help": "intra-op threads for inference"}),
    ("--max-batch-size", {"type": int, "help": "most images per forward pass"}),
    ("--max-batch-delay-ms", {"type": float, "help": "wait for more same-shape images (ms)"}),
    ("--batched-forward", {"action": argparse.BooleanOptionalAction,
                           "help": "one forward pass per batch of equal padded shapes (default: on CUDA only)"}),
    ("--queue-size", {"type": int, "help": "images waiting per model before 429"}),
    ("--request-timeout-s", {"type": float, "help": "per-request queue + inference limit (then 503)"}),
    ("--max-upload-bytes", {"type": int, "help": "request body limit (413 above)"}),
    ("--max-files", {"type": int, "help": "images per multipart request"}),
    ("--max-pixels", {"type": int, "help": "decoded pixel limit (decompression-bomb guard, 413 above)"}),
    ("--max-in-flight", {"type": int, "help": "inference requests handled at once (429 above)"}),
    ("--retry-after-s", {"type": int, "help": "least Retry-After seconds on 429/503"}),
    ("--image-scale", {"help": "MAX,MIN test scale instead of 1333,800 (smoke tests only)"}),
    ("--model-store", {"type": Path, "help": "folder reloads read from (default: GNWS_MODEL_STORE or the cache)"}),
    ("--cors-origins", {"help": "comma-separated browser origins allowed to call the API"}),
    ("--max-uploads", {"type": int, "help": "request bodies received at once (429 above)"}),
    ("--watch-store-s", {"type": float, "metavar": "SECONDS",
                         "help": "poll the model store and swap in new versions of served models"}),
    ("--offline", {"action": argparse.BooleanOptionalAction,
                   "help": "never download: stop, naming the missing file, when zoo weights are not here"}),
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP detection service (FastAPI under uvicorn)",
        description="Flags override the GNWS_* environment variables. The API key is read from GNWS_API_KEY "
        "only (a flag would show it in the process list).",
    )
    for flag, kwargs in _FLAGS:
        p.add_argument(flag, default=None, **kwargs)
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=None,
                   help="skip the warm-up forward pass per model")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    ray = p.add_argument_group("Ray Serve (pip install 'gnws[ray]'; see docs/scaling.md)")
    ray.add_argument("--ray", metavar="ADDRESS", help="deploy on the Ray cluster at ADDRESS (e.g. 10.0.0.5:6379, or "
                     "auto) instead of running uvicorn here: this app as the ingress, forward passes on replicas")
    ray.add_argument("--replicas", type=int, default=1, help="inference replicas (the minimum with --max-replicas)")
    ray.add_argument("--max-replicas", type=int, help="autoscale up to this many replicas by ongoing requests")
    ray.add_argument("--max-replicas-per-node", type=int, help="spread replicas over nodes (1: one per node)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (its torch threads too)")
    p.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """:class:`~service.settings.Settings` from the environment with the given flags on top."""
    overrides = {}
    for flag, _ in (*_FLAGS, ("--warmup", {})):
        field = flag.lstrip("-").replace("-", "_")
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"invalid settings: {problems}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from models.fetch import prepare_zoo_models
    from models.precision import check_precision, resolve_device

    from .app import create_app
    from .registry import resolve_startup_source
    from .server import run_until_stopped, uvicorn_config

    settings = settings_from_args(args)
    # Zoo models missing here are downloaded and baked first (never when offline: a missing one then
    # stops the command, naming the file); then every source is checked before uvicorn starts
    # (the lifespan repeats this check).
    prepare_zoo_models(settings.model_sources(), offline=settings.offline, store=settings.model_store)
    for source in settings.model_sources():
        ref = resolve_startup_source(source, settings.model_store)
        check_precision(settings.precision_for(ref.name), resolve_device(settings.device))
    if args.ray:
        from .ray_serve import run

        if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
            raise ConfigurationError("--replicas must be >= 1 and --max-replicas >= --replicas")
        logger.info("deploying on the Ray cluster at %s; the proxy serves http://%s:%d", args.ray, settings.host,
                    settings.port)
        run(settings, args.ray, replicas=args.replicas, max_replicas=args.max_replicas,
            max_replicas_per_node=args.max_replicas_per_node, replica_cpus=args.replica_cpus)
        return 0
    app = create_app(settings)
    logger.info("serving on http://%s:%d (docs at /docs, page at /)", settings.host, settings.port)
    run_until_stopped(uvicorn_config(app, settings, log_level=args.log_level))
    return 0


