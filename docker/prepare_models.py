"""Container start-up: make sure the weights of the models to serve are in the weights volume.

For each zoo key among the arguments (default: the service's ``GNWS_DETECT_MODEL``,
``GNWS_SEGMENT_MODEL`` and ``GNWS_EXTRA_MODELS``) whose baked file is not in the model store yet,
download the zoo checkpoint (``gnws fetch``) and bake it into the store, so the first
``docker compose up`` fills the volume and later starts touch no network. Model-store names and
``.safetensors`` paths (fine-tuned exports) are left alone. With ``GNWS_OFFLINE=1`` nothing is
downloaded: a missing model fails with the message saying how to pre-fill the volume.
"""

from __future__ import annotations

import logging
import os
import sys

from models import DEFAULT_DETECT_MODEL, DEFAULT_SEGMENT_MODEL, GnwsError, WeightsNotFoundError, get_entry
from models.fetch import fetch
from models.store import checkpoint_path, ensure_baked_zoo_model, is_zoo_name, missing_weights_message, store_path

logger = logging.getLogger("gnws.prepare_models")
_DISABLED = {"", "none", "off", "-"}


def configured_models() -> list[str]:
    """The models the service is configured to serve (same env variables and defaults as the service)."""
    names = [os.environ.get("GNWS_DETECT_MODEL", DEFAULT_DETECT_MODEL),
             os.environ.get("GNWS_SEGMENT_MODEL", DEFAULT_SEGMENT_MODEL),
             *os.environ.get("GNWS_EXTRA_MODELS", "").split(",")]
    return list(dict.fromkeys(n.strip() for n in names if n.strip().lower() not in _DISABLED))


def prepare(names: list[str], *, offline: bool) -> None:
    """Fetch and bake every zoo model in ``names`` that the model store lacks.

    Raises:
        WeightsNotFoundError: offline and a zoo model is neither baked nor downloaded.
        DownloadError: the download failed.
    """
    for name in names:
        if not is_zoo_name(name):
            logger.info("%s: not a zoo key, served from the model store or a file as configured", name)
            continue
        if store_path(name).is_file():
            logger.info("%s: in the model store", name)
            continue
        entry = get_entry(name)
        if not checkpoint_path(entry).is_file():
            if offline:
                raise WeightsNotFoundError(f"GNWS_OFFLINE is set and {missing_weights_message(entry)}")
            fetch(name)
        logger.info("%s: baked into %s", name, ensure_baked_zoo_model(name))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    offline = os.environ.get("GNWS_OFFLINE", "").strip().lower() in {"1", "true", "yes"}
    try:
        prepare(args or configured_models(), offline=offline)
    except (GnwsError, KeyError) as exc:
        logger.error("%s", exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
