"""Container start-up: make sure the weights of the models to serve are in the weights volume.

For each zoo key among the arguments (default: the service's ``GNWS_DETECT_MODEL``,
``GNWS_SEGMENT_MODEL`` and ``GNWS_EXTRA_MODELS``) whose baked file is not in the model store yet,
download the zoo checkpoint (``gnws fetch``) and bake it into the store
(:func:`models.fetch.prepare_zoo_models`, which ``gnws serve`` runs too), so the first
``docker compose up`` fills the volume and later starts touch no network. Model-store names and
``.safetensors`` paths (fine-tuned exports) are left alone. With ``GNWS_OFFLINE=1`` nothing is
downloaded: a missing model fails with the message saying how to pre-fill the volume.
"""

from __future__ import annotations

import logging
import os
import sys

from models import DEFAULT_DETECT_MODEL, DEFAULT_SEGMENT_MODEL, GnwsError
from models.fetch import prepare_zoo_models

logger = logging.getLogger("gnws.prepare_models")
_DISABLED = {"", "none", "off", "-"}


def configured_models() -> list[str]:
    """The models the service is configured to serve (same env variables and defaults as the service)."""
    names = [os.environ.get("GNWS_DETECT_MODEL", DEFAULT_DETECT_MODEL),
             os.environ.get("GNWS_SEGMENT_MODEL", DEFAULT_SEGMENT_MODEL),
             *os.environ.get("GNWS_EXTRA_MODELS", "").split(",")]
    return list(dict.fromkeys(n.strip() for n in names if n.strip().lower() not in _DISABLED))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    offline = os.environ.get("GNWS_OFFLINE", "").strip().lower() in {"1", "true", "yes"}
    try:
        prepare_zoo_models(args or configured_models(), offline=offline)
    except (GnwsError, KeyError) as exc:
        logger.error("%s", exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
