"""`retrain serve`: an HTTP API and two web pages over an exported model.

POST /predict: each request's images are sniffed and decoded in a thread pool (decode.py), then
one batcher task runs the model on every image waiting, so requests that arrive together share
one ONNX Runtime call. The training page builds a dataset in a server-owned temporary workspace
and runs `retrain train` in a low-priority subprocess, so training never stalls predictions.

Safe by default: binds 127.0.0.1 and then answers only loopback Host names and same-origin
writes (no DNS rebinding or cross-site uploads); request bodies over `max_upload_bytes` get 413;
images are recognised by their bytes, never their name, and decoded under decode.py's pixel
limit; no name from a request becomes a path except a class name that passed `class_name`;
at most `max_queue` predict requests are admitted, the rest get 503 with Retry-After; stalled,
greedy and vanishing clients are handled in connections.py (header and body deadlines, a queue
slot only once the body is complete, connections per client capped).
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, MutableHeaders, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import ClientDisconnect

from . import __version__
from .connections import CompleteBody, guarded_protocol
from .decode import UnreadableImage, load_image
from .errors import UserError
from .files import atomic_write_bytes
from .progress import LINE as PROGRESS_LINE
from .prediction import LABELS_FILE, METRICS_FILE, MODEL_FILE, Classifier, load
from .scan import SPLIT_DIR_NAMES, is_hidden, is_image_name

STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# Leading bytes of the formats we decode, and the extension a training image is saved under.
# Anything else (SVG, PDF, EPS, which Pillow would hand to Ghostscript, ...) is refused unread.
SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF87a", ".gif"),
              (b"GIF89a", ".gif"), (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))
FORMATS = "JPEG, PNG, GIF, BMP, WebP or TIFF"


@dataclass
class ServeConfig:
    max_upload_bytes: int = 32 << 20  # one request's body
    max_files: int = 16  # images in one request
    max_queue: int = 16  # predict requests admitted at once; more get 503
    max_batch: int = 16  # images in one ONNX Runtime call
    retry_after_s: int = 1  # the queue drains in well under this at the default limits
    decode_threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS  # None: any Host header (--host 0.0.0.0)
    max_classes: int = 100
    max_workspace_bytes: int = 2 << 30  # training photos kept in the workspace, all classes
    jobs_kept: int = 3  # finished training runs whose model.zip stays downloadable
    workspace_parent: str | None = None  # default: the system temp folder
    header_timeout_s: float = 10.0  # a connection's request headers must be complete within this
    body_timeout_s: float = 30.0  # and then its body: 32 MiB in 30 s needs ~9 Mbit/s
    max_connections_per_client: int = 64  # open connections from one client address


class ApiError(Exception):
    """An error answered as {"error": message} with an HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# --- images from requests --------------------------------------------------------------------

def sniff(data: bytes) -> str | None:
    """The extension for `data`'s image format judged by its first bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in SIGNATURES if data.startswith(magic)), None)


def display_name(filename: str | None) -> str:
    """The client's file name for messages only: last component, bounded length."""
    name = PurePath((filename or "").replace("\\", "/")).name
    return name[:120] or "upload"


def check_image(name: str, data: bytes, prep) -> tuple[str, np.ndarray]:
    """(extension, (S, S, 3) uint8 image) for an upload, or ApiError saying what is wrong."""
    if not data:
        raise ApiError(422, f"{name}: empty file (0 bytes)")
    ext = sniff(data)
    if ext is None:
        raise ApiError(415, f"{name}: not a {FORMATS} image (judged by its content, not its name)")
    try:
        return ext, load_image(data, prep)
    except UnreadableImage as e:
        raise ApiError(422, f"{name}: {e}") from None


async def read_uploads(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    """[(display name, bytes)] of every file part of a multipart/form-data request."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "send the images as multipart/form-data file parts (field name 'files')")
    form = await request.form(max_files=max_files, max_fields=16)
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise ApiError(400, "no image in the request: add one or more file parts named 'files'")
        return [(display_name(f.filename), await f.read()) for f in files]
    finally:
        await form.close()


# --- prediction --------------------------------------------------------------------------------

class Gate:
    """Admits at most `limit` requests at once; the event loop is single-threaded, so no lock."""

    def __init__(self, limit: int):
        self.limit, self.inside, self.refused = limit, 0, 0

    def enter(self, retry_after_s: int) -> None:
        if self.inside >= self.limit:
            self.refused += 1
            raise ApiError(503, f"busy: {self.inside} requests in progress; retry shortly",
                           {"Retry-After": str(retry_after_s)})
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1


class Batcher:
    """Runs the model on the images of all waiting requests, up to `max_batch` per call.

    There is no waiting timer: while one call runs, new requests queue up and the next call
    takes them all, so a lone request pays no extra latency.
    """

    def __init__(self, clf: Classifier, max_batch: int):
        self.clf, self.max_batch = clf, max_batch
        self.waiting: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self.ready = asyncio.Event()
        self.runner = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")  # ORT uses every core itself
        self.calls = self.images = 0

    async def classify(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, C) probabilities."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((images, future))
        self.ready.set()
        return await future

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        taken = [self.waiting.popleft()]
        count = len(taken[0][0])
        while self.waiting and count + len(self.waiting[0][0]) <= self.max_batch:
            taken.append(self.waiting.popleft())
            count += len(taken[-1][0])
        if not self.waiting:
            self.ready.clear()
        return taken

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.ready.wait()
            taken = self._take()
            batch = np.concatenate([images for images, _ in taken])
            try:
                probs = await loop.run_in_executor(self.runner, self.clf.probabilities, batch)
            except Exception as e:  # a model failure fails these requests, not the server
                for _, future in taken:
                    future.done() or future.set_exception(ApiError(500, f"inference failed: {e}"))
                continue
            self.calls, self.images = self.calls + 1, self.images + len(batch)
            start = 0
            for images, future in taken:  # a cancelled future is a client that went away
                future.done() or future.set_result(probs[start:start + len(images)])
                start += len(images)


def ranked(clf: Classifier, names: list[str], probs: np.ndarray, top_k: int) -> list[dict]:
    """One result dict per image: Prediction.to_dict(), keyed by 'file' instead of 'path'."""
    return [{"file": name} | {key: v for key, v in clf.rank(name, p, top_k).to_dict().items() if key != "path"}
            for name, p in zip(names, probs)]


# --- metrics and middleware ----------------------------------------------------------------------

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


def _json_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
}


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
                    headers.setdefault(name, value)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = getattr(scope.get("route"), "path", None)  # the template, never the raw path
            self.metrics.record(f"{scope['method']} {route}" if route else "unmatched", status[0],
                                time.perf_counter() - start)


class Guard:
    """Host and Origin checks (loopback only, same-origin writes); Content-Length over the limit.

    Bodies without a Content-Length are counted by Starlette's RequestBodyLimitMiddleware.
    """

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._refusal(scope["method"], headers)
        if refusal:
            return await _json_response(*refusal)(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, method: str, headers: Headers) -> tuple[int, str] | None:
        host = headers.get("host", "")
        allowed = self.config.allowed_hosts
        if allowed is not None and _hostname(host) not in allowed:
            return 403, f"Host '{host[:100]}' refused: this server answers only {', '.join(allowed)}"
        origin = headers.get("origin")
        if method not in ("GET", "HEAD", "OPTIONS") and origin and urlsplit(origin).netloc != host:
            return 403, "cross-origin request refused"
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.config.max_upload_bytes:
            return 413, too_large(self.config)
        return None


def too_large(config: ServeConfig) -> str:
    return f"request body over the {config.max_upload_bytes / (1 << 20):g} MiB limit"


def _hostname(host_header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1'."""
    return urlsplit(f"//{host_header}").hostname or ""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- training workspace ------------------------------------------------------------------------

CLASS_NAME = re.compile(r"[^\W_][\w .+-]{0,63}")  # starts with a letter or digit; no separators
RESERVED = {n for names in SPLIT_DIR_NAMES.values() for n in names}  # scan would read them as splits


def class_name(text: str) -> str:
    """A class name safe to use as one folder name, or ApiError explaining the rule."""
    name = unicodedata.normalize("NFC", text.strip())
    if not CLASS_NAME.fullmatch(name) or is_hidden(name) or name.lower() in RESERVED:
        raise ApiError(400, f"invalid class name '{text[:80]}': use 1-64 letters, digits, spaces or "
                            f"_ . + - , starting with a letter or digit, and not {', '.join(sorted(RESERVED))}")
    return name


class Workspace:
    """Training photos in a server-owned temp folder: data/<class>/<content hash><sniffed ext>."""

    def __init__(self, root: Path, config: ServeConfig):
        self.root, self.config = root, config
        self.data = root / "data"
        self.data.mkdir()
        self.lock = threading.Lock()  # uploads are checked and written in decode threads
        self.used_bytes = 0

    def folder(self, name: str) -> Path:
        """The folder of an existing class; 404 if there is none."""
        path = self.data / class_name(name)
        if path.parent != self.data or not path.is_dir():  # the parent check is belt and braces
            raise ApiError(404, f"no class named '{name[:80]}': create it first")
        return path

    def classes(self) -> list[dict]:
        return [{"name": p.name, "images": sum(1 for f in p.iterdir() if is_image_name(f.name))}
                for p in sorted(self.data.iterdir()) if p.is_dir()]

    def create(self, name: str) -> str:
        name = class_name(name)
        with self.lock:
            if len(self.classes()) >= self.config.max_classes:
                raise ApiError(409, f"at most {self.config.max_classes} classes")
            (self.data / name).mkdir(exist_ok=True)
        return name

    def delete(self, name: str) -> None:
        folder = self.folder(name)
        with self.lock:
            self.used_bytes -= sum(f.stat().st_size for f in folder.iterdir())
            shutil.rmtree(folder)

    def add(self, folder: Path, name: str, data: bytes, prep) -> str | None:
        """Check and store one photo under a server-chosen name; the reason if refused."""
        try:
            ext, _ = check_image(name, data, prep)
        except ApiError as e:
            return e.message
        path = folder / (hashlib.sha256(data).hexdigest()[:32] + ext)
        with self.lock:
            if path.exists():
                return None  # the same photo again: nothing to add
            if self.used_bytes + len(data) > self.config.max_workspace_bytes:
                return f"{name}: the training workspace is full ({self.config.max_workspace_bytes >> 20} MiB)"
            self.used_bytes += len(data)
        atomic_write_bytes(path, data)  # temp name starts with '.', so a scan never sees half a file
        return None

    def snapshot(self, dest: Path) -> Path:
        """Hard-linked copy of the photos, so uploads during training cannot change the run."""
        return Path(shutil.copytree(self.data, dest, copy_function=os.link, ignore=shutil.ignore_patterns(".*")))

    def ready_to_train(self) -> None:
        classes = self.classes()
        empty = [c["name"] for c in classes if not c["images"]]
        if len(classes) < 2 or empty:
            raise ApiError(400, "add photos to at least two classes first" +
                           (f" (no photos yet in: {', '.join(empty)})" if empty else ""))


# --- training jobs -----------------------------------------------------------------------------

# The training subprocess: `retrain train` itself, at low CPU priority so predictions come first.
WORKER = ("import os, sys; getattr(os, 'nice', lambda n: 0)(10); "
          "from retrain.cli import retrain_main; sys.exit(retrain_main(sys.argv[1:]))")


@dataclass
class Job:
    id: str
    folder: Path
    steps: int
    status: str = "running"  # running | done | failed | cancelled
    stage: str = "starting"
    progress: float | None = None  # fraction of the current stage, when it reports one
    log: deque = field(default_factory=lambda: deque(maxlen=12))
    error: str | None = None
    result: dict | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    process: subprocess.Popen | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to_dict(self) -> dict:
        with self.lock:
            return {"id": self.id, "status": self.status, "stage": self.stage, "progress": self.progress,
                    "log": list(self.log), "error": self.error, "result": self.result, "steps": self.steps,
                    "elapsed_s": round((self.finished or time.time()) - self.started, 1),
                    "download": f"/jobs/{self.id}/model.zip" if self.status == "done" else None}

    def read_line(self, line: str) -> None:
        """Fold one line of `retrain train`'s stderr (a progress line or a log line) into the state."""
        line = line.strip()
        m = PROGRESS_LINE.match(line)
        with self.lock:
            if m:
                total = int(m["total"]) if m["total"] != "?" else 0
                self.stage, self.progress = m["stage"], int(m["done"]) / total if total else None
            elif line.startswith("retrain: error: "):
                self.error = line.removeprefix("retrain: error: ")
            elif line:
                self.log.append(line)


class Trainer:
    """Starts one training run at a time and follows its progress from a reader thread."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()  # start() runs in a worker thread

    def running(self) -> Job | None:
        return next((j for j in self.all() if j.status == "running"), None)

    def all(self) -> list[Job]:
        return list(self.jobs.values())

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise ApiError(404, "no such training job")
        return self.jobs[job_id]

    def start(self, steps: int) -> Job:
        with self.lock:
            return self._start(steps)

    def _start(self, steps: int) -> Job:
        if self.running():
            raise ApiError(409, "a training run is in progress: wait for it or cancel it")
        self.workspace.ready_to_train()
        self._forget_old()
        job_id = uuid.uuid4().hex[:12]
        job = Job(job_id, self.workspace.root / "jobs" / job_id, steps)
        data = self.workspace.snapshot(job.folder / "data")
        cmd = [sys.executable, "-c", WORKER, "train", str(data), "--output", str(job.folder / "model"),
               "--steps", str(steps), "--workers", "1"]
        env = os.environ | {"RETRAIN_PROGRESS": "lines", "RETRAIN_PROGRESS_SECONDS": "0.5"}  # parsed by read_line
        job.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, env=env)
        self.jobs[job_id] = job
        threading.Thread(target=self._follow, args=(job,), name=f"train-{job_id}", daemon=True).start()
        return job

    def _follow(self, job: Job) -> None:
        """Read the run's progress until it exits, then package the model."""
        pending = b""
        while chunk := job.process.stderr.read1(4096):
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for line in lines:
                job.read_line(line.decode("utf-8", "replace"))
        job.read_line(pending.decode("utf-8", "replace"))
        code = job.process.wait()
        with job.lock:
            job.stage, job.progress = "packaging the model", None
        try:
            status, result = ("cancelled", None) if job.status == "cancelled" else self._package(job, code)
        except OSError as e:  # e.g. the disk filled up while zipping: the run failed, the server goes on
            status, result = "failed", None
            job.error = f"cannot package the model: {e.strerror or e}"
        with job.lock:
            job.status, job.result, job.finished = status, result, time.time()
            if status == "failed" and not job.error:
                job.error = job.log[-1] if job.log else f"training exited with code {code}"

    def _package(self, job: Job, code: int) -> tuple[str, dict | None]:
        model = job.folder / "model"
        if code != 0 or not (model / MODEL_FILE).is_file():
            return "failed", None
        with zipfile.ZipFile(job.folder / "model.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            for name in (MODEL_FILE, LABELS_FILE, METRICS_FILE):
                z.write(model / name, name)
        metrics = json.loads((model / METRICS_FILE).read_text(encoding="utf-8"))
        keys = ("classes", "test_accuracy", "validation_accuracy", "num_images", "backbone", "verdict")
        return "done", {k: metrics.get(k) for k in keys}

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with job.lock:
            if job.status != "running":
                return job
            job.status = "cancelled"
        job.process.terminate()
        return job

    def _forget_old(self) -> None:
        """Delete all but the newest `jobs_kept` finished runs, so the workspace stays bounded."""
        old = sorted(self.all(), key=lambda j: j.started)[:-self.workspace.config.jobs_kept or None]
        for job in old:
            shutil.rmtree(job.folder, ignore_errors=True)
            del self.jobs[job.id]

    def stop_all(self) -> None:
        for job in self.all():
            if job.status == "running":
                self.cancel(job.id)
                try:
                    job.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    job.process.kill()


# --- the application ---------------------------------------------------------------------------

class State:
    """Everything a running server holds; created at startup, torn down at shutdown."""

    def __init__(self, clf: Classifier, config: ServeConfig, metrics: Metrics):
        self.clf, self.config, self.metrics = clf, config, metrics
        self.gate = Gate(config.max_queue)
        self.batcher = Batcher(clf, config.max_batch)
        self.decoder = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
        root = Path(tempfile.mkdtemp(prefix="retrain-serve-", dir=config.workspace_parent))
        self.workspace = Workspace(root, config)
        self.trainer = Trainer(self.workspace)

    def close(self) -> None:
        self.trainer.stop_all()
        self.decoder.shutdown(wait=True)
        self.batcher.runner.shutdown(wait=True)
        shutil.rmtree(self.workspace.root, ignore_errors=True)

    async def in_threads(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)


class NewClass(BaseModel):
    name: str = Field(max_length=200)


class NewJob(BaseModel):
    steps: int = Field(500, ge=1, le=20000, description="most training steps (early stopping may end sooner)")


MULTIPART_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


def create_app(model: Classifier | str | os.PathLike, config: ServeConfig | None = None) -> FastAPI:
    """The ASGI application serving `model` (a Classifier, a model directory or an .onnx file)."""
    clf = model if isinstance(model, Classifier) else load(model)
    config = config or ServeConfig()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.serve = state = State(clf, config, metrics)
        task = asyncio.create_task(state.batcher.run(), name="batcher")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.get_running_loop().run_in_executor(None, state.close)

    app = FastAPI(title="retrain serve", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; /openapi.json stays
                  description="Classify images with a retrain model, and train new models from the /train page.")
    _add_error_handlers(app, config)
    _add_prediction_routes(app)
    _add_training_routes(app)
    _add_pages(app)
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=config.max_upload_bytes)
    app.add_middleware(CompleteBody, max_bytes=config.max_upload_bytes, timeout_s=config.body_timeout_s,
                       gauges=metrics.gauges)
    app.add_middleware(Guard, config=config)
    app.add_middleware(Observe, metrics=metrics)  # added last: outermost, so it sees every refusal
    return app


def _add_error_handlers(app: FastAPI, config: ServeConfig) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _json_response(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = too_large(config) if e.status_code == 413 else str(e.detail)
        return _json_response(e.status_code, message, getattr(e, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def went_away(request: Request, e: ClientDisconnect):  # nobody is listening: one line, no traceback
        logging.getLogger("retrain.serve").info("client disconnected during %s", request.url.path)
        return _json_response(499, "client disconnected")

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):  # a bug: say so in JSON, keep the traceback in the log
        logging.getLogger("retrain.serve").exception("unhandled error on %s", request.url.path)
        return _json_response(500, f"internal error: {type(e).__name__}")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return _json_response(422, "; ".join(_describe(err) for err in e.errors()))


def _describe(err: dict) -> str:
    """One pydantic error as 'top_k: Input should be ...' or 'body.name: ...'."""
    if err["type"] == "json_invalid":
        return f"invalid JSON body: {err.get('ctx', {}).get('error', err['msg'])}"
    loc = [str(x) for x in err["loc"]]
    where = ".".join(loc[1:] if loc[0] in ("query", "path") and len(loc) > 1 else loc)
    return f"{where}: {err['msg']}"


def _state(request: Request) -> State:
    return request.app.state.serve


def _add_prediction_routes(app: FastAPI) -> None:
    @app.post("/predict", openapi_extra=MULTIPART_BODY,
              summary="Classify one or several images (multipart file parts named 'files')")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)) -> dict:
        state = _state(request)
        # The body is complete already (CompleteBody): a slow sender never holds one of the queue's slots.
        state.gate.enter(state.config.retry_after_s)
        try:
            uploads = await read_uploads(request, state.config.max_files)
            checked = await asyncio.gather(*(state.in_threads(check_image, name, data, state.clf.prep)
                                             for name, data in uploads))
            probs = await state.batcher.classify(np.stack([image for _, image in checked]))
            return {"results": ranked(state.clf, [name for name, _ in uploads], probs, top_k)}
        finally:
            state.gate.leave()

    @app.get("/labels", summary="The classes the model predicts, in output order")
    async def labels(request: Request) -> dict:
        return {"labels": _state(request).clf.labels}

    @app.get("/healthz", summary="200 while the server can classify")
    async def healthz(request: Request) -> dict:
        return {"status": "ok", "labels": len(_state(request).clf.labels)}

    @app.get("/metrics", summary="Request counts and latency by route; batching and queue figures")
    async def metrics(request: Request) -> dict:
        state = _state(request)
        b = state.batcher
        return state.metrics.summary() | {"predict": {
            "in_flight": state.gate.inside, "queue_limit": state.gate.limit, "refused_busy": state.gate.refused,
            "onnxruntime_calls": b.calls, "images": b.images,
            "mean_batch": round(b.images / b.calls, 2) if b.calls else None}}


def _add_training_routes(app: FastAPI) -> None:
    @app.get("/classes", summary="Training classes and their photo counts")
    async def classes(request: Request) -> dict:
        return {"classes": _state(request).workspace.classes()}

    @app.post("/classes", status_code=201, summary="Create a training class")
    async def create_class(request: Request, body: NewClass) -> dict:
        return {"name": _state(request).workspace.create(body.name)}

    @app.delete("/classes/{name}", summary="Delete a training class and its photos")
    async def delete_class(request: Request, name: str) -> dict:
        _state(request).workspace.delete(name)
        return {"deleted": name}

    @app.post("/classes/{name}/images", openapi_extra=MULTIPART_BODY, summary="Add photos to a training class")
    async def add_images(request: Request, name: str) -> dict:
        state = _state(request)
        folder = state.workspace.folder(name)
        uploads = await read_uploads(request, state.config.max_files)
        errors = await asyncio.gather(*(state.in_threads(state.workspace.add, folder, n, data, state.clf.prep)
                                        for n, data in uploads))
        rejected = [{"file": n, "error": e} for (n, _), e in zip(uploads, errors) if e]
        if len(rejected) == len(uploads):
            raise ApiError(422, "; ".join(r["error"] for r in rejected))
        count = sum(1 for f in folder.iterdir() if is_image_name(f.name))
        return {"accepted": len(uploads) - len(rejected), "rejected": rejected, "images": count}

    @app.post("/jobs", status_code=202, summary="Start training on the classes' photos (in the background)")
    async def start_job(request: Request, body: NewJob | None = None) -> dict:
        state = _state(request)
        steps = (body or NewJob()).steps
        job = await asyncio.get_running_loop().run_in_executor(None, state.trainer.start, steps)
        return job.to_dict()

    @app.get("/jobs", summary="Training runs, newest last")
    async def jobs(request: Request) -> dict:
        return {"jobs": [j.to_dict() for j in _state(request).trainer.all()]}

    @app.get("/jobs/{job_id}", summary="A training run's status and progress")
    async def job(request: Request, job_id: str) -> dict:
        return _state(request).trainer.get(job_id).to_dict()

    @app.delete("/jobs/{job_id}", summary="Cancel a training run")
    async def cancel(request: Request, job_id: str) -> dict:
        return _state(request).trainer.cancel(job_id).to_dict()

    @app.get("/jobs/{job_id}/model.zip", summary="The trained model: model.onnx, labels.txt, metrics.json")
    async def download(request: Request, job_id: str):
        job = _state(request).trainer.get(job_id)
        if job.status != "done":
            raise ApiError(409, f"training run {job.id} is {job.status}: no model to download")
        return FileResponse(job.folder / "model.zip", media_type="application/zip",
                            filename=f"retrain-model-{job.id}.zip")


def _add_pages(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def predict_page():
        return FileResponse(STATIC / "index.html")

    @app.get("/train", include_in_schema=False)
    async def train_page():
        return FileResponse(STATIC / "train.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def serve(model: str | os.PathLike | None, host: str = "127.0.0.1", port: int = 8000,
          config: ServeConfig | None = None) -> int:
    """Load `model` (default: the bundled ImageNet classifier) and serve it until SIGTERM or Ctrl-C."""
    import uvicorn

    clf = load(model) if model else _imagenet()
    config = config or ServeConfig()
    check_port_free(host, port)
    if not is_loopback(host):
        config.allowed_hosts = None
        print(f"Warning: listening on {host}: anyone who can reach this machine can classify and train.",
              file=sys.stderr)
    print(f"Serving {clf.path} ({len(clf.labels)} classes) on http://{_url_host(host)}:{port}/ "
          f"(training page /train, API /openapi.json)", file=sys.stderr)
    # In-flight requests finish on SIGTERM; a client that never finishes cannot hold shutdown forever.
    uvicorn.run(create_app(clf, config), host=host, port=port, timeout_graceful_shutdown=30,
                access_log=False, server_header=False,
                http=guarded_protocol(config.header_timeout_s, config.max_connections_per_client))
    return 0


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
