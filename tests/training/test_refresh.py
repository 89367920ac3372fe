"""The refresh loop, end to end: train → `gnws export` (store versions) → a running `gnws serve`
watching the store swaps each new version in → a bad version is refused → rollback by API call.

A real uvicorn on 127.0.0.1 serves while a client keeps sending; no request may fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gnws.cli import main as gnws_main
from models import Predictor
from models.files import atomic_write_bytes
from models.store import version_path
from tests.conftest import FASTER_R50, IMAGES
from tests.service.conftest import start_server

from .conftest import COCO, FAST_ARGS, subset_annotations

NAME = "city-r50"
KEY = "refresh-key"
IMAGE = IMAGES / "000000404484.jpg"
SCALE = (192, 128)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def expected(version: int) -> list[dict[str, Any]]:
    predictor = Predictor.load(version_path(NAME, version), device="cpu", image_scale=SCALE)
    return [dict(d) for d in predictor.predict(IMAGE.read_bytes())]


@pytest.mark.slow
def test_exports_are_picked_up_refused_and_rolled_back(
    tmp_path: Path, gnws_home: Path, mmdet_checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    train_ann = subset_annotations(tmp_path / "ann" / "train.json", "train2017", ["000000114694.jpg"])
    run_dir = tmp_path / "runs" / NAME

    def train(iters: int, *extra: str) -> None:
        args = ["train", "--max-iters", str(iters), *extra]
        if iters == 1:
            args += ["--model", FASTER_R50, "--init-checkpoint", str(mmdet_checkpoint(FASTER_R50)),
                     "--train-ann", str(train_ann), "--train-images", str(COCO / "train2017"),
                     "--work-dir", str(run_dir), "--lr", "0.02", *FAST_ARGS]
        assert gnws_main(args) == 0, capsys.readouterr().err[-3000:]
        assert gnws_main(["export", str(run_dir), "--name", NAME]) == 0, capsys.readouterr().err[-3000:]

    train(1)  # version 1
    from service import Settings, create_app  # the service is another package; tests may use both

    store = gnws_home / "models"
    settings = Settings(detect_model=NAME, segment_model="none", device="cpu", image_scale=SCALE, api_key=KEY,
                        model_store=store, warmup=False, watch_store_s=0.3, request_timeout_s=120)
    live = start_server(create_app(settings))
    responses: list[httpx.Response] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=live.url, timeout=120) as client:
            while not stop.is_set() and len(responses) < 400:
                responses.append(client.post("/v1/detect", content=IMAGE.read_bytes(),
                                             headers={"Content-Type": "image/jpeg"}))

    sender = threading.Thread(target=traffic)
    client = httpx.Client(base_url=live.url, timeout=120, headers={"X-API-Key": KEY})
    try:
        sender.start()

        def serving() -> dict[str, Any]:
            (model,) = client.get("/v1/models").json()["models"]
            return model

        assert serving()["version"] == 1
        train(2, "--resume", str(run_dir))  # one more step: version 2, other weights
        wait_for(lambda: serving()["version"] == 2, "the watcher to swap in version 2")
        assert serving()["versions"] == [1, 2]
        assert not serving()["pinned"]

        # A broken version 3 is refused: version 2 keeps serving.
        atomic_write_bytes(version_path(NAME, 3), b"\x00" * 4096)
        wait_for(lambda: 'gnws_model_reloads_total{model="city-r50",result="failure"} 1.0' in
                 client.get("/metrics").text, "the watcher to refuse version 3")
        assert serving()["version"] == 2

        # Rollback: one call; the watcher leaves a pinned version alone.
        r = client.post(f"/v1/models/{NAME}/reload", json={"version": 1})
        assert r.status_code == 200, r.text
        assert (r.json()["model"]["version"], r.json()["model"]["pinned"]) == (1, True)
        version_path(NAME, 3).unlink()
        time.sleep(1.5)  # several watch intervals
        assert serving()["version"] == 1
        r = client.post(f"/v1/models/{NAME}/reload", json={})  # unpinned: the newest version again
        assert (r.status_code, r.json()["model"]["version"], r.json()["model"]["pinned"]) == (200, 2, False)
        sent = len(responses)
        wait_for(lambda: len(responses) > sent + 1, "traffic after the last reload")
    finally:
        stop.set()
        sender.join(300)
        client.close()
        live.stop()

    assert responses, "the client sent nothing"
    assert [r.status_code for r in responses] == [200] * len(responses), [r.text[:200] for r in responses
                                                                            if r.status_code != 200]
    by_version = {1: expected(1), 2: expected(2)}
    assert by_version[1] != by_version[2], "the second export changed the weights"
    seen = []
    for r in responses:
        body = r.json()
        version = body["model"]["version"]
        assert body["images"][0]["detections"] == by_version[version], f"version {version} answered otherwise"
        seen.append(version)
    assert {1, 2} <= set(seen)
    assert seen[-1] == 2
