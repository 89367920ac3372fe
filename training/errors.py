"""User-facing errors of the training package (all :class:`models.errors.GnwsError`)."""

from __future__ import annotations

from models.errors import GnwsError


class TrainingError(GnwsError):
    """Base class of training errors the user can fix."""


class DatasetError(TrainingError):
    """COCO-format data is missing, unreadable or has no usable images."""


class TrainConfigError(TrainingError, ValueError):
    """An invalid option or combination of options."""


class ResumeError(TrainingError):
    """A run cannot be resumed (no checkpoint, or it does not match the run)."""
