"""Build a TorchServe model archive (``.mar``) from a baked gnws model: ``gnws archive NAME``.

NAME is any baked model reference (:mod:`models.resolve`): a zoo key (its baked file in the
model store, made from a cached zoo checkpoint if needed), a model-store name (e.g. a fine-tuned
export) or a path to a gnws ``.safetensors``. The archive holds the baked weights as its
serialized file, a few-line handler entry file that imports :class:`gnws.torchserve.handler.GnwsHandler`
from the installed package, and a ``model-config.yaml`` with TorchServe's batching/worker settings
and the handler's settings. It is written atomically (temp file in the export folder, then rename).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from models import bake_file, read_model_info
from models.errors import CheckpointError, GnwsError
from models.resolve import BAKED_KINDS, resolve_model

from . import MODEL_NAME

logger = logging.getLogger(__name__)

# The file TorchServe loads (it wants exactly one class defined in it): the handler itself is a
# module of the installed package.
HANDLER_FILE = "gnws_handler.py"
HANDLER_SHIM = '''"""TorchServe entry point written by `gnws archive`: the handler is gnws.torchserve.handler."""

from gnws.torchserve.handler import GnwsHandler as _GnwsHandler


class GnwsHandler(_GnwsHandler):
    """gnws' TorchServe handler (see gnws.torchserve.handler)."""
'''


@dataclass(frozen=True, kw_only=True)
class ArchiveSettings:
    """What goes into ``model-config.yaml``.

    Attributes:
        batch_size: TorchServe ``batchSize`` (requests per handler call).
        max_batch_delay_ms: TorchServe ``maxBatchDelay``: how long to wait to fill a batch.
        min_workers / max_workers: worker processes per model.
        response_timeout_s: TorchServe ``responseTimeout`` per batch.
        device: handler device (``auto`` = the worker's assigned GPU if any, else CPU).
        image_scale: ``(max_size, min_size)`` test scale for tests and smoke runs; ``None`` = model's.
        precision: ``fp32`` (exact), ``bf16`` or ``fp16`` (:mod:`models.precision`); checked
            against the worker's device when TorchServe loads the model.
    """

    batch_size: int = 4
    max_batch_delay_ms: int = 50
    min_workers: int = 1
    max_workers: int = 1
    response_timeout_s: int = 120
    device: str = "auto"
    image_scale: tuple[int, int] | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("batch_size", "min_workers", "max_workers", "response_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay_ms must be >= 0, got {self.max_batch_delay_ms}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) is below min_workers ({self.min_workers})")


def model_config_yaml(settings: ArchiveSettings, model_name: str) -> str:
    """TorchServe ``model-config.yaml``; values are JSON scalars/lists, which are valid YAML."""
    handler: dict[str, object] = {"model_name": model_name, "device": settings.device, "precision": settings.precision}
    if settings.image_scale is not None:
        handler["image_scale"] = list(settings.image_scale)
    lines = [
        f"minWorkers: {settings.min_workers}",
        f"maxWorkers: {settings.max_workers}",
        f"batchSize: {settings.batch_size}",
        f"maxBatchDelay: {settings.max_batch_delay_ms}",
        f"responseTimeout: {settings.response_timeout_s}",
        "handler:",
        *(f"  {key}: {json.dumps(value)}" for key, value in handler.items()),
    ]
    return "\n".join(lines) + "\n"


def resolve_model_file(name: str) -> Path:
    """The baked-or-not ``.safetensors`` for a zoo key, a model-store name or a path.

    Raises:
        WeightsNotFoundError: nothing by that name is on this machine.
        UnknownModelNameError: a name that is no zoo key and not in the store.
        ModelReferenceError: an mmdetection checkpoint (bake it first).
    """
    return resolve_model(name, accept=BAKED_KINDS).materialize()


def default_model_name(name: str) -> str:
    return Path(name).stem if Path(name).suffix == ".safetensors" else name


def build_archive(
    name: str,
    export_dir: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    settings: ArchiveSettings | None = None,
    version: str = "1.0",
    force: bool = False,
) -> Path:
    """Write ``<export_dir>/<model_name>.mar`` for model ``name`` and return its path.

    Unbaked models are baked into a temporary copy first (the archive always serves baked weights).

    Raises:
        GnwsError: bad model name, existing archive without ``force``, torch-model-archiver missing.
        WeightsNotFoundError / CheckpointError: the model file is missing or not a gnws model.
    """
    settings = settings or ArchiveSettings()
    model_name = model_name or default_model_name(name)
    if not MODEL_NAME.match(model_name):
        raise GnwsError(f"TorchServe model names match {MODEL_NAME.pattern}; got {model_name!r} (use --model-name)")
    export = Path(export_dir)
    export.mkdir(parents=True, exist_ok=True)
    target = export / f"{model_name}.mar"
    if target.exists() and not force:
        raise GnwsError(f"{target} already exists; pass --force to replace it")
    try:
        from model_archiver.model_archiver_config import ModelArchiverConfig
        from model_archiver.model_packaging import generate_model_archive
    except ImportError:
        raise GnwsError("torch-model-archiver is not installed: pip install 'gnws[torchserve]'") from None

    source = resolve_model_file(name)
    info = read_model_info(source)
    with tempfile.TemporaryDirectory(prefix=".gnws-archive-", dir=export) as tmp:
        staging = Path(tmp)
        if not info.baked:
            logger.info("%s is not baked: baking a temporary copy", source)
            baked = staging / "weights" / f"{model_name}.safetensors"
            baked.parent.mkdir()
            bake_file(source, baked)
            source = baked
        config = staging / "model-config.yaml"
        config.write_text(model_config_yaml(settings, model_name))
        handler = staging / HANDLER_FILE
        handler.write_text(HANDLER_SHIM)
        generate_model_archive(ModelArchiverConfig(
            model_name=model_name,
            handler=str(handler),
            version=version,
            serialized_file=str(source),
            config_file=str(config),
            export_path=str(staging),
            force=True,
        ))
        built = staging / f"{model_name}.mar"
        if not built.is_file():
            raise CheckpointError(f"torch-model-archiver did not write {built}")
        with built.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(built, target)
    logger.info("wrote %s (%s, %.1f MB)", target, info.config.arch, target.stat().st_size / 1e6)
    return target


def parse_image_scale(text: str) -> tuple[int, int]:
    try:
        max_size, min_size = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MAX,MIN (e.g. 640,384), got {text!r}") from None
    return max_size, min_size


_DEFAULTS = ArchiveSettings()


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``gnws archive``: flags default to :class:`ArchiveSettings`' values."""
    p = sub.add_parser("archive", help="build a TorchServe .mar from a baked model (zoo key, store name or file)")
    p.add_argument("name", metavar="NAME", help="zoo key, model-store name or path to a gnws .safetensors")
    p.add_argument("-o", "--export-path", type=Path, default=None,
                   help="folder for the .mar (default: $GNWS_MAR_STORE, else ./model-store)")
    p.add_argument("--model-name", help="TorchServe model name (default: NAME, or the file stem)")
    p.add_argument("--batch-size", type=int, help=f"TorchServe batchSize (default: {_DEFAULTS.batch_size})")
    p.add_argument("--max-batch-delay", type=int, metavar="MS", dest="max_batch_delay_ms",
                   help=f"TorchServe maxBatchDelay in ms (default: {_DEFAULTS.max_batch_delay_ms})")
    p.add_argument("--workers", type=int, help=f"min and max workers (default: {_DEFAULTS.min_workers})")
    p.add_argument("--response-timeout", type=int, metavar="S", dest="response_timeout_s",
                   help=f"seconds (default: {_DEFAULTS.response_timeout_s})")
    p.add_argument("--device", help=f"auto, cpu, cuda, ... (default: {_DEFAULTS.device})")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help=f"the forward pass's precision (default: {_DEFAULTS.precision}, exact)")
    p.add_argument("--image-scale", type=parse_image_scale, metavar="MAX,MIN",
                   help="test-time scale instead of the model's 1333,800 (smoke tests only)")
    p.add_argument("--version", default="1.0", help="archive version (default: %(default)s)")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing archive")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> ArchiveSettings:
    """:class:`ArchiveSettings` with the flags that were given on top of its defaults."""
    given = {name: getattr(args, name) for name in ("batch_size", "max_batch_delay_ms", "response_timeout_s",
                                                     "device", "image_scale", "precision")}
    if args.workers is not None:
        given |= {"min_workers": args.workers, "max_workers": args.workers}
    try:
        return dataclasses.replace(_DEFAULTS, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise GnwsError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Build the archive the parsed arguments describe; prints its path."""
    export = args.export_path or Path(os.environ.get("GNWS_MAR_STORE", "model-store"))
    path = build_archive(args.name, export, model_name=args.model_name, settings=settings_from_args(args),
                         version=args.version, force=args.force)
    print(path)  # noqa: T201 - CLI output
    return 0
