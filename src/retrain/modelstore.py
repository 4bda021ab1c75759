"""Trained models in the workspace: listed, switched between without a restart, downloaded with their report.

The model being served is `clf`; `use` swaps it in one assignment, so a predict request keeps
the model it started with (batching.py) and the next one gets the new model.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import zipfile
from pathlib import Path
from typing import Callable

from .errors import UserError
from .evaluation import worst_mistakes
from .files import atomic_write_json
from .metrics import RunMetrics, read_metrics, to_json
from .prediction import LABELS_FILE, METRICS_FILE, MODEL_FILE, REPORT_FILE, Classifier, load
from .trainjob import FINDINGS_FILE, result_of
from .webconfig import ApiError

STARTUP = "startup"  # the model the server was started with (a model folder or the bundled ImageNet one)
MODEL_ID = re.compile(r"[0-9a-f]{12}")
ACTIVE_FILE = "active.json"
ZIP_FILE = "model.zip"
ZIPPED = (MODEL_FILE, LABELS_FILE, METRICS_FILE, REPORT_FILE)
_UNREAD = object()


def _photo(path: str) -> str:
    """A training photo's server-chosen name from the path a run recorded."""
    return Path(path.replace("\\", "/")).name


def links(model_id: str) -> dict[str, str]:
    """Where a trained model's report and download are served."""
    return {"report": f"/models/{model_id}/report.html", "download": f"/models/{model_id}/{ZIP_FILE}"}


def _name(path: Path) -> str:
    """A model's folder name, or its .onnx file's."""
    return path.parent.name if path.name == MODEL_FILE else path.stem


class ModelStore:
    def __init__(self, root: Path, startup: Classifier | None, kept: int, fallback: Callable[[], Classifier]):
        """startup: the model asked for; None serves the workspace's last model, else `fallback()`."""
        self.root, self.kept, self.lock = root, kept, threading.Lock()
        self._metrics: dict[str, RunMetrics | None] = {}  # a kept model's folder never changes: read it once
        for unzipped in (p for p in root.iterdir() if self._complete_but_unzipped(p)):
            zip_model(unzipped)  # an earlier retrain moved the folder in first; a server killed then left it unzipped
        active = self._saved_active()
        if startup is None and active:
            self.startup, self.startup_name, self.active, self.clf = None, None, active, load(self.folder(active))
        else:
            self.startup = startup or fallback()
            self.startup_name = "the bundled ImageNet classifier" if startup is None else _name(startup.path)
            self.active, self.clf = STARTUP, self.startup

    def _saved_active(self) -> str | None:
        try:
            active = json.loads((self.root / ACTIVE_FILE).read_text(encoding="utf-8"))["model"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return active if self._kept(str(active)) else None

    def _kept(self, name: str) -> bool:
        """Whether `name` is a kept model: a model folder with its zip."""
        folder = self.root / name
        return bool(MODEL_ID.fullmatch(name)) and (folder / MODEL_FILE).is_file() and (folder / ZIP_FILE).is_file()

    def _complete_but_unzipped(self, folder: Path) -> bool:
        return bool(MODEL_ID.fullmatch(folder.name)) and all((folder / n).is_file() for n in ZIPPED) and \
            not (folder / ZIP_FILE).is_file()

    def folder(self, model_id: str) -> Path:
        if not self._kept(model_id):
            raise ApiError(404, f"no trained model '{model_id[:40]}'")
        return self.root / model_id

    def metrics(self, model_id: str) -> RunMetrics | None:
        """The model's metrics.json, None where it is missing, damaged or of a newer retrain.

        Read once per model: GET /models describes every model, and the page asks for a model's
        mistakes after each change to the photos."""
        folder = self.folder(model_id)
        if (known := self._metrics.get(model_id, _UNREAD)) is not _UNREAD:  # one lookup: add() may drop it
            return known
        try:
            found = read_metrics(folder / METRICS_FILE)
        except UserError:
            found = None
        self._metrics[model_id] = found
        return found

    def ids(self) -> list[str]:
        """Trained models, newest first: those kept whole (a server killed while keeping one left it without its zip)."""
        found = [p for p in self.root.iterdir() if self._kept(p.name)]
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def describe(self, model_id: str) -> dict:
        metrics = self.metrics(model_id)
        described = {"id": model_id, "active": model_id == self.active} | links(model_id)
        if metrics is None:
            return described | {"classes": [], "note": "its metrics.json cannot be read"}
        return result_of(metrics) | described | {
            "created": metrics.provenance.get("created"),
            "per_class": to_json(metrics.test.per_class) if metrics.test else None}

    def listing(self) -> dict:
        models = [self.describe(i) for i in self.ids()]
        if self.startup:
            models.append({"id": STARTUP, "active": self.active == STARTUP, "name": self.startup_name,
                           "classes": self.startup.labels[:12], "num_classes": len(self.startup.labels)})
        return {"active": self.active, "labels": len(self.clf.labels), "models": models}

    def use(self, model_id: str) -> None:
        """Serve another model from now on (loading it takes a moment: call from a thread)."""
        clf = self.startup if model_id == STARTUP and self.startup else load(self.folder(model_id))
        with self.lock:
            self.active, self.clf = model_id, clf
            atomic_write_json(self.root / ACTIVE_FILE, {"model": model_id})

    def add(self, model_id: str, model_dir: Path) -> None:
        """Keep a finished run's model, zip it with its report, serve it, and forget the oldest.

        The zip is made before the folder moves in: a server killed part-way leaves no model half kept."""
        zip_model(model_dir)
        os.replace(model_dir, self.root / model_id)
        self.use(model_id)
        for old in self.ids()[self.kept:]:
            if old != self.active:
                shutil.rmtree(self.root / old, ignore_errors=True)
                self._metrics.pop(old, None)

    def mistakes(self, model_id: str) -> list[dict]:
        """The test photos the model got wrong, most confident first."""
        metrics = self.metrics(model_id)
        if metrics is None:
            return []
        classes = metrics.classes
        return [{"photo": _photo(p.path), "label": classes[p.label], "predicted": classes[p.predicted],
                 "confidence": round(p.confidence, 3)} for p in worst_mistakes(metrics.test_predictions or [])]

    def findings(self, model_id: str) -> dict:
        """doctor's findings on the photos the model trained on, each naming its photos."""
        try:
            report = json.loads((self.folder(model_id) / FINDINGS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"items": [], "notes": ["doctor's checks did not run for this model"]}
        return {"items": findings_items(report), "notes": report.get("warnings", []) + report.get("notes", [])}


def zip_model(folder: Path) -> None:
    """ZIP_FILE in `folder`: the model's files, written beside it and renamed when whole."""
    with zipfile.ZipFile(folder / ".model.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name in ZIPPED:
            if (folder / name).is_file():
                z.write(folder / name, name)
    os.replace(folder / ".model.zip", folder / ZIP_FILE)


def _entry(e: dict) -> dict:
    return {"photo": _photo(e["path"]), "class": e["label"]}


def findings_items(report: dict) -> list[dict]:
    """doctor's report (Report.to_dict) as a flat list of {kind, detail, photos}."""
    items = [{"kind": "possibly mislabelled", "photos": [_entry(s["image"])],
              "detail": f"labelled {s['image']['label']}, looks like {s['preferred']} "
                        f"({100 * s['preferred_probability']:.0f}%)"} for s in report.get("suspects") or []]
    items += [{"kind": f"exact duplicates ({g['kind']})", "photos": [_entry(e) for e in g["images"]],
               "detail": "the same file more than once"} for g in report.get("exact_duplicates") or []]
    items += [{"kind": f"near duplicates ({n['kind']})", "photos": [_entry(n["a"]), _entry(n["b"])],
               "detail": f"{n['distance']} of 256 hash bits differ"} for n in report.get("near_duplicates") or []]
    items += [{"kind": "outlier", "photos": [_entry(o["image"])],
               "detail": f"unlike the other photos (similarity {o['relative']:.2f} of the usual)"}
              for o in report.get("outliers") or []]
    items += [{"kind": "unreadable", "photos": [{"photo": _photo(u["path"]), "class": None}], "detail": u["reason"]}
              for u in report.get("unreadable") or []]
    return items
