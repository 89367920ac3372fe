"""TorchServe 0.12 token keys of the torchserve container: print one, renewing it when it has expired.

    docker compose exec -T torchserve python /opt/gnws/torchserve/keys.py inference           # current key
    docker compose exec -T torchserve python /opt/gnws/torchserve/keys.py inference --renew   # a new one

How TorchServe's token auth works (``docs/token_authorization_api.md`` and ``TokenAuthorization.java``
upstream): at start it writes ``key_file.json`` into its working directory with three keys. The
inference key is needed by every request on the inference port (``/ping`` included), the management
key by every management request; both expire ``token_expiration_min`` after they were issued. The
"API" key never expires and serves only ``GET /token?type=inference|management`` on the management
API, which replaces that key (the old one stops working at once) and rewrites ``key_file.json``.
TorchServe keeps the keys in memory and never reads the file back. The metrics port needs no key.

Here the management API listens on the container's loopback only, so renewing goes through
``docker compose exec``. ``--renew`` replaces a key that still works: every client holding it must
then fetch the new one. Standard library only (the health check imports it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from render_config import read_properties

CONFIG = Path(os.environ.get("GNWS_TS_EFFECTIVE_CONFIG", "/home/model-server/effective-config.properties"))
KEY_FILE = Path(os.environ.get("GNWS_TS_KEY_FILE", "/home/model-server/key_file.json"))
KINDS = ("inference", "management")
TIMEOUT_S = 5.0


def read_keys() -> dict[str, Any]:
    return json.loads(KEY_FILE.read_text())


def expiry(entry: dict[str, Any]) -> datetime:
    """The ``expiration time`` of a key-file entry (a Java ``Instant``: ISO 8601, up to 9 fraction digits, Z)."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", entry["expiration time"]).replace("Z", "+00:00")
    return datetime.fromisoformat(text)


def expires_within(entry: dict[str, Any], margin: timedelta) -> bool:
    """Whether the key has expired, or will within ``margin``."""
    return expiry(entry) <= datetime.now(UTC) + margin


def get(url: str, token: str | None) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:  # noqa: S310 - URLs from our own config
        return resp.read()


def management_url() -> str:
    return read_properties(CONFIG)["management_address"]


def renew(kind: str) -> str:
    """A new ``kind`` key from TorchServe (``GET /token?type=KIND`` with the API key); the old one stops working.

    Raises:
        ValueError: TorchServe answered but wrote no new key.
        OSError: TorchServe refused or did not answer (``urllib.error.HTTPError`` is one).
    """
    if kind not in KINDS:
        raise ValueError(f"key kind must be one of {KINDS}, got {kind!r}")
    before = read_keys()
    get(f"{management_url()}/token?type={kind}", before["API"]["key"])
    after = read_keys()[kind]
    if after["key"] == before[kind]["key"]:
        raise ValueError(f"TorchServe did not write a new {kind} key into {KEY_FILE}")
    return str(after["key"])


def current_key(kind: str, margin: timedelta = timedelta(0)) -> str:
    """The ``kind`` key from ``key_file.json``, renewed first when it expires within ``margin``."""
    entry = read_keys()[kind]
    return renew(kind) if expires_within(entry, margin) else str(entry["key"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--renew", action="store_true", help="replace the key even if it has not expired")
    args = p.parse_args(argv)
    try:
        key = renew(args.kind) if args.renew else current_key(args.kind)
    except (OSError, ValueError, KeyError) as exc:
        sys.stderr.write(f"keys: {type(exc).__name__}: {exc}\n")
        return 1
    sys.stdout.write(f"{key}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
