"""Fixtures of the container and TorchServe tests: the archive builder and the handler as loaded modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from gnws.archive_cli import load_archive_module

TORCHSERVE_DIR = Path(__file__).resolve().parents[2] / "docker" / "torchserve"


@pytest.fixture(scope="session")
def archive_module() -> ModuleType:
    """``docker/torchserve/archive.py``, loaded the way ``gnws archive`` loads it."""
    return load_archive_module()


@pytest.fixture(scope="session")
def handler_module() -> ModuleType:
    """``docker/torchserve/gnws_handler.py`` as TorchServe imports it: a top-level module from a file."""
    path = TORCHSERVE_DIR / "gnws_handler.py"
    spec = importlib.util.spec_from_file_location("gnws_handler", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
