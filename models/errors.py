"""Domain errors of the models package.

Every error a user can cause (missing weights, bad checkpoint, bad image) derives from
:class:`GnwsError`, so entry points (CLI, HTTP service, TorchServe handler) can turn it into a
clear message without a traceback.
"""

from __future__ import annotations


class GnwsError(Exception):
    """Base class of errors meant for the user, with a message that says how to fix them."""


class UnknownModelNameError(GnwsError, KeyError):
    """A name that is not a zoo key (the message names close matches). Still a ``KeyError``."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else type(self).__name__


class WeightsNotFoundError(GnwsError, FileNotFoundError):
    """Weights for a model are not on disk (and could not or were not fetched)."""


class DownloadError(GnwsError):
    """A download failed (network, HTTP status) or its checksum did not match."""


class ChecksumMismatchError(DownloadError):
    """A download completed, but its sha256 is not the published one."""


class CheckpointError(GnwsError):
    """A checkpoint file is unreadable, truncated, or not the expected kind of file."""


class ConversionError(CheckpointError):
    """A checkpoint's keys or shapes do not map exactly onto the target model."""


class ModelReferenceError(GnwsError, ValueError):
    """A model reference that cannot be used where it was given: the wrong kind of reference
    (an mmdetection ``.pth`` where only baked models are served, ...), a path outside the model
    store where only the store may be read, or a name that is not a usable file name."""


class PrecisionError(GnwsError, ValueError):
    """A precision mode that is not one of ``fp32``, ``bf16``, ``fp16`` (the message lists them)."""


class UnsupportedPrecisionError(PrecisionError):
    """A precision mode the chosen device cannot run (fp16 on a CPU, bf16 on a CPU without
    AVX-512 BF16 or AMX, bf16 on a CUDA GPU older than Ampere, ...). Raised at load, never a fallback."""


class UsageError(GnwsError):
    """A command-line argument cannot be used (wrong file type, missing folder, ...)."""


class UnknownClassError(GnwsError, ValueError):
    """A requested class is neither a class name nor a category id of the model."""


class ImageDecodeError(GnwsError, ValueError):
    """Input bytes are not a decodable image."""


class ImageTooLargeError(ImageDecodeError):
    """An image has more pixels than allowed (decompression-bomb guard)."""
