"""The training pipeline: a folder of class folders in, a TrainedModel (model.onnx + metrics) out.

train() reads top to bottom: scan -> features (cached) -> head -> network (fine-tuned or from
scratch, as the plan says) -> calibrate -> evaluate -> export. Each stage is a module of its
own; this one only calls them in order and records what they did.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from .progress import Stopwatch, progress, say
from . import __version__, distributed
from .backbones import Backbone, export_torch_network, get_backbone
from .engine import open_engine
from .errors import UserError
from .checks import class_counts, copies_of_training, quick_summary
from .evaluation import (Timeline, accuracy_evidence, classification_metrics, copies_warning, small_splits_disagree,
                         verdict)
from .evidence import describe_accuracy
from .features import compute_features, feature_matrices, features_cached, features_of, store_folder
from .runtime import inference_session_from
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text, default_cache_dir, prune_least_recent
from .config import Checkpoint, TrainConfig
from .graphs import check_output_name, classifier_model, extractor_model, extractor_path, model_metadata
from .calibrate import Calibration, calibrate, calibration_error_text, unknown_threshold_text
from .metrics import (BackboneScore, CalibrationReport, FinetuneRecord, HeadRecord, PredictionRecord, RunMetrics,
                      SkippedFile)
from .head import OUT_OF_FOLD_MAX_ROWS, HeadResult, logits, out_of_fold_logits, softmax, train_head
from .prediction import LABELS_FILE, METRICS_FILE, MODEL_FILE
from .split import MIN_HELD_OUT
from .interrupts import interrupts_deferred
from .outputs import os_error_message, write_model_dir
from .plan import FOLDS, Mode, TrainingPlan, check_settings_apply, plan_training, unused_note
from .scan import SPLITS, Dataset, SampleTable, scan_dataset, skipped_line
from .tuned import (TunedRun, Winner, identity_key, load_scores, load_tuned, save_scores, save_tuned, scores_path,
                    tuned_path)




@dataclass
class TrainedModel:
    model: onnx.ModelProto
    classes: list[str]
    metrics: RunMetrics
    misclassified: list[tuple[str, str, str]] = field(default_factory=list)  # (path, true, predicted)
    cache_dir: Path | None = None  # where the report finds plots drawn before (None: the usual cache)

    def save(self, output_dir: str | Path, report: bool = True) -> Path:
        """Write model.onnx, labels.txt, metrics.json and (unless report=False) report.html into `output_dir`.

        All or nothing (outputs.write_model_dir): a full or read-only disk leaves the previous model whole.
        """
        title = Path(output_dir).resolve().name
        return write_model_dir(output_dir, lambda out: self._write_into(out, report, title), "model")

    def _write_into(self, out: Path, report: bool, title: str) -> None:
        self._write_files(out / MODEL_FILE, out / LABELS_FILE)
        atomic_write_json(out / METRICS_FILE, self.metrics.to_json())
        if report:
            from .report import write_report

            write_report(out, title=title, metrics=self.metrics, cache_dir=self.cache_dir)

    def save_files(self, graph: str | Path, labels: str | Path) -> None:
        try:
            with interrupts_deferred():  # the graph and its labels are replaced together or not at all
                self._write_files(graph, labels)
        except OSError as e:  # a full, read-only or forbidden disk: one line naming the path
            raise UserError(os_error_message(e, "write")) from None

    def _write_files(self, graph: str | Path, labels: str | Path) -> None:
        atomic_write_bytes(graph, self.model.SerializeToString())
        atomic_write_text(labels, "".join(f"{c}\n" for c in self.classes))


def release_free_heap() -> None:
    """Give the heap a finished stage freed back to the OS (glibc keeps it for reuse otherwise).

    On 200,000 images this keeps the training process's peak heap within 17% of its peak on 20,000
    (29% without): the scan's and the extraction's big temporaries are gone by the time the head trains.
    """
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to do
        pass


def _versions() -> dict[str, str]:
    """Library versions for provenance, read from package metadata (importing torch costs 1.3 s)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    return {"retrain": __version__, "python": platform.python_version()} | {
        name: installed(name) for name in ("torch", "onnx", "onnxruntime", "numpy", "pillow")}


def usable_splits(dataset: Dataset, usable: np.ndarray, failures: dict[str, str]) -> dict[str, SampleTable]:
    """{split: samples} of the rows where the boolean mask `usable` is set (their content has features or decoded).

    The other rows join dataset.skipped, with their reason from `failures` ({digest: reason});
    every class must keep a training image.
    """
    samples = dataset.samples
    dataset.skipped += [(samples.path(i), failures.get(samples.digest_hex(i), "no features"))
                        for i in np.flatnonzero(~usable)]
    left = np.bincount(samples.labels[usable & samples.split_mask("train")], minlength=len(dataset.classes))
    lost = [c for c, n in zip(dataset.classes, left) if not n]
    if lost:
        raise UserError(f"no usable training images left for class(es): {', '.join(lost)} "
                        "(see the skipped files above)")
    return {name: samples[usable & samples.split_mask(name)] for name in SPLITS}


def _summarize(dataset: Dataset, log: Callable[[str], None]) -> None:
    counts = dataset.counts()
    fixed = list(dataset.split_folders)
    carved = [s for s in ("validation", "test") if s not in fixed]
    how = ("fixed split folders" if not carved else "stratified by class, stable as photos are added"
           if not fixed else f"{' and '.join(fixed)} from a folder, {carved[0]} stratified by class")
    log(f"Found {len(dataset.samples)} images in {len(dataset.classes)} classes; split train {counts['train']}, "
        f"validation {counts['validation']}, test {counts['test']} ({how})")
    log("Per class (train/validation/test): " + ", ".join(
        f"{c} {row['train']}/{row['validation']}/{row['test']}" for c, row in class_counts(dataset).items()))
    if dataset.unsplit_classes:
        log(f"Warning: too few photos to hold any out for {', '.join(dataset.unsplit_classes)} (fewer than "
            f"{MIN_HELD_OUT}): all of them train, and how well the model knows them is not measured.")
    for line in quick_summary(dataset):  # counts, missing or tiny splits, exact duplicates and leaks: no decoding
        log(line)
    if dataset.ignored:
        log(f"Ignored {dataset.ignored} file(s) without an image extension in the class folders.")


def _log_for(config: TrainConfig) -> Callable[[str], None]:
    return lambda msg: None if config.quiet else say(msg)


def _features_by_split(image_dir: str | Path, config: TrainConfig, backbone: Backbone, cache: Path,
                       stage: Stopwatch, log: Callable[[str], None]):
    """Scan, extract (cached) features; (dataset, {split: samples}, {split: (x, y)}, the ONNX extractor's path)."""
    dataset = _scan(image_dir, config, cache, stage, log)
    features, failures, extractor = _extract(dataset.samples, config, backbone, cache, stage)
    split = usable_splits(dataset, features.covers(dataset.samples), failures)
    _log_skipped(dataset, log)
    return dataset, split, feature_matrices(split, features, backbone.feature_dim), extractor


def _extract(samples: SampleTable, config: TrainConfig, backbone: Backbone, cache: Path, stage: Stopwatch):
    """(features of the samples' contents, {digest: why it failed}, the ONNX extractor's path); cached."""
    with stage("features"), distributed.main_first(), open_engine(config.engine, config.ray_address) as engine:
        extractor = extractor_path(backbone, cache)  # exported once; it becomes part of model.onnx too
        features, failures = compute_features(samples, backbone, extractor, store_folder(cache, config.bottleneck_dir),
                                              batch_size=config.batch_size, workers=config.workers,
                                              quiet=config.quiet, engine=engine)
    return features, failures, extractor


def _scan(image_dir: str | Path, config: TrainConfig, cache: Path, stage: Stopwatch,
          log: Callable[[str], None]) -> Dataset:
    with stage("scan"):
        dataset = scan_for_training(image_dir, config, cache)
        _summarize(dataset, log)
        for note in _overridden_percentages(dataset, config):
            log(note)
    return dataset


def _overridden_percentages(dataset: Dataset, config: TrainConfig) -> list[str]:
    """Notes for split percentages given but unread: a split folder holds that split's photos."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return [f"Note: --{name} {getattr(config, name):g} goes unused: the {split} photos are those in {folder}"
            for split, name in (("validation", "validation_percentage"), ("test", "testing_percentage"))
            if (folder := dataset.split_folders.get(split)) and getattr(config, name) != defaults[name]]


def scan_for_training(image_dir: str | Path, config: TrainConfig, cache: Path) -> Dataset:
    """The folder scanned and split as train() does (the split record in `cache` keeps every run's split)."""
    return scan_dataset(image_dir, val_dir=config.val_dir, test_dir=config.test_dir,
                        validation_percentage=config.validation_percentage,
                        testing_percentage=config.testing_percentage, workers=config.workers + 2,
                        quiet=config.quiet, split_records=cache / "splits")


def _log_skipped(dataset: Dataset, log: Callable[[str], None]) -> None:
    if dataset.skipped:
        log(skipped_line(dataset.skipped))


def feature_splits(image_dir: str | Path, config: TrainConfig, backbone: Backbone | None = None
                   ) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Class names and {split: (features, labels)} exactly as train() would use them (lr-find, benchmarks);
    `backbone` instead of the config's (the benchmarks' one-view baseline)."""
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    backbone = backbone or get_backbone(config.backbone, input_mean=config.input_mean, input_std=config.input_std)
    dataset, _, x, _ = _features_by_split(image_dir, config, backbone, cache, Stopwatch(), _log_for(config))
    return dataset.classes, x


def head_training_data(image_dir: str | Path, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Training-split features, labels and class names, as train() would use them (for lr-find)."""
    classes, x = feature_splits(image_dir, config)
    return *x["train"], classes


@dataclass(frozen=True)
class _Fitted:
    """What a training path hands to calibration, evaluation and export (a later stage makes a new one)."""
    dataset: Dataset
    split: dict[str, SampleTable]
    x: dict[str, tuple[np.ndarray, np.ndarray]]  # validation and test features of the final network
    extractor: onnx.ModelProto
    layers: list[tuple[np.ndarray, np.ndarray]]
    plan: TrainingPlan
    backbone: Backbone
    head: HeadResult | None = None
    tuned: FinetuneRecord | None = None
    backbone_scores: list[BackboneScore] | None = None  # the comparison that chose the backbone, if one ran
    # That comparison's out-of-fold logits of the training and validation photos (rows in that order), for calibration.
    held_out: np.ndarray | None = None


def train(image_dir: str | Path, config: TrainConfig | None = None,
          log: Callable[[str], None] | None = None, timeline: Timeline | None = None,
          publish: Callable[[TrainedModel], None] | None = None) -> TrainedModel | None:
    """Train a classifier on a folder of class folders; returns the model and its metrics.

    The stages in order: scan -> features (cached) -> head -> network (fine-tuned or from scratch,
    as the plan says) -> calibrate -> evaluate -> export. Under torchrun every process calls this;
    rank 0 gets the model, the others None. timeline, if given, records test accuracy against
    training time (for `retrain compare`). publish, if given, receives the head's model as soon as
    it exists when the default run goes on to improve it (fine-tuning, or larger backbones compared on a small
    folder): its first usable model.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise UserError(f"config must be a TrainConfig; got {type(config).__name__}")
    if not isinstance(image_dir, (str, os.PathLike)) or not str(image_dir).strip():  # "": not the current folder
        raise UserError(f"image_dir must be a folder's path; got {image_dir!r}")
    config.validate()  # again: a setting may have been changed since the config was made
    check_settings_apply(config)
    check_output_name(config.output_name)
    log = distributed.rank0_log(log or _log_for(config))
    stage = Stopwatch(after=release_free_heap)
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    backbone = get_backbone(config.backbone, input_mean=config.input_mean, input_std=config.input_std)
    train_with = _train_on_features if backbone.pretrained else _train_from_scratch
    fitted = train_with(image_dir, config, backbone, cache, stage, log, timeline)
    first = (lambda f: publish(_finished(image_dir, f, config, stage, log, announce=False))) if publish else None
    if fitted.plan.mode in (Mode.FINETUNE, Mode.HEAD_LIVE):
        fitted = _fine_tune(fitted, config, cache, stage, log, timeline, publish=first)
    if _backbones_compete(fitted):
        # An anytime plan published the head's model before fine-tuning; otherwise it is published here.
        fitted = _choose_backbone(fitted, config, cache, stage, log, publish=None if fitted.plan.anytime else first)
    distributed.finish()
    if not distributed.is_main():
        return None  # torchrun: the other processes helped train; rank 0 evaluates and exports
    return _finished(image_dir, fitted, config, stage, log)


def _backbones_compete(fitted: _Fitted) -> bool:
    """Whether the plan's candidate backbones compete now: the head stays, and no Ctrl-C asked to stop."""
    return fitted.plan.mode is Mode.HEAD and bool(fitted.plan.backbone_candidates) and not (
        fitted.tuned and fitted.tuned.interrupted)


def _finished(image_dir: str | Path, fitted: _Fitted, config: TrainConfig, stage: Stopwatch,
              log: Callable[[str], None], announce: bool = True) -> TrainedModel:
    """Calibrate, evaluate and export: the trained network becomes a TrainedModel."""
    backbone = fitted.backbone
    with stage("calibrate"):
        cal = _calibrate(fitted, config)
    provenance = _provenance(image_dir, config, backbone, fitted)
    with stage("evaluate"):
        metrics, misclassified = _evaluate(fitted, cal, _run_record(fitted, backbone, cal, provenance))
    for line in result_lines(metrics) if announce else ():
        log(line)
    with stage("export"):
        model = classifier_model(fitted.extractor, fitted.layers,
                                 model_metadata(backbone, fitted.dataset.classes, provenance),
                                 temperature=cal.temperature, unknown_threshold=cal.unknown_threshold,
                                 output_name=config.output_name)
    metrics = replace(metrics, seconds=dict(stage.seconds))
    return TrainedModel(model, fitted.dataset.classes, metrics, misclassified,
                        cache_dir=Path(config.cache_dir) if config.cache_dir else None)


def _calibrate(fitted: _Fitted, config: TrainConfig) -> Calibration:
    """Temperature and unknown threshold from held-out logits; sharpening only for label-smoothed networks."""
    z_held, y_held = _held_out_logits(fitted, len(fitted.dataset.classes), config)
    warm_head_kept = fitted.tuned is not None and fitted.tuned.best_epoch == 0
    smoothed = (config.head if not fitted.plan.live or warm_head_kept else
                config.scratch if fitted.plan.mode is Mode.SCRATCH else config.finetune).label_smoothing > 0
    x_te, y_te = fitted.x["test"]
    return calibrate(z_held, y_held, logits(fitted.layers, x_te), y_te, config.unknown_threshold,
                     may_sharpen=smoothed, seed=config.head.seed)


def _provenance(image_dir: str | Path, config: TrainConfig, backbone: Backbone, fitted: _Fitted) -> dict:
    """How the model was made, stored in its metadata and metrics.json."""
    return {"config": config.to_dict(), "plan": fitted.plan.to_dict(), "image_dir": str(Path(image_dir).resolve()),
            "backbone_identity": backbone.identity, "dataset_fingerprint": fitted.dataset.fingerprint(),
            "versions": _versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _run_record(fitted: _Fitted, backbone: Backbone, cal: Calibration, provenance: dict) -> dict:
    """metrics.json's account of the run: data per split and class, skipped files, calibration, histories."""
    classes, split, head, tuned = fitted.dataset.classes, fitted.split, fitted.head, fitted.tuned
    return dict(
        classes=classes, backbone=backbone.name, mode=fitted.plan.mode.value, plan=fitted.plan.to_dict(),
        num_images={k: len(v) for k, v in split.items()},
        class_counts={k: dict(zip(classes, np.bincount(v.labels, minlength=len(classes)).tolist()))
                      for k, v in split.items()},
        skipped_files=[SkippedFile(str(p), why) for p, why in fitted.dataset.skipped],
        calibration=cal.report, provenance=provenance,
        head=HeadRecord(best_step=head.best_step, steps_run=head.steps_run, history=head.history) if head else None,
        finetune=tuned, backbone_comparison=fitted.backbone_scores)


def _train_on_features(image_dir: str | Path, config: TrainConfig, backbone: Backbone, cache: Path, stage: Stopwatch,
                       log: Callable[[str], None], timeline: Timeline | None) -> _Fitted:
    """Pretrained backbones: the head on cached features, then (by mode) fine-tuning on live images."""
    dataset, split, x, extractor = _features_by_split(image_dir, config, backbone, cache, stage, log)
    extractor = onnx.load(str(extractor))
    check_output_name(config.output_name, extractor)  # an ONNX-file backbone's own names, before training
    if not split["validation"]:
        log("No validation images: early stopping watches training accuracy instead.")
    with stage("train"):
        bar = progress(total=config.head.steps, desc="Training head", unit="step", disable=config.quiet, leave=False)
        head = train_head(*x["train"], *x["validation"], len(dataset.classes), config.head, log=log,
                          progress=bar.update)
        bar.close()
    if timeline:
        timeline.record(lambda: _accuracy(head.layers, *x["test"]))
    x_va, y_va = x["validation"]
    plan = plan_training(config, backbone, len(split["train"]),
                         (_accuracy(head.layers, x_va, y_va) if len(y_va) else None, len(y_va)),
                         n_photos=sum(len(rows) for rows in split.values()))
    if plan.mode is Mode.HEAD and config.mode == "auto":
        log(plan.describe())
    return _Fitted(dataset, split, x, extractor, head.layers, plan, backbone, head)


def _choose_backbone(fitted: _Fitted, config: TrainConfig, cache: Path, stage: Stopwatch, log: Callable[[str], None],
                     publish: Callable[[_Fitted], None] | None) -> _Fitted:
    """The plan's candidate backbones' heads, compared by k-fold accuracy on the training and validation photos.

    It runs where the head is the final model (validation too small to judge fine-tuning, or
    fine-tuning that did not beat the head); the validation split alone would be too little to
    choose by, so each candidate's head is judged on every labelled photo it did not train on.
    The winner's out-of-fold logits are those photos' held-out evidence for calibration too.
    `publish`, if given, receives the first candidate's model (already trained) before the others
    extract. The counts and the winner (head and logits) are cached: the same command on the same
    folder trains none of them again, and where the winner's features are cached too it publishes
    nothing early (its final model follows in seconds).
    """
    identity = _planned_identity(training_identity(config, fitted.dataset, fitted.backbone), fitted.plan)
    stored = scores_path(cache, identity)
    cached = load_scores(stored, identity)
    if publish and distributed.is_main() and not _final_model_is_quick(cached, fitted, config, cache):
        publish(fitted)
    trained = {fitted.backbone.name: fitted}
    y = np.concatenate([fitted.x["train"][1], fitted.x["validation"][1]])
    if cached is None:
        for name in fitted.plan.backbone_candidates:
            if name not in trained:
                contender = _contender(fitted, get_backbone(name), config, cache, stage, log)
                trained |= {name: contender} if contender else {}
        with stage("train"):
            held = {name: _out_of_fold(c, y, config) for name, c in trained.items()}
        scores = [BackboneScore(name, int((z.argmax(1) == y).sum()), len(y)) for name, z in held.items()]
        best = _most_correct(scores)
        winner = Winner(best, trained[best].head, held[best], y)
        save_scores(stored, scores, identity, winner)
    else:
        scores, winner = cached
        best = _most_correct(scores)
        log(f"Reusing the backbone comparison of an identical earlier run (same photos and settings): {stored}")
        stored_winner = winner if winner and winner.backbone == best else None
        if best not in trained:
            trained[best] = _contender(fitted, get_backbone(best), config, cache, stage, log,
                                       stored_winner.head if stored_winner else None)
        winner = _completed_winner(stored_winner, trained[best], y, config, stage)
        if winner is not None and winner is not stored_winner:  # made whole again: stored for the next rerun
            save_scores(stored, scores, identity, winner)
    chosen = trained[best] or fitted
    summary = ", ".join(f"{s.name} {s.correct}/{s.photos}" for s in scores)
    log(f"Cross-validated ({FOLDS} folds) on {scores[0].photos} photos: {summary}; {chosen.backbone.name} is kept")
    return replace(chosen, backbone_scores=scores, held_out=winner.held_out if winner else None,
                   plan=replace(chosen.plan, reason=f"{chosen.plan.reason}: {summary} right; {chosen.backbone.name} "
                                "kept"))


def _out_of_fold(candidate: _Fitted, y: np.ndarray, config: TrainConfig) -> np.ndarray:
    """A candidate head's out-of-fold logits of the training and validation photos (the comparison's folds)."""
    x = np.concatenate([candidate.x["train"][0], candidate.x["validation"][0]])
    return out_of_fold_logits(x, y, len(candidate.dataset.classes), config.head, candidate.head.best_step, FOLDS)


def _completed_winner(stored: Winner | None, contender: _Fitted | None, y: np.ndarray, config: TrainConfig,
                      stage: Stopwatch) -> Winner | None:
    """The cached winner where it is whole; otherwise made whole from the contender (the head that
    `_contender` used or trained, and out-of-fold logits computed again where the stored ones are
    missing or were counted at another step). None: no contender."""
    if contender is None:
        return None
    n_classes = len(contender.dataset.classes)
    # The folds' heads train for the full head's best step: stored logits stand while that step does.
    logits_stand = stored is not None and stored.held_out_fits(y, n_classes) and \
        stored.head.best_step == contender.head.best_step
    if logits_stand and stored.head.fits(contender.backbone.feature_dim, n_classes):
        return stored
    if logits_stand:
        return Winner(contender.backbone.name, contender.head, stored.held_out, y)
    with stage("train"):
        return Winner(contender.backbone.name, contender.head, _out_of_fold(contender, y, config), y)


def _final_model_is_quick(cached: tuple[list[BackboneScore], Winner | None] | None, fitted: _Fitted,
                          config: TrainConfig, cache: Path) -> bool:
    """Whether a cached comparison leaves nothing slow to do: its winner is this head's backbone, or
    the winner's head and features are cached (then publishing a first model would only cost time)."""
    if cached is None:
        return False
    scores, winner = cached
    best = _most_correct(scores)
    return best == fitted.backbone.name or (winner is not None and winner.backbone == best and features_cached(
        _all_rows(fitted.split), get_backbone(best), store_folder(cache, config.bottleneck_dir)))


def _all_rows(split: dict[str, SampleTable]) -> SampleTable:
    return split["train"] + split["validation"] + split["test"]


def _most_correct(scores: list[BackboneScore]) -> str:
    return max(scores, key=lambda score: score.correct).name  # a tie keeps the earlier, smaller backbone


def _contender(fitted: _Fitted, backbone: Backbone, config: TrainConfig, cache: Path, stage: Stopwatch,
               log: Callable[[str], None], head: HeadResult | None = None) -> _Fitted | None:
    """The head (`head`, or one trained here) on `backbone`'s features of the same photos, or None if
    some photo failed through it."""
    split = fitted.split
    rows = _all_rows(split)
    features, failures, extractor = _extract(rows, config, backbone, cache, stage)
    if not features.covers(rows).all():
        log(f"{backbone.name} left out of the comparison: {len(failures)} photo(s) failed through it")
        return None
    x = feature_matrices(split, features, backbone.feature_dim)
    if head is None or not head.fits(backbone.feature_dim, len(fitted.dataset.classes)):
        with stage("train"):
            head = train_head(*x["train"], *x["validation"], len(fitted.dataset.classes), config.head,
                              log=lambda message: None)
    return replace(fitted, backbone=backbone, x=x, extractor=onnx.load(str(extractor)), layers=head.layers, head=head)


def _planned_identity(identity: dict, plan: TrainingPlan) -> dict:
    """The training identity plus what the plan resolved: a cached result is reused only under both.

    The same settings on another machine, or under a retrain that plans differently (epochs, rates,
    device, candidates), must not reuse it. The device counts as the plan resolved it: --device cpu
    and auto on a machine without a GPU are one run.
    """
    settings = identity["settings"]
    asked = {k: v for k, v in settings["finetune"].items() if k != "device"}
    return identity | {"settings": settings | {"finetune": asked}, "plan": plan.to_dict()}


def _fine_tune(fitted: _Fitted, config: TrainConfig, cache: Path, stage: Stopwatch,
               log: Callable[[str], None], timeline: Timeline | None,
               publish: Callable[[_Fitted], None] | None) -> _Fitted:
    """The network fine-tuned on live images from the head's warm start, or the same run's from the cache.

    An anytime plan (the default) first publishes the head's model, keeps the head unless a
    fine-tuned epoch beats it on validation, lets Ctrl-C end fine-tuning with the best so far, and
    caches a finished run so that the same command on the same folder reuses it.
    """
    from .finetune import finetune  # imports PyTorch: only when fine-tuning

    plan, split, backbone = fitted.plan, fitted.split, fitted.backbone
    identity = training_identity(config, fitted.dataset, backbone)
    planned = _planned_identity(identity, plan)  # the data's fingerprint is hashed once
    stored = tuned_path(cache, planned)
    head_only = replace(fitted, plan=TrainingPlan(Mode.HEAD, "the first model: the head on cached features"))
    cached = load_tuned(stored, planned) if plan.anytime else None
    if cached and (cached.extractor is None or all(len(cached.x[k][1]) == len(split[k]) for k in cached.x)):
        kept = "the head" if cached.extractor is None else f"the network of epoch {cached.record.best_epoch}"
        log(f"Reusing the fine-tuning of an identical earlier run (same photos and settings), which kept {kept}: "
            f"{stored}")
        return _after_tuning(fitted, head_only, cached)
    log(plan.describe())
    if plan.anytime and publish and distributed.is_main():
        publish(head_only)
    with stage("finetune"):
        tuned = finetune(split["train"], split["validation"], backbone, fitted.layers, plan.settings(config.finetune),
                         log, Checkpoint(_checkpoint_path(cache, identity), identity), config.resume,
                         after_epoch=timeline.record if timeline else None, test=split["test"], quiet=config.quiet,
                         time_budget=plan.time_budget, anytime=plan.anytime, rates_if_cut=plan.rates_if_cut)
    if plan.anytime and tuned.record.best_epoch == 0:  # the head stays: the very model published first
        run = TunedRun(None, fitted.layers, {}, tuned.record)
    else:
        extractor = tuned_extractor(tuned, backbone)
        run = TunedRun(extractor, tuned.layers, _features_through(extractor, split, backbone, config), tuned.record)
    if plan.anytime and not tuned.record.interrupted:
        save_tuned(stored, run, planned)
    return _after_tuning(fitted, head_only, run)


def _after_tuning(fitted: _Fitted, head_only: _Fitted, run: TunedRun) -> _Fitted:
    """The fine-tuned network, or (no network: no epoch beat it) the head's model with the attempt on record."""
    if run.extractor is None:
        return replace(head_only, plan=replace(fitted.plan, mode=Mode.HEAD, reason=_kept_head(run.record)),
                       tuned=run.record)
    return _with_network(fitted, run)


def _kept_head(record: FinetuneRecord) -> str:
    epochs = len(record.history) - 1  # the first entry is the warm start
    why = "interrupted (Ctrl-C) before any" if record.interrupted else "no"
    return f"{why} fine-tuned epoch beat the head on validation ({epochs} epoch(s) run): the head's model is kept"


def _train_from_scratch(image_dir: str | Path, config: TrainConfig, backbone: Backbone, cache: Path, stage: Stopwatch,
                        log: Callable[[str], None], timeline: Timeline | None) -> _Fitted:
    """Backbones with random weights: the whole network trains on images decoded once into memory."""
    from .scratch import check_options, train_from_scratch  # imports PyTorch

    check_options(config.scratch, backbone)  # before the scan: a wrong flag should not cost minutes
    dataset = _scan(image_dir, config, cache, stage, log)
    split = {name: dataset.split(name) for name in SPLITS}
    identity = training_identity(config, dataset, backbone)
    plan = plan_training(config, backbone, len(split["train"]))
    log(plan.describe())
    with stage("train"):
        tuned, failures = train_from_scratch(split, backbone, len(dataset.classes), plan.settings(config.scratch), log,
                                             stretch_to_budget=plan.stretch_to_budget,
                                             checkpoint=Checkpoint(_checkpoint_path(cache, identity), identity),
                                             resume=config.resume, time_budget=config.time_budget,
                                             after_epoch=timeline.record if timeline else None, quiet=config.quiet)
    split = usable_splits(dataset, ~dataset.samples.has_digest(failures), failures)
    _log_skipped(dataset, log)
    extractor = tuned_extractor(tuned, backbone)
    return _Fitted(dataset, split, _features_through(extractor, split, backbone, config), extractor, tuned.layers, plan,
                   backbone, tuned=tuned.record)


def _with_network(fitted: _Fitted, run: TunedRun) -> _Fitted:
    return replace(fitted, extractor=run.extractor, layers=run.layers, x=fitted.x | run.x, tuned=run.record)


def _features_through(extractor: onnx.ModelProto, split: dict[str, SampleTable], backbone: Backbone,
                      config: TrainConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validation and test features through a trained network's exported ONNX (what the model will compute)."""
    rows = split["validation"] + split["test"]
    features = features_of(inference_session_from(extractor), rows, backbone.prep, workers=config.workers,
                           quiet=config.quiet)
    return feature_matrices({name: split[name] for name in ("validation", "test")}, features, backbone.feature_dim)


def _accuracy(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, y: np.ndarray) -> float:
    return float((logits(layers, x).argmax(1) == y).mean()) if len(y) else float("nan")


CHECKPOINTS_KEPT = 3  # other runs' checkpoints kept for --resume (84 MB each for lite0, more for lite1/lite2)


# TrainConfig fields that change where output goes, how it is logged or how fast features are
# extracted, never the trained network: a run resumed with any of them changed continues the same run.
NOT_TRAINING = ("val_dir", "test_dir", "cache_dir", "bottleneck_dir", "output_name", "unknown_threshold", "resume",
                "workers", "batch_size", "engine", "ray_address", "quiet")
NOT_TRAINING_LIVE = ("workers", "compile", "hold_images")  # FinetuneConfig fields of that kind


def training_identity(config: TrainConfig, dataset: Dataset, backbone: Backbone) -> dict:
    """What makes two runs the same run: the data, the backbone and the settings that shape training."""
    settings = {k: v for k, v in config.to_dict().items() if k not in NOT_TRAINING}
    for live in ("finetune", "scratch"):
        settings[live] = {k: v for k, v in settings[live].items() if k not in NOT_TRAINING_LIVE}
    return json.loads(json.dumps({"dataset_fingerprint": dataset.fingerprint(), "backbone": backbone.identity,
                                  "settings": settings}, sort_keys=True, default=str))


def _checkpoint_path(cache: Path, identity: dict) -> Path:
    """One checkpoint per training identity, so the same command with --resume finds the run it continues."""
    path = cache / "checkpoints" / f"finetune-{identity_key(identity)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():  # the process that writes checkpoints tidies them; torchrun's others only read
        # Interrupted runs leave theirs for --resume; only the most recent are worth their space.
        prune_least_recent(path.parent, CHECKPOINTS_KEPT,
                           lambda e: e.name.startswith("finetune-") and e.name.endswith(".pt") and e.name != path.name)
    return path


def tuned_extractor(tuned, backbone: Backbone) -> onnx.ModelProto:
    """The fine-tuned feature network as an ONNX extractor (uint8 image -> features)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "network.onnx"
        export_torch_network(tuned.features, backbone.prep, path)
        return extractor_model(onnx.load(str(path)), backbone.prep)


def _held_out_logits(fitted: _Fitted, n_classes: int, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """Logits of photos the final model did not train on, for calibration.

    After a backbone comparison, the winner's out-of-fold logits of every training and validation
    photo (already computed to count its score). Otherwise validation always; for a head on cached
    features also out-of-fold logits of the training split, many more photos for the price of a few
    small heads (a fine-tuned network's would need as many fine-tuning runs).
    """
    if fitted.held_out is not None:
        return fitted.held_out, np.concatenate([fitted.x["train"][1], fitted.x["validation"][1]]).astype(np.int64)
    x_va, y_va = fitted.x["validation"]
    z, y = logits(fitted.layers, x_va), y_va
    x_tr, y_tr = fitted.x.get("train", (np.empty((0, 0)), np.empty(0)))
    if not fitted.plan.live and fitted.head and 0 < len(y_tr) <= OUT_OF_FOLD_MAX_ROWS:
        z_tr = out_of_fold_logits(np.asarray(x_tr), y_tr, n_classes, config.head, fitted.head.best_step)
        z, y = np.concatenate([z, z_tr]), np.concatenate([y, y_tr])
    return z, y.astype(np.int64)


def result_lines(metrics: RunMetrics) -> list[str]:
    """What a run ends with: the test accuracy with its evidence, a tiny-split caveat, what calibration did."""
    n_val, n_test = metrics.num_validation, metrics.test.num_images if metrics.test else 0
    copies = metrics.test_evidence.copies_of_training
    lines = [f"Final test accuracy = {describe_accuracy(metrics.test_accuracy, n_test, 'test photos', copies)}"]
    lines += [f"Warning: {copies_warning(copies, n_test)}"] if copies else []
    disagree = small_splits_disagree(metrics.validation_accuracy, n_val, metrics.test_accuracy, n_test)
    lines += [disagree] if disagree else []
    lines.append(_calibration_line(metrics.calibration, n_test))
    threshold = unknown_threshold_text(metrics.calibration, n_test)
    lines += [threshold] if threshold else []
    unused, reason = metrics.plan.get("unused"), metrics.plan.get("reason")
    return lines + ([f"Note: {unused_note(unused)}" + (f" ({reason})" if reason else "")] if unused else [])


def _calibration_line(cal: CalibrationReport, n_test: int) -> str:
    """What calibration did, and the calibration error it left on the test photos (or that it is not measurable)."""
    line = f"Calibration: {cal.why}"
    if n_test:  # the error it left, or (too few test photos) that it is not measurable: never silence
        line += f"; {calibration_error_text(cal, n_test, 'test photos')}"
    return line


def _evaluate(fitted: _Fitted, cal: Calibration, record: dict) -> tuple[RunMetrics, list[tuple[str, str, str]]]:
    """Validation and test accuracy with their evidence, test metrics and predictions, the verdict; the mistakes.

    `record` (_run_record) holds the rest of metrics.json.
    """
    layers, classes, split = fitted.layers, fitted.dataset.classes, fitted.split
    (x_va, y_va), (x_te, y_te) = fitted.x["validation"], fitted.x["test"]
    validation_accuracy = _accuracy(layers, x_va, y_va) if len(x_va) else None
    test, predictions, misclassified = None, None, []
    if len(x_te):
        probs = softmax(logits(layers, x_te), cal.temperature)
        pred = probs.argmax(1)
        test = classification_metrics(y_te, pred, classes)
        misclassified = [(str(s.path), classes[s.label], classes[p])
                         for s, p in zip(split["test"], pred) if s.label != p]
        predictions = [PredictionRecord(str(s.path), int(s.label), int(p), float(c))
                       for s, p, c in zip(split["test"], pred, probs.max(axis=1))]
    test_accuracy, copies = test.accuracy if test else None, copies_of_training(split)
    metrics = RunMetrics(
        **record, validation_accuracy=validation_accuracy, test_accuracy=test_accuracy, num_validation=len(y_va),
        validation_evidence=accuracy_evidence(validation_accuracy, len(y_va)),
        test_evidence=accuracy_evidence(test_accuracy, len(y_te), copies), test=test, test_predictions=predictions,
        verdict=verdict(test, validation_accuracy, len(y_va), classes, fitted.dataset.unsplit_classes,
                        copies_of_training=copies))
    return metrics, misclassified
