"""What `retrain serve` does about clients that connect and then stall, hog or vanish.

Sixteen idle sockets, each sending the headers of a POST /predict and four bytes of its body,
used to lock the server: each request took a queue slot before its body was read, and nothing
timed the body out. Here:
- `CompleteBody` reads a request's whole body, under a deadline and the size limit, before the
  application sees the request, so a queue slot is only ever taken by a request that has
  arrived; a body not complete in time gets 408 and its connection is closed;
- `guarded_protocol` gives uvicorn's HTTP/1.1 protocol a deadline for the request headers and
  caps the connections one client address may hold open, and all clients together (loopback alone
  offers millions of addresses; the cap keeps file descriptors for the server's own files);
- a client that disconnects mid-request costs one short log line, not a traceback.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from typing import Any, Awaitable, Callable

log = logging.getLogger("retrain.serve")

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _Disconnected(Exception):
    pass


class _TooLarge(Exception):
    pass


def _client(scope: Message) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "client"


async def _refuse(send: Send, status: int, message: str) -> None:
    """A JSON error that closes the connection: the rest of the body is never read."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def too_large(max_bytes: int) -> str:
    return f"request body over the {max_bytes / (1 << 20):g} MiB limit"


class CompleteBody:
    """ASGI middleware: the whole body, read within `timeout_s` and up to `max_bytes`, before the app runs."""

    def __init__(self, app, max_bytes: int, timeout_s: float, gauges: dict[str, int]):
        """gauges: where "receiving_bodies" is counted (httpguard.Metrics's, shown by /metrics)."""
        self.app, self.max_bytes, self.timeout_s, self.gauges = app, max_bytes, timeout_s, gauges

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.gauges["receiving_bodies"] += 1
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except asyncio.TimeoutError:
            log.info("%s: request body not complete after %g s: 408, connection closed", _client(scope), self.timeout_s)
            return await _refuse(send, 408, f"request body not complete within {self.timeout_s:g} s")
        except _TooLarge:
            return await _refuse(send, 413, too_large(self.max_bytes))
        except _Disconnected:
            log.info("%s: client disconnected before sending its whole request", _client(scope))
            return
        finally:
            self.gauges["receiving_bodies"] -= 1
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then waits on the real one (for the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay


def guarded_protocol(header_timeout_s: float, max_per_client: int, max_total: int) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers and caps on open connections,
    per client address and in all."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    open_by_client: Counter[str] = Counter()  # this server's connections by client address (one event loop)

    class GuardedH11Protocol(H11Protocol):
        _counted, _deadline, _host = False, None, ""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._host = self.client[0] if self.client else ""
            if why := self._over_a_cap():
                log.warning("%s: %s: connection refused", self._host, why)
                transport.close()
                return
            open_by_client[self._host] += 1
            self._counted = True
            self._arm()

        def _over_a_cap(self) -> str:
            """Why a new connection from this client is refused ('' when it is not)."""
            if open_by_client[self._host] >= max_per_client:
                return f"over {max_per_client} open connections from one client"
            if open_by_client.total() >= max_total:
                return f"the server holds {max_total} open connections, its limit"
            return ""

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._counted:
                self._counted = False
                open_by_client[self._host] -= 1
                if not open_by_client[self._host]:
                    del open_by_client[self._host]
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():  # headers complete: CompleteBody times the body
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # a kept-alive connection's next request has the same deadline

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if not self._in_request() and not self.transport.is_closing():
                log.info("%s: no complete request headers within %g s: connection closed", self._host,
                         header_timeout_s)
                self.transport.close()

    return GuardedH11Protocol
