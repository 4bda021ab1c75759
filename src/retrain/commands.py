"""What each command-line command does, once cli.py has parsed its arguments into values.

One function per command: it calls the stages and applications that do the work and prints
what the user reads. The heavy modules are imported inside the functions, so that parsing
arguments (and `retrain --help`) loads neither ONNX Runtime nor PyTorch.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import ExportConfig, TrainConfig
from .errors import UserError
from .validate import Rule, check_argument
from .guards import open_regular
from .interrupts import termination_as_interrupt
from .outputs import check_output_dir, check_output_file, written_by_retrain


@dataclass
class Afterwards:
    """What `retrain train` and `retrain --image_dir` do with a trained model besides saving it."""
    quiet: bool = False  # --quiet drops the narration, never the result lines
    print_misclassified: bool = False
    summaries_dir: str | None = None


def positive(name: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"{name} must be positive (got {value})")


def use_cache_dir(cache_dir: str | None) -> None:
    """For serve, whose training runs reach the cache only through defaults: --cache_dir DIR means
    RETRAIN_CACHE=DIR for this process and the ones it starts."""
    if cache_dir:
        try:  # now, as a one-line error: the server reaches the cache only once it has started
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--cache_dir {cache_dir}: {e.strerror or e}") from None
        os.environ["RETRAIN_CACHE"] = cache_dir


def _inputs(image_dir: str, config: TrainConfig) -> list[str | None]:
    """The image folders a run reads: no output may be written inside them."""
    return [image_dir, config.val_dir, config.test_dir]


@termination_as_interrupt()  # `kill`, `timeout`, `docker stop`: the run ends as Ctrl-C ends it
def train_files(image_dir: str, config: TrainConfig, graph: str, labels: str, afterwards: Afterwards) -> int:
    """`retrain --image_dir`: train, then write the model and its labels where retrain.py did."""
    from .pipeline import train

    for flag, path, example in (("--output_graph", graph, "output_graph.onnx"),
                                ("--output_labels", labels, "output_labels.txt")):  # a wrong path must not cost the run
        check_output_file(path, flag, _inputs(image_dir, config), example)
    if Path(graph).resolve() == Path(labels).resolve():
        raise UserError(f"--output_graph and --output_labels name the same file ({graph}): give two paths")
    _refuse_replacing_a_non_model(Path(graph))
    _refuse_replacing_non_labels(Path(labels))
    check_afterwards(afterwards, _inputs(image_dir, config))
    model = train(image_dir, config, publish=_announced(lambda m: m.save_files(graph, labels), graph, config.quiet))
    if model is None:  # a torchrun helper process: rank 0 writes the model
        return 0
    model.save_files(graph, labels)
    _after_training(model, afterwards)
    print(f"Saved the model to {graph} and its labels to {labels}", file=sys.stderr)
    return 0


def _refuse_replacing_a_non_model(graph: Path) -> None:
    """retrain.py replaced --output_graph whatever it was; only a model retrain wrote is replaced here
    (an empty file holds nothing to keep): not a user's file, and not another tool's ONNX model."""
    if not graph.is_file() or graph.stat().st_size == 0:
        return
    import onnx
    from google.protobuf.message import DecodeError

    try:  # protobuf reads some arbitrary bytes without complaint: a model has nodes
        model = onnx.load(str(graph), load_external_data=False)
        is_model, ours = len(model.graph.node) > 0, any(p.key == "retrain:labels" for p in model.metadata_props)
    except (OSError, ValueError, DecodeError):
        is_model = ours = False
    if not ours:
        what = "an ONNX model retrain did not write" if is_model else "not an ONNX model"
        raise UserError(f"--output_graph {graph} already exists and is {what}: give another path "
                        "(retrain replaces only an earlier model of its own there)")


LABELS_MAX_BYTES = 1 << 20  # far more than any list of class names


def _refuse_replacing_non_labels(labels: Path) -> None:
    """--output_labels replaces a text file, as retrain.py did (any could be an earlier run's labels,
    /tmp/output_labels.txt beside retrain.py's output_graph.pb among them), but not a model, a photo
    or any other file that is not short UTF-8 text."""
    if not labels.is_file() or labels.stat().st_size == 0:
        return
    try:
        with open_regular(labels, LABELS_MAX_BYTES) as f:  # a bigger file is no labels file either
            data = f.read()
        text = b"\0" not in data and bool(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError):
        text = False
    if not text:
        raise UserError(f"--output_labels {labels} already exists and is not a labels file (short UTF-8 text, a "
                        "class a line): give another path")


def check_afterwards(afterwards: Afterwards, inputs: list[str | None]) -> None:
    """--summaries_dir checked before training, so that a wrong path does not cost the run."""
    if afterwards.summaries_dir:
        check_output_dir(afterwards.summaries_dir, inputs, overwrite=True, flag="--summaries_dir")


@termination_as_interrupt()
def train_dir(image_dir: str, config: TrainConfig, output: str, overwrite: bool, afterwards: Afterwards) -> int:
    """`retrain train`: train, then write a model directory."""
    from .pipeline import train

    check_output_dir(output, _inputs(image_dir, config), overwrite)  # before training, not after it
    check_afterwards(afterwards, _inputs(image_dir, config))
    model = train(image_dir, config, publish=_announced(lambda m: m.save(output), output, config.quiet))
    if model is None:  # a torchrun helper process: rank 0 writes the model
        return 0
    out = model.save(output)
    _after_training(model, afterwards)
    print(f"Saved model.onnx, labels.txt, metrics.json and report.html to {out}", file=sys.stderr)
    return 0


def _announced(save: Callable, where: str, quiet: bool) -> Callable:
    """The default run's first model (the head) saved the moment it exists, saying so unless quiet."""
    def publish(model) -> None:
        save(model)
        if not quiet:
            print(f"Saved a first model (the head on cached features) to {where}; the run now tries to beat it and "
                  "replaces it only with a model that measures better (fine-tuning: on validation; larger backbones "
                  "on a small folder: by cross-validation). Ctrl-C keeps the best model so far.", file=sys.stderr)
    return publish


def _after_training(model, afterwards: Afterwards) -> None:
    if afterwards.quiet:  # quiet drops the narration, never the result
        from .pipeline import result_lines

        for line in result_lines(model.metrics):
            print(line, file=sys.stderr)
    if afterwards.print_misclassified:
        print("=== MISCLASSIFIED TEST IMAGES ===")
        for path, truth, predicted in model.misclassified:
            print(f"{path:>70}  {truth} (predicted {predicted})")
    if afterwards.summaries_dir:
        from .summaries import write_summaries

        print(f"TensorBoard summaries in {write_summaries(afterwards.summaries_dir, model.metrics)}", file=sys.stderr)


def predict(model: str, images: list[str], *, labels: str | None, top_k: int, min_confidence: float | None,
            output: str | None, as_json: bool, engine: str, ray_address: str | None, overwrite: bool = False) -> int:
    """`retrain predict`: the top classes of each image, printed or streamed to a file; 1 if any was unreadable."""
    from .engine import open_engine
    from .prediction import load

    if overwrite and not output:
        raise UserError("--overwrite: only with --output (it lets a run replace that file)")
    if as_json and output:  # else --json would be dropped without a word
        raise UserError("--json: not with --output, whose extension chooses its format (name it .jsonl for JSON Lines)")
    with open_engine(engine, ray_address) as runner:
        clf = load(model, labels, runner)
        if output:  # streamed: one row per image as it comes, folders walked lazily
            from .prediction import predict_to_file

            done = predict_to_file(clf, images, output, top_k, min_confidence, quiet=False, overwrite=overwrite)
            print(f"Wrote {done.rows} predictions ({done.failures} unreadable) to {done.path}", file=sys.stderr)
            return 1 if done.failures else 0
        return _print_predictions(clf, images, top_k, min_confidence, as_json)


def _print_predictions(clf, images: list[str], top_k: int, min_confidence: float | None, as_json: bool) -> int:
    from .prediction import json_text, predictions_of

    failures = rows = 0
    for pred in predictions_of(clf, images, top_k, min_confidence):
        rows += 1
        failures += bool(pred.error)
        if as_json:
            print(json_text(pred.to_dict()))
        elif pred.error:
            print(f"{pred.path}: {_skipped(pred.error)}", file=sys.stderr)
        else:
            print(pred.path + ("  (unknown: below the confidence threshold)" if pred.unknown else ""))
            for label, score in pred.top:
                print(f"  {label} {score:.5f}")
    if not rows:
        raise UserError("no images found in: " + ", ".join(images))
    return 1 if failures else 0


def _skipped(error: str) -> str:
    """'skipped: REASON', said once: the decoder's reason for a pipe or a device already starts so."""
    return error if error.startswith("skipped: ") else f"skipped: {error}"


def evaluate(model: str, image_dir: str, as_json: bool) -> int:
    """`retrain evaluate`: accuracy, per-class metrics and the confusion matrix, as a table or JSON."""
    from .evaluation import evaluation_of_folder, format_metrics

    evaluation = evaluation_of_folder(model, image_dir)
    if as_json:
        from .prediction import json_text

        print(json_text(evaluation.to_json(), indent=2))
    else:
        if evaluation.warning:
            print(f"Warning: {evaluation.warning}", file=sys.stderr)
        print(format_metrics(evaluation.metrics, evaluation.copies_of_training))
        if evaluation.skipped:  # named, with the reason: a count alone hides which photos the figures leave out
            print(evaluation.skipped_line(), file=sys.stderr)
    return 0


def report(model: str, image_dir: str | None, cache_dir: str | None) -> int:
    from .report import write_report

    print(write_report(model, image_dir, cache_dir=Path(cache_dir) if cache_dir else None))
    return 0


def lr_find(image_dir: str, config: TrainConfig, plot: str) -> int:
    """`retrain lr-find`: sweep the head's learning rate on the training features; plot it and suggest one."""
    from .lrfind import lr_sweep, plot_destination, plot_sweep
    from .pipeline import head_training_data

    path = plot_destination(plot, _inputs(image_dir, config))
    x, y, classes = head_training_data(image_dir, config)
    sweep = lr_sweep(x, y, len(classes), config.head)
    print(f"Suggested --learning_rate {sweep.suggestion:.2g} (loss curve: {plot_sweep(sweep, path)})")
    if caveat := sweep.caveat():
        print(f"Note: {caveat}", file=sys.stderr)
    return 0


def compare(image_dir: str, models: str | None, config: TrainConfig, output: str, overwrite: bool = False) -> int:
    """`retrain compare`: train each model on the same split; the table on stdout, the files in `output`."""
    from .compare import compare as compare_models
    from .compare import comparison_table, contenders, default_models

    names = [m.strip() for m in models.split(",") if m.strip()] if models else default_models(image_dir)
    # before any training: neither the comparison's files nor a model's may replace the user's own. A run
    # stopped part-way leaves only model folders, each marked as retrain's: a rerun may write beside them.
    out, inputs = Path(output), _inputs(image_dir, config)
    models_only = out.is_dir() and all(p.is_dir() and written_by_retrain(p) for p in out.iterdir())
    check_output_dir(out, inputs, overwrite or models_only, replaces="compare.txt, compare.json and compare.png")
    for entry in contenders(names):  # each model's folder as compare names it (an ONNX file's: its stem)
        check_output_dir(out / entry.folder, inputs, overwrite)
    runs = compare_models(image_dir, names, config, Path(output),
                          lambda msg: None if config.quiet else print(msg, file=sys.stderr))
    print(comparison_table(runs))
    print(f"Models, compare.txt, compare.json and compare.png in {output}", file=sys.stderr)
    return 0


def import_idx(images: str, labels: str, output: str, class_names: str, limit_per_class: int | None) -> int:
    from .datasets import idx_to_folders

    n = idx_to_folders(images, labels, output, class_names=class_names, limit_per_class=limit_per_class)
    print(f"Wrote {n} PNG images into class folders under {output}", file=sys.stderr)
    return 0


def serve(model: str | None, host: str, port: int, *, cache_dir: str | None, workspace: str | None,
          max_upload_mb: int, max_queue: int, max_batch: int) -> int:
    from .serve import serve as serve_model
    from .webconfig import ServeConfig

    use_cache_dir(cache_dir)
    # ServeConfig checks its own limits; these two are read before it exists (the MB become bytes).
    check_argument("port", port, Rule("--port", 1, 65535, integer=True))
    positive("--max-upload-mb", max_upload_mb)
    return serve_model(model, host, port, ServeConfig(max_upload_bytes=max_upload_mb << 20, max_queue=max_queue,
                                                      max_batch=max_batch, workspace=workspace))


def doctor(image_dir: str, *, backbone: str, cache_dir: str | None, workers: int, quiet: bool, as_json: bool) -> int:
    from .doctor import diagnose, format_text
    from .prediction import json_text

    positive("--workers", workers)
    found = diagnose(image_dir, backbone=backbone, cache_dir=cache_dir, workers=workers, quiet=quiet)
    print(json_text(found.to_dict(), indent=2) if as_json else format_text(found))
    return 0


def export(model: str, output: str, config: ExportConfig) -> int:
    from .export import export as export_model

    written = export_model(model, output, config)
    print(f"Wrote {', '.join(written['files'])}, labels.txt and export.json to {output}", file=sys.stderr)
    return 0


def label_image(image: str, graph: str | None, labels: str | None, top_k: int, min_confidence: float | None,
                cache_dir: str | None, compat: dict[str, Any]) -> int:
    """`label_image`: top-k `label score` lines, best first; `unknown` first below the confidence threshold."""
    from .prediction import load, model_file, require_regular_file

    if graph:
        clf = load(onnx_beside(model_file(graph)), labels)
    else:
        from .files import default_cache_dir
        from .imagenet import imagenet_model_path

        clf = load(imagenet_model_path(Path(cache_dir) if cache_dir else default_cache_dir()), labels)
    for note in compatibility_notes(compat, clf):
        print(f"Note: {note}", file=sys.stderr)
    path = Path(image)
    if path.is_dir():
        raise UserError(f"--image {path} is a folder: label_image classifies one image; "
                        f"`retrain predict MODEL {path}` classifies every image in a folder")
    require_regular_file(path, "image")  # a named pipe is said to be one, not "not found"
    pred = next(clf.predict_paths([path], top_k, min_confidence=min_confidence))
    if pred.error:
        raise UserError(f"cannot classify {path}: {pred.error}")
    if pred.unknown:
        threshold = clf.unknown_threshold if min_confidence is None else min_confidence
        print("unknown")  # no score: the model gives no probability of 'none of these', only the flag
        print(f"Note: the top probability {pred.top[0][1]:.3f} is below the confidence threshold "
              f"{threshold:.3f}: probably none of these classes", file=sys.stderr)
    for label, score in pred.top:
        print(f"{label} {score:.6f}")
    return 0


def onnx_beside(graph: Path) -> Path:
    """retrain.py wrote output_graph.pb; a handout's .pb path that does not exist means the .onnx beside it."""
    onnx_file = graph.with_suffix(".onnx")
    if graph.suffix == ".pb" and not graph.exists() and onnx_file.is_file():
        print(f"Note: {graph} does not exist; using {onnx_file} (retrain writes ONNX models)", file=sys.stderr)
        return onnx_file
    return graph


def compatibility_notes(given: dict[str, Any], clf) -> list[str]:
    """What label_image.py's tensor and preprocessing flags (`given`: {name: value or None}) mean for an ONNX
    model that preprocesses itself."""
    prep, notes = clf.prep, []
    inputs = [i.name for i in clf.session.get_inputs()]
    outputs = [o.name for o in clf.session.get_outputs()]
    if given.get("input_layer") and given["input_layer"] not in inputs:
        notes.append(f"--input_layer={given['input_layer']} ignored: the model's input is '{inputs[0]}'")
    if given.get("output_layer") and given["output_layer"] not in outputs:
        notes.append(f"--output_layer={given['output_layer']} ignored: the model's output is '{outputs[0]}'")
    for flag, actual in (("input_height", prep.size), ("input_width", prep.size), ("input_mean", prep.mean),
                         ("input_std", prep.std)):
        value = given.get(flag)
        if value is not None and value != actual:
            notes.append(f"--{flag}={value:g} ignored: the model resizes to {prep.size}x{prep.size} and normalises "
                         f"as (pixel - {prep.mean:g}) / {prep.std:g} itself, as it was trained")
    return notes
