"""Training test helpers: the small COCO fixture, filtered copies of it, and CLI runs in subprocesses.

Training runs use a small image scale (192x128), few sampled anchors/RoIs and a frozen backbone so a
real optimizer step takes a few seconds on two CPU cores; the recipe code paths are the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FASTER_R50, FIXTURES, MASK_R50

COCO = FIXTURES / "coco"
ROOT = Path(__file__).resolve().parents[2]
FAST_ARGS = [
    "--image-scale", "192", "128", "--images-per-gpu", "1", "--rpn-samples", "64", "--rcnn-samples", "32",
    "--frozen-stages", "4", "--workers", "0", "--log-interval", "1", "--no-tensorboard",
]  # fmt: skip

__all__ = ["COCO", "FASTER_R50", "FAST_ARGS", "MASK_R50", "ROOT", "read_jsonl", "run_cli", "subset_annotations"]


def subset_annotations(
    dest: Path, split: str, file_names: list[str] | None = None, *, limit: int | None = None
) -> Path:
    """A copy of the fixture's ``split`` annotations keeping only some images (same image folder)."""
    data = json.loads((COCO / "annotations" / f"instances_{split}.json").read_text())
    images = [i for i in data["images"] if file_names is None or i["file_name"] in file_names]
    images = sorted(images, key=lambda i: i["file_name"])[:limit]
    ids = {i["id"] for i in images}
    data["images"] = images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(data))
    return dest


def run_cli(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m training ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "training", *args], cwd=ROOT, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def gnws_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``GNWS_HOME`` (no cached zoo files) with its own model store."""
    home = tmp_path / "gnws_home"
    monkeypatch.setenv("GNWS_HOME", str(home))
    monkeypatch.setenv("GNWS_MODEL_STORE", str(home / "models"))
    return home
