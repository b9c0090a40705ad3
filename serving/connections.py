"""uvicorn's HTTP protocol with a deadline on every request head (request line and headers).

uvicorn closes a connection left idle between requests (``timeout_keep_alive``), and this
server answers a stalled body 408 (``Limits.body_timeout_s``), but nothing bounds a connection
that opens and says nothing, or sends its request head a byte at a time: a few hundred such
clients (slowloris) hold every socket and file descriptor the server has. Here a connection's
first request head must be complete within ``head_timeout_s`` of the connection, and each later
one within ``head_timeout_s`` of its first byte (the idle time before it is uvicorn's keep-alive
timeout), else the server answers 408 and closes it.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)


def _timeout_response() -> bytes:
    """Vertex's error shape, as the application answers a stalled body."""
    body = json.dumps({"error": {"code": 408, "message": "the request head (request line and headers) was not "
                                 "sent in time", "status": "DEADLINE_EXCEEDED"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


_TIMEOUT_RESPONSE = _timeout_response()


class HeadTimeoutProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` closing connections whose request head stalls."""

    head_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        client = "%s:%d" % self.client if self.client else "a client"
        logger.warning("closed the connection from %s: its request head was not complete within %g s",
                       client, self.head_timeout_s)
        if self.cycle is None or self.cycle.response_complete:  # no response of ours under way
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def head_timeout_protocol(head_timeout_s: float) -> type[HeadTimeoutProtocol]:
    """The protocol class to hand uvicorn (``Config(http=...)``) for this deadline."""
    if not head_timeout_s > 0:
        raise ValueError(f"head_timeout_s must be > 0, got {head_timeout_s}")
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": float(head_timeout_s)})
