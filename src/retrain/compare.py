"""`retrain compare`: networks from random weights against transfer learning, on the user's own split.

Each model trains through the same train() on the same folder (so the same content-hash split),
recording test accuracy against training wall time. Transfer runs start with an empty feature
cache, so their time includes extracting every feature; exporting the pretrained backbone to
ONNX is a one-off set-up and happens before the clock starts.
"""
from __future__ import annotations

import itertools
import json
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from PIL import Image

from .pipeline import scan_for_training, train
from .plan import check_settings_apply
from .config import TrainConfig
from .backbones import Backbone, get_backbone
from .errors import UserError
from .evaluation import Timeline, copies_warning
from .evidence import describe_accuracy
from .files import default_cache_dir
from .graphs import extractor_path
from .guards import open_regular
from .outputs import write_model_dir
from .scan import Dataset, find_split_dirs, walk_files
from .checks import why_none_held_out

SMALL_IMAGE_SIDE = 48  # images at most this size (shorter side) get scratch-small, bigger ones scratch-color


@dataclass
class Run:
    model: str
    mode: str
    test_accuracy: float
    test_images: int  # the test photos the accuracies are over (the same split for every model)
    seconds: float  # training wall time until the model was exported
    points: list[tuple[float, float]]  # (seconds, test accuracy) along the way
    copies_of_training: int = 0  # test photos whose bytes the models trained on: every figure is inflated

    def accuracy_at(self, seconds: float) -> float | None:
        """Test accuracy had training stopped at `seconds` (None: nothing trained yet)."""
        reached = [acc for t, acc in self.points if t <= seconds]
        return reached[-1] if reached else None

    def time_to(self, accuracy: float) -> float | None:
        """First time the test accuracy reached `accuracy` (None: never)."""
        return next((t for t, acc in self.points if acc >= accuracy - 1e-12), None)


def default_models(image_dir: str | Path) -> list[str]:
    """The from-scratch network that suits the images (by the median size of the first 20), then lite0."""
    folder = Path(image_dir)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    images = itertools.islice((path for path, is_image in walk_files(folder) if is_image), 20)
    sides = []
    for path in images:  # reads headers only, and no file's hash: this must not cost a scan
        try:
            with open_regular(path) as f, Image.open(f) as img:
                sides.append(min(img.size))
        except OSError:
            continue
    small = bool(sides) and sorted(sides)[len(sides) // 2] <= SMALL_IMAGE_SIDE
    return ["scratch-small" if small else "scratch-color", "lite0"]


@dataclass(frozen=True)
class Contender:
    """One --models entry, checked before anything trains."""
    name: str  # as the user wrote it: the model's row in the table
    spec: str  # the backbone as the user wrote it (the name without +finetune), for TrainConfig.backbone
    backbone: Backbone
    mode: str  # "finetune" (the +finetune suffix) or "" (a head for pretrained backbones)

    @property
    def folder(self) -> str:
        """The model's folder inside --output: the name, or for an ONNX file's path the file's stem."""
        base = Path(self.spec).stem if self.spec.lower().endswith(".onnx") else self.spec
        return re.sub(r"[^\w.-]", "_", base) + (f"+{self.mode}" if self.mode else "")


def contenders(models: list[str]) -> list[Contender]:
    """Every --models entry checked (a known backbone, a meaningful suffix, no repeats), so that a
    mistake in the last one is found before the first one trains."""
    if len(models) < 2:
        raise UserError("compare needs at least two models, e.g. --models scratch-color,lite0")
    found: list[Contender] = []
    for name in models:
        backbone_name, _, mode = name.partition("+")  # lite0+finetune: transfer with fine-tuning
        if mode not in ("", "finetune"):
            raise UserError(f"model '{name}': the only suffix is +finetune (e.g. lite0+finetune)")
        try:
            backbone = get_backbone(backbone_name)
        except UserError as e:
            raise UserError(f"--models: {e}") from None
        if mode and not backbone.pretrained:  # the registry's word, not the name's spelling
            raise UserError(f"model '{name}': +finetune fine-tunes a pretrained backbone, and {backbone.name} starts "
                            f"from random weights (its whole network trains anyway): write {backbone_name}")
        entry = Contender(name, backbone_name, backbone, mode)
        same = next((c for c in found if (c.backbone.name, c.mode) == (backbone.name, mode)), None)
        if same:  # one model folder and two rows of one model: refused rather than trained twice
            raise UserError(f"--models names the same model twice ('{same.name}' and '{name}'): give each once")
        clash = next((c for c in found if c.folder == entry.folder), None)
        if clash:  # 'a b.onnx' and 'a_b.onnx': the second model would replace the first's folder
            raise UserError(f"--models: '{clash.name}' and '{name}' would both be saved as {entry.folder}: rename one")
        found.append(entry)
    return found


def check_test_photos(image_dir: str | Path, config: TrainConfig, cache: Path) -> None:
    """Refuse, before anything trains, a split with no test photo: there would be no accuracy to compare.

    Scans as train() does (same split options, same split record), so the split is the one every model gets.
    """
    dataset = scan_for_training(image_dir, config, cache)
    if not dataset.counts()["test"]:
        why = _why_no_test_photos(image_dir, dataset, config)
        raise UserError(f"compare measures every model on test photos, and {why}")


def _why_no_test_photos(image_dir: str | Path, dataset: Dataset, config: TrainConfig) -> str:
    folder = config.test_dir or find_split_dirs(Path(image_dir)).get("test")
    if folder:
        return f"the test folder {folder} holds no readable photo of these classes: put photos in its class folders"
    if not config.testing_percentage:
        return "--testing_percentage 0 holds none out: give a percentage above 0, or test photos with --test_dir"
    return f"none is held out: {why_none_held_out(dataset.unsplit_classes)} (or give --test_dir)"


def _run_config(config: TrainConfig, entry: Contender) -> TrainConfig:
    """One model's settings; the time budget is for the networks that train from random weights."""
    return replace(config, backbone=entry.spec, mode=entry.mode or "head",
                   time_budget=config.time_budget if not entry.backbone.pretrained else None)


def compare(image_dir: str | Path, models: list[str], config: TrainConfig, output: Path,
            log: Callable[[str], None]) -> list[Run]:
    """Train each model on the same split; save each model and the comparison under `output`."""
    entries = contenders(models)
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    check_test_photos(image_dir, config, cache)
    # Every model's settings checked before the first trains (a head setting a scratch backbone would ignore).
    if config.time_budget is not None and all(entry.backbone.pretrained for entry in entries):
        raise UserError("--time_budget: only the models that train from random weights (scratch-small, scratch-color) "
                        "use it, and --models names none")
    configs = [_run_config(config, entry) for entry in entries]
    for entry, run_config in zip(entries, configs):
        try:
            check_settings_apply(run_config)
        except UserError as e:
            raise UserError(f"model '{entry.name}': {e}") from None
    runs = []
    for entry, run_config in zip(entries, configs):
        name, backbone = entry.name, entry.backbone
        if backbone.pretrained:
            extractor_path(backbone, cache)  # one-off ONNX export, outside the clock
        log(f"=== {name} ===")
        with tempfile.TemporaryDirectory() as features:  # an empty feature cache: extraction is timed
            timeline = Timeline()
            model = train(image_dir, replace(run_config, bottleneck_dir=features), log, timeline)
            accuracy = model.metrics.test_accuracy
            if accuracy is None:  # test photos were there, but none could be decoded: nothing was measured
                raise UserError(f"{name}: none of the test photos could be read, so there is no accuracy to compare; "
                                "`retrain doctor` lists the unreadable files")
            timeline.record(lambda: accuracy)
        model.save(output / entry.folder)
        runs.append(Run(name, model.metrics.mode, accuracy, model.metrics.num_images.get("test", 0),
                        timeline.points[-1][0], timeline.points, model.metrics.test_evidence.copies_of_training))
    write_comparison(runs, output)
    return runs


def comparison_table(runs: list[Run]) -> str:
    """Accuracy and time per model, accuracy at the quickest model's time, time to each other's best."""
    quickest = min(r.seconds for r in runs)
    best = {r.model: max(acc for _, acc in r.points) for r in runs}
    lines = [f"{'model':<15} {'mode':<9} {'test acc':>8} {'time':>8} {f'acc @ {_fmt_time(quickest)}':>12}  "
             "time to reach the other models' best"]
    for r in runs:
        at = r.accuracy_at(quickest)
        reach = ", ".join(f"{o.model} {100 * best[o.model]:.1f}%: "
                          + (_fmt_time(t) if (t := r.time_to(best[o.model])) is not None else "not reached")
                          for o in runs if o is not r)
        lines.append(f"{r.model:<15} {r.mode:<9} {100 * r.test_accuracy:>7.1f}% {_fmt_time(r.seconds):>8} "
                     f"{(f'{100 * at:.1f}%' if at is not None else '-'):>12}  {reach}")
    n = runs[0].test_images
    lines.append(f"Each model's test accuracy, on the same {n} photos: "
                 + "; ".join(f"{r.model} {_accuracy_text(r, n)}" for r in runs))
    copies = max(r.copies_of_training for r in runs)  # the table is printed under --quiet too, and kept
    lines += [f"Warning: {copies_warning(copies, n)}"] if copies else []
    return "\n".join(lines)


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def write_comparison(runs: list[Run], output: Path) -> None:
    """compare.txt (the table), compare.json (every curve) and compare.png (accuracy against time).

    Staged and marked as retrain's like a model folder, so that a rerun may replace them.
    """
    def write(folder: Path) -> None:
        (folder / "compare.txt").write_text(comparison_table(runs) + "\n", encoding="utf-8")
        (folder / "compare.json").write_text(json.dumps([r.__dict__ for r in runs], indent=1), encoding="utf-8")
        (folder / "compare.png").write_bytes(_plot(runs))
    write_model_dir(output, write, "comparison")


def _accuracy_text(run: Run, n: int) -> str:
    """A model's test accuracy with its evidence, as the table and the plot show it (copies do not count)."""
    return describe_accuracy(run.test_accuracy, n, copies=run.copies_of_training)


def _plot(runs: list[Run]) -> bytes:
    from .report import literal_text

    with literal_text():  # the legend names each model as the user wrote it (an ONNX file "cost $_$.onnx")
        return _draw(runs)


def _draw(runs: list[Run]) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    end = max(r.seconds for r in runs)
    for r in runs:
        t, acc = zip(*r.points)
        line, = ax.step(t, [100 * a for a in acc], where="post", marker="o", markersize=3,
                        label=f"{r.model} ({r.mode}): {_accuracy_text(r, r.test_images)} in {_fmt_time(r.seconds)}")
        if r.seconds < end:  # finished early: its model stays as good for the rest of the time axis
            ax.plot([r.seconds, end], [100 * r.test_accuracy] * 2, linestyle="--", color=line.get_color())
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    ticks = [m * 10 ** e for e in range(-1, 6) for m in (1, 2, 5) if lo <= m * 10 ** e <= hi]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training wall time, seconds (log scale)")
    ax.set_ylabel("test accuracy, %")
    lows = [100 * a for r in runs for _, a in r.points]
    ax.set_ylim(max(0.0, min(lows) - 5), 100.5)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("From random weights vs transfer learning")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
