"""Command-line interface: thin argparse wrappers over the API.

`retrain --image_dir=...` and `label_image --graph=...` keep the classic TensorFlow Hub flags;
`retrain train|predict|evaluate` is the modern interface on the same code.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import sys
import tempfile
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import UserError
from .outputs import check_output_dir, check_output_file, os_error_message

SUBCOMMANDS = ("train", "predict", "evaluate", "report", "lr-find", "import-idx", "serve", "doctor", "compare",
               "export")

RETIRED_FLAGS = {
    "--tfhub_module": "use --backbone (lite0, lite1, lite2, or the path of an ONNX feature extractor)",
    "--saved_model_dir": "the exported model is ONNX: use --output_graph",
    "--intermediate_output_graphs_dir": "intermediate graphs are not written; the best step's model is exported",
    "--intermediate_store_frequency": "intermediate graphs are not written; the best step's model is exported",
    "--checkpoint_path": "fine-tuning checkpoints live in the cache; continue with --resume",
    "--test_batch_size": "every test image is always evaluated",
    "--validation_batch_size": "every validation image is always evaluated",
    "--logging_verbosity": "use --quiet to silence progress output",
}

DISTORTION_FLAGS = ("flip_left_right", "random_crop", "random_scale", "random_brightness")


class _Retired(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not supported: {RETIRED_FLAGS[option_string]}")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once: not when the help already gives it in words, nor an empty one (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False, formatter_class=_Help)


def add_cache_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--cache_dir, spelt and meant the same in every command that reads the cache."""
    p.add_argument("--cache_dir", "--cache-dir", help="cache for backbones, features, split records and checkpoints "
                                                      "(default: $RETRAIN_CACHE, else ~/.cache/retrain)")


def use_cache_dir(cache_dir: str | None) -> None:
    """For commands that reach the cache only through defaults (the bundled ImageNet model, serve's training
    runs): --cache_dir DIR means RETRAIN_CACHE=DIR for this process and the ones it starts."""
    if cache_dir:
        os.environ["RETRAIN_CACHE"] = cache_dir


def add_training_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `retrain --image_dir` and `retrain train` (both spellings accepted)."""
    from .config import TrainConfig
    from .config import CPU_TRAIN_SIZE, FinetuneConfig, scratch_defaults
    from .config import HeadConfig

    t, h = TrainConfig(), HeadConfig()
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=t.backbone,
                   help="lite0, lite1, lite2 (pretrained), scratch-small, scratch-color (random weights: the whole "
                        "network trains), or a local ONNX feature extractor (.onnx)")
    g.add_argument("--hidden_units", "--hidden-units", type=int, default=h.hidden_units,
                   help="units in one hidden layer before the softmax (0: none)")
    g.add_argument("--input_mean", "--input-mean", type=float, help="pixel mean for an ONNX-file backbone (default 127.5)")
    g.add_argument("--input_std", "--input-std", type=float, help="pixel std for an ONNX-file backbone (default 127.5)")
    g = p.add_argument_group("data")
    g.add_argument("--testing_percentage", "--testing-percentage", type=float, default=t.testing_percentage,
                   help="percent of each class held out for the test, unless there is a test folder")
    g.add_argument("--validation_percentage", "--validation-percentage", type=float, default=t.validation_percentage,
                   help="percent of each class held out for validation, unless there is a validation folder")
    g.add_argument("--val_dir", "--val-dir", help="fixed validation folder (class folders) instead of a hash split")
    g.add_argument("--test_dir", "--test-dir", help="fixed test folder (class folders) instead of a hash split")
    g.add_argument("--bottleneck_dir", "--bottleneck-dir", help="feature cache folder (default: CACHE/features)")
    add_cache_option(g)
    g.add_argument("--workers", type=int, default=t.workers, help="image decoding threads")
    g = p.add_argument_group("training")
    g.add_argument("--how_many_training_steps", "--steps", type=int, default=h.steps,
                   help="most training steps (early stopping on validation usually ends sooner)")
    g.add_argument("--learning_rate", "--learning-rate", type=float, default=h.learning_rate, help="AdamW learning rate")
    g.add_argument("--train_batch_size", "--batch-size", type=int, default=h.batch_size)
    g.add_argument("--weight_decay", "--weight-decay", type=float, default=h.weight_decay)
    g.add_argument("--eval_step_interval", "--eval-step-interval", type=int, default=h.eval_interval,
                   help="steps between validation checks")
    g.add_argument("--seed", type=int, default=h.seed, help="random seed of head training, fine-tuning and augmentation")
    g.add_argument("--unknown_threshold", "--unknown-threshold", type=_threshold, default=None,
                   help="flag photos whose calibrated top probability is below this as unknown; "
                        "'auto' picks the value that rejects ~5%% of held-out photos (default: off)")
    g.add_argument("--print_misclassified_test_images", "--print-misclassified", action="store_true")
    g.add_argument("--summaries_dir", "--summaries-dir", help="write TensorBoard summaries (per-step scalars) here")
    g.add_argument("--quiet", action="store_true", help="no progress bars or step lines")
    g = p.add_argument_group("fine-tuning (--mode finetune) and scratch backbones")
    f, s = FinetuneConfig(), scratch_defaults()
    g.add_argument("--mode", choices=["head", "finetune", "auto"], default=t.mode,
                   help="head: softmax on cached features (fast); finetune: also train the backbone on live "
                        "images; auto: fine-tune when it fits --time_budget")
    g.add_argument("--time_budget", "--time-budget", type=float,
                   help="minutes --mode auto may spend (default 20); for scratch backbones, the training time to fit")
    g.add_argument("--epochs", type=int, help=f"default {f.epochs}; scratch backbones: chosen from the data size")
    g.add_argument("--unfreeze", type=int, default=f.unfreeze,
                   help="backbone stages to train, counted from the top (-1: all, 0: none)")
    g.add_argument("--train_size", "--train-size", type=int,
                   help=f"fine-tuning resolution (default {CPU_TRAIN_SIZE} on the CPU, the backbone's on a GPU)")
    g.add_argument("--finetune_learning_rate", "--finetune-learning-rate", type=float,
                   help=f"head learning rate while fine-tuning (default {f.learning_rate}; the backbone gets "
                        f"{f.backbone_lr_ratio}x); scratch backbones: the one-cycle peak (default {s.learning_rate})")
    g.add_argument("--finetune_batch_size", "--finetune-batch-size", type=int,
                   help="default 32 on the CPU; on a GPU up to 256 (keeping ~100 steps per epoch); "
                        "scratch backbones: 128, less on small data")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=f.device)
    g.add_argument("--compile", action="store_true", help="torch.compile the network (GPU)")
    g.add_argument("--hold_images", "--hold-images", action=argparse.BooleanOptionalAction,
                   help="decode the photos once and keep them on the training device, distorting them there "
                        "(default: on a GPU when they fit in half its free memory); --no-hold_images decodes "
                        "them every epoch")
    g.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning run")
    g = p.add_argument_group("distortions (retrain.py's augmentation flags; live images, backbone frozen "
                             "unless --mode finetune)")
    g.add_argument("--flip_left_right", action="store_true")
    g.add_argument("--random_crop", type=int, default=0)
    g.add_argument("--random_scale", type=int, default=0)
    g.add_argument("--random_brightness", type=int, default=0)
    add_engine_options(p, "feature extraction")
    for flag in RETIRED_FLAGS:
        p.add_argument(flag, action=_Retired, nargs="?", help=argparse.SUPPRESS)


def add_engine_options(p: argparse.ArgumentParser, work: str) -> None:
    g = p.add_argument_group(f"engine (where {work} runs)")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help=f"local: this process; ray: {work} spread over a Ray cluster's workers "
                        "(pip install 'retrain[ray]'; images must be readable at the same path on every node)")
    g.add_argument("--ray_address", "--ray-address",
                   help="Ray cluster to attach to, e.g. HOST:6379 (default: RAY_ADDRESS, else the cluster "
                        "`ray start` made on this machine, else a new local Ray)")


def _threshold(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1] or 'auto', got '{text}'") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value}")
    return value


def _probability(text: str) -> float:
    value = _threshold(text)
    if value == "auto":
        raise argparse.ArgumentTypeError("'auto' is chosen at training time; give a probability here")
    return value


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"{name} must be positive (got {value})")


def _refuse_live_flags_in_head_mode(args: argparse.Namespace) -> None:
    """--mode head trains on cached features: flags for training on live images would be silently dropped."""
    if args.mode != "head" or args.backbone.lower().startswith("scratch") or any(
            getattr(args, d) for d in DISTORTION_FLAGS):
        return
    given = {"--epochs": args.epochs is not None, "--unfreeze": args.unfreeze != -1,
             "--train_size": args.train_size is not None, "--finetune_learning_rate": args.finetune_learning_rate
             is not None, "--finetune_batch_size": args.finetune_batch_size is not None,
             "--device": args.device != "auto", "--compile": args.compile, "--hold_images": args.hold_images
             is not None, "--resume": args.resume}
    if flags := [flag for flag, on in given.items() if on]:
        raise UserError(f"{', '.join(flags)}: only for training on live images (--mode finetune or auto, a "
                        "scratch backbone, or distortion flags); --mode head trains on cached features")


def config_from_args(args: argparse.Namespace):
    from .config import TrainConfig
    from .augment import Augment
    from .config import FinetuneConfig, scratch_defaults
    from .config import HeadConfig

    for name in ("how_many_training_steps", "learning_rate", "train_batch_size", "eval_step_interval", "workers",
                 "epochs", "finetune_learning_rate", "finetune_batch_size", "time_budget"):
        if getattr(args, name) is not None:
            _positive(f"--{name}", getattr(args, name))
    for name in DISTORTION_FLAGS[1:]:
        if not 0 <= getattr(args, name) < 100:
            raise UserError(f"--{name} is a percentage in [0, 100)")
    if args.time_budget is not None and args.mode != "auto" and not args.backbone.lower().startswith("scratch"):
        raise UserError("--time_budget applies to --mode auto and to scratch backbones only")
    _refuse_live_flags_in_head_mode(args)
    augment = None
    if any(getattr(args, d) for d in DISTORTION_FLAGS):
        augment = Augment.from_retrain_flags(0, args.flip_left_right, args.random_crop, args.random_scale,
                                             args.random_brightness)
    given = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.finetune_batch_size),
                               ("learning_rate", args.finetune_learning_rate)) if v is not None}
    shared = dict(train_size=args.train_size, unfreeze=args.unfreeze, augment=augment, device=args.device,
                  compile=args.compile, hold_images=args.hold_images, workers=0, seed=args.seed) | given
    tune, scratch = FinetuneConfig(**shared), replace(scratch_defaults(), **shared)
    head = HeadConfig(steps=args.how_many_training_steps, learning_rate=args.learning_rate,
                      batch_size=args.train_batch_size, hidden_units=args.hidden_units,
                      weight_decay=args.weight_decay, eval_interval=args.eval_step_interval, seed=args.seed)
    return TrainConfig(backbone=args.backbone, head=head, validation_percentage=args.validation_percentage,
                       testing_percentage=args.testing_percentage, val_dir=args.val_dir, test_dir=args.test_dir,
                       cache_dir=args.cache_dir, bottleneck_dir=args.bottleneck_dir, input_mean=args.input_mean,
                       input_std=args.input_std, output_name=getattr(args, "final_tensor_name", "final_result"),
                       unknown_threshold=args.unknown_threshold, workers=args.workers, quiet=args.quiet,
                       engine=args.engine, ray_address=args.ray_address,
                       mode=args.mode, finetune=tune, scratch=scratch, resume=args.resume,
                       time_budget=args.time_budget * 60 if args.time_budget else None)


def _after_training(model, args: argparse.Namespace) -> None:
    if args.quiet:  # quiet drops the narration, never the result
        from .pipeline import result_lines

        for line in result_lines(model.metrics):
            print(line, file=sys.stderr)
    if args.print_misclassified_test_images:
        _print_misclassified(model)
    if args.summaries_dir:
        from .summaries import write_summaries

        print(f"TensorBoard summaries in {write_summaries(args.summaries_dir, model.metrics)}", file=sys.stderr)


def _print_misclassified(model) -> None:
    print("=== MISCLASSIFIED TEST IMAGES ===")
    for path, truth, predicted in model.misclassified:
        print(f"{path:>70}  {truth} (predicted {predicted})")


def legacy_retrain(argv: Sequence[str]) -> int:
    """`retrain --image_dir=DIR`, with TensorFlow Hub retrain.py's flags."""
    from .pipeline import train

    tmp = Path(tempfile.gettempdir())
    p = _parser("retrain", "Retrain a classifier on a folder of class folders (retrain.py-compatible flags). "
                           "Modern interface: retrain train|predict|evaluate --help")
    p.add_argument("--image_dir", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--output_graph", default=str(tmp / "output_graph.onnx"), help="where to write the ONNX model")
    p.add_argument("--output_labels", default=str(tmp / "output_labels.txt"), help="where to write the labels")
    p.add_argument("--final_tensor_name", default="final_result", help="name of the model's probability output")
    add_training_options(p)
    args = parse_suggesting(p, argv)
    config = config_from_args(args)
    for flag in ("output_graph", "output_labels"):  # before training: a wrong path must not cost the run
        check_output_file(getattr(args, flag), f"--{flag}", _inputs(args))
    model = train(args.image_dir, config)
    if model is None:  # a torchrun helper process: rank 0 writes the model
        return 0
    model.save_files(args.output_graph, args.output_labels)
    _after_training(model, args)
    print(f"Saved the model to {args.output_graph} and its labels to {args.output_labels}", file=sys.stderr)
    return 0


def _inputs(args: argparse.Namespace) -> list[str | None]:
    """The image folders a run reads: no output may be written inside them."""
    return [args.image_dir, args.val_dir, args.test_dir]


def cmd_train(args: argparse.Namespace) -> int:
    from .pipeline import train

    config = config_from_args(args)
    check_output_dir(args.output, _inputs(args), args.overwrite)  # before training, not after it
    model = train(args.image_dir, config)
    if model is None:  # a torchrun helper process: rank 0 writes the model
        return 0
    out = model.save(args.output)
    _after_training(model, args)
    print(f"Saved model.onnx, labels.txt, metrics.json and report.html to {out}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .engine import open_engine
    from .prediction import load

    _positive("--top-k", args.top_k)
    with open_engine(args.engine, args.ray_address) as engine:
        return _predict(args, load(args.model, args.labels, engine))


def _predict(args: argparse.Namespace, clf) -> int:
    from .prediction import expand_images

    if args.output:  # streamed: one row per image as it comes, folders walked lazily
        from .prediction import predict_to_file

        done = predict_to_file(clf, args.images, args.output, args.top_k, args.min_confidence, quiet=False)
        print(f"Wrote {done.rows} predictions ({done.failures} unreadable) to {done.path}", file=sys.stderr)
        return 1 if done.failures else 0
    paths = expand_images(args.images)
    if not paths:
        raise UserError("no images found in: " + ", ".join(args.images))
    failures = 0
    for pred in clf.predict_paths(paths, args.top_k, min_confidence=args.min_confidence):
        failures += bool(pred.error)
        if args.json:
            print(json.dumps(pred.to_dict(), ensure_ascii=False))
        elif pred.error:
            print(f"{pred.path}: skipped: {pred.error}", file=sys.stderr)
        else:
            print(pred.path + ("  (unknown: below the confidence threshold)" if pred.unknown else ""))
            for label, score in pred.top:
                print(f"  {label} {score:.5f}")
    return 1 if failures else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluation_of_folder, format_metrics

    evaluation = evaluation_of_folder(args.model, args.image_dir)
    if args.json:
        print(json.dumps(evaluation.to_json(), indent=2, ensure_ascii=False))
    else:
        print(format_metrics(evaluation.metrics))
        if evaluation.skipped:
            print(f"\nSkipped {len(evaluation.skipped)} unreadable file(s).")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(write_report(args.model, args.image_dir))
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .pipeline import head_training_data
    from .config import HeadConfig, TrainConfig
    from .lrfind import lr_sweep, plot_sweep

    cfg = TrainConfig(backbone=args.backbone, cache_dir=args.cache_dir, quiet=args.quiet,
                      head=HeadConfig(hidden_units=args.hidden_units, seed=args.seed))
    x, y, classes = head_training_data(args.image_dir, cfg)
    sweep = lr_sweep(x, y, len(classes), cfg.head)
    plot = plot_sweep(sweep, Path(args.plot))
    print(f"Suggested --learning_rate {sweep.suggestion:.2g} (loss curve: {plot})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .compare import compare, comparison_table, default_models

    for name in ("time_budget", "workers"):
        if getattr(args, name) is not None:
            _positive(f"--{name}", getattr(args, name))
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else default_models(args.image_dir)
    config = TrainConfig(val_dir=args.val_dir, test_dir=args.test_dir, cache_dir=args.cache_dir,
                         validation_percentage=args.validation_percentage, testing_percentage=args.testing_percentage,
                         workers=args.workers, quiet=args.quiet,
                         time_budget=args.time_budget * 60 if args.time_budget else None)
    config.head.seed = config.finetune.seed = config.scratch.seed = args.seed
    runs = compare(args.image_dir, models, config, Path(args.output),
                   lambda msg: None if args.quiet else print(msg, file=sys.stderr))
    print(comparison_table(runs))
    print(f"Models, compare.txt, compare.json and compare.png in {args.output}", file=sys.stderr)
    return 0


def cmd_import_idx(args: argparse.Namespace) -> int:
    from .datasets import idx_to_folders

    n = idx_to_folders(args.images, args.labels, args.output, class_names=args.class_names,
                       limit_per_class=args.limit_per_class)
    print(f"Wrote {n} PNG images into class folders under {args.output}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeConfig, serve

    use_cache_dir(args.cache_dir)
    for name in ("port", "max_upload_mb", "max_queue", "max_batch"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    config = ServeConfig(max_upload_bytes=args.max_upload_mb << 20, max_queue=args.max_queue,
                         max_batch=args.max_batch)
    return serve(args.model, args.host, args.port, config)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import diagnose, format_text

    _positive("--workers", args.workers)
    report = diagnose(args.image_dir, backbone=args.backbone, cache_dir=args.cache_dir, workers=args.workers,
                      quiet=args.quiet)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else format_text(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .config import ExportConfig
    from .export import export

    _positive("--calibration_images", args.calibration_images)
    if args.tolerance < 0:
        raise UserError(f"--tolerance is in accuracy points, 0 or more (got {args.tolerance})")
    config = ExportConfig(int8=args.int8, any_size=args.any_size, ort=args.ort, tolerance=args.tolerance,
                          calibration_images=args.calibration_images, image_dir=args.image_dir,
                          overwrite=args.overwrite)
    report = export(args.model, args.output, config)
    print(f"Wrote {', '.join(report['files'])}, labels.txt and export.json to {args.output}", file=sys.stderr)
    return 0


def add_export_parser(sub) -> None:
    from .config import CALIBRATION_IMAGES, DEFAULT_TOLERANCE

    ex = sub.add_parser("export", help="a smaller (--int8), any-size-input (--any-size) or mobile (--ort) copy "
                        "of a model", allow_abbrev=False, formatter_class=_Help)
    ex.add_argument("model", help="model directory (or its model.onnx)")
    ex.add_argument("--output", "-o", required=True, help="directory to write the exported model into")
    ex.add_argument("--int8", action="store_true",
                    help="quantize to int8, calibrated on the model's training photos; refused if accuracy falls "
                         "by more than --tolerance")
    ex.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help="accuracy points the int8 model may lose on validation or test")
    ex.add_argument("--calibration_images", "--calibration-images", type=int, default=CALIBRATION_IMAGES,
                    help="training photos to calibrate int8 activations on")
    ex.add_argument("--image_dir", "--image-dir",
                    help="the model's training folder, if it has moved (none: the folder recorded in the model)")
    ex.add_argument("--any_size", "--any-size", action="store_true",
                    help="also write model_any_size.onnx: input one decoded RGB image of any size, resized and "
                         "cropped inside the model")
    ex.add_argument("--ort", action="store_true", help="also write each model as .ort, ONNX Runtime's mobile format")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    ex.set_defaults(run=cmd_export)


def modern_parser() -> argparse.ArgumentParser:
    p = _parser("retrain", "Turn a folder of labelled photos into an image classifier, offline. "
                           "The classic form `retrain --image_dir=DIR` also works.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model directory from IMAGE_DIR", allow_abbrev=False,
                       formatter_class=_Help)
    t.add_argument("image_dir", help="folder of class folders (or of train/, val/, test/ folders)")
    t.add_argument("--output", "-o", required=True, help="model directory to write")
    t.add_argument("--overwrite", action="store_true",
                   help="write into --output even if it holds files retrain did not write")
    add_training_options(t)
    t.set_defaults(run=cmd_train)
    pr = sub.add_parser("predict", help="classify images with a model", allow_abbrev=False)
    pr.add_argument("model", help="model directory or .onnx file")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--top-k", "--top_k", type=int, default=5)
    pr.add_argument("--labels", help="labels file (default: the labels stored in the model)")
    pr.add_argument("--json", action="store_true", help="one JSON object per image (JSON Lines)")
    pr.add_argument("--output", "-o", help="stream one row per image to this .csv or .jsonl file instead "
                                           "(written as FILE.partial, renamed when complete)")
    pr.add_argument("--min_confidence", "--min-confidence", type=_probability,
                    help="flag images whose top probability is below this as unknown (default: the model's threshold)")
    add_engine_options(pr, "decoding and classification")
    pr.set_defaults(run=cmd_predict)
    ev = sub.add_parser("evaluate", help="accuracy, per-class metrics and confusion matrix on IMAGE_DIR",
                        allow_abbrev=False)
    ev.add_argument("model")
    ev.add_argument("image_dir")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(run=cmd_evaluate)
    rp = sub.add_parser("report", help="write report.html (plots, mistakes, calibration, saliency) into a model dir",
                        allow_abbrev=False)
    rp.add_argument("model", help="model directory")
    rp.add_argument("image_dir", nargs="?", help="evaluate on this folder of class folders (default: the test split)")
    rp.set_defaults(run=cmd_report)
    lf = sub.add_parser("lr-find", help="sweep the head's learning rate on cached features, plot it, suggest one",
                        allow_abbrev=False)
    lf.add_argument("image_dir")
    lf.add_argument("--plot", default="lr_find.png", help="where to save the loss curve (PNG)")
    lf.add_argument("--backbone", default="lite0")
    lf.add_argument("--hidden_units", "--hidden-units", type=int, default=0)
    add_cache_option(lf)
    lf.add_argument("--seed", type=int, default=0)
    lf.add_argument("--quiet", action="store_true")
    lf.set_defaults(run=cmd_lr_find)
    cp = sub.add_parser("compare", help="train from-scratch and transfer models on the same split; accuracy "
                        "against wall time as a table and a plot", allow_abbrev=False,
                        formatter_class=_Help)
    cp.add_argument("image_dir")
    cp.add_argument("--models", help="comma-separated backbones, a +finetune suffix fine-tunes a pretrained one "
                                     "(default: scratch-small for images of 48 px or less, else scratch-color; "
                                     "then lite0)")
    cp.add_argument("--output", "-o", default="compare", help="folder for the models, table and plot")
    cp.add_argument("--time_budget", "--time-budget", type=float,
                    help="minutes each from-scratch network may train (default: its full schedule)")
    cp.add_argument("--val_dir", "--val-dir")
    cp.add_argument("--test_dir", "--test-dir")
    cp.add_argument("--validation_percentage", "--validation-percentage", type=float, default=10.0)
    cp.add_argument("--testing_percentage", "--testing-percentage", type=float, default=10.0)
    add_cache_option(cp)
    cp.add_argument("--workers", type=int, default=2)
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--quiet", action="store_true")
    cp.set_defaults(run=cmd_compare)
    ix = sub.add_parser("import-idx", help="turn MNIST-style IDX files into a folder of class folders",
                        allow_abbrev=False)
    ix.add_argument("images", help="IDX image file (may be .gz)")
    ix.add_argument("labels", help="IDX label file (may be .gz)")
    ix.add_argument("output", help="folder to create class folders in")
    ix.add_argument("--class-names", choices=["fashion", "digits"], default="digits")
    ix.add_argument("--limit-per-class", type=int, help="keep at most this many images per class")
    ix.set_defaults(run=cmd_import_idx)
    sv = sub.add_parser("serve", help="HTTP API and web pages to try a model and to train new ones",
                        allow_abbrev=False, formatter_class=_Help)
    sv.add_argument("model", nargs="?", help="model directory or .onnx file (default: the bundled ImageNet classifier)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback exposes "
                                                        "prediction and training to the network")
    sv.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    add_cache_option(sv)
    sv.add_argument("--max-upload-mb", type=int, default=32, help="largest request body, MiB")
    sv.add_argument("--max-queue", type=int, default=16, help="predict requests admitted at once; more get 503")
    sv.add_argument("--max-batch", type=int, default=16, help="most images per ONNX Runtime call (1: no batching)")
    sv.set_defaults(run=cmd_serve)
    dr = sub.add_parser("doctor", help="check IMAGE_DIR for unreadable files, duplicates, leakage and mislabels",
                        allow_abbrev=False, formatter_class=_Help)
    dr.add_argument("image_dir")
    dr.add_argument("--json", action="store_true", help="the full report as one JSON object")
    dr.add_argument("--backbone", default="lite0", help="feature extractor for outliers and mislabels")
    add_cache_option(dr)
    dr.add_argument("--workers", type=int, default=2, help="image decoding threads")
    dr.add_argument("--quiet", action="store_true", help="no progress bars")
    dr.set_defaults(run=cmd_doctor)
    add_export_parser(sub)
    return p


def label_image(argv: Sequence[str]) -> int:
    """`label_image --graph=G --labels=L --image=I`: top-5 `label score` lines, best first."""
    from .prediction import load, model_file

    p = _parser("label_image", "Classify one image with a retrained model (label_image.py-compatible flags). "
                               "Without --graph: the bundled ImageNet classifier.")
    p.add_argument("--image", required=True, help="image to classify")
    p.add_argument("--graph", help="ONNX model written by retrain (default: ImageNet EfficientNet-Lite0)")
    p.add_argument("--labels", help="labels file (default: the labels stored in the model)")
    p.add_argument("--top_k", "--top-k", type=int, default=5)
    p.add_argument("--min_confidence", "--min-confidence", type=_probability,
                   help="print 'unknown' first when the top probability is below this (default: the model's threshold)")
    add_cache_option(p)
    compat = p.add_argument_group("accepted for compatibility (the model carries its own preprocessing)")
    for flag, kind in COMPAT_FLAGS.items():
        compat.add_argument(flag, type=kind)
    args = parse_suggesting(p, argv, lenient=COMPAT_FLAGS)
    _positive("--top_k", args.top_k)
    use_cache_dir(args.cache_dir)
    if args.graph:
        clf = load(onnx_beside(model_file(args.graph)), args.labels)
    else:
        from .files import default_cache_dir
        from .imagenet import imagenet_model_path

        clf = load(imagenet_model_path(default_cache_dir()), args.labels)
    for note in compatibility_notes(args, clf):
        print(f"Note: {note}", file=sys.stderr)
    image = Path(args.image)
    if not image.is_file():
        raise UserError(f"image not found: {image}")
    pred = next(clf.predict_paths([image], args.top_k, min_confidence=args.min_confidence))
    if pred.error:
        raise UserError(f"cannot classify {image}: {pred.error}")
    if pred.unknown:
        threshold = clf.unknown_threshold if args.min_confidence is None else args.min_confidence
        print(f"unknown {1 - pred.top[0][1]:.6f}")
        print(f"Note: the top probability {pred.top[0][1]:.3f} is below the confidence threshold "
              f"{threshold:.3f}: probably none of these classes", file=sys.stderr)
    for label, score in pred.top:
        print(f"{label} {score:.6f}")
    return 0


# label_image.py's tensor and preprocessing flags: accepted, and near-miss spellings of them too,
# since they change nothing (the model carries its input name and its own preprocessing).
COMPAT_FLAGS = {"--input_layer": str, "--output_layer": str, "--input_height": int, "--input_width": int,
                "--input_mean": float, "--input_std": float}


def parse_suggesting(p: argparse.ArgumentParser, argv: Sequence[str], lenient: Iterable[str] = ()) -> argparse.Namespace:
    """parse_args, but a misspelt flag is one line naming the flag meant, and a near miss of a
    `lenient` flag is read as that flag, with a note (course handouts spell `--input_layper`)."""
    known = [flag for action in p._actions for flag in action.option_strings]
    fixed = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name.startswith("--") and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            if close and close[0] in lenient:
                print(f"Note: {name} read as {close[0]}", file=sys.stderr)
                arg = close[0] + eq + value
            elif close:
                raise UserError(f"unrecognized flag {name}: did you mean {close[0]}?")
        fixed.append(arg)
    return p.parse_args(fixed)


def onnx_beside(graph: Path) -> Path:
    """retrain.py wrote output_graph.pb; a handout's .pb path that does not exist means the .onnx beside it."""
    onnx_file = graph.with_suffix(".onnx")
    if graph.suffix == ".pb" and not graph.exists() and onnx_file.is_file():
        print(f"Note: {graph} does not exist; using {onnx_file} (retrain writes ONNX models)", file=sys.stderr)
        return onnx_file
    return graph


def compatibility_notes(args: argparse.Namespace, clf) -> list[str]:
    """What label_image.py's tensor and preprocessing flags mean for an ONNX model that preprocesses itself."""
    prep, notes = clf.prep, []
    inputs = [i.name for i in clf.session.get_inputs()]
    outputs = [o.name for o in clf.session.get_outputs()]
    if args.input_layer and args.input_layer not in inputs:
        notes.append(f"--input_layer={args.input_layer} ignored: the model's input is '{inputs[0]}'")
    if args.output_layer and args.output_layer not in outputs:
        notes.append(f"--output_layer={args.output_layer} ignored: the model's output is '{outputs[0]}'")
    for flag, given, actual in (("input_height", args.input_height, prep.size), ("input_width", args.input_width, prep.size),
                                ("input_mean", args.input_mean, prep.mean), ("input_std", args.input_std, prep.std)):
        if given is not None and given != actual:
            notes.append(f"--{flag}={given:g} ignored: the model resizes to {prep.size}x{prep.size} and normalises "
                         f"as (pixel - {prep.mean:g}) / {prep.std:g} itself, as it was trained")
    return notes


# OSErrors that a user's paths, disks or ports cause: one line, not a traceback.
USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EISDIR,
               errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG, errno.EADDRINUSE,
               errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE, errno.ENXIO}


def _debug() -> bool:
    """RETRAIN_DEBUG=1: show the traceback of a user error too (for bug reports)."""
    return os.environ.get("RETRAIN_DEBUG", "") not in ("", "0")


def _run(fn: Callable[[], int], prog: str) -> int:
    try:
        return fn()
    except UserError as e:
        if _debug():
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `retrain predict ... | head`
        return 0
    except OSError as e:
        if e.errno not in USER_ERRNOS or _debug():
            raise
        print(f"{prog}: error: {os_error_message(e, 'use')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; finished feature extraction is kept in the cache.", file=sys.stderr)
        return 130


def retrain_main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS or not argv or argv[0] in ("-h", "--help"):
        def modern() -> int:
            args = modern_parser().parse_args(argv)
            return args.run(args)
        return _run(modern, "retrain")
    return _run(lambda: legacy_retrain(argv), "retrain")


def label_image_main(argv: Sequence[str] | None = None) -> int:
    return _run(lambda: label_image(list(sys.argv[1:] if argv is None else argv)), "label_image")
