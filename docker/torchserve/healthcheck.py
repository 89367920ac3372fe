"""Container health check of the torchserve image: the configured models are registered with READY
workers and the inference listener answers.

It reads the config TorchServe runs with (``render_config.py`` wrote it: listener addresses and the
``load_models`` list) and the keys in ``key_file.json``, both afresh on every run (how the keys work:
``keys.py``). The inference and management keys expire after ``token_expiration_min``, so this check
keeps working indefinitely by renewing the management key (with the API key, which never expires)
when it has expired or is about to; the management API is on the container's loopback only, so
nobody outside holds that key. It never renews the inference key, which clients were given: with a
valid inference key ``/ping`` must say Healthy; with an expired one the listener must answer
TorchServe's token refusal, and the output says that clients need a renewed key.
Exit status 0 when healthy, 1 (with the reason on stderr) otherwise.
"""

from __future__ import annotations

import json
import sys
import urllib.error
from datetime import timedelta

from keys import CONFIG, current_key, expires_within, get, read_keys
from render_config import read_properties

# Renew the management key this long before it expires (a check takes at most a few seconds).
RENEW_MARGIN = timedelta(seconds=60)
TOKEN_REFUSED = "Token Authorization failed"


def inference_problem(inference_url: str) -> str | None:
    """``None`` when the inference listener answers as it should for the current inference key."""
    entry = read_keys()["inference"]
    if not expires_within(entry, timedelta(0)):
        status = json.loads(get(f"{inference_url}/ping", entry["key"])).get("status")
        return None if status == "Healthy" else f"/ping says {status!r}"
    try:
        get(f"{inference_url}/ping", entry["key"])
    except urllib.error.HTTPError as exc:
        if TOKEN_REFUSED in exc.read().decode(errors="replace"):
            sys.stdout.write(f"inference key expired at {entry['expiration time']}: clients need a renewed one "
                             "(keys.py inference; docs/containers.md)\n")
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
    token = current_key("management", RENEW_MARGIN)
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
