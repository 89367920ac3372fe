"""Fine-tuning GN+WS Faster/Mask R-CNN on COCO-format data (mmdetection's GN+WS recipe).

Modules: :mod:`~training.config` (TrainConfig, schedules, lr rule), :mod:`~training.optim`
(SGD/AdamW, warmup + step schedule), :mod:`~training.data` (COCO dataset and train pipeline),
:mod:`~training.datacheck` (every image decoded before step 1), :mod:`~training.sampler`
(aspect-ratio grouped distributed sampler), :mod:`~training.targets` and :mod:`~training.losses`
(assigners, samplers, losses), :mod:`~training.engine` (DDP/AMP loop), :mod:`~training.runtime`
(distributed plumbing, metrics, speed), :mod:`~training.checkpoint`, :mod:`~training.evaluate`
(COCOeval), :mod:`~training.init` (zoo / ImageNet / scratch), :mod:`~training.export` and
:mod:`~training.cli` (``gnws train|eval|export``). Imports :mod:`models`, never ``service``.
"""

from .config import SCHEDULES, TrainConfig
from .errors import DatasetError, ResumeError, TrainConfigError, TrainingError

__all__ = ["SCHEDULES", "DatasetError", "ResumeError", "TrainConfig", "TrainConfigError", "TrainingError"]
