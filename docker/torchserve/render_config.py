"""Write the TorchServe configuration the torchserve container starts with (called by ``entrypoint.sh``).

The shipped ``config.properties`` binds every listener to 127.0.0.1. This renders it for one start:

* inference and metrics move to one explicit interface address: ``TS_BIND_ADDRESS`` when set, else
  the container's own address (the source address of its default route, or what its hostname
  resolves to: Docker writes the container's address into ``/etc/hosts``). Wildcards (``0.0.0.0``,
  ``::``) are refused. Management and both gRPC listeners stay on 127.0.0.1.
* ``load_models`` names exactly the models to serve (``NAME=NAME.mar``), so an archive left in the
  model store by an earlier configuration (the ``gnws-mar`` volume outlives containers) is not served.

Standard library plus the model-name rule of the installed package (:data:`gnws.torchserve.MODEL_NAME`,
which imports nothing heavy); the tests render their config with the same :func:`render`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from gnws.torchserve import MODEL_NAME

logger = logging.getLogger("gnws.torchserve.render_config")

# Listeners published outside the container; every other address must stay on the loopback.
PUBLIC_KEYS = ("inference_address", "metrics_address")
LOOPBACK_KEYS = ("management_address", "grpc_inference_address", "grpc_management_address")
# TEST-NET-1 (RFC 5737): connecting a UDP socket to it only picks a route, nothing is sent.
_ROUTE_PROBE = ("192.0.2.1", 9)


def read_properties(path: str | os.PathLike[str]) -> dict[str, str]:
    """``key=value`` lines of a Java properties file (comments and blank lines skipped)."""
    props: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def format_properties(props: Mapping[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in props.items())


def address_host(value: str) -> str:
    """The host of ``http://HOST:PORT`` (brackets of an IPv6 literal removed) or of a bare address."""
    if "://" in value:
        host = urlsplit(value).hostname
        if host is None:
            raise ValueError(f"{value!r} names no host")
        return host
    return value.strip("[]")


def check_explicit(host: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address ``host`` as an IP literal that names one interface.

    Raises:
        ValueError: not an IP literal, or a wildcard (``0.0.0.0``, ``::``).
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{what}: expected an IP address of one interface (e.g. 172.18.0.5), got {host!r}") from None
    if ip.is_unspecified:
        raise ValueError(
            f"{what}: {host} is a wildcard (every interface); name one interface, e.g. the container's own "
            "address, or leave TS_BIND_ADDRESS unset to use it"
        )
    return ip


def primary_address() -> str:
    """This machine's (container's) own address: the default route's source, else the hostname's address.

    Falls back to 127.0.0.1 (with a warning) when there is no network but the loopback.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(_ROUTE_PROBE)
            address = s.getsockname()[0]
        except OSError:
            address = ""
    if address and not ipaddress.ip_address(address).is_unspecified:
        return address
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = ""
    if address and not ipaddress.ip_address(address).is_loopback:
        return address
    logger.warning("no network interface but the loopback: inference and metrics listen on 127.0.0.1 only")
    return "127.0.0.1"


def bind_address(env: Mapping[str, str]) -> str:
    """``TS_BIND_ADDRESS`` (checked) or :func:`primary_address`."""
    chosen = env.get("TS_BIND_ADDRESS", "").strip() or primary_address()
    check_explicit(chosen, "TS_BIND_ADDRESS")
    return chosen


def with_host(url: str, host: str) -> str:
    """``url`` with its host replaced (scheme and port kept)."""
    parts = urlsplit(url)
    if parts.port is None:
        raise ValueError(f"{url!r} has no port")
    literal = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{literal}:{parts.port}"


def render(
    props: Mapping[str, str], *, bind: str, models: Sequence[str], model_store: str | None = None
) -> dict[str, str]:
    """The config TorchServe starts with: public listeners on ``bind``, exactly ``models`` loaded.

    ``model_store`` (when given) replaces the template's store, and ``allowed_urls`` with it.

    Raises:
        ValueError: ``bind`` is a wildcard, a model name is not a TorchServe name, no model is given, or the
            template puts a loopback-only listener elsewhere.
    """
    check_explicit(bind, "bind address")
    if not models:
        raise ValueError("no model to serve; set GNWS_TORCHSERVE_MODELS (space-separated zoo keys or store names)")
    for name in models:
        if not MODEL_NAME.match(name):
            raise ValueError(f"TorchServe model names match {MODEL_NAME.pattern}; got {name!r}")
    out = dict(props)
    for key in PUBLIC_KEYS:
        out[key] = with_host(props[key], bind)
    for key in LOOPBACK_KEYS:
        if key in props and not ipaddress.ip_address(address_host(props[key])).is_loopback:
            raise ValueError(f"{key} must stay on the loopback (127.0.0.1), the template has {props[key]!r}")
    if model_store is not None:
        store = Path(model_store).resolve()
        out["model_store"] = str(store)
        out["allowed_urls"] = f"file://{store}/.*"
    out["load_models"] = ",".join(f"{name}={name}.mar" for name in dict.fromkeys(models))
    return out


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("models", nargs="+", metavar="NAME", help="TorchServe model names (NAME.mar in the model store)")
    p.add_argument("--template", type=Path, default=Path(os.environ.get("TS_CONFIG_FILE", "config.properties")),
                   help="shipped config (env TS_CONFIG_FILE, default: %(default)s)")
    p.add_argument("--model-store", help="folder of the .mar files (default: the template's model_store)")
    p.add_argument("--out", type=Path, required=True, help="where to write the rendered config")
    args = p.parse_args(argv)
    try:
        props = render(read_properties(args.template), bind=bind_address(os.environ), models=args.models,
                       model_store=args.model_store)
    except (OSError, ValueError, KeyError) as exc:
        logger.error("cannot write the TorchServe config: %s", exc)
        return 2
    write_atomic(args.out, format_properties(props))
    logger.info("%s: inference %s, metrics %s, models %s", args.out, props["inference_address"],
                props["metrics_address"], props["load_models"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
