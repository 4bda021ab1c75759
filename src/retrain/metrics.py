"""metrics.json: what a training run measured, as typed sections with a versioned JSON form.

Readers use these types, so a renamed key fails loudly in one place instead of turning into '?'
in a report. SCHEMA_VERSION changes when a key is renamed, removed or changes meaning; adding a
field with a default does not (older files read it as the default), and readers ignore keys they
do not know, so a section such as `finetune` can grow without a new version.

Versions: 0 is a file written before the schema had a version (no "schema_version" key). It has
the same keys as version 1 and is read as version 1 (migration: none needed); one that lacks a
key version 1 requires is refused, naming the key. 2: a class's precision may be null (never
predicted: 0/0), which version 1's readers took for an error; versions 0 and 1 read as 2 unchanged.
A version newer than SCHEMA_VERSION is refused with a UserError that says to upgrade retrain.
"""
from __future__ import annotations

import functools
import json
import types
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import UserError

SCHEMA_VERSION = 2

T = TypeVar("T")


def optional(**kwargs: Any) -> Any:
    """A field that defaults to None and is left out of the JSON while None (its key appears only when set)."""
    return field(default=None, metadata={"omit_if_none": True}, **kwargs)


@dataclass
class ClassMetrics:
    precision: float | None  # None: never predicted, so undefined (0 would read as wrong predictions)
    recall: float | None  # None: no photos of the class, so unknown (0 would read as a failing class)
    f1: float | None
    support: int


@dataclass
class ClassificationMetrics:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of one set of labelled photos."""
    accuracy: float | None
    num_images: int
    accuracy_interval: list[float] | None  # 95% Wilson interval
    macro_f1: float | None
    per_class: dict[str, ClassMetrics]
    classes: list[str]
    confusion_matrix: list[list[int]]  # [i][j]: true class i predicted as j


@dataclass
class Evidence:
    """What a shown accuracy rests on: N, its 95% interval, and whether N is enough to claim a figure."""
    accuracy: float | None
    n: int
    interval: list[float] | None
    measurable: bool
    copies_of_training: int = 0  # of the N, photos whose bytes the model trained on: they inflate the figure


@dataclass
class PredictionRecord:
    path: str
    label: int
    predicted: int
    confidence: float


@dataclass
class SkippedFile:
    path: str
    reason: str


@dataclass
class CalibrationReport:
    """What calibration chose and why; the test_* figures only when there are test photos."""
    temperature: float
    calibrated: bool
    why: str
    held_out_predictions: int
    suggested_unknown_threshold: float
    unknown_threshold: float  # 0: never reject
    test_ece_before: float | None = optional()
    test_ece_after: float | None = optional()
    test_nll_before: float | None = optional()
    test_nll_after: float | None = optional()
    reliability_after: list[dict] | None = optional()  # bins: confidence, accuracy, count
    reliability_before: list[dict] | None = optional()
    test_false_rejection: float | None = optional()
    test_false_rejection_at_suggested: float | None = optional()
    unknown_threshold_why: str | None = optional()  # how the threshold was set, or why `auto` set none


@dataclass
class HeadRecord:
    best_step: int
    steps_run: int
    history: list[dict]  # per evaluation: step, train_/validation_ accuracy and loss


@dataclass
class FinetuneRecord:
    """Fine-tuning or training from scratch: new fields need a default (see the module docstring)."""
    best_epoch: int
    history: list[dict]  # per epoch: epoch, train_/validation_ accuracy and loss (epoch 0: validation only)
    device: str
    train_size: int
    interrupted: bool = False  # Ctrl-C ended it early (the default run keeps the best epoch so far)


@dataclass
class BackboneScore:
    """One backbone's head in a cross-validated comparison (small folders, backbone auto)."""
    name: str
    correct: int  # out-of-fold predictions right
    photos: int


@dataclass
class RunMetrics:
    """metrics.json: the run's data, accuracy with its evidence, calibration, histories and provenance."""
    classes: list[str]
    backbone: str
    mode: str
    plan: dict  # TrainingPlan.to_dict() (plan.py sits above this layer)
    num_images: dict[str, int]  # per split
    class_counts: dict[str, dict[str, int]]  # per split, per class
    skipped_files: list[SkippedFile]
    calibration: CalibrationReport
    validation_accuracy: float | None
    test_accuracy: float | None
    num_validation: int
    validation_evidence: Evidence
    test_evidence: Evidence
    test: ClassificationMetrics | None
    verdict: list[str]
    test_predictions: list[PredictionRecord] | None = optional()
    head: HeadRecord | None = optional()
    finetune: FinetuneRecord | None = optional()
    backbone_comparison: list[BackboneScore] | None = optional()
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per stage
    provenance: dict = field(default_factory=dict)  # config, plan, data fingerprint, versions, time
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> RunMetrics:
        """Read the JSON form, refusing a newer schema or a missing or mistyped key with a UserError."""
        if not isinstance(data, dict):
            raise UserError(f"{where} should hold a JSON object")
        version = data.get("schema_version", 0)
        if type(version) is not int or version < 0:
            raise UserError(f"{where}: schema_version should be a whole number, not {json.dumps(version)[:40]}")
        if version > SCHEMA_VERSION:
            raise UserError(f"{where} has schema version {version}; this retrain reads up to {SCHEMA_VERSION}: "
                            "upgrade retrain to read it")
        return from_json(cls, data | {"schema_version": SCHEMA_VERSION}, where)  # versions 0 and 1 read as 2


def read_metrics(path: str | Path) -> RunMetrics:
    """A metrics.json file as RunMetrics; a UserError saying what is wrong if it cannot be read as one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    return RunMetrics.from_json(data, str(path))


def to_json(value: Any) -> Any:
    """Dataclasses to JSON-ready dicts, recursively; fields made with optional() are left out while None."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value)
                if not (f.metadata.get("omit_if_none") and getattr(value, f.name) is None)}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def from_json(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from its JSON form (read from `where`), checking each value against the field's type."""
    try:
        return _value(cls, data, "")
    except _Mismatch as e:
        raise UserError(f"{where}: {e.args[0]}") from None


class _Mismatch(Exception):
    """A value that does not fit the schema; the message starts with its key path."""


_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _value(tp: Any, data: Any, key: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return None if data is None else _value(next(a for a in args if a is not type(None)), data, key)
    if is_dataclass(tp):
        return _dataclass(tp, _checked(data, dict, key), key)
    if origin is list:
        return [_value(args[0], v, f"{key}[{i}]") for i, v in enumerate(_checked(data, list, key))]
    if origin is dict:
        return {k: _value(args[1], v, f"{key}.{k}") for k, v in _checked(data, dict, key).items()}
    if tp in (dict, list):
        return _checked(data, tp, key)
    if tp in _SCALARS and (not isinstance(data, _SCALARS[tp]) or (tp is not bool and isinstance(data, bool))):
        raise _Mismatch(f"{key or 'the value'} should be {tp.__name__}, not {json.dumps(data)[:40]}")
    return data


def _checked(data: Any, kind: type, key: str) -> Any:
    if not isinstance(data, kind):
        raise _Mismatch(f"{key or 'the file'} should be a JSON {'object' if kind is dict else 'array'}")
    return data


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)  # resolved once per class: test_predictions can hold 100,000 rows


def _dataclass(cls: type[T], data: dict, key: str) -> T:
    hints, values = _hints(cls), {}
    for f in fields(cls):
        name = f"{key}.{f.name}" if key else f.name
        if f.name in data:
            values[f.name] = _value(hints[f.name], data[f.name], name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise _Mismatch(f"'{name}' is missing (written by an older retrain? train the model again)")
    return cls(**values)
