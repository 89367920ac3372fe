"""The 12 GN+WS COCO models of the mmdetection model zoo.

Source: mmdetection ``configs/gn+ws/README.md`` and ``metafile.yml`` (v2.0 zoo); see
docs/mmdetection-fidelity.md, 'The model zoo'. Keys are the checkpoint stems and are never renamed.
The checkpoint's file-name suffix is the first 8 hex digits of its sha256
(``tools/model_converters/publish_model.py``), which :mod:`models.fetch` verifies.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .config import DetectorConfig
from .errors import UnknownModelNameError

URL_PREFIX = "https://download.openmmlab.com/"


@dataclass(frozen=True, kw_only=True)
class ZooEntry:
    """One published checkpoint: its architecture and provenance.

    Attributes:
        key: checkpoint stem, e.g. ``faster_rcnn_r50_fpn_gn_ws-all_1x_coco``.
        config: the architecture.
        mmdet_config: the mmdetection v3 config file it was published with.
        schedule: training schedule name (``1x``, ``2x``, ``20-23-24e``).
        date_hash: ``<date>-<sha256[:8]>`` part of the published file name.
        box_ap / mask_ap: COCO val2017 AP published by mmdetection (``None`` for no masks).
    """

    key: str
    config: DetectorConfig
    mmdet_config: str
    schedule: str
    date_hash: str
    box_ap: float
    mask_ap: float | None = None

    @property
    def sha256_prefix(self) -> str:
        return self.date_hash.split("-")[1]

    @property
    def filename(self) -> str:
        return f"{self.key}_{self.date_hash}.pth"

    @property
    def url(self) -> str:
        return f"{URL_PREFIX}mmdetection/v2.0/gn%2Bws/{self.key}/{self.filename}"


_BACKBONES = {
    "r50": {"depth": 50},
    "r101": {"depth": 101},
    "x50_32x4d": {"depth": 50, "groups": 32, "width_per_group": 4},
    "x101_32x4d": {"depth": 101, "groups": 32, "width_per_group": 4},
}

# (arch, backbone, schedule, date-hash, box AP, mask AP)
_TABLE = (
    ("faster_rcnn", "r50", "1x", "20200130-613d9fe2", 39.7, None),
    ("faster_rcnn", "r101", "1x", "20200205-a93b0d75", 41.7, None),
    ("faster_rcnn", "x50_32x4d", "1x", "20200203-839c5d9d", 40.7, None),
    ("faster_rcnn", "x101_32x4d", "1x", "20200212-27da1bc2", 42.1, None),
    ("mask_rcnn", "r50", "2x", "20200226-16acb762", 40.6, 36.6),
    ("mask_rcnn", "r101", "2x", "20200212-ea357cd9", 42.0, 37.7),
    ("mask_rcnn", "x50_32x4d", "2x", "20200216-649fdb6f", 41.1, 37.0),
    ("mask_rcnn", "x101_32x4d", "2x", "20200319-33fb95b5", 42.1, 37.9),
    ("mask_rcnn", "r50", "20-23-24e", "20200213-487d1283", 41.1, 37.1),
    ("mask_rcnn", "r101", "20-23-24e", "20200213-57b5a50f", 43.1, 38.6),
    ("mask_rcnn", "x50_32x4d", "20-23-24e", "20200226-969bcb2c", 42.1, 38.0),
    ("mask_rcnn", "x101_32x4d", "20-23-24e", "20200316-e6cd35ef", 42.7, 38.5),
)


def _entry(arch: str, backbone: str, schedule: str, date_hash: str, box: float, mask: float | None) -> ZooEntry:
    key = f"{arch}_{backbone}_fpn_gn_ws-all_{schedule.replace('-', '_')}_coco"
    v3_arch = arch.replace("_", "-")
    v3_backbone = backbone.replace("_", "-")
    return ZooEntry(
        key=key,
        config=DetectorConfig(arch=arch, **_BACKBONES[backbone]),  # type: ignore[arg-type]
        mmdet_config=f"configs/gn+ws/{v3_arch}_{v3_backbone}_fpn_gn-ws-all_{schedule}_coco.py",
        schedule=schedule,
        date_hash=date_hash,
        box_ap=box,
        mask_ap=mask,
    )


ZOO: Mapping[str, ZooEntry] = MappingProxyType({e.key: e for e in (_entry(*row) for row in _TABLE)})

DEFAULT_DETECT_MODEL = "faster_rcnn_r50_fpn_gn_ws-all_1x_coco"
DEFAULT_SEGMENT_MODEL = "mask_rcnn_r50_fpn_gn_ws-all_2x_coco"


def get_entry(name: str) -> ZooEntry:
    """Look a model up by its key; an unknown name raises ``UnknownModelNameError`` (a ``KeyError``)
    naming close matches."""
    try:
        return ZOO[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(ZOO), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelNameError(f"unknown zoo model {name!r}.{hint} `gnws zoo` lists all {len(ZOO)}.") from None


def with_classes(cfg: DetectorConfig, classes: tuple[str, ...], category_ids: tuple[int, ...]) -> DetectorConfig:
    """The same architecture for another label space (heads are re-created by the caller)."""
    return dataclasses.replace(cfg, classes=tuple(classes), category_ids=tuple(category_ids))
