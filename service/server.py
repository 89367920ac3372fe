"""Running the app under uvicorn, with the connection-level limits the app itself cannot apply.

:func:`uvicorn_config` is what ``gnws serve`` (and the tests' live servers) run: uvicorn with
``limit_concurrency`` = ``max_connections`` (503 above it) and :class:`GuardedHttpToolsProtocol`,
uvicorn's httptools protocol with two changes:

- a connection must send its request line and headers within ``header_timeout_s`` of its first
  byte (or of connecting): otherwise it gets a JSON 408 and is closed, so clients that connect
  and send nothing, or headers byte by byte, do not hold sockets for ever;
- requests uvicorn cannot parse (a malformed request line, a URL or headers too long for its
  parser) get the API's JSON error shape instead of uvicorn's plain-text 400;
- a response that closes the connection before the request body has arrived (a 413 for an
  oversize upload, sent as soon as ``Content-Length`` says so, to a client that asked for
  ``Connection: close``) is a lingering close, as nginx and Apache do it: the server stops
  sending, then reads and discards what the client is still sending (for up to ``LINGER_S``
  seconds, and while it keeps sending) before closing. Closing at once would make the kernel
  answer the unread data with a reset, and a client that sends its whole body before reading
  (Python's urllib, ...) would see "connection reset" instead of the 413.

:func:`run_until_stopped` runs the server until SIGINT or SIGTERM and returns once uvicorn has shut
down gracefully (open requests finished, the lifespan's shutdown run), so ``gnws serve`` then exits
with status 0.

The app's own limits (uploads, processing places, body sizes) are in :mod:`service.inference`,
:mod:`service.uploads` and :mod:`service.limits`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .settings import Settings

logger = logging.getLogger(__name__)

LINGER_S = 30.0


class _LingeringTransport:
    """The transport a request cycle writes to: ``close()`` lingers while the request body is
    still arriving (see the module docstring); everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        cycle = self._protocol.cycle
        if cycle is None or not cycle.more_body or self._transport.is_closing() or not self._transport.can_write_eof():
            self._transport.close()
            return
        self._transport.write_eof()  # the response is complete: no more bytes from us
        self._protocol.linger(LINGER_S)


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"detail": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and JSON parse errors (see the module docstring)."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()  # a keep-alive connection's next request: its headers have the same deadline

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.transport is self.transport:
            self.cycle.transport = _LingeringTransport(self.transport, self)  # type: ignore[assignment]

    def linger(self, seconds: float) -> None:
        """Discard what the client still sends (uvicorn drops body data once a response is complete,
        and closes after ``timeout_keep_alive`` seconds without data), but for ``seconds`` at most."""
        self.loop.call_later(seconds, self.transport.close)

    def send_400_response(self, msg: str) -> None:
        self._cancel_header_timer()
        self.transport.write(_raw_response(400, "Bad Request", f"{msg} (malformed request line or headers, or a URL "
                                                                "or header too long)"))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_raw_response(
                408, "Request Timeout",
                f"the request line and headers did not arrive within {self.header_timeout_s:g} s",
            ))
            self.transport.close()


def protocol_for(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with ``settings``' header deadline."""
    return type("GnwsHttpProtocol", (GuardedHttpToolsProtocol,), {"header_timeout_s": settings.header_timeout_s})


def uvicorn_config(app: Any, settings: Settings, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn configuration ``gnws serve`` runs ``app`` with (``kwargs`` override or add options)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": protocol_for(settings),
        "limit_concurrency": settings.max_connections,
        "timeout_graceful_shutdown": 30,
    }
    return uvicorn.Config(app, **(options | kwargs))


class _StopSignal(BaseException):  # like KeyboardInterrupt: not caught by `except Exception`
    """Raised by the handlers :func:`run_until_stopped` installs, with the signal's number."""


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise _StopSignal(signum)


def run_until_stopped(config: uvicorn.Config) -> None:
    """Serve until SIGINT or SIGTERM; return after uvicorn's graceful shutdown.

    uvicorn handles both signals itself while it serves, and after its shutdown re-sends the one it
    received to the handler that was there before it, so that a process ends as the signal would
    have ended it (SIGINT as ``KeyboardInterrupt``, SIGTERM as death by signal, status 143). Here
    that earlier handler raises an exception this function catches: a completed shutdown returns
    normally, whichever signal asked for it. The previous handlers are restored on return.
    """
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _stopped) for sig in handled}
    try:
        uvicorn.Server(config).run()
    except _StopSignal as stop:
        logger.info("stopped by %s", signal.Signals(stop.args[0]).name)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
