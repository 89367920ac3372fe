"""Fixtures of the TorchServe tests: the archive builder, and the handler as TorchServe loads it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

from gnws.torchserve import archive


@pytest.fixture(scope="session")
def archive_module() -> ModuleType:
    """The archive builder behind ``gnws archive`` (an installed module)."""
    return archive


@pytest.fixture(scope="session")
def handler_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The handler entry file ``gnws archive`` packs, imported the way TorchServe's worker does: the
    unpacked archive's folder on ``sys.path``, then ``importlib.import_module("gnws_handler")``."""
    unpacked = tmp_path_factory.mktemp("unpacked-mar")
    (unpacked / archive.HANDLER_FILE).write_text(archive.HANDLER_SHIM)
    sys.path.insert(0, str(unpacked))
    try:
        yield importlib.import_module(archive.HANDLER_FILE.removesuffix(".py"))
    finally:
        sys.path.remove(str(unpacked))
        sys.modules.pop(archive.HANDLER_FILE.removesuffix(".py"), None)
