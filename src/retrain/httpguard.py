"""What stands between the network and the web app's routes: Host and Origin checks, body limits,
security headers, request metrics, and errors answered as one line of JSON.

Safe by default: the server binds 127.0.0.1 and then answers only loopback Host names and
same-origin writes (no DNS rebinding or cross-site uploads); request bodies over
`max_upload_bytes` get 413.
"""
from __future__ import annotations

import ipaddress
import logging
import time
from collections import deque
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .connections import too_large
from .webconfig import ApiError, ServeConfig

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                               "frame-ancestors 'none'",
}
# report.html: its own inline styles and embedded PNGs, no scripts, shown in a frame of the app's page.
REPORT_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                             "frame-ancestors 'self'", "X-Frame-Options": "SAMEORIGIN"}


class Metrics:
    """Request counts by route and status, and latency over the last `window` requests per route."""

    def __init__(self, window: int = 2000):
        self.started = time.time()
        self.counts: dict[str, dict[str, int]] = {}
        self.latency: dict[str, deque[float]] = {}
        self.window = window
        self.gauges = {"receiving_bodies": 0}  # requests whose body is still arriving (CompleteBody counts them)

    def record(self, route: str, status: int, seconds: float) -> None:
        by_status = self.counts.setdefault(route, {})
        by_status[str(status)] = by_status.get(str(status), 0) + 1
        self.latency.setdefault(route, deque(maxlen=self.window)).append(seconds)

    def summary(self) -> dict:
        lat = {}
        for route, values in self.latency.items():
            ms = np.array(values) * 1000
            lat[route] = {"count": len(ms), "mean": round(float(ms.mean()), 2),
                          **{f"p{q}": round(float(np.percentile(ms, q)), 2) for q in (50, 90, 99)}}
        return {"uptime_s": round(time.time() - self.started, 1), "requests": self.counts,
                "latency_ms": lat} | self.gauges


def json_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Observe:
    """Outermost ASGI layer: metrics for every request, and security headers on every response."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)  # a route may set its own (report.html does)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = getattr(scope.get("route"), "path", None)  # the template, never the raw path
            self.metrics.record(f"{scope['method']} {route}" if route else "unmatched", status[0],
                                time.perf_counter() - start)


class Guard:
    """Host and Origin checks (loopback only, same-origin writes); Content-Length over the limit.

    Bodies without a Content-Length are counted as they arrive by connections.CompleteBody.
    """

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope["method"], Headers(scope=scope))
        if refusal:
            return await json_error(*refusal)(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, method: str, headers: Headers) -> tuple[int, str] | None:
        host = headers.get("host", "")
        allowed = self.config.allowed_hosts
        if allowed is not None and hostname(host) not in allowed:
            return 403, f"Host '{host[:100]}' refused: this server answers only {', '.join(allowed)}"
        origin = headers.get("origin")
        if method not in ("GET", "HEAD", "OPTIONS") and origin and urlsplit(origin).netloc != host:
            return 403, "cross-origin request refused"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.config.max_upload_bytes:
            return 413, too_large(self.config.max_upload_bytes)
        return None


def hostname(host_header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1'."""
    return urlsplit(f"//{host_header}").hostname or ""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return json_error(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return json_error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def went_away(request: Request, e: ClientDisconnect):  # nobody is listening: one line, no traceback
        logging.getLogger("retrain.serve").info("client disconnected during %s", request.url.path)
        return json_error(499, "client disconnected")

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):  # a bug: say so in JSON, keep the traceback in the log
        logging.getLogger("retrain.serve").exception("unhandled error on %s", request.url.path)
        return json_error(500, f"internal error: {type(e).__name__}")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return json_error(422, "; ".join(describe_invalid(err) for err in e.errors()))


def describe_invalid(err: dict) -> str:
    """One pydantic error as 'top_k: Input should be ...' or 'body.name: ...'."""
    if err["type"] == "json_invalid":
        return f"invalid JSON body: {err.get('ctx', {}).get('error', err['msg'])}"
    loc = [str(x) for x in err["loc"]]
    where = ".".join(loc[1:] if loc[0] in ("query", "path") and len(loc) > 1 else loc)
    return f"{where}: {err['msg']}"
