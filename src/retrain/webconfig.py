"""The web app's settings and its one error type, shared by its modules (serve.py puts them together)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_workspace() -> Path:
    """The per-user data folder where `retrain serve` keeps classes, photos and models between runs."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "retrain" / "workspace"


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
    models_kept: int = 5  # trained models kept in the workspace (the one being served always stays)
    trash_kept: int = 50  # deletions that can still be undone
    workspace: str | None = None  # default: default_workspace()
    header_timeout_s: float = 10.0  # a connection's request headers must be complete within this
    body_timeout_s: float = 30.0  # and then its body: 32 MiB in 30 s needs ~9 Mbit/s
    max_connections_per_client: int = 64  # open connections from one client address
    max_connections: int = 512  # open connections in all (at most half the open files the process may hold)

    def workspace_dir(self) -> Path:
        return Path(self.workspace) if self.workspace else default_workspace()


class ApiError(Exception):
    """An error answered as {"error": message} with an HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers
