"""Container health check of the torchserve image: every model has its workers READY.

TorchServe (>= 0.11) wants a token on every API, ``/ping`` included; the tokens are read from
``key_file.json`` in the working directory each time, so keys refreshed through the management
API are picked up. ``/ping`` says Healthy before the models are loaded, hence the management-API
check of each model's workers (the management API listens on the container's loopback only).
Exit status 0 when healthy, 1 (with the reason on stderr) otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

KEY_FILE = Path(os.environ.get("GNWS_TS_KEY_FILE", "/home/model-server/key_file.json"))
INFERENCE_URL = os.environ.get("GNWS_TS_INFERENCE_URL", "http://127.0.0.1:8080")
MANAGEMENT_URL = os.environ.get("GNWS_TS_MANAGEMENT_URL", "http://127.0.0.1:8081")


def get_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - fixed loopback URLs
        return json.load(resp)


def problem() -> str | None:
    """``None`` when healthy, else what is wrong."""
    keys = json.loads(KEY_FILE.read_text())
    status = get_json(f"{INFERENCE_URL}/ping", keys["inference"]["key"]).get("status")
    if status != "Healthy":
        return f"/ping says {status!r}"
    token = keys["management"]["key"]
    models = get_json(f"{MANAGEMENT_URL}/models", token)["models"]
    if not models:
        return "no model is registered"
    for model in models:
        for desc in get_json(f"{MANAGEMENT_URL}/models/{model['modelName']}", token):
            states = [w["status"] for w in desc["workers"]]
            if not states or any(s != "READY" for s in states):
                return f"{model['modelName']}: workers {states}"
    return None


def main() -> int:
    try:
        reason = problem()
    except (OSError, ValueError, KeyError) as exc:  # urllib errors are OSErrors; expired keys answer 400
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        sys.stderr.write(f"unhealthy: {reason}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
