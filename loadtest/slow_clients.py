"""Hostile and careless clients beside steady traffic (loopback only, bounded in count and time):

- stalled readers: a streaming request with a long answer on a socket with a tiny receive
  buffer, never read (the server must cut it off and free its slot);
- queued leavers: a streaming request whose client disconnects a moment later, often while
  still queued (the server must drop it from the queue);
- half-sent headers: a connection that sends part of its request headers and then nothing
  (the server must close it).

Leavers and half-sent headers start every ``interval_s``, a stalled reader every
``stalled_every`` intervals; every socket is closed at the end. With ``polite`` the same clients
behave: the stalled reader's twin reads its answer, no headers are left half-sent (the leavers
still leave). Comparing steady traffic beside the polite twins with steady traffic beside the
hostile clients isolates what not reading and never finishing headers cost others, from the
engine work the requests themselves are.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass
from urllib.parse import urlparse


@dataclass(frozen=True)
class SlowClientConfig:
    model: str
    interval_s: float = 2.0
    stalled_every: int = 5
    stalled_n: int = 1
    stalled_max_tokens: int = 64
    polite: bool = False
    hold_s: float = 60.0  # how long a stalled reader or half-sent header connection stays open at most


def _request(host: str, body: dict) -> bytes:
    raw = json.dumps(body).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw


async def _open(address: tuple[str, int], receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return sock


class SlowClients:
    def __init__(self, url: str, config: SlowClientConfig) -> None:
        parsed = urlparse(url)
        if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("slow clients only target a server on this machine")
        self.address = (parsed.hostname, parsed.port or 80)
        self.config = config
        self.counts = {"stalled_readers": 0, "queued_leavers": 0, "half_sent_headers": 0, "connect_errors": 0}
        self._sockets: list[tuple[float, socket.socket]] = []  # (opened at, socket)
        self._readers: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event) -> dict:
        loop = asyncio.get_running_loop()
        round_ = 0
        try:
            while not stop.is_set():
                kinds = ["queued_leaver", "half_sent_headers"]
                if round_ % self.config.stalled_every == 0:
                    kinds.append("stalled_reader")
                round_ += 1
                for kind in kinds:
                    try:
                        await getattr(self, kind)(loop)
                    except OSError:
                        self.counts["connect_errors"] += 1
                try:
                    await asyncio.wait_for(stop.wait(), self.config.interval_s)
                except asyncio.TimeoutError:
                    pass
                self._close_old(loop.time())
        finally:
            for task in self._readers:
                task.cancel()
            for _, sock in self._sockets:
                sock.close()
        return dict(self.counts)

    def _keep(self, sock: socket.socket, loop) -> None:
        self._sockets.append((loop.time(), sock))

    def _close_old(self, now: float) -> None:
        keep = []
        for opened_at, sock in self._sockets:
            if now - opened_at > self.config.hold_s:
                sock.close()
            else:
                keep.append((opened_at, sock))
        self._sockets = keep

    async def stalled_reader(self, loop) -> None:
        sock = await _open(self.address, receive_buffer=2048)
        await loop.sock_sendall(sock, _request(self.address[0], {
            "model": self.config.model, "prompt": "Count:", "max_tokens": self.config.stalled_max_tokens,
            "n": self.config.stalled_n, "temperature": 1.0, "ignore_eos": True, "stream": True}))
        self._keep(sock, loop)
        if self.config.polite:  # the twin reads its answer to the end
            task = asyncio.ensure_future(_read_all(loop, sock))
            self._readers.add(task)
            task.add_done_callback(self._readers.discard)
        self.counts["stalled_readers"] += 1

    async def queued_leaver(self, loop) -> None:
        sock = await _open(self.address)
        await loop.sock_sendall(sock, _request(self.address[0], {
            "model": self.config.model, "prompt": "Hello", "max_tokens": 32, "stream": True}))
        await asyncio.sleep(0.2)
        sock.close()
        self.counts["queued_leavers"] += 1

    async def half_sent_headers(self, loop) -> None:
        if self.config.polite:
            return
        sock = await _open(self.address)
        await loop.sock_sendall(sock, f"POST /v1/completions HTTP/1.1\r\nHost: {self.address[0]}\r\nX-Slow: ".encode())
        self._keep(sock, loop)
        self.counts["half_sent_headers"] += 1


async def _read_all(loop, sock: socket.socket) -> None:
    try:
        while await loop.sock_recv(sock, 65536):
            pass
    except OSError:
        pass


async def run_slow_clients(url: str, config: SlowClientConfig, stop: asyncio.Event) -> dict:
    return await SlowClients(url, config).run(stop)
