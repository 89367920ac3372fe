"""``gnws archive NAME``: build a TorchServe ``.mar`` from a baked model.

The builder and the handler it packs live in ``docker/torchserve/`` (the handler is a file that
TorchServe loads, not part of an installed package). This module finds that folder (``$GNWS_TORCHSERVE_DIR``,
set in the images, or the source checkout this package runs from) and loads ``archive.py`` from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from models.errors import GnwsError


def torchserve_dir() -> Path:
    """``docker/torchserve`` of this checkout, or ``$GNWS_TORCHSERVE_DIR``."""
    if env := os.environ.get("GNWS_TORCHSERVE_DIR"):
        return Path(env)
    return Path(__file__).resolve().parents[1] / "docker" / "torchserve"


def load_archive_module() -> ModuleType:
    path = torchserve_dir() / "archive.py"
    if not path.is_file():
        raise GnwsError(
            f"no TorchServe archive builder at {path}: run from a gnws source checkout, or set "
            "GNWS_TORCHSERVE_DIR to a copy of docker/torchserve"
        )
    spec = importlib.util.spec_from_file_location("gnws_torchserve_archive", path)
    if spec is None or spec.loader is None:
        raise GnwsError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("archive", help="build a TorchServe .mar from a baked model (zoo key, store name or file)")
    try:
        module = load_archive_module()
    except GnwsError as exc:
        error = exc  # reported when the command runs, so that other commands stay usable

        def missing(args: argparse.Namespace) -> int:
            raise error

        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=missing)
        return
    module.add_arguments(p)
    p.set_defaults(func=module.run)
