"""`retrain serve`: the web app and HTTP API, put together from its parts.

| module | what |
|---|---|
| httpguard.py | loopback-only Host names, same-origin writes, body limits, security headers, metrics, JSON errors |
| uploads.py | images recognised by their bytes, decoded under the pixel limit |
| batching.py | a bounded queue of predict requests, one ONNX Runtime call for all waiting images |
| workspace.py | classes and photos kept on disk across restarts, server-chosen file names, undo |
| jobs.py, trainjob.py | one training run at a time in a low-priority worker process, followed as JSON-lines events |
| modelstore.py | trained models: switch the served one without a restart, report, download |
| routes_*.py | the HTTP routes over those |

Stalled, greedy and vanishing clients are handled in connections.py (header and body deadlines,
a queue slot only once the body is complete, connections per client capped).
"""
from __future__ import annotations

import asyncio
import os
import resource
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from . import __version__
from .connections import CompleteBody, guarded_protocol
from .errors import UserError
from .httpguard import Guard, Metrics, Observe, add_error_handlers, is_loopback
from .prediction import Classifier, load
from .routes_photos import add_photo_routes
from .routes_predict import add_prediction_routes
from .routes_training import add_training_routes
from .webconfig import ServeConfig
from .webstate import State
from .workspace import claim

STATIC = Path(__file__).parent / "static"
__all__ = ["STATIC", "ServeConfig", "create_app", "serve"]


def create_app(model: Classifier | str | os.PathLike | None, config: ServeConfig | None = None) -> FastAPI:
    """The ASGI application serving `model` (a Classifier, a model directory or an .onnx file).

    None: the workspace's last served model, or else the bundled ImageNet classifier.
    """
    config = ServeConfig() if config is None else config
    config.validate()  # again: a limit may have been changed since the config was made
    startup = model if isinstance(model, Classifier) or model is None else load(model)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.serve = state = State(startup, config, metrics, _imagenet)
        task = asyncio.create_task(state.batcher.run(), name="batcher")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.get_running_loop().run_in_executor(None, state.close)

    app = FastAPI(title="retrain serve", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; /openapi.json stays
                  description="Collect photos, train a classifier, try it and fix its data; or classify images.")
    add_error_handlers(app)
    add_prediction_routes(app)
    add_photo_routes(app)
    add_training_routes(app)
    _add_pages(app)
    app.add_middleware(CompleteBody, max_bytes=config.max_upload_bytes, timeout_s=config.body_timeout_s,
                       gauges=metrics.gauges)
    app.add_middleware(Guard, config=config)
    app.add_middleware(Observe, metrics=metrics)  # added last: outermost, so it sees every refusal
    return app


def _add_pages(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    @app.get("/train", include_in_schema=False)  # the old address of the training steps: the same page
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def serve(model: str | os.PathLike | None, host: str = "127.0.0.1", port: int = 8000,
          config: ServeConfig | None = None) -> int:
    """Serve `model` (default: the workspace's last one, else the bundled ImageNet classifier) until SIGTERM or Ctrl-C."""
    import uvicorn

    clf = load(model) if model else None
    config = config or ServeConfig()
    check_port_free(host, port)
    claim(config.workspace_dir()).release()  # a workspace unusable or in use: one line now, not a traceback
    if not is_loopback(host):
        config.allowed_hosts = None
        print(f"Warning: listening on {host}: anyone who can reach this machine can classify and train.",
              file=sys.stderr)
    print(f"Serving on http://{_url_host(host)}:{port}/ (workspace {config.workspace_dir()}, API /openapi.json)",
          file=sys.stderr)
    # In-flight requests finish on SIGTERM; a client that never finishes cannot hold shutdown forever.
    uvicorn.run(create_app(clf, config), host=host, port=port, timeout_graceful_shutdown=30,
                access_log=False, server_header=False,
                http=guarded_protocol(config.header_timeout_s, config.max_connections_per_client,
                                     connection_cap(config.max_connections)))
    return 0


def connection_cap(wanted: int) -> int:
    """`wanted`, or half the open files this process may hold if that is fewer (macOS shells allow 256)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return wanted if soft == resource.RLIM_INFINITY else max(1, min(wanted, soft // 2))


def check_port_free(host: str, port: int) -> None:
    """A one-line error now for a port in use or an address not on this machine (uvicorn logs and exits 1)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(infos[0][4])
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port or --host)"
                        ) from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _imagenet() -> Classifier:
    from .files import default_cache_dir
    from .imagenet import imagenet_model_path

    return load(imagenet_model_path(default_cache_dir()))
