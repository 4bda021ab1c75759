"""Command-line interface: argument parsing only; commands.py does what each command does.

`retrain --image_dir=...` and `label_image --graph=...` keep the classic TensorFlow Hub flags;
`retrain train|predict|evaluate` is the modern interface on the same code.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import os
import sys
import tempfile
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import commands
from .commands import positive
from .config import (AUTO_BUDGET_SECONDS, Augment, CALIBRATION_IMAGES, CPU_TRAIN_SIZE, DEFAULT_TOLERANCE, MODES, OUTPUT_NAME,
                     ExportConfig, FinetuneConfig, HeadConfig, TrainConfig, scratch_defaults)
from .errors import UserError
from .outputs import os_error_message
from .validate import ENGINES, TRAIN_RULES
from .webconfig import ServeConfig, default_workspace

SUBCOMMANDS = ("train", "predict", "evaluate", "report", "lr-find", "import-idx", "serve", "doctor", "compare",
               "export")

RETIRED_FLAGS = {
    "--tfhub_module": "use --backbone (lite0, lite1, lite2, or the path of an ONNX feature extractor)",
    "--saved_model_dir": "the exported model is ONNX: use --output_graph",
    "--intermediate_output_graphs_dir": "intermediate graphs are not written; the best step's model is exported",
    "--intermediate_store_frequency": "intermediate graphs are not written; the best step's model is exported",
    "--checkpoint_path": "fine-tuning checkpoints live in the cache; continue with --resume",
    "--test_batch_size": "every test image is always evaluated (-1, retrain.py's 'all of them', is accepted)",
    "--validation_batch_size": "every validation image is always evaluated (-1, retrain.py's 'all', is accepted)",
    "--logging_verbosity": "DEBUG and INFO are accepted, WARN, ERROR and FATAL mean --quiet",
}
# retrain.py values that mean what retrain does anyway: accepted, so that its scripts still run.
RETIRED_BUT_MEANT = {("--test_batch_size", "-1"): {}, ("--validation_batch_size", "-1"): {},
                     **{("--logging_verbosity", level): {} for level in ("DEBUG", "INFO")},
                     **{("--logging_verbosity", level): {"quiet": True} for level in ("WARN", "WARNING", "ERROR", "FATAL")}}

DISTORTION_FLAGS = ("flip_left_right", "random_crop", "random_scale", "random_brightness")
TOP_K = 5  # classes shown per image by predict and label_image
BACKBONE_HELP = ("auto (lite0, or lite1/lite2 where cross-validation on a small folder finds them better), "
                 "lite0, lite1, lite2 (pretrained), scratch-small, scratch-color (random weights: the whole network "
                 "trains), or a local ONNX feature extractor (.onnx)")


class _Retired(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        meant = RETIRED_BUT_MEANT.get((option_string, values))
        if meant is None:
            parser.error(f"{option_string} is not supported: {RETIRED_FLAGS[option_string]}")
        for name, value in meant.items():
            setattr(namespace, name, value)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once: not when the help already gives it in words, nor an empty one (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is empty for empty in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """One line for a wrong command line, as for any user error (argparse prints its whole usage first)."""

    help_command = ""  # how to see the options, if not `PROG --help`

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.help_command or self.prog + ' --help'}` lists the "
                     "options)\n")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, allow_abbrev=False, formatter_class=_Help)


def add_cache_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--cache_dir, spelt and meant the same in every command that reads the cache."""
    p.add_argument("--cache_dir", "--cache-dir", help="cache for backbones, features, split records, checkpoints "
                                                      "and report plots (default: $RETRAIN_CACHE, else ~/.cache/retrain)")


# Options several commands share, each spelt, defaulted and explained once.

def path_arg(text: str) -> str:
    """A file or folder argument: an empty one (an unset shell variable) would otherwise mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?): give a folder or a file")
    return text


def add_image_dir(p: argparse.ArgumentParser, help: str = "folder of class folders (or of train/, val/, test/ folders)"
                  ) -> None:
    p.add_argument("image_dir", type=path_arg, help=help)


def add_backbone_option(p: argparse.ArgumentParser | argparse._ArgumentGroup, help: str) -> None:
    p.add_argument("--backbone", default=TrainConfig().backbone, help=help)


def add_hidden_units_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--hidden_units", "--hidden-units", type=int, default=HeadConfig().hidden_units,
                   help="units in one hidden layer before the softmax (0: none)")


def add_split_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    t = TrainConfig()
    p.add_argument("--testing_percentage", "--testing-percentage", type=float, default=t.testing_percentage,
                   help="percent of each class held out for the test, unless there is a test folder")
    p.add_argument("--validation_percentage", "--validation-percentage", type=float, default=t.validation_percentage,
                   help="percent of each class held out for validation, unless there is a validation folder")
    p.add_argument("--val_dir", "--val-dir", type=path_arg, help="fixed validation folder (class folders) instead of a hash split")
    p.add_argument("--test_dir", "--test-dir", type=path_arg, help="fixed test folder (class folders) instead of a hash split")


def add_workers_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--workers", type=int, default=TrainConfig().workers, help="image decoding threads")


def add_seed_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--seed", type=int, default=HeadConfig().seed,
                   help="random seed of head training, fine-tuning and augmentation")


def add_quiet_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or step lines")


def add_json_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--json", action="store_true", help=help)


def add_classify_options(p: argparse.ArgumentParser, min_confidence_help: str) -> None:
    """--labels, --top_k and --min_confidence: predict and label_image."""
    p.add_argument("--labels", help="labels file (default: the labels stored in the model)")
    p.add_argument("--top_k", "--top-k", type=int, default=TOP_K, help="classes to show per image, best first")
    p.add_argument("--min_confidence", "--min-confidence", type=_probability, help=min_confidence_help)


def add_training_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `retrain --image_dir` and `retrain train` (both spellings accepted)."""
    t, h, f, s = TrainConfig(), HeadConfig(), FinetuneConfig(), scratch_defaults()
    g = p.add_argument_group("model")
    add_backbone_option(g, BACKBONE_HELP)
    add_hidden_units_option(g)
    g.add_argument("--input_mean", "--input-mean", type=float, help="pixel mean for an ONNX-file backbone (default 127.5)")
    g.add_argument("--input_std", "--input-std", type=float, help="pixel std for an ONNX-file backbone (default 127.5)")
    g = p.add_argument_group("data")
    add_split_options(g)
    g.add_argument("--bottleneck_dir", "--bottleneck-dir", help="feature cache folder (default: CACHE/features)")
    add_cache_option(g)
    add_workers_option(g)
    g = p.add_argument_group("training")
    g.add_argument("--how_many_training_steps", "--steps", type=int, default=h.steps,
                   help="most training steps (early stopping on validation usually ends sooner)")
    g.add_argument("--learning_rate", "--learning-rate", type=float, default=h.learning_rate, help="AdamW learning rate")
    g.add_argument("--train_batch_size", "--batch-size", type=int, default=h.batch_size,
                   help="feature vectors per head training step")
    g.add_argument("--weight_decay", "--weight-decay", type=float, default=h.weight_decay,
                   help="AdamW weight decay of the head")
    g.add_argument("--eval_step_interval", "--eval-step-interval", type=int, default=h.eval_interval,
                   help="steps between validation checks")
    add_seed_option(g)
    g.add_argument("--unknown_threshold", "--unknown-threshold", type=_threshold, default=t.unknown_threshold,
                   help="flag photos whose calibrated top probability is below this as unknown; "
                        "'auto' picks the value that rejects ~5%% of held-out photos (default: off)")
    g.add_argument("--print_misclassified_test_images", "--print-misclassified", action="store_true",
                   help="list the test photos the model gets wrong")
    g.add_argument("--summaries_dir", "--summaries-dir", help="write TensorBoard summaries (per-step scalars) here")
    add_quiet_option(g)
    g = p.add_argument_group("fine-tuning (the default run, --mode finetune) and scratch backbones")
    g.add_argument("--mode", choices=MODES, default=t.mode,
                   help="auto: save the head's model at once, then fine-tune within --time_budget and keep the "
                        "result only if it beats the head on validation; head: softmax on cached features only "
                        "(the instant path); finetune: always fine-tune")
    g.add_argument("--time_budget", "--time-budget", type=float,
                   help=f"minutes --mode auto may fine-tune (default {AUTO_BUDGET_SECONDS // 60}); for scratch "
                        "backbones, the training time to fit")
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
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=f.device,
                   help="where live-image training runs (auto: a GPU if there is one)")
    g.add_argument("--compile", action="store_true", help="torch.compile the network (GPU)")
    g.add_argument("--hold_images", "--hold-images", action=argparse.BooleanOptionalAction,
                   help="decode the photos once and keep them on the training device, distorting them there "
                        "(default: on a GPU when they fit in half its free memory); --no-hold_images decodes "
                        "them every epoch")
    g.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning run")
    g = p.add_argument_group("distortions (retrain.py's augmentation flags; live images, backbone frozen "
                             "unless --mode finetune)")
    g.add_argument("--flip_left_right", "--flip-left-right", action="store_true",
                   help="mirror half of the training photos")
    g.add_argument("--random_crop", "--random-crop", type=int, default=0,
                   help="percent of margin to crop at random")
    g.add_argument("--random_scale", "--random-scale", type=int, default=0,
                   help="percent to scale up by at random")
    g.add_argument("--random_brightness", "--random-brightness", type=int, default=0,
                   help="percent to brighten or darken by at random")
    add_engine_options(p, "feature extraction")
    for flag in RETIRED_FLAGS:
        p.add_argument(flag, action=_Retired, nargs="?", help=argparse.SUPPRESS)


def add_engine_options(p: argparse.ArgumentParser, work: str) -> None:
    t = TrainConfig()
    g = p.add_argument_group(f"engine (where {work} runs)")
    g.add_argument("--engine", choices=ENGINES, default=t.engine,
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


def _minutes(value: float | None) -> float | None:
    """--time_budget is in minutes; TrainConfig.time_budget in seconds: a value out of range is refused here, in
    the minutes it was given in."""
    rule = TRAIN_RULES["time_budget"]
    if value is not None and rule.problem(value * 60):
        raise UserError(f"{rule.flag} must be a number of minutes above 0 and at most {rule.high / 60:,.0f}; "
                        f"got {value!r}")
    return None if value is None else value * 60


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that `retrain train` or `retrain --image_dir` flags describe."""
    for name in ("how_many_training_steps", "learning_rate", "train_batch_size", "eval_step_interval", "workers",
                 "epochs", "finetune_learning_rate", "finetune_batch_size", "time_budget"):
        if getattr(args, name) is not None:
            positive(f"--{name}", getattr(args, name))
    for name in DISTORTION_FLAGS[1:]:
        if not 0 <= getattr(args, name) < 100:
            raise UserError(f"--{name} is a percentage in [0, 100)")
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
                       input_std=args.input_std, output_name=getattr(args, "final_tensor_name", OUTPUT_NAME),
                       unknown_threshold=args.unknown_threshold, workers=args.workers, quiet=args.quiet,
                       engine=args.engine, ray_address=args.ray_address,
                       mode=args.mode, finetune=tune, scratch=scratch, resume=args.resume,
                       time_budget=_minutes(args.time_budget))


def compare_config(args: argparse.Namespace) -> TrainConfig:
    """The settings `retrain compare` trains every model with (the backbone and mode come from --models)."""
    for name in ("time_budget", "workers"):
        if getattr(args, name) is not None:
            positive(f"--{name}", getattr(args, name))
    seed = {"seed": args.seed}
    return TrainConfig(val_dir=args.val_dir, test_dir=args.test_dir, cache_dir=args.cache_dir,
                       validation_percentage=args.validation_percentage, testing_percentage=args.testing_percentage,
                       workers=args.workers, quiet=args.quiet, time_budget=_minutes(args.time_budget),
                       head=HeadConfig(**seed), finetune=FinetuneConfig(**seed),
                       scratch=replace(scratch_defaults(), **seed))


def afterwards(args: argparse.Namespace) -> commands.Afterwards:
    return commands.Afterwards(args.quiet, args.print_misclassified_test_images, args.summaries_dir)


def legacy_retrain(argv: Sequence[str]) -> int:
    """`retrain --image_dir=DIR`, with TensorFlow Hub retrain.py's flags."""
    tmp = Path(tempfile.gettempdir())
    p = _parser("retrain", "Retrain a classifier on a folder of class folders (retrain.py-compatible flags). "
                           "Modern interface: retrain train|predict|evaluate --help")
    p.help_command = "retrain --image_dir=DIR --help"
    p.add_argument("--image_dir", required=True, type=path_arg, help="folder with one sub-folder of images per class")
    p.add_argument("--output_graph", default=str(tmp / "output_graph.onnx"), help="where to write the ONNX model")
    p.add_argument("--output_labels", default=str(tmp / "output_labels.txt"), help="where to write the labels")
    p.add_argument("--final_tensor_name", default=OUTPUT_NAME, help="name of the model's probability output")
    add_training_options(p)
    args = parse_suggesting(p, argv)
    return commands.train_files(args.image_dir, config_from_args(args), args.output_graph, args.output_labels,
                                afterwards(args))


def _subparser(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, allow_abbrev=False, formatter_class=_Help)


def add_export_parser(sub) -> None:
    ex = _subparser(sub, "export", "a smaller (--int8), any-size-input (--any-size) or mobile (--ort) copy of a model")
    ex.add_argument("model", help="model directory (or its model.onnx)")
    ex.add_argument("--output", "-o", required=True, help="directory to write the exported model into")
    ex.add_argument("--int8", action="store_true",
                    help="quantize to int8, calibrated on the model's training photos; refused if accuracy falls "
                         "by more than --tolerance")
    ex.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help="accuracy points the int8 model may lose on validation or test")
    ex.add_argument("--calibration_images", "--calibration-images", type=int, default=CALIBRATION_IMAGES,
                    help="training photos to calibrate int8 activations on")
    ex.add_argument("--image_dir", "--image-dir", type=path_arg,
                    help="the model's training folder, if it has moved (none: the folder recorded in the model)")
    ex.add_argument("--any_size", "--any-size", action="store_true",
                    help="also write model_any_size.onnx: input one decoded RGB image of any size, resized and "
                         "cropped inside the model")
    ex.add_argument("--ort", action="store_true", help="also write each model as .ort, ONNX Runtime's mobile format")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    ex.set_defaults(run=lambda a: commands.export(a.model, a.output, ExportConfig(
        int8=a.int8, any_size=a.any_size, ort=a.ort, tolerance=a.tolerance, calibration_images=a.calibration_images,
        image_dir=a.image_dir, overwrite=a.overwrite)))


def add_train_parser(sub) -> None:
    t = _subparser(sub, "train", "train a model directory from IMAGE_DIR")
    add_image_dir(t)
    t.add_argument("--output", "-o", required=True, help="model directory to write")
    t.add_argument("--overwrite", action="store_true",
                   help="write into --output even if it holds files retrain did not write")
    add_training_options(t)
    t.set_defaults(run=lambda a: commands.train_dir(a.image_dir, config_from_args(a), a.output, a.overwrite,
                                                    afterwards(a)))


def add_predict_parser(sub) -> None:
    pr = _subparser(sub, "predict", "classify images with a model")
    pr.add_argument("model", help="model directory or .onnx file")
    pr.add_argument("images", nargs="+", type=path_arg, help="image files or folders")
    add_classify_options(pr, "flag images whose top probability is below this as unknown (default: the model's "
                             "threshold)")
    add_json_option(pr, "print one JSON object per image (JSON Lines); with --output, name the file .jsonl instead")
    pr.add_argument("--output", "-o", help="stream one row per image to this .csv or .jsonl file instead "
                                           "(written to a temporary file beside it, renamed when complete)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace an --output file that is not an earlier predictions file (those are replaced anyway)")
    add_engine_options(pr, "decoding and classification")
    pr.set_defaults(run=lambda a: commands.predict(
        a.model, a.images, labels=a.labels, top_k=a.top_k, min_confidence=a.min_confidence, output=a.output,
        as_json=a.json, engine=a.engine, ray_address=a.ray_address, overwrite=a.overwrite))


def add_evaluate_parsers(sub) -> None:
    """evaluate and report: a model measured on its test split or on another folder."""
    ev = _subparser(sub, "evaluate", "accuracy, per-class metrics and confusion matrix on IMAGE_DIR")
    ev.add_argument("model", help="model directory or .onnx file")
    add_image_dir(ev, "folder of class folders to measure the model on")
    add_json_option(ev, "the metrics as one JSON object")
    ev.set_defaults(run=lambda a: commands.evaluate(a.model, a.image_dir, a.json))
    rp = _subparser(sub, "report", "write report.html (plots, mistakes, calibration, saliency) into a model dir")
    rp.add_argument("model", help="model directory")
    rp.add_argument("image_dir", nargs="?", type=path_arg, help="evaluate on this folder of class folders (default: the test split)")
    add_cache_option(rp)
    rp.set_defaults(run=lambda a: commands.report(a.model, a.image_dir, a.cache_dir))


def add_lr_find_parser(sub) -> None:
    lf = _subparser(sub, "lr-find", "sweep the head's learning rate on cached features, plot it, suggest one")
    add_image_dir(lf)
    lf.add_argument("--plot", default="lr_find.png", help="where to save the loss curve (PNG)")
    add_backbone_option(lf, BACKBONE_HELP)
    add_hidden_units_option(lf)
    add_cache_option(lf)
    add_seed_option(lf)
    add_quiet_option(lf)
    lf.set_defaults(run=lambda a: commands.lr_find(a.image_dir, TrainConfig(
        backbone=a.backbone, cache_dir=a.cache_dir, quiet=a.quiet,
        head=HeadConfig(hidden_units=a.hidden_units, seed=a.seed)), a.plot))


def add_compare_parser(sub) -> None:
    cp = _subparser(sub, "compare", "train from-scratch and transfer models on the same split; accuracy against "
                                    "wall time as a table and a plot")
    add_image_dir(cp)
    cp.add_argument("--models", help="comma-separated backbones, a +finetune suffix fine-tunes a pretrained one "
                                     "(default: scratch-small for images of 48 px or less, else scratch-color; "
                                     "then lite0)")
    cp.add_argument("--output", "-o", default="compare", help="folder for the models, table and plot")
    cp.add_argument("--time_budget", "--time-budget", type=float,
                    help="minutes each from-scratch network may train (default: its full schedule)")
    add_split_options(cp)
    add_cache_option(cp)
    add_workers_option(cp)
    add_seed_option(cp)
    add_quiet_option(cp)
    cp.add_argument("--overwrite", action="store_true",
                    help="write into an --output folder that holds files retrain did not write (it replaces only "
                         "the comparison's files and the models' folders)")
    cp.set_defaults(run=lambda a: commands.compare(a.image_dir, a.models, compare_config(a), a.output, a.overwrite))


def add_import_idx_parser(sub) -> None:
    ix = _subparser(sub, "import-idx", "turn MNIST-style IDX files into a folder of class folders")
    ix.add_argument("images", help="IDX image file (may be .gz)")
    ix.add_argument("labels", help="IDX label file (may be .gz)")
    ix.add_argument("output", help="folder to create class folders in")
    ix.add_argument("--class_names", "--class-names", choices=["fashion", "digits"], default="digits",
                    help="names of the ten classes")
    ix.add_argument("--limit_per_class", "--limit-per-class", type=int, help="keep at most this many images per class")
    ix.set_defaults(run=lambda a: commands.import_idx(a.images, a.labels, a.output, a.class_names, a.limit_per_class))


def add_serve_parser(sub) -> None:
    sv = _subparser(sub, "serve", "HTTP API and web pages to try a model and to train new ones")
    sv.add_argument("model", nargs="?", help="model directory or .onnx file (default: the bundled ImageNet classifier)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback exposes "
                                                        "prediction and training to the network")
    sv.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    add_cache_option(sv)
    c = ServeConfig()
    sv.add_argument("--workspace", help="folder keeping the web app's classes, photos and trained models across "
                                        f"restarts (default: {default_workspace()})")
    sv.add_argument("--max_upload_mb", "--max-upload-mb", type=int, default=c.max_upload_bytes >> 20,
                    help="largest request body, MiB")
    sv.add_argument("--max_queue", "--max-queue", type=int, default=c.max_queue,
                    help="predict requests admitted at once; more get 503")
    sv.add_argument("--max_batch", "--max-batch", type=int, default=c.max_batch,
                    help="most images per ONNX Runtime call (1: no batching)")
    sv.set_defaults(run=lambda a: commands.serve(a.model, a.host, a.port, cache_dir=a.cache_dir,
                                                 workspace=a.workspace, max_upload_mb=a.max_upload_mb,
                                                 max_queue=a.max_queue, max_batch=a.max_batch))


def add_doctor_parser(sub) -> None:
    dr = _subparser(sub, "doctor", "check IMAGE_DIR for unreadable files, duplicates, leakage and mislabels")
    add_image_dir(dr)
    add_json_option(dr, "the full report as one JSON object")
    add_backbone_option(dr, "feature extractor for outliers and mislabels")
    add_cache_option(dr)
    add_workers_option(dr)
    dr.add_argument("--quiet", action="store_true", help="no progress bars")
    dr.set_defaults(run=lambda a: commands.doctor(a.image_dir, backbone=a.backbone, cache_dir=a.cache_dir,
                                                  workers=a.workers, quiet=a.quiet, as_json=a.json))


def modern_parser() -> argparse.ArgumentParser:
    p = _parser("retrain", "Turn a folder of labelled photos into an image classifier, offline. "
                           "The classic form `retrain --image_dir=DIR` also works; "
                           "`retrain --image_dir=DIR --help` lists its retrain.py flags.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (add_train_parser, add_predict_parser, add_evaluate_parsers, add_lr_find_parser, add_compare_parser,
                add_import_idx_parser, add_serve_parser, add_doctor_parser, add_export_parser):
        add(sub)
    return p


def label_image(argv: Sequence[str]) -> int:
    """`label_image --graph=G --labels=L --image=I`: top-5 `label score` lines, best first."""
    p = _parser("label_image", "Classify one image with a retrained model (label_image.py-compatible flags). "
                               "Without --graph: the bundled ImageNet classifier.")
    p.add_argument("--image", required=True, help="image to classify")
    p.add_argument("--graph", help="ONNX model written by retrain (default: ImageNet EfficientNet-Lite0)")
    add_classify_options(p, "print 'unknown' first when the top probability is below this (default: the model's "
                            "threshold)")
    add_cache_option(p)
    compat = p.add_argument_group("accepted for compatibility (the model carries its own preprocessing)")
    for flag, kind in COMPAT_FLAGS.items():
        compat.add_argument(flag, type=kind)
    args = parse_suggesting(p, argv, lenient=COMPAT_FLAGS)
    given = {flag[2:]: getattr(args, flag[2:]) for flag in COMPAT_FLAGS}
    return commands.label_image(args.image, args.graph, args.labels, args.top_k, args.min_confidence, args.cache_dir,
                                given)


# label_image.py's tensor and preprocessing flags: accepted, and near-miss spellings of them too,
# since they change nothing (the model carries its input name and its own preprocessing).
COMPAT_FLAGS = {"--input_layer": str, "--output_layer": str, "--input_height": int, "--input_width": int,
                "--input_mean": float, "--input_std": float}


def parse_suggesting(p: argparse.ArgumentParser, argv: Sequence[str], lenient: Iterable[str] = ()) -> argparse.Namespace:
    """parse_args, but a misspelt flag is one line naming the flag meant, and a near miss of a
    `lenient` flag is read as that flag, with a note (course handouts spell `--input_layper`)."""
    return p.parse_args(_near_misses_fixed(p, argv, lenient))


def _near_misses_fixed(p: argparse.ArgumentParser, argv: Sequence[str], lenient: Iterable[str] = ()) -> list[str]:
    """argv with near misses of `lenient` flags read as those flags; UserError naming the flag meant for others."""
    known = [flag for action in p._actions for flag in action.option_strings]
    fixed = []
    for i, arg in enumerate(argv):
        if arg == "--":  # what follows is positional, whatever it looks like
            return fixed + list(argv[i:])
        name, eq, value = arg.partition("=")
        if name.startswith("--") and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            if close and close[0] in lenient:
                print(f"Note: {name} read as {close[0]}", file=sys.stderr)
                arg = close[0] + eq + value
            elif close:
                raise UserError(f"unrecognized flag {name}: did you mean {close[0]}?")
        fixed.append(arg)
    return fixed


# OSErrors that a user's paths, disks or ports cause: one line, not a traceback.
USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EISDIR,
               errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG, errno.EADDRINUSE,
               errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE, errno.ENXIO}


def _debug() -> bool:
    """RETRAIN_DEBUG=1: show the traceback of a user error too (for bug reports)."""
    return os.environ.get("RETRAIN_DEBUG", "") not in ("", "0")


def _tolerant_streams() -> None:
    """Print a file name that is not UTF-8 (its odd bytes read as surrogate escapes) as its own bytes, as ls
    does, and a letter the terminal's encoding lacks as an escape: never a crash in the middle of output
    (PYTHONIOENCODING=utf-8 and some locales are strict). JSON output escapes such names itself (json_text)."""
    for stream, errors in ((sys.stdout, "surrogateescape"), (sys.stderr, "backslashreplace")):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)


def _run(fn: Callable[[], int], prog: str) -> int:
    _tolerant_streams()
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
        print(f"\n{prog}: interrupted; models and predictions files are replaced only when complete (one saved "
              "before this stands), and finished feature extraction is kept in the cache.", file=sys.stderr)
        return 130


def retrain_main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS or not argv or argv[0] in ("-h", "--help"):
        def modern() -> int:
            parser = modern_parser()
            if argv and argv[0] in SUBCOMMANDS:  # before argparse, which would first ask for a missing --output
                _near_misses_fixed(_subcommand_parser(parser, argv[0]), argv[1:])
            args = parser.parse_args(argv)
            return args.run(args)
        return _run(modern, "retrain")
    return _run(lambda: legacy_retrain(argv), "retrain")


def _subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def label_image_main(argv: Sequence[str] | None = None) -> int:
    return _run(lambda: label_image(list(sys.argv[1:] if argv is None else argv)), "label_image")
