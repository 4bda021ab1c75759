"""Training runs for the web app: one at a time, in a low-priority worker process (trainjob.py) whose
JSON-lines events become the state every tab polls. Any tab can follow or cancel the run.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError
from .modelstore import links
from .trainjob import QUALITIES
from .webconfig import ApiError
from .workspace import Workspace

LOG_LINES = 400  # log lines a run keeps: all of a normal run's
JOBS_KEPT = 10  # runs listed by GET /jobs (their models stay in the model store)


@dataclass
class Job:
    id: str
    folder: Path
    quality: str
    status: str = "running"  # running | done | failed | cancelled
    stage: str = "starting"
    progress: float | None = None  # fraction of the current stage, when it reports one
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    error: str | None = None
    result: dict | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    process: subprocess.Popen | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to_dict(self) -> dict:
        with self.lock:
            done = self.status == "done"
            return {"id": self.id, "status": self.status, "quality": self.quality, "stage": self.stage,
                    "progress": self.progress, "log": list(self.log), "error": self.error, "result": self.result,
                    "elapsed_s": round((self.finished or time.time()) - self.started, 1),
                    "model": self.id if done else None,
                    **(links(self.id) if done else {"download": None, "report": None})}

    def read_event(self, event: dict) -> None:
        """Fold one event from the worker into the state."""
        kind = event.get("type")
        with self.lock:
            if kind == "progress":
                total = event.get("total") or 0
                self.stage, self.progress = str(event.get("stage")), event["done"] / total if total else None
            elif kind == "stage":
                self.stage, self.progress = str(event.get("stage")), None
            elif kind == "log":
                self.log.append(str(event.get("message")))
            elif kind == "error":
                self.error, self.stage, self.progress = str(event.get("message")), "failed", None
            elif kind == "done":
                self.result, self.stage, self.progress = event.get("result"), "done", None


class Trainer:
    """Starts one training run at a time and follows its events from a reader thread.

    finished(job, model_dir) is called when a run succeeds, to keep and serve its model.
    """

    def __init__(self, workspace: Workspace, finished: Callable[[Job, Path], None]):
        self.workspace, self.finished = workspace, finished
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()  # start() runs in a worker thread

    def running(self) -> Job | None:
        return next((j for j in self.all() if j.status == "running"), None)

    def all(self) -> list[Job]:
        return list(self.jobs.values())

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise ApiError(404, "no such training run")
        return self.jobs[job_id]

    def start(self, quality: str) -> Job:
        if quality not in QUALITIES:
            raise ApiError(422, f"quality: choose {' or '.join(QUALITIES)}")
        with self.lock:
            running = self.running()
            if running:
                raise ApiError(409, f"a training run is in progress ({running.id}): follow or cancel it")
            self.workspace.ready_to_train()
            job_id = uuid.uuid4().hex[:12]
            job = Job(job_id, self.workspace.root / "jobs" / job_id, quality)
            data = self.workspace.snapshot(job.folder / "data")
            spec = {"data": str(data), "output": str(job.folder / "model"), "quality": quality}
            (job.folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
            with open(job.folder / "worker.log", "wb") as log:  # the worker's text for people, for debugging
                job.process = subprocess.Popen([sys.executable, "-m", "retrain.trainjob", str(job.folder / "spec.json")],
                                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
            self.jobs = dict(list(self.jobs.items())[-JOBS_KEPT + 1:]) | {job_id: job}
        threading.Thread(target=self._follow, args=(job,), name=f"train-{job_id}", daemon=True).start()
        return job

    def _follow(self, job: Job) -> None:
        """Read the run's events until it exits, then keep its model."""
        for line in job.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:  # not from the event writer: keep it for a person, never interpret it
                event = {"type": "log", "message": line.decode("utf-8", "replace").strip()}
            job.read_event(event if isinstance(event, dict) else {})
        code = job.process.wait()
        status = "cancelled" if job.status == "cancelled" else "done" if code == 0 and job.result else "failed"
        if status == "done":
            try:
                self.finished(job, job.folder / "model")
            except (OSError, UserError) as e:  # a full disk, an unloadable model: the run failed, the server goes on
                status, job.error = "failed", f"cannot keep the model: {getattr(e, 'strerror', None) or e}"
        if status == "failed" and not job.error:
            job.error = self._last_words(job, code)
        with job.lock:
            job.status, job.finished, job.stage = status, time.time(), status  # not the last stage it was in
            job.progress = None if status != "done" else 1.0
        shutil.rmtree(job.folder, ignore_errors=True)

    @staticmethod
    def _last_words(job: Job, code: int) -> str:
        """Why a run ended without an error event (a crash): the last line of its log."""
        try:
            lines = (job.folder / "worker.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            lines = []
        logging.getLogger("retrain.serve").warning("training run %s exited with code %s", job.id, code)
        return f"training stopped unexpectedly (exit code {code})" + (f": {lines[-1][:300]}" if lines else "")

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with job.lock:
            # After the done event the model is saved and about to be kept: too late to cancel, and a run
            # that says "done" must not end as cancelled with its model thrown away.
            if job.status != "running" or job.result is not None:
                return job
            job.status, job.stage, job.progress = "cancelled", "cancelled", None
        job.process.terminate()
        return job

    def stop_all(self) -> None:
        for job in self.all():
            if job.status == "running":
                self.cancel(job.id)
                try:
                    job.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    job.process.kill()
