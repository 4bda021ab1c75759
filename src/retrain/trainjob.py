"""The web app's training worker: `python -m retrain.trainjob SPEC.json` trains, writes the model with its
report and doctor's findings, and tells the server how it goes as JSON lines on stdout.

Events, one JSON object a line: {"type": "progress", "stage", "done", "total", "unit"}, {"type": "log",
"message"}, {"type": "stage", "stage"}, then {"type": "done", "result"} or {"type": "error", "message"}.
They come from progress.py's subscriber hook and the API's return values, never from reading text
meant for people. The spec: {"data": folder, "output": model folder, "quality": "fast"|"accurate"},
and optionally "cache_dir": a folder (default: the user's cache).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, TextIO

from .config import TrainConfig
from .errors import UserError
from .evidence import describe_accuracy
from .metrics import Evidence, RunMetrics, to_json
from .plan import estimated_seconds
from .progress import subscribed

QUALITIES = ("fast", "accurate")
FINDINGS_FILE = "doctor.json"


def train_config(quality: str, cache_dir: str | None) -> TrainConfig:
    """The one place where the web app's choice becomes training settings."""
    if quality == "fast":
        return TrainConfig(mode="head", cache_dir=cache_dir, workers=1)
    # accurate: the default run (the head, then fine-tuning where it can pay, within its time budget)
    return TrainConfig(mode="auto", cache_dir=cache_dir, workers=1)


def estimate(quality: str, class_sizes: list[int]) -> dict:
    """How long a first run on classes of these sizes may take, and what the plan will do, for the page."""
    seconds, plan = estimated_seconds(train_config(quality, None), class_sizes)
    return {"seconds": round(seconds), "plan": plan.reason}


def result_of(metrics: RunMetrics) -> dict:
    """What the web page shows of a run's metrics.json (GET /jobs/{id} and each model of GET /models).

    test_accuracy stays for older clients; the page shows test_accuracy_text, the figure with the
    evidence metrics.json recorded for it (test_evidence: N, interval, measurable), never a bare figure.
    """
    return {"classes": metrics.classes, "test_accuracy": metrics.test_accuracy,
            "test_evidence": to_json(metrics.test_evidence), "test_accuracy_text": evidence_text(metrics.test_evidence),
            "validation_accuracy": metrics.validation_accuracy, "num_images": metrics.num_images,
            "backbone": metrics.backbone, "verdict": metrics.verdict, "mode": metrics.mode}


def evidence_text(evidence: Evidence) -> str:
    """The recorded test evidence in the CLI's words ("not measurable on 4 test photos (4/4 right; 95% CI
    51-100%)"), written here so that the page's scripts show it as it is and never re-implement the rule.
    A measured figure counted partly on copies of training photos is named inflated; one the copies make
    not measurable says how many photos were not trained on instead."""
    copies = evidence.copies_of_training
    text = describe_accuracy(evidence.accuracy, evidence.n, "test photos", copies)
    return text + f", inflated: {copies} of them are copies of photos the model trained on" \
        if copies and evidence.measurable else text


def findings(data: Path, cache_dir: str | None, log: Callable[[str], None]) -> dict:
    """doctor's report on the photos trained on, as plain data (paths are '<class>/<photo>')."""
    from .doctor import diagnose  # an application of its own: imported only once the model is saved

    return diagnose(data, cache_dir=cache_dir, workers=1, quiet=True, log=log).to_dict()


def run(spec: dict, emit: Callable[[dict], None]) -> int:
    """Train as `spec` says, sending events to `emit`; the exit status."""
    from .api import train  # the pipeline: loaded by the worker, not by the server that imports this module

    log = lambda message: emit({"type": "log", "message": message})  # noqa: E731
    try:
        config = train_config(spec["quality"], spec.get("cache_dir"))
        with subscribed(emit):
            model = train(spec["data"], config)
            emit({"type": "stage", "stage": "Writing the report"})
            out = model.save(spec["output"])  # model.onnx, labels.txt, metrics.json, report.html
    except UserError as e:
        emit({"type": "error", "message": str(e)})
        return 2
    emit({"type": "stage", "stage": "Checking the photos (doctor)"})
    try:
        with subscribed(emit):
            report = findings(Path(spec["data"]), spec.get("cache_dir"), log)
        (out / FINDINGS_FILE).write_text(json.dumps(report), encoding="utf-8")
    except (UserError, OSError) as e:  # the model is good without them: say why they are missing
        log(f"doctor's checks could not run: {e}")
    emit({"type": "done", "result": result_of(model.metrics)})
    return 0


def _event_writer(stream: TextIO) -> Callable[[dict], None]:
    def emit(event: dict) -> None:
        stream.write(json.dumps(event, default=str) + "\n")
        stream.flush()
    return emit


def main(argv: list[str]) -> int:
    getattr(os, "nice", lambda n: 0)(10)  # predictions in the server come first
    events = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything else printed goes to the log, never into the event stream
    sys.stdout = sys.stderr
    return run(json.loads(Path(argv[0]).read_text(encoding="utf-8")), _event_writer(events))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
