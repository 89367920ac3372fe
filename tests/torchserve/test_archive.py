"""``gnws archive``: name resolution, model-config.yaml, errors (no archive is zipped here;
``test_torchserve.py`` builds and serves real ones)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import yaml

from gnws.cli import main as gnws_main
from models import WeightsNotFoundError
from models.errors import UnknownModelNameError
from tests.conftest import FASTER_R50


def test_model_config_yaml_is_what_torchserve_reads(archive_module: ModuleType) -> None:
    settings = archive_module.ArchiveSettings(batch_size=8, max_batch_delay_ms=20, min_workers=1, max_workers=2,
                                              response_timeout_s=30, device="cuda", image_scale=(640, 384))
    config = yaml.safe_load(archive_module.model_config_yaml(settings, "m-1"))
    assert config == {
        "minWorkers": 1, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 20, "responseTimeout": 30,
        "handler": {"model_name": "m-1", "device": "cuda", "precision": "fp32", "image_scale": [640, 384]},
    }
    default = yaml.safe_load(archive_module.model_config_yaml(archive_module.ArchiveSettings(), "m"))
    assert "image_scale" not in default["handler"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 0}, "batch_size"),
    ({"max_batch_delay_ms": -1}, "max_batch_delay_ms"),
    ({"min_workers": 2, "max_workers": 1}, "below min_workers"),
])
def test_bad_settings(archive_module: ModuleType, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        archive_module.ArchiveSettings(**kwargs)


def test_resolves_files_store_names_and_zoo_keys(archive_module: ModuleType, baked_model, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GNWS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GNWS_MODEL_STORE", str(tmp_path / "store"))
    baked = baked_model(FASTER_R50)
    assert archive_module.resolve_model_file(str(baked)) == baked
    with pytest.raises(WeightsNotFoundError, match=f"gnws fetch {FASTER_R50}"):
        archive_module.resolve_model_file(FASTER_R50)  # a zoo key, not downloaded
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / f"{FASTER_R50}.safetensors").symlink_to(baked)
    assert archive_module.resolve_model_file(FASTER_R50) == tmp_path / "store" / f"{FASTER_R50}.safetensors"
    (tmp_path / "store" / "city-finetune.safetensors").symlink_to(baked)
    assert archive_module.resolve_model_file("city-finetune").name == "city-finetune.safetensors"
    with pytest.raises(UnknownModelNameError, match="did you mean faster_rcnn_r50_fpn_gn_ws-all_1x_coco"):
        archive_module.resolve_model_file("faster_rcnn_r50_fpn_gn_ws_1x_coco")


def test_cli_errors_are_one_sentence(baked_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GNWS_HOME", str(tmp_path / "home"))
    assert gnws_main(["archive", "no-such-model", "-o", str(tmp_path)]) == 2
    assert "neither a zoo key" in capsys.readouterr().err
    (tmp_path / f"{FASTER_R50}.mar").write_bytes(b"old")
    assert gnws_main(["archive", str(baked_model(FASTER_R50)), "-o", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / f"{FASTER_R50}.mar").read_bytes() == b"old"
    assert gnws_main(["archive", str(baked_model(FASTER_R50)), "-o", str(tmp_path), "--model-name", "a/b"]) == 2
    assert "model names match" in capsys.readouterr().err
    assert gnws_main(["archive", str(baked_model(FASTER_R50)), "-o", str(tmp_path), "--workers", "0"]) == 2
    assert "min_workers must be >= 1" in capsys.readouterr().err
    assert not list(tmp_path.glob(".gnws-archive-*")), "no staging folder is left behind"


def test_archive_command_is_registered() -> None:
    with pytest.raises(SystemExit) as exc:
        gnws_main(["archive", "--help"])
    assert exc.value.code == 0
