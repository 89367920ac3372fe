"""Container health check of the torchserve image: the configured models are registered with READY
workers and the inference listener answers.

It reads the config TorchServe runs with (``render_config.py`` wrote it: listener addresses and the
``load_models`` list) and the tokens in ``key_file.json``, both afresh on every run. TorchServe 0.12
token auth (``docs/token_authorization_api.md`` and ``TokenAuthorization.java`` upstream): every
inference and management request needs a key, ``/ping`` included; the metrics port needs none. The
inference and management keys expire after ``token_expiration_min``; the "API" key never does and
``GET /token?type=...`` on the management API with it issues a new key, which TorchServe writes into
``key_file.json`` (TorchServe itself never reads that file back).

So this check keeps working indefinitely: when the management key has expired (or is about to), it
renews the management key with the API key (the management API is on the container's loopback only,
so nobody outside holds that key). It never renews the inference key, which clients were given: with
a valid inference key ``/ping`` must say Healthy; with an expired one the listener must answer
TorchServe's token refusal, and the output says that clients need a renewed key.
Exit status 0 when healthy, 1 (with the reason on stderr) otherwise.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from render_config import read_properties

CONFIG = Path(os.environ.get("GNWS_TS_EFFECTIVE_CONFIG", "/home/model-server/effective-config.properties"))
KEY_FILE = Path(os.environ.get("GNWS_TS_KEY_FILE", "/home/model-server/key_file.json"))
# Renew the management key this long before it expires (a check takes at most a few seconds).
RENEW_MARGIN = timedelta(seconds=60)
TIMEOUT_S = 5.0
TOKEN_REFUSED = "Token Authorization failed"


def expiry(entry: dict[str, Any]) -> datetime:
    """The ``expiration time`` of a key-file entry (a Java ``Instant``: ISO 8601, up to 9 fraction digits, Z)."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", entry["expiration time"]).replace("Z", "+00:00")
    return datetime.fromisoformat(text)


def expires_soon(entry: dict[str, Any], now: datetime, margin: timedelta = RENEW_MARGIN) -> bool:
    return expiry(entry) <= now + margin


def get(url: str, token: str | None) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:  # noqa: S310 - URLs from our own config
        return resp.read()


def management_key(management_url: str) -> str:
    """The current management key, renewed with the API key when it has expired or is about to."""
    keys = json.loads(KEY_FILE.read_text())
    if not expires_soon(keys["management"], datetime.now(UTC)):
        return str(keys["management"]["key"])
    get(f"{management_url}/token?type=management", keys["API"]["key"])
    renewed = json.loads(KEY_FILE.read_text())["management"]
    if renewed["key"] == keys["management"]["key"]:
        raise ValueError(f"TorchServe did not write a new management key into {KEY_FILE}")
    return str(renewed["key"])


def inference_problem(inference_url: str) -> str | None:
    """``None`` when the inference listener answers as it should for the current inference key."""
    entry = json.loads(KEY_FILE.read_text())["inference"]
    if not expires_soon(entry, datetime.now(UTC), margin=timedelta(0)):
        status = json.loads(get(f"{inference_url}/ping", entry["key"])).get("status")
        return None if status == "Healthy" else f"/ping says {status!r}"
    try:
        get(f"{inference_url}/ping", entry["key"])
    except urllib.error.HTTPError as exc:
        if TOKEN_REFUSED in exc.read().decode(errors="replace"):
            print(f"inference key expired at {entry['expiration time']}: clients need a renewed key "  # noqa: T201
                  "(docs/containers.md, 'Token keys')")
            return None
        return f"/ping answered {exc.code} to an expired key, not the token refusal"
    return "/ping accepted an expired inference key"


def problem() -> str | None:
    """``None`` when healthy, else what is wrong."""
    props = read_properties(CONFIG)
    management_url, inference_url = props["management_address"], props["inference_address"]
    wanted = [pair.partition("=")[0] for pair in props.get("load_models", "").split(",") if pair]
    if not wanted:
        return f"{CONFIG} names no model in load_models"
    token = management_key(management_url)
    registered = {m["modelName"] for m in json.loads(get(f"{management_url}/models", token))["models"]}
    missing = [name for name in wanted if name not in registered]
    if missing:
        return f"not registered (see TorchServe's log): {', '.join(missing)}"
    for name in wanted:
        for desc in json.loads(get(f"{management_url}/models/{name}", token)):
            states = [w["status"] for w in desc["workers"]]
            if not states or any(s != "READY" for s in states):
                return f"{name}: workers {states}"
    return inference_problem(inference_url)


def main() -> int:
    try:
        reason = problem()
    except urllib.error.HTTPError as exc:  # e.g. a refused management key
        reason = f"{exc.url}: {exc.code} {exc.read().decode(errors='replace').strip()[:300]}"
    except (OSError, ValueError, KeyError) as exc:  # connection errors are OSErrors
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        sys.stderr.write(f"unhealthy: {reason}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
