"""Helpers shared by the bench scripts: reference weights, timing, markdown tables."""

from __future__ import annotations

import importlib.util
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
IMAGES = FIXTURES / "images"


def make_reference_checkpoint(stem: str, out_dir: Path) -> Path:
    """The deterministic mmdetection-style checkpoint of ``tests/fixtures/make_weights.py``."""
    path = out_dir / f"{stem}.pth"
    if path.exists():
        return path
    spec = importlib.util.spec_from_file_location("make_weights", FIXTURES / "make_weights.py")
    assert spec is not None
    assert spec.loader is not None
    mw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mw)
    manifest = json.loads((FIXTURES / "manifests" / f"{stem}.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    mw.save_checkpoint(mw.make_state_dict(manifest), path)
    return path


def time_once(fn: Callable[[], object], *, cuda: bool = False) -> float:
    """Wall time in seconds of one call (on CUDA, from an idle GPU until its work is done)."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_call(fn: Callable[[], object], *, repeats: int, warmup: int = 1, cuda: bool = False) -> list[float]:
    """Wall times in seconds of ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return [time_once(fn, cuda=cuda) for _ in range(repeats)]


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{platform.system()} {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}{gpu}")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
