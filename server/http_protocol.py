"""uvicorn's h11 protocol with bounded request headers: their size (h11's incomplete-event
limit) and the time a client may take to send them. A connection whose headers never finish
is closed instead of holding a socket and a protocol object forever (slowloris). The kernel's
send buffer per connection is bounded too, so a client that stops reading is noticed (the
response's sends block, and ``--stream-send-timeout`` cuts it off) after ~100 KiB, not after
the megabytes a loopback socket may otherwise absorb."""

from __future__ import annotations

import asyncio
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


SEND_BUFFER_BYTES = 64 << 10


def bounded_h11_protocol(header_timeout_s: float) -> type[H11Protocol]:
    class HeaderDeadlineProtocol(H11Protocol):
        """Request headers must be complete within ``header_timeout_s`` of their first byte
        (or of the connection's opening)."""

        _header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
                except OSError:
                    pass
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_deadline = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection whose request headers did not arrive in %.0f s",
                                 header_timeout_s)
                self.transport.close()

    return HeaderDeadlineProtocol
