"""The one model resolver: every kind of reference, the store's versions, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import CheckpointError, ModelReferenceError, UnknownModelNameError, WeightsNotFoundError
from models.resolve import BAKED_KINDS, RefKind, resolve_model
from models.store import next_version_path, prune_versions
from tests.conftest import FASTER_R50


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, baked_model) -> Path:
    monkeypatch.setenv("GNWS_HOME", str(tmp_path / "home"))
    store = tmp_path / "store"
    store.mkdir()
    (store / "city.safetensors").symlink_to(baked_model(FASTER_R50))
    return store


def test_each_kind(store: Path, baked_model, mmdet_checkpoint, tmp_path: Path) -> None:
    baked = baked_model(FASTER_R50)
    ref = resolve_model(str(baked), store=store)
    assert (ref.kind, ref.name, ref.path) == (RefKind.FILE, FASTER_R50, baked)
    ref = resolve_model("city", store=store)
    assert (ref.kind, ref.name, ref.path, ref.version) == (RefKind.STORE, "city", store / "city.safetensors", None)
    pth = mmdet_checkpoint(FASTER_R50)
    ref = resolve_model(pth, zoo_key=FASTER_R50, store=store)
    assert (ref.kind, ref.zoo_key, ref.path) == (RefKind.MMDET, FASTER_R50, pth)
    with pytest.raises(CheckpointError, match="--model NAME"):
        resolve_model(pth, store=store)
    with pytest.raises(ModelReferenceError, match="gnws bake SRC.pth"):
        resolve_model(pth, zoo_key=FASTER_R50, accept=BAKED_KINDS, store=store)
    (store / f"{FASTER_R50}.safetensors").symlink_to(baked)
    ref = resolve_model(FASTER_R50, store=store)
    assert (ref.kind, ref.path) == (RefKind.ZOO, store / f"{FASTER_R50}.safetensors")
    assert ref.materialize() == store / f"{FASTER_R50}.safetensors"
    assert ref.read_info() is not None


def test_missing_and_unknown(store: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match=f"gnws fetch {FASTER_R50}"):
        resolve_model(FASTER_R50, store=store)  # a zoo key, neither baked nor downloaded
    with pytest.raises(WeightsNotFoundError, match="no model file"):
        resolve_model(tmp_path / "nope.safetensors", store=store)
    with pytest.raises(UnknownModelNameError, match="did you mean city"):
        resolve_model("cty", store=store)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelReferenceError, match="neither a gnws model"):
        resolve_model(tmp_path / "weights.bin", store=store)
    with pytest.raises(ModelReferenceError, match="empty"):
        resolve_model("  ", store=store)


def test_versions_newest_first_and_pruning(store: Path, baked_model) -> None:
    for expected in (1, 2, 3):
        version, path = next_version_path("coco-ft", store)
        assert version == expected
        path.parent.mkdir(exist_ok=True)
        path.symlink_to(baked_model(FASTER_R50))
    ref = resolve_model("coco-ft", store=store)
    assert (ref.kind, ref.name, ref.version) == (RefKind.STORE, "coco-ft", 3)
    assert resolve_model("coco-ft", store=store, within_store=True).version == 3
    assert resolve_model("coco-ft/2", store=store, within_store=True).version == 2
    assert prune_versions("coco-ft", keep=2, store=store) == [1]
    with pytest.raises(WeightsNotFoundError, match="coco-ft/1.safetensors"):
        resolve_model("coco-ft/1", store=store, within_store=True)


@pytest.mark.parametrize("text", ["../outside", "/etc/passwd", "a/../../b", "."])
def test_within_store_never_leaves_the_store(store: Path, text: str) -> None:
    with pytest.raises((ModelReferenceError, WeightsNotFoundError)) as exc:
        resolve_model(text, store=store, within_store=True)
    assert str(store.parent) not in str(exc.value), "no server path in what a client may see"
