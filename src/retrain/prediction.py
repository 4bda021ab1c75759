"""Load an exported model and classify images with it: the predict stage."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .progress import progress
from .decode import UnreadableImage
from .errors import UserError
from .files import give_mode_of
from .outputs import check_output_file
from .runtime import inference_session, run_model
from .guards import UnsafeFile, check_regular, open_regular
from .preprocess import IMAGE_NAME, INPUT_NAME, Preprocessing
from .validate import Rule, check_argument

if TYPE_CHECKING:
    import onnxruntime as ort

    from .engine import Engine

MODEL_FILE, LABELS_FILE, METRICS_FILE, REPORT_FILE = "model.onnx", "labels.txt", "metrics.json", "report.html"
TOP_K_RULE = Rule("--top_k", 1, 1_000_000, integer=True)
CONFIDENCE_RULE = Rule("--min_confidence", 0, 1, optional=True)


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first
    error: str | None = None
    unknown: bool = False  # top probability below the confidence threshold: none of the classes

    def to_dict(self) -> dict:
        if self.error:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "unknown": self.unknown,
                "predictions": [{"label": l, "score": round(s, 6)} for l, s in self.top]}


def read_labels(path: Path) -> list[str]:
    try:
        with open_regular(path, max_bytes=16 << 20) as f:  # a pipe or device would block or never end
            text = f.read().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read labels file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"labels file {path} is not UTF-8 text ({e.reason} at byte {e.start}): "
                        "give the labels.txt written with the model") from None
    labels = [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    if problem := labels_problem(labels):
        raise UserError(f"labels file {path} {problem}: give the labels.txt written with the model, or drop --labels "
                        "(the model carries its labels)")
    return labels


def labels_problem(labels: list[str]) -> str | None:
    """Why `labels` cannot name a model's classes (none, or one twice), as a phrase; None if it can."""
    if not labels:
        return "has no labels (it is empty or holds only blank lines)"
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            return f"lists {label!r} more than once"
        seen.add(label)
    return None


def require_regular_file(path: Path, what: str, max_bytes: int | None = None) -> None:
    """UserError unless `path` (links followed) is a regular file: '{what} not found', or what it is instead.

    Judged by stat, never by opening: a named pipe would block the open.
    """
    try:
        check_regular(path, max_bytes)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{what} not found: {path}") from None
    except UnsafeFile as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None


class Classifier:
    """An exported retrain model (model.onnx with its metadata) ready to classify images.

    With an `engine` (a RayEngine), files are decoded and classified on its workers; ranking,
    thresholds and output stay here, so the rows are the same as a local run's.
    """

    def __init__(self, onnx_path: str | os.PathLike, labels: list[str] | None = None, threads: int | None = None,
                 engine: Engine | None = None):
        path = Path(onnx_path)
        require_regular_file(path, "model", max_bytes=sys.maxsize)  # a model has no image's size limit
        try:
            self.session = inference_session(path, threads)
        except Exception as e:  # ORT raises its own exception types for bad files
            if path.suffix.lower() == ".pb":  # judged by content: `--output_graph=x.pb` holds ONNX, loaded above
                raise UserError(f"{path} is a TensorFlow graph; this tool reads ONNX models. Retrain with "
                                "`retrain --image_dir=...`, which writes output_graph.onnx") from None
            raise UserError(f"cannot load ONNX model {path}: {str(e).splitlines()[0]}") from None
        self.path, self.engine = path, engine
        _refuse_other_inputs(self.session, path)
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        if "retrain:preprocessing" not in self.metadata:
            raise UserError(f"{path} was not written by retrain (no preprocessing metadata); "
                            "use it as a backbone with --backbone instead")
        try:
            self.prep, stored, self.unknown_threshold = _parse_metadata(self.metadata)
        except (ValueError, KeyError, TypeError) as e:  # hand-edited or damaged metadata
            raise UserError(f"{path}: damaged retrain metadata ({type(e).__name__}: {e}); "
                            "retrain the model or restore the file written by retrain") from None
        self.labels = stored if labels is None else _override(labels, stored)
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.labels):
            raise UserError(f"the labels list has {len(self.labels)} entries but the model predicts "
                            f"{n_out} classes: is it the labels file written with this model?")

    def provenance(self) -> dict:
        """How the model was made (image_dir, config, ...), as training recorded it; {} where it records none,
        or the record is unreadable."""
        try:
            found = json.loads(self.metadata.get("retrain:provenance", "{}"))
        except ValueError:
            return {}
        return found if isinstance(found, dict) else {}

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 images -> (N, C) class probabilities."""
        return self.session.run(None, {INPUT_NAME: batch})[0]

    def predict_paths(self, paths: list[Path], top_k: int = 5, batch_size: int = 32, workers: int = 2,
                      min_confidence: float | None = None) -> Iterator[Prediction]:
        """Predictions in input order; an unreadable file yields a Prediction with `error` set.

        `min_confidence` overrides the threshold stored in the model for flagging `unknown`.
        """
        check_classify_options(top_k, min_confidence)
        for i, probs, error in self.probabilities_of(paths, batch_size, workers):
            yield (Prediction(str(paths[i]), [], error) if error
                   else self.rank(str(paths[i]), probs, top_k, min_confidence))

    def probabilities_of(self, paths: list[Path], batch_size: int = 32, workers: int = 2
                         ) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
        """(index, (C,) probabilities or None, reason or None) for each file, in input order."""
        batches = (self.engine.run(self.path, paths, self.prep, batch_size, workers) if self.engine
                   else run_model(self.session, paths, self.prep, batch_size, workers))
        for ok, probs, failed in batches:
            results: dict[int, tuple[np.ndarray | None, str | None]] = {i: (None, why) for i, why in failed}
            results |= {i: (p, None) for i, p in zip(ok, probs)}
            yield from ((i, *results[i]) for i in sorted(results))

    def rank(self, name: str, probs: np.ndarray, top_k: int = 5, min_confidence: float | None = None) -> Prediction:
        """One image's (C,) probabilities as a Prediction: top k labels, flagged unknown below the threshold."""
        k = max(1, min(top_k, len(self.labels)))
        threshold = self.unknown_threshold if min_confidence is None else min_confidence
        best = np.argsort(-probs, kind="stable")[:k]
        return Prediction(name, [(self.labels[j], float(probs[j])) for j in best],
                          unknown=bool(probs[best[0]] < threshold))


def _override(labels: list[str], stored: list[str]) -> list[str]:
    """`labels` in place of the model's own, unless they cannot name its classes or only reorder them."""
    if problem := labels_problem(labels):
        raise UserError(f"the labels list {problem}: each entry names one class")
    if labels != stored and sorted(labels) == sorted(stored):  # the order is what ties a label to an output
        raise UserError("the labels file lists the model's classes in another order and would mislabel every "
                        "prediction: drop --labels (the model carries its labels)")
    return labels


def check_classify_options(top_k: object, min_confidence: object) -> None:
    check_argument("top_k", top_k, TOP_K_RULE)
    check_argument("min_confidence", min_confidence, CONFIDENCE_RULE)


def _refuse_other_inputs(session: ort.InferenceSession, path: Path) -> None:
    """A one-line error for a model that does not take retrain's batch of square uint8 images."""
    names = [i.name for i in session.get_inputs()]
    if names == [IMAGE_NAME]:
        beside = path.with_name(MODEL_FILE)
        raise UserError(f"{path} is the any-size model for apps (one decoded photo of any size a call); "
                        f"predict, evaluate, label_image and serve read {beside if beside.is_file() else MODEL_FILE}, "
                        "which `retrain export` writes beside it")
    if names != [INPUT_NAME]:
        raise UserError(f"{path} takes the input(s) {', '.join(names)}, not retrain's {INPUT_NAME}: "
                        "give a model.onnx written by retrain")


def _parse_metadata(metadata: dict[str, str]) -> tuple[Preprocessing, list[str], float]:
    """(preprocessing, labels, unknown threshold) from a model's metadata; ValueError/KeyError/TypeError if malformed."""
    prep = Preprocessing.from_dict(json.loads(metadata["retrain:preprocessing"]))
    if not 1 <= prep.size <= 4096 or not 0 < prep.crop_fraction <= 1 or not prep.std > 0:
        raise ValueError(f"retrain:preprocessing {prep} is out of range")
    labels = json.loads(metadata["retrain:labels"])
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise ValueError("retrain:labels is not a list of class names")
    threshold = float(metadata.get("retrain:unknown_threshold", 0.0))
    if not 0 <= threshold <= 1:
        raise ValueError(f"retrain:unknown_threshold {threshold} is not a probability")
    return prep, labels, threshold


def model_file(model: str | os.PathLike) -> Path:
    """The ONNX file of a model given as a model directory or as the .onnx file itself."""
    path = Path(model)
    return path / MODEL_FILE if path.is_dir() else path


def load(model: str | os.PathLike, labels: str | os.PathLike | None = None, engine: Engine | None = None
         ) -> Classifier:
    """Load a model directory or .onnx file; `labels` overrides the labels stored in the model."""
    return Classifier(model_file(model), read_labels(Path(labels)) if labels else None, engine=engine)


def predict(model: str | os.PathLike | Classifier, images: list[str | os.PathLike], top_k: int = 5,
            min_confidence: float | None = None) -> list[Prediction]:
    """Classify image files (folders are searched for images) and return predictions in order."""
    clf = model if isinstance(model, Classifier) else load(model)
    return list(predictions_of(clf, images, top_k, min_confidence))


def predictions_of(clf: Classifier, images: list[str | os.PathLike], top_k: int = 5,
                   min_confidence: float | None = None) -> Iterator[Prediction]:
    """Each image's prediction in order, then a row for each folder that could not be listed."""
    unreadable: list[tuple[Path, str]] = []
    paths = expand_images(as_list(images), unreadable)
    if paths:
        yield from clf.predict_paths(paths, top_k, min_confidence=min_confidence)
    yield from unlisted_folders(unreadable)


def as_list(images: list[str | os.PathLike] | str | os.PathLike) -> list[str | os.PathLike]:
    """One path given where a list belongs, as a list of one (a string is not a list of its letters)."""
    return [images] if isinstance(images, (str, os.PathLike)) else list(images)


OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
STREAM_CHUNK = 4096  # paths classified per predict_paths call: memory stays flat however big the folder


@dataclass
class StreamSummary:
    rows: int  # one per image, readable or not
    failures: int  # rows with an error
    path: Path


def output_format(path: str | os.PathLike) -> str:
    """'csv' or 'jsonl', from the file's extension."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the output format of {path}: name it .csv or .jsonl (JSON Lines)")
    return fmt


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_text(value: object, indent: int | None = None) -> str:
    """`value` as JSON (one line unless `indent`), other scripts' letters kept as they are.

    A file name that is not UTF-8 reaches Python with its odd bytes as lone surrogates (surrogate
    escapes), which no UTF-8 file or stream takes: they are written as \\udcXX escapes, which keep
    the line valid JSON and give the same name back to json.loads.
    """
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, indent=indent, ensure_ascii=False))


def csv_header(top_k: int) -> list[str]:
    return ["path", "unknown", "error"] + [f"{col}_{i}" for i in range(1, top_k + 1) for col in ("label", "score")]


def csv_row(pred: Prediction, top_k: int) -> list:
    """One CSV row: an unreadable file has its error and empty prediction columns."""
    if pred.error:
        return [pred.path, "", pred.error] + [""] * (2 * top_k)
    cells = [c for label, score in pred.top for c in (label, f"{score:.6f}")]
    return [pred.path, str(pred.unknown).lower(), ""] + cells + [""] * (2 * top_k - len(cells))


def _predictions_file(path: Path) -> bool:
    """Whether `path` starts as retrain's predictions do (a CSV header or a JSON Lines row of its keys)."""
    if not path.is_file():  # a pipe would block the read; a device is nobody's earlier predictions
        return False
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline(4096)
    except (OSError, UnicodeDecodeError):
        return False
    if first.startswith(",".join(csv_header(1)[:3]) + ","):
        return True
    try:
        row = json.loads(first)
    except ValueError:
        return False
    # A row is Prediction.to_dict(): a path with its predictions, or with its error.
    return isinstance(row, dict) and "path" in row and row.keys() <= {"path", "unknown", "predictions", "error"} \
        and ("predictions" in row or "error" in row)


class RowWriter:
    """Writes predictions to a new temporary file beside FILE (FILE.XXXXXXXX.partial) as they come, one whole
    row per write, then renames it to FILE.

    A run that fails or is interrupted removes it; a killed one leaves it holding only complete
    rows. FILE itself appears only when every image has its row.
    """

    def __init__(self, path: str | os.PathLike, top_k: int, overwrite: bool = False):
        self.path, self.top_k, self.format = Path(path), top_k, output_format(path)
        # Found now, not by the rename after every image is classified: a folder, a pipe or device, a file in a
        # folder's place, a place that cannot be written.
        check_output_file(self.path, "--output", example="predictions.csv")
        if not overwrite and self.path.exists() and not _predictions_file(self.path):
            raise UserError(f"--output {self.path} already exists and is not a predictions file retrain wrote: give "
                            "a new file name, or add --overwrite to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial, self.file = _new_partial(self.path)
        self.rows = self.failures = 0
        if self.format == "csv":
            self._write_line(csv_header(top_k))

    def _write_line(self, cells: list) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        self.file.write(buf.getvalue())

    def write(self, pred: Prediction) -> None:
        if self.format == "csv":
            self._write_line(csv_row(pred, self.top_k))
        else:
            self.file.write(json_text(pred.to_dict()) + "\n")
        self.file.flush()  # whole rows reach the file as they come, never half of one
        self.rows += 1
        self.failures += bool(pred.error)

    def finish(self) -> StreamSummary:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.partial, self.path)
        except BaseException:
            self.abandon()
            raise
        return StreamSummary(self.rows, self.failures, self.path)

    def abandon(self) -> None:
        """Close and remove the temporary file; FILE is left as it was."""
        self.file.close()
        self.partial.unlink(missing_ok=True)


def _new_partial(path: Path) -> tuple[Path, io.TextIOWrapper]:
    """A new, uniquely named file beside `path`, open for writing rows.

    Created with O_EXCL (mkstemp), so neither a file of the user's nor a link planted under a
    predictable name is ever written through.
    """
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    give_mode_of(fd, path)  # FILE's own, or open()'s: mkstemp's 0600 would make FILE private
    # surrogateescape: a file name that is not UTF-8 goes into a CSV cell as its own bytes, as ls prints it
    return Path(name), open(fd, "w", encoding="utf-8", errors="surrogateescape", newline="")


def predict_to_file(model: str | os.PathLike | Classifier, images: list[str | os.PathLike],
                    output: str | os.PathLike, top_k: int = 5, min_confidence: float | None = None, *,
                    batch_size: int = 32, workers: int = 2, quiet: bool = True,
                    overwrite: bool = False) -> StreamSummary:
    """Classify image files and folders, streaming one row per image to a .csv or .jsonl file.

    Folders are walked lazily and classified STREAM_CHUNK files at a time, so memory does not
    grow with the number of images. Unreadable files get a row with their error. Raises
    UserError (and leaves no file) when no image is found. An existing `output` is replaced only if
    it is an earlier predictions file, or with `overwrite`.
    """
    check_classify_options(top_k, min_confidence)  # before the writer is made from top_k
    clf = model if isinstance(model, Classifier) else load(model)
    k = max(1, min(top_k, len(clf.labels)))
    images = as_list(images)
    unreadable: list[tuple[Path, str]] = []
    paths = iter_images(images, unreadable)  # missing inputs are reported before any file is created
    writer = RowWriter(output, k, overwrite)
    bar = progress(desc="Predicting", unit="img", disable=quiet)
    try:
        for chunk in _chunks(paths, STREAM_CHUNK):
            for pred in clf.predict_paths(chunk, k, batch_size, workers, min_confidence):
                writer.write(pred)
                bar.update()
        for pred in unlisted_folders(unreadable):
            writer.write(pred)
    except BaseException:
        writer.abandon()  # FILE stays as it was; no temporary file is left beside it
        raise
    finally:
        bar.close()
    if not writer.rows:
        writer.abandon()
        raise UserError("no images found in: " + ", ".join(str(i) for i in images))
    return writer.finish()


def _chunks(items: Iterator[Path], size: int) -> Iterator[list[Path]]:
    chunk: list[Path] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_images(items: list[str | os.PathLike], unreadable: list[tuple[Path, str]] | None = None) -> Iterator[Path]:
    """Files as given, folders replaced by the image files below them (sorted), lazily: every item is
    checked to exist now, folders are walked as they are consumed; those that cannot be listed go
    to `unreadable` with the reason."""
    paths = [Path(item) for item in items]
    for p in paths:
        try:
            p.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise UserError(f"image not found: {p}") from None
        except OSError:  # there, but not readable (a locked folder above it, a link loop): its row says why
            pass
    return _walk_items(paths, unreadable)


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # cannot be looked at: treated as a file, whose row gives the reason
        return False


def _walk_items(paths: list[Path], unreadable: list[tuple[Path, str]] | None) -> Iterator[Path]:
    from .scan import walk_files

    for p in paths:
        if _is_folder(p):
            yield from (path for path, image in walk_files(p, unreadable) if image)
        else:
            yield p


def expand_images(items: list[str | os.PathLike], unreadable: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Files as given; folders replaced by the image files below them (sorted); see iter_images."""
    return list(iter_images(items, unreadable))


def unlisted_folders(unreadable: list[tuple[Path, str]]) -> list[Prediction]:
    """A row for each folder that could not be listed: its photos would otherwise be missing unnoticed."""
    return [Prediction(str(folder), [], why) for folder, why in unreadable]


__all__ = ["Classifier", "Prediction", "UnreadableImage", "load", "predict", "predict_to_file"]
