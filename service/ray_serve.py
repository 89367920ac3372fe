"""gnws on Ray Serve: the FastAPI app as the ingress, N inference replicas across a cluster's nodes.

``gnws serve --ray ADDRESS --replicas N`` (or ``serve deploy deploy/ray/serve_config.yaml``)
deploys two Ray Serve deployments:

- :class:`GnwsIngress`, one replica: the whole gnws app (``/v1``, ``/v2``, limits, batching,
  metrics, reloads) built by :func:`service.app.create_app`. It never loads weights: its models
  are :class:`RemotePredictor` objects that read the model files' metadata (classes, scale) to
  decode, prepare and encode images, and send each forward pass to a replica;
- :class:`InferenceReplica`, ``N`` replicas (or autoscaled between bounds): each holds the served
  models' :class:`models.Predictor` and runs forward passes, one at a time.

Every forward pass carries the key of the weights it wants (file, size, mtime), so a replica that
Ray replaces after a reload loads the current weights on its first request, and a reload reaches
every replica: the ingress loads and warms the new file on every live replica
(``DeploymentHandle.broadcast``) before it swaps. A replica that dies under a forward pass is
retried once on another; if that fails too, the request gets 503 with ``Retry-After``. A full
replica queue is 429 with ``Retry-After``, like every other refusal of the app.

``/metrics`` on the ingress is the app's own view (every request passes through it); the
replicas' own figures (``ray_serve_*``: queue lengths, processing latency, restarts per replica)
are on each node's Ray metrics port. Answers name the replica that ran each image's forward
pass (``images[].worker``: replica id @ node id).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gnws.request.errors import NotReadyError, OverloadedError
from models import Predictor, PreparedImage, RawDetections
from models.resolve import ModelRef

from .settings import Settings

logger = logging.getLogger(__name__)

APP_NAME = "gnws"
RETRIES = 1  # a forward pass whose replica died runs once more, on another replica
CACHED_PREDICTORS = 4  # per replica: the served models' current and previous weights


@dataclass(frozen=True)
class WeightsKey:
    """Which weights a forward pass wants: a model file as it is now (a rewrite changes the key)."""

    name: str
    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, name: str, ref: ModelRef) -> WeightsKey:
        path = ref.materialize()
        stat = path.stat()
        return cls(name=name, path=str(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def replica_options(settings: Settings) -> dict[str, Any]:
    """What a replica needs to load a predictor as the app would (device, pixels, scale)."""
    return {"device": settings.device, "max_pixels": settings.max_pixels, "image_scale": settings.image_scale,
            "torch_threads": settings.torch_threads, "batched_forward": settings.batched_forward,
            "model_precision": dict(settings.model_precision), "precision": settings.precision}


class InferenceReplica:
    """A Ray Serve replica holding the served models; runs forward passes, one at a time."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        if options.get("torch_threads"):
            torch.set_num_threads(int(options["torch_threads"]))
        self._predictors: OrderedDict[WeightsKey, Predictor] = OrderedDict()
        self.worker = _worker_name()

    def _predictor(self, key: WeightsKey) -> Predictor:
        predictor = self._predictors.get(key)
        if predictor is None:
            start = time.perf_counter()
            precision = self.options["model_precision"].get(key.name, self.options["precision"])
            predictor = Predictor.load(key.path, device=self.options["device"], model_name=key.name,
                                       max_pixels=self.options["max_pixels"], image_scale=self.options["image_scale"],
                                       precision=precision)
            if self.options.get("batched_forward") is not None:
                predictor.batched_forward = self.options["batched_forward"]
            self._predictors[key] = predictor
            while len(self._predictors) > CACHED_PREDICTORS:
                self._predictors.popitem(last=False)
            logger.info("replica %s loaded %s from %s in %.1f s", self.worker, key.name, key.path,
                        time.perf_counter() - start)
        self._predictors.move_to_end(key)
        return predictor

    def load(self, key: WeightsKey) -> str:
        """Load (and warm up) ``key``'s weights ahead of the requests that will want them."""
        from .registry import warm_up

        warm_up(self._predictor(key))
        return self.worker

    def infer(self, key: WeightsKey, prepared: Sequence[PreparedImage]) -> list[RawDetections]:
        with torch.inference_mode():
            raws = self._predictor(key).infer(prepared)
        return [RawDetections(boxes=r.boxes, scores=r.scores, labels=r.labels, masks=r.masks, worker=self.worker)
                for r in raws]


def _worker_name() -> str:
    import ray
    from ray import serve

    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (tests call the class directly)
        replica = f"pid{os.getpid()}"
    return f"{replica}@{ray.get_runtime_context().get_node_id()[:8]}"


class RemotePredictor(Predictor):
    """A :class:`models.Predictor` whose forward passes run on :class:`InferenceReplica` replicas.

    Everything else (decoding, preparing, encoding, the label space) is local and reads only the
    model file's metadata, never its tensors.
    """

    def __init__(self, ref: ModelRef, name: str, handle: Any, settings: Settings, timeout_s: float) -> None:
        info = ref.read_info()
        if info is None:
            raise NotReadyError(f"{name}: no gnws model file to serve ({ref.kind} reference)")
        if settings.image_scale is not None:
            from dataclasses import replace

            max_size, min_size = settings.image_scale
            info = replace(info, config=replace(info.config, max_size=max_size, min_size=min_size))
        # The fields Predictor's methods use, without a network: forward passes are the replicas'.
        self.model = None  # type: ignore[assignment]
        self.info = info
        self.name = name
        self.device = torch.device("cpu")
        self.max_pixels = settings.max_pixels
        self.batched_forward = bool(settings.batched_forward)
        self.precision = settings.precision_for(name)  # type: ignore[assignment]  # checked by Settings
        self.key = WeightsKey.of(name, ref)
        self._handle = handle
        self._timeout_s = timeout_s

    def infer(self, prepared: Sequence[PreparedImage]) -> list[RawDetections]:
        """Run on a replica (called from the app's forward-pass threads, never its event loop)."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(RETRIES + 1):
            try:
                response = self._handle.infer.remote(self.key, list(prepared))
                return list(response.result(timeout_s=self._timeout_s))
            except BackPressureError:
                raise OverloadedError("every inference replica is busy; retry after Retry-After seconds") from None
            except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                logger.warning("an inference replica failed under a forward pass (attempt %d): %s", attempt + 1, exc)
        raise NotReadyError("the inference replicas failed under this request; retry after Retry-After seconds")

    def load_everywhere(self, timeout_s: float) -> list[str]:
        """Load and warm these weights on every live replica; returns the replicas that did.

        At startup the replicas may still be starting (a broadcast reaches only live ones, and
        fails while there are none): then one replica loads them through an ordinary call, which
        waits for a replica, and the others load them on their first request.
        """
        try:
            results = [str(r) for r in self._handle.broadcast("load", self.key).results(timeout_s=timeout_s)]
        except Exception as exc:  # Ray's errors for "no live replica yet" have no common base class
            logger.info("no inference replica is live yet (%s: %s); loading on the first one up",
                        type(exc).__name__, exc)
            results = []
        if not results:
            results = [str(self._handle.load.remote(self.key).result(timeout_s=timeout_s))]
        return results


def build_app(settings: Settings, *, replicas: int = 1, max_replicas: int | None = None,
              max_replicas_per_node: int | None = None, replica_cpus: float = 1.0) -> Any:
    """The Ray Serve application: :class:`GnwsIngress` in front of the :class:`InferenceReplica` pool.

    Args:
        settings: the app's settings (limits, models, device, ...).
        replicas: replicas to start with (and the minimum, when ``max_replicas`` is larger).
        max_replicas: autoscale between ``replicas`` and this many (by ongoing requests).
        max_replicas_per_node: spread replicas over nodes (1: at most one per node).
        replica_cpus: CPUs Ray reserves per replica (and its torch threads, unless ``torch_threads`` says).
    """
    from ray import serve

    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": replica_cpus},
        # One forward pass at a time per replica; the ingress' batcher bounds what waits.
        "max_ongoing_requests": 1,
        "max_queued_requests": max(2, (max_replicas or replicas)),
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 30,
    }
    if max_replicas_per_node is not None:
        options["max_replicas_per_node"] = max_replicas_per_node
    if max_replicas is not None and max_replicas > replicas:
        options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": 1}
    else:
        options["num_replicas"] = replicas
    replica_settings = replica_options(settings)
    if replica_settings["torch_threads"] is None:
        replica_settings["torch_threads"] = max(1, int(replica_cpus))
    pool = serve.deployment(name="InferenceReplica", **options)(InferenceReplica).bind(replica_settings)
    ingress = serve.deployment(
        name="GnwsIngress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0.5},
        # Every request reaches the app, which applies gnws' own limits (429/503 + Retry-After).
        max_ongoing_requests=settings.max_uploads + settings.max_in_flight + 16,
        max_queued_requests=settings.max_in_flight,
    )(_ingress_class())
    # The settings travel as deployment arguments (stored by Ray's controller), the API key included.
    values = settings.model_dump(mode="json")
    if settings.api_key is not None:
        values["api_key"] = settings.api_key.get_secret_value()
    return ingress.bind(pool, values, max_replicas or replicas)


def _ingress_class() -> type:
    from ray import serve

    @serve.ingress()
    class GnwsIngress:
        """The gnws app, with its models' forward passes on the replica pool."""

        def __init__(self, pool: Any, settings: dict[str, Any], forward_workers: int) -> None:
            self.pool = pool
            self.settings = Settings(**settings)
            self.forward_workers = forward_workers

        def __serve_build_asgi_app__(self) -> Any:
            from .app import create_app

            timeout_s = self.settings.request_timeout_s

            def load(ref: ModelRef) -> Predictor:
                predictor = RemotePredictor(ref, ref.name, self.pool, self.settings, timeout_s)
                loaded = predictor.load_everywhere(timeout_s=600)
                logger.info("%s loaded on %d replica(s): %s", ref.name, len(loaded), ", ".join(loaded))
                return predictor

            return create_app(self.settings, loader=load, forward_workers=self.forward_workers)

    GnwsIngress.__name__ = GnwsIngress.__qualname__ = "GnwsIngress"
    return GnwsIngress


def build(args: dict[str, Any]) -> Any:
    """``import_path: service.ray_serve:build`` for ``serve deploy``/``serve run`` config files.

    ``args``: ``replicas``, ``max_replicas``, ``max_replicas_per_node``, ``replica_cpus`` and
    ``settings`` (``GNWS_*`` settings by field name; the rest come from the replicas' environment).
    """
    settings = Settings(**(args.get("settings") or {}))
    return build_app(settings, replicas=int(args.get("replicas", 1)),
                     max_replicas=int(args["max_replicas"]) if args.get("max_replicas") else None,
                     max_replicas_per_node=int(args["max_replicas_per_node"]) if args.get("max_replicas_per_node")
                     else None, replica_cpus=float(args.get("replica_cpus", 1.0)))


def run(settings: Settings, address: str, **kwargs: Any) -> None:
    """``gnws serve --ray ADDRESS``: deploy on the cluster at ``address`` and serve until interrupted.

    Ctrl+C (SIGINT) removes the gnws application from the cluster again, as ``serve run`` does; the
    cluster itself keeps running.
    """
    import ray
    from ray import serve

    ray.init(address=address, log_to_driver=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(build_app(settings, **kwargs), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
        logger.info("interrupted: removed the %s application from the cluster", APP_NAME)
