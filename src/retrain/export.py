"""Smaller and safer models to ship (`retrain export`): int8, any-size input, the .ort mobile format.

- int8: ONNX Runtime static quantization (QDQ: int8 per-channel weights, uint8 activations),
  calibrated on the model's own training photos. It is kept only if its validation and test
  accuracy, measured beside the fp32 model's on the same decoded photos, fall by no more than a
  tolerance; otherwise export refuses, with the numbers, and writes nothing.
- any size: the classifier behind preprocess.geometry_graph, so callers hand it one decoded
  photo and cannot resize or crop it differently from training.
- .ort: ONNX Runtime's mobile format (what its Android and iOS packages load).

Everything is built in a temporary folder and only then written, atomically, into the output.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from .decode import decode_all
from .config import ExportConfig
from .errors import UserError
from .evidence import INTERVAL_BELOW, TOO_FEW_TO_MEASURE, describe_accuracy
from .runtime import decoded_batches, inference_session
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text, default_cache_dir
from .outputs import check_output_dir, write_model_dir
from .graphs import any_size_model, tidy_opsets
from .prediction import LABELS_FILE, MODEL_FILE, Classifier, load
from .preprocess import FEATURES_NAME, INPUT_NAME, PIXELS_NAME
from .scan import Dataset, SampleTable, scan_dataset, skipped_line

ANY_SIZE_FILE = "model_any_size.onnx"
REPORT_FILE = "export.json"
SPEED_BATCHES = (1, 32)


@dataclass
class Measured:
    """One model's numbers, measured beside the other's in the same run."""
    size_bytes: int
    images_per_second: dict[str, float] = field(default_factory=dict)  # {"batch_1": ..., "batch_32": ...}
    accuracy: dict[str, float] = field(default_factory=dict)  # {"validation": ..., "test": ...}


POOLED = "validation and test"


def pooled_photos(images: dict[str, int]) -> int:
    """Distinct photos in {split: photos}, which holds POOLED once there are two splits."""
    return images.get(POOLED, sum(images.values()))


@dataclass
class Int8Report:
    fp32: Measured
    int8: Measured
    images: dict[str, int]  # photos per split the accuracies are over (POOLED: both splits together)
    top1_agreement: float | None  # fraction of those photos both models give the same label; None: no photos
    calibration_images: int
    tolerance: float
    cpu: list[str]  # AVX2 / AVX-512 VNNI / BF16 flags: which int8 kernels ONNX Runtime could choose

    def drops(self) -> dict[str, float]:
        """Accuracy points lost per split, and pooled (negative: the int8 model is more accurate)."""
        return {s: 100 * (self.fp32.accuracy[s] - self.int8.accuracy[s]) for s in self.fp32.accuracy}

    def judged(self) -> list[str]:
        """The drops with photos enough for the tolerance to mean something (one photo of 4 is 25 points):
        each split of 10+ photos, and the splits pooled (a small split's losses count there)."""
        return [s for s in self.drops() if self.images[s] >= TOO_FEW_TO_MEASURE]

    def photos(self) -> int:
        """Distinct photos both models ran on."""
        return pooled_photos(self.images)

    def table(self) -> str:
        rows = [("", "fp32", "int8", "ratio"),
                ("size (MB)", f"{self.fp32.size_bytes / 1e6:.1f}", f"{self.int8.size_bytes / 1e6:.1f}",
                 f"{self.int8.size_bytes / self.fp32.size_bytes:.2f}")]
        for key in self.fp32.images_per_second:
            a, b = self.fp32.images_per_second[key], self.int8.images_per_second[key]
            rows.append((f"images/s, {key.replace('_', ' ')}", f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}x"))
        for split, drop in self.drops().items():
            rows.append((f"{split} accuracy (N={self.images[split]})", f"{100 * self.fp32.accuracy[split]:.1f}%",
                         f"{100 * self.int8.accuracy[split]:.1f}%", f"{0 - drop:+.1f} points"))
        agreement = f"{100 * self.top1_agreement:.1f}%" if self.top1_agreement is not None else "n/a"
        rows.append((f"same top-1 label (N={self.photos()})", "", agreement, ""))
        evidence = [f"{split}: fp32 {describe_accuracy(self.fp32.accuracy[split], n)}, int8 "
                    f"{describe_accuracy(self.int8.accuracy[split], n)}" for split, n in self.images.items()
                    if n < INTERVAL_BELOW]  # what so few photos can say of the figures above
        return "\n".join([f"{a:<32}{b:>10}{c:>10}{d:>14}" for a, b, c, d in rows] + evidence)


def export(model_dir: str | os.PathLike, output: str | os.PathLike, config: ExportConfig,
           log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Write the exported model directory `output`; returns what export.json records.

    Raises UserError (and writes nothing) when the int8 model loses more than the tolerance.
    """
    if not (config.int8 or config.any_size or config.ort):
        raise UserError("nothing to export: give --int8, --any-size and/or --ort")
    source = load(model_dir)
    out = _check_output(Path(output), source, config)
    model = tidy_opsets(onnx.load(str(source.path)))
    if config.int8 and any(node.op_type == "DequantizeLinear" for node in model.graph.node):
        raise UserError(f"{source.path} is already an int8 model: export --int8 from the fp32 model.onnx it came from")
    report: dict = {"source": str(source.path.resolve()), "int8": None}
    with tempfile.TemporaryDirectory(prefix="retrain-export-") as tmp:
        if config.int8:
            model, int8 = int8_model(source, model, Path(tmp), config, log)
            report["int8"] = asdict(int8) | {"accuracy_drop_points": int8.drops(), "judged": int8.judged()}
        files = {MODEL_FILE: model}
        if config.any_size:
            files[ANY_SIZE_FILE] = any_size_model(model, source.prep)
        blobs = {name: m.SerializeToString() for name, m in files.items()}
        if config.ort:
            blobs |= {Path(name).with_suffix(".ort").name: ort_format(data, Path(tmp)) for name, data in blobs.items()}
    report["files"] = {name: len(data) for name, data in blobs.items()}
    _write(out, blobs, source.labels, report)
    return report


def _write(out: Path, blobs: dict[str, bytes], labels: list[str], report: dict) -> None:
    """All files staged, then renamed into `out` together (outputs.write_model_dir: Ctrl-C held off)."""
    def write(staging: Path) -> None:
        for name, data in blobs.items():
            atomic_write_bytes(staging / name, data)
        atomic_write_text(staging / LABELS_FILE, "".join(f"{c}\n" for c in labels))
        atomic_write_json(staging / REPORT_FILE, report)
    write_model_dir(out, write, "export")


def _check_output(out: Path, source: Classifier, config: ExportConfig) -> Path:
    """Refused before any work: the source's own folder, a folder among the photos or holding the
    user's files (as `retrain train --output`), and (without --overwrite) an earlier export's files."""
    if out.resolve() == source.path.parent.resolve():
        raise UserError(f"--output {out} is the model's own directory: choose another, the source stays as it is")
    ours = (MODEL_FILE, ANY_SIZE_FILE, *(Path(n).with_suffix(".ort").name for n in (MODEL_FILE, ANY_SIZE_FILE)),
            LABELS_FILE, REPORT_FILE)
    check_output_dir(out, _image_folders(source, config.image_dir), config.overwrite, replaces=", ".join(ours))
    taken = [n for n in ours if (out / n).exists()]
    if taken and not config.overwrite:
        raise UserError(f"{out} already holds {', '.join(taken)}: choose another --output or add --overwrite")
    return out


def _image_folders(source: Classifier, image_dir: str | None) -> list[str | None]:
    """The photo folders the model was trained and tested on (from its provenance), and --image_dir."""
    provenance, settings = _provenance(source)
    return [image_dir, provenance.get("image_dir"), settings.get("val_dir"), settings.get("test_dir")]


def _provenance(source: Classifier) -> tuple[dict, dict]:
    """The model's provenance record and the training settings in it ({} where it records none)."""
    provenance = source.provenance()
    settings = provenance.get("config")
    return provenance, settings if isinstance(settings, dict) else {}


# ------------------------------------------------------------------------------------------ int8

def int8_model(source: Classifier, model: onnx.ModelProto, tmp: Path, config: ExportConfig,
               log: Callable[[str], None]) -> tuple[onnx.ModelProto, Int8Report]:
    """The quantized classifier and its numbers beside the fp32 one's; UserError past the tolerance."""
    dataset = training_dataset(source, config.image_dir, log)
    _check_enough_to_judge({s: len(dataset.split(s)) for s in ("validation", "test")}, config.tolerance)
    calibration = calibration_images(dataset.split("train"), source, config)
    log(f"Quantizing to int8, calibrated on {len(calibration)} training photos ...")
    quantized = quantize(model, calibration, tmp)
    fp32_session, int8_session = source.session, inference_session(quantized.SerializeToString())
    log("Measuring accuracy and speed of both models on the same photos ...")
    accuracy, images, agreement = compare_accuracy(fp32_session, int8_session, dataset, source, config.workers)
    speed = compare_speed({"fp32": ort_runner(fp32_session), "int8": ort_runner(int8_session)}, calibration)
    report = Int8Report(
        fp32=Measured(source.path.stat().st_size, speed["fp32"], accuracy["fp32"]),
        int8=Measured(quantized.ByteSize(), speed["int8"], accuracy["int8"]),
        images=images, top1_agreement=agreement, calibration_images=len(calibration),
        tolerance=config.tolerance, cpu=cpu_instructions())
    log(report.table())
    _check_enough_to_judge(report.images, config.tolerance)  # again: some photos may have failed to decode
    judged = set(report.judged())
    worse = {s: d for s, d in report.drops().items() if d > config.tolerance and s in judged}
    if worse:
        raise UserError("the int8 model loses " + ", ".join(f"{d:.1f} points of {s} accuracy" for s, d in worse.items())
                        + f", over the {config.tolerance:g}-point tolerance (--tolerance); nothing written. "
                        + "; ".join(f"{s}: fp32 {100 * report.fp32.accuracy[s]:.1f}%, int8 "
                                    f"{100 * report.int8.accuracy[s]:.1f}%" for s in report.fp32.accuracy))
    return quantized, report


def _check_enough_to_judge(images: dict[str, int], tolerance: float) -> None:
    """Refuse int8 where the held-out photos ({split: photos}), pooled, are too few to tell a lost point from
    chance, unless the tolerance accepts any loss."""
    if pooled_photos(images) < TOO_FEW_TO_MEASURE and tolerance < 100:
        raise UserError(f"only {images.get('validation', 0)} validation and {images.get('test', 0)} test photos: "
                        f"too few to check that the int8 model keeps the fp32 model's accuracy ({TOO_FEW_TO_MEASURE} "
                        "or more are needed); nothing written. Add photos to every class and train again, export "
                        "without --int8, or accept any loss unchecked with --tolerance 100")


def training_dataset(source: Classifier, image_dir: str | None, log: Callable[[str], None]) -> Dataset:
    """The model's photos, split as when it was trained (the split settings come from its provenance)."""
    provenance, settings = _provenance(source)
    folder = image_dir or provenance.get("image_dir")
    if not folder:
        raise UserError(f"{source.path} does not record the folder it was trained on: give it with --image_dir")
    if not Path(folder).is_dir():
        if image_dir:
            raise UserError(f"--image_dir {image_dir} is not a folder: give the folder the model was trained on")
        raise UserError(f"the training photos of {source.path} are not at {folder} any more: give their folder "
                        "with --image_dir (int8 calibration and the accuracy check need them)")
    # The split recorded in training's cache: a folder grown since keeps its first photos where training put them.
    records = Path(settings.get("cache_dir") or default_cache_dir()) / "splits"
    dataset = scan_dataset(folder, val_dir=settings.get("val_dir"), test_dir=settings.get("test_dir"),
                           validation_percentage=settings.get("validation_percentage", 10.0),
                           testing_percentage=settings.get("testing_percentage", 10.0), quiet=True,
                           split_records=records)
    if dataset.classes != source.labels:
        raise UserError(f"the class folders of {folder} ({', '.join(dataset.classes)}) are not the model's classes "
                        f"({', '.join(source.labels)}): give the training folder with --image_dir")
    if dataset.skipped:  # the accuracy check runs without them
        log(skipped_line(dataset.skipped))
    if provenance.get("dataset_fingerprint") not in (None, dataset.fingerprint()):
        log(f"Note: the photos in {folder} have changed since the model was trained; "
            "both models are measured on them as they are now.")
    return dataset


def calibration_images(train: SampleTable, source: Classifier, config: ExportConfig) -> np.ndarray:
    """(n, S, S, 3) uint8: training photos evenly spaced through the split (which runs class by class)."""
    if not len(train):
        raise UserError("the model's training split has no photos to calibrate the int8 model on")
    rows = np.unique(np.linspace(0, len(train) - 1, min(config.calibration_images, len(train))).astype(int))
    images, failed = decode_all([train.path(int(i)) for i in rows], source.prep, config.workers)
    keep = np.setdiff1d(np.arange(len(rows)), list(failed))
    if not len(keep):
        raise UserError("none of the calibration photos could be decoded")
    return images[keep]


def quantize(model: onnx.ModelProto, calibration: np.ndarray, tmp: Path) -> onnx.ModelProto:
    """Static QDQ quantization of the backbone; the normaliser and the head stay fp32.

    The model first goes through ONNX Runtime's basic optimisations, which fold the
    EfficientNet "same" padding (Pad nodes) into the convolutions: left between quantize and
    dequantize nodes, those Pads kept int8 Lite0 at fp32's speed (measured: 1.05x against 2.4x).
    Quantizing the residual Adds and clips as well as the convolutions, rather than the
    convolutions alone, keeps the activations int8 from block to block: on rock_paper_scissors
    Conv-only quantization lost 5.4 points of validation accuracy, this none.
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = (calibration[i:i + 1] for i in range(len(calibration)))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    optimized = basic_optimized(model, tmp)
    fp32_parts = _upstream(optimized.graph, PIXELS_NAME) + _downstream(optimized.graph, FEATURES_NAME)
    target = tmp / "int8.onnx"
    try:
        with _quiet():
            quantize_static(optimized, str(target), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=fp32_parts)
    except Exception as e:  # the quantizer raises assorted types for graphs it cannot handle
        raise UserError(f"ONNX Runtime could not quantize this model: {str(e).splitlines()[0] if str(e) else e!r}"
                        ) from None
    quantized = tidy_opsets(onnx.load(str(target)))
    _keep_interface(quantized, model, calibration=len(calibration))
    return quantized


def basic_optimized(model: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    """The model after ONNX Runtime's hardware-independent optimisations (constant folding, Pad into Conv),
    every node named (the quantizer excludes nodes by name)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp / "basic.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(opts.optimized_model_filepath)
    for i, node in enumerate(optimized.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    return optimized


def _upstream(graph: onnx.GraphProto, tensor: str) -> list[str]:
    """Names of the nodes `tensor` is computed from (graph.node is in topological order)."""
    needed, names = {tensor}, []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            names.append(node.name)
            needed.update(node.input)
    return names


def _downstream(graph: onnx.GraphProto, tensor: str) -> list[str]:
    """Names of the nodes that depend on `tensor`."""
    reached, names = {tensor}, []
    for node in graph.node:
        if reached.intersection(node.input):
            names.append(node.name)
            reached.update(node.output)
    return names


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer and converter log advice and progress and print; the report says what matters."""
    import logging

    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _keep_interface(quantized: onnx.ModelProto, model: onnx.ModelProto, calibration: int) -> None:
    """Same inputs, outputs and metadata as the fp32 model, plus a note of how it was quantized."""
    def signature(m: onnx.ModelProto) -> list:
        return [(v.name, v.type.SerializeToString()) for v in (*m.graph.input, *m.graph.output)]

    assert signature(quantized) == signature(model), "quantization changed the model's inputs or outputs"
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(model.metadata_props)
    quantized.metadata_props.append(onnx.StringStringEntryProto(key="retrain:quantization", value=json.dumps(
        {"method": "ONNX Runtime static quantization, QDQ", "weights": "int8, per channel",
         "activations": "uint8", "calibration": f"MinMax over {calibration} training photos",
         "fp32_parts": "normalisation and head"})))
    quantized.producer_name = model.producer_name


def compare_accuracy(fp32: ort.InferenceSession, int8: ort.InferenceSession, dataset: Dataset, source: Classifier,
                     workers: int) -> tuple[dict[str, dict[str, float]], dict[str, int], float | None]:
    """({"fp32"|"int8": {split: accuracy}}, {split: photos}, top-1 agreement) over validation and test, and
    over both pooled (POOLED) where both have photos; each photo decoded once and given to both models."""
    accuracy: dict[str, dict[str, float]] = {"fp32": {}, "int8": {}}
    images, agree, total, pooled = {}, 0, 0, {"fp32": 0, "int8": 0}
    for split in ("validation", "test"):
        samples = dataset.split(split)
        if not len(samples):
            continue
        right = {"fp32": 0, "int8": 0}
        n = 0
        for ok, batch, _ in decoded_batches(samples.paths, source.prep, 32, workers):
            labels = samples.labels[ok]
            top = {name: s.run(None, {INPUT_NAME: batch})[0].argmax(1) for name, s in (("fp32", fp32), ("int8", int8))}
            right = {name: right[name] + int((top[name] == labels).sum()) for name in right}
            agree += int((top["fp32"] == top["int8"]).sum())
            n += len(ok)
        if n:
            images[split] = n
            total += n
            for name in right:
                accuracy[name][split] = right[name] / n
                pooled[name] += right[name]
    if len(images) > 1:  # a split too small to judge alone still counts here
        images[POOLED] = total
        for name in pooled:
            accuracy[name][POOLED] = pooled[name] / total
    return accuracy, images, agree / total if total else None  # None: no photo to agree on (JSON null, not 0%)


def ort_runner(session: ort.InferenceSession) -> Callable[[np.ndarray], object]:
    return lambda batch: session.run(None, {INPUT_NAME: batch})


def compare_speed(runners: dict[str, Callable[[np.ndarray], object]], images: np.ndarray,
                  batches: tuple[int, ...] = SPEED_BATCHES, rounds: int = 5) -> dict[str, dict[str, float]]:
    """{name: {"batch_B": images/s}} of each runner (uint8 (B, S, S, 3) images -> anything): median
    over `rounds`, the runners taking turns so that other load on the machine falls on all alike."""
    out: dict[str, dict[str, float]] = {name: {} for name in runners}
    for size in batches:
        batch = np.resize(images, (size, *images.shape[1:]))  # repeats photos when there are fewer
        calls = max(1, 32 // size)  # about 32 images a timing
        times: dict[str, list[float]] = {name: [] for name in runners}
        for run in runners.values():  # warm-up
            run(batch)
        for _ in range(rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                for _ in range(calls):
                    run(batch)
                times[name].append(time.perf_counter() - start)
        for name in runners:
            out[name][f"batch_{size}"] = round(size * calls / statistics.median(times[name]), 1)
    return out


def cpu_instructions() -> list[str]:
    """Which of AVX2, AVX-512 VNNI and AVX-512 BF16 this CPU has (Linux; empty elsewhere)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted({"avx2", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8"} & flags)


# ------------------------------------------------------------------------------------------ .ort

def ort_format(model: bytes, tmp: Path) -> bytes:
    """The model in ONNX Runtime's mobile format, via onnxruntime's own converter.

    Converted for ARM: that leaves out the x86-only NCHWc layout, so the same file runs on
    phones and on x86.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    folder = Path(tempfile.mkdtemp(dir=tmp))
    (folder / "model.onnx").write_bytes(model)
    with _quiet():
        convert_onnx_models_to_ort(folder / "model.onnx", output_dir=folder / "ort",
                                   optimization_styles=[OptimizationStyle.Fixed], target_platform="arm")
    data = (folder / "ort" / "model.ort").read_bytes()
    shutil.rmtree(folder)
    return data
