"""Downloading zoo checkpoints with sha256-prefix verification.

Like ``torch.hub.download_url_to_file(..., hash_prefix=...)``: stream to a partial file in the
destination folder while hashing, show a progress bar, check the sha256 prefix that the
published file name carries, then fsync and rename. A mismatch deletes the partial file and
fails; a network error fails with one sentence naming the URL and how to supply the file by hand.
``GNWS_ZOO_MIRROR`` (or ``mirror=``) replaces ``https://download.openmmlab.com/`` for mirrors.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from .errors import CheckpointError, ChecksumMismatchError, DownloadError, WeightsNotFoundError
from .files import atomic_writer
from .store import checkpoint_path, ensure_baked_zoo_model, manual_download_hint, store_path, verify_zoo_checkpoint
from .zoo import URL_PREFIX, ZOO, get_entry

logger = logging.getLogger(__name__)

CHUNK = 1 << 20


def download(url: str, dest: Path, *, sha256_prefix: str | None, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying the sha256 prefix if given."""
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_writer(dest) as out:  # noqa: S310
            total = resp.headers.get("Content-Length")
            with tqdm(
                total=int(total) if total and total.isdigit() else None,
                unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress,
            ) as bar:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            digest = h.hexdigest()
            if sha256_prefix and not digest.startswith(sha256_prefix):
                raise ChecksumMismatchError(
                    f"checksum mismatch for {url}: sha256 starts with {digest[:len(sha256_prefix)]}, "
                    f"expected {sha256_prefix}; the download was deleted. Try again or use another mirror."
                )
    except DownloadError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"could not download {url} ({reason})") from None
    return dest


STALE_PARTIAL_S = 600


def _remove_stale_partials(dest: Path) -> None:
    """Delete partial files of earlier downloads of ``dest`` that a killed process left behind
    (untouched for ``STALE_PARTIAL_S``, so a download running in another process is left alone)."""
    if not dest.parent.is_dir():
        return
    now = time.time()
    for part in dest.parent.glob(f".{dest.name}.*.part"):
        with contextlib.suppress(OSError):
            if now - part.stat().st_mtime > STALE_PARTIAL_S:
                part.unlink()
                logger.info("removed %s, left by an interrupted download", part)


def zoo_url(name: str, mirror: str | None = None) -> str:
    entry = get_entry(name)
    mirror = mirror or os.environ.get("GNWS_ZOO_MIRROR")
    if mirror:
        return mirror.rstrip("/") + "/" + entry.url[len(URL_PREFIX):]
    return entry.url


def fetch(name: str, *, mirror: str | None = None, progress: bool = True, force: bool = False) -> Path:
    """Fetch zoo checkpoint ``name`` into the cache (no download when a verified copy is there).

    Raises:
        DownloadError: the download failed or its checksum did not match.
        CheckpointError: the cached file is not the published checkpoint (``force=True`` replaces it).
    """
    entry = get_entry(name)
    dest = checkpoint_path(entry)
    if dest.is_file() and not force:
        try:
            verify_zoo_checkpoint(entry, dest)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (`gnws fetch {entry.key} --force` downloads it again)") from None
        logger.info("%s already cached at %s (sha256 verified)", name, dest)
        return dest
    _remove_stale_partials(dest)
    url = zoo_url(name, mirror)
    try:
        return download(url, dest, sha256_prefix=entry.sha256_prefix, progress=progress)
    except ChecksumMismatchError:
        raise  # the file arrived, and is not the published one: being offline is not the cause
    except DownloadError as exc:
        raise DownloadError(f"{exc}; this machine may be offline: {manual_download_hint(entry)}.") from None


def prepare_zoo_models(names: Iterable[str], *, offline: bool, store: Path | None = None) -> list[Path]:
    """Make sure every zoo model among ``names`` is baked in the model store: download its
    checkpoint (sha256-checked) unless cached, then convert and bake it. Other names (model-store
    names, files) are skipped. Returns the baked files.

    Raises:
        WeightsNotFoundError: ``offline`` and a zoo model is neither baked nor downloaded; the
            message names the two places its weights may be put.
        DownloadError: a download failed.
    """
    baked: list[Path] = []
    for name in names:
        entry = ZOO.get(name)
        if entry is None:
            continue
        target = store_path(entry.key, store)
        if not target.is_file() and not checkpoint_path(entry).is_file():
            if offline:
                raise WeightsNotFoundError(
                    f"{entry.key} is not on this machine and offline mode (GNWS_OFFLINE) forbids downloading it: "
                    f"put the baked model at {target}, or the published checkpoint ({entry.url}) at "
                    f"{checkpoint_path(entry)}"
                )
            fetch(entry.key)
        baked.append(ensure_baked_zoo_model(entry.key, store))
        logger.info("%s: baked at %s", entry.key, baked[-1])
    return baked
