"""The web app's settings, its one error type and its request bodies' base, shared by its modules (serve.py puts
them together)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .validate import Rule, check

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_workspace() -> Path:
    """The per-user data folder where `retrain serve` keeps classes, photos and models between runs."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "retrain" / "workspace"


def _count(flag: str, low: int = 1) -> Rule:
    return Rule(flag, low, 10 ** 12, integer=True)


SERVE_RULES = {
    "max_upload_bytes": Rule("max_upload_bytes", 1, 2 ** 50, integer=True), "max_files": _count("max_files"),
    "max_queue": _count("--max_queue"),    "max_batch": _count("--max_batch"), "retry_after_s": _count("retry_after_s", 0),
    "decode_threads": _count("decode_threads"), "max_classes": _count("max_classes", 2),
    "max_workspace_bytes": _count("max_workspace_bytes"), "models_kept": _count("models_kept"),
    "trash_kept": _count("trash_kept", 0), "header_timeout_s": Rule("header_timeout_s", 0, 86_400, low_open=True),
    "body_timeout_s": Rule("body_timeout_s", 0, 86_400, low_open=True),
    "max_connections_per_client": _count("max_connections_per_client"), "max_connections": _count("max_connections"),
}


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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every limit checked (max_queue=0 would answer 503 to every request, for ever); create_app
        calls it again, for a setting changed after the config was made."""
        check("ServeConfig", self, SERVE_RULES)

    def workspace_dir(self) -> Path:
        return Path(self.workspace) if self.workspace else default_workspace()


class RequestBody(BaseModel):
    """A JSON request body whose unknown fields are refused (422 naming them): {"time_budget": 1} given to a
    route that has no such field would otherwise be dropped, and the caller believe it was used."""
    model_config = ConfigDict(extra="forbid")


class ApiError(Exception):
    """An error answered as {"error": message} with an HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers
