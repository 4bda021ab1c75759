"""The training plan: what a run will do, resolved once from the settings, the backbone, the data and the device.

Before it, the mode was a string that grew new values on the way ("head-live", "scratch") and
the epochs, batch size, resolution and device actually used were resolved deep inside the
trainers and recorded nowhere (provenance said batch size 0, device "auto"). The plan is made
once the scan has counted the training photos, logged in one line, stored in metrics.json and
provenance, and handed to the trainer that runs it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Sequence

from .backbones import AUTO_CANDIDATES, AUTO_FIRST, Backbone, from_random_weights, get_backbone, is_auto
from .config import (AUTO_BUDGET_SECONDS, CPU_IMAGES_PER_SECOND, LIVE_IMAGE_SETTINGS, FinetuneConfig, GentlerIfCut,
                     HeadConfig, TrainConfig, finetune_geometry, scratch_schedule)
from .errors import UserError
from .evidence import describe_accuracy
from .split import held_out_targets
from .validate import FINETUNE_RULES, HEAD_RULES

MIN_VALIDATION = 50  # photos: under this, a fine-tuned network's gain cannot be told from noise
NEAR_PERFECT = 0.99  # validation accuracy of the head past which fine-tuning has nothing left to show
# A schedule of one or two epochs cannot recover from the recipe's first-epoch drop: validation after
# epochs 1 and 2 with the head at 1e-3 and the backbone at 2e-4 against the recipe's 2e-3 and 1e-3:
# rock_paper_scissors 84.0/95.2% vs 72.2/75.9%, intel_scenes 86.7/89.2% vs 66.7/82.5%,
# sign_language_digits 87.5/93.8% vs 77.4/88.5%; Fashion-MNIST's demo, one epoch: 82.0% vs 38.5%.
SHORT_SCHEDULE = 2  # epochs
GENTLE_RATES = {"learning_rate": 1e-3, "backbone_lr_ratio": 0.2}
FOLDS = 5  # cross-validation folds when backbones compete on a small folder
STARTUP_SECONDS = 8.0  # imports, the scan, the head's fit, calibration and the report
FINETUNE_STARTUP_SECONDS = 20.0  # importing PyTorch, building the network, exporting it to ONNX
GPU_IMAGES_PER_SECOND = 1000.0  # Lite0 at 224 px, batch 32, on an H200: 930-1,260 measured (4,470 at batch 256)


class Mode(str, Enum):
    HEAD = "head"  # a softmax (or one hidden layer) on cached features
    HEAD_LIVE = "head-live"  # the head on live distorted photos, backbone frozen (retrain.py's distortion flags)
    FINETUNE = "finetune"  # the backbone trains too, on live augmented photos
    SCRATCH = "scratch"  # a network from random weights, trained whole


@dataclass(frozen=True)
class TrainingPlan:
    mode: Mode
    reason: str  # why this mode, in words
    device: str = "cpu"
    epochs: int | None = None  # live-image training only (None: the head on cached features)
    batch_size: int | None = None
    train_size: int | None = None  # pixels per side while training on live images
    stretch_to_budget: bool = False  # from scratch: a time budget may lengthen the schedule too
    time_budget: float | None = None  # seconds the live-image training may take
    rates: dict | None = None  # learning rates that replace the recipe's (a short anytime schedule)
    rates_if_cut: GentlerIfCut | None = None  # the same, where the first epoch's pace cuts the schedule that short
    anytime: bool = False  # the head's model is saved first; fine-tuning may only replace it with a better one
    backbone_candidates: tuple[str, ...] = ()  # their heads compete by cross-validation where the head stays
    unused: tuple[str, ...] = ()  # fine-tuning settings the user gave that a plan without fine-tuning leaves unread

    @property
    def live(self) -> bool:
        return self.mode is not Mode.HEAD

    def settings(self, cfg: FinetuneConfig) -> FinetuneConfig:
        """`cfg` with what this plan resolved (the trainer runs exactly the plan)."""
        resolved = replace(cfg, epochs=self.epochs, batch_size=self.batch_size, train_size=self.train_size,
                           device=self.device, **(self.rates or {}))
        return replace(resolved, unfreeze=0) if self.mode is Mode.HEAD_LIVE else resolved

    def describe(self) -> str:
        if not self.live:
            return f"Plan: {self.mode.value} ({self.reason})" + (f"; {unused_note(self.unused)}" if self.unused else "")
        return (f"Plan: {self.mode.value} on the {self.device.upper() if self.device == 'cpu' else 'GPU'}, "
                f"{self.epochs} epoch(s), batch {self.batch_size}, {self.train_size} px ({self.reason})")

    def to_dict(self) -> dict:
        """JSON's form: what a cached run's stored plan is compared with after its round trip."""
        return asdict(self) | {"mode": self.mode.value, "backbone_candidates": list(self.backbone_candidates),
                               "unused": list(self.unused)}


def check_settings_apply(config: TrainConfig) -> None:
    """Refuse settings the run would never read, before any work: silently ignoring them misleads.

    Checked here rather than in the command line so that Python callers get the same answer; whether
    a backbone trains from random weights is the registry's to say, so TrainConfig cannot check it.
    """
    scratch = from_random_weights(config.backbone)
    live_head = config.finetune.augment is not None  # distortions: the head trains on live photos, no budget
    if config.time_budget is not None and not scratch and (config.mode != "auto" or live_head):
        raise UserError("time_budget (--time_budget) applies to --mode auto without distortion flags and to scratch "
                        "backbones only")
    if scratch:
        _refuse_head_settings(config)
    unread = _given_for_live_training(config) if config.mode == "head" and not (scratch or live_head) else []
    if unread:
        raise UserError(f"{', '.join(unread)}: only for training on live images (--mode finetune or auto, a scratch "
                        "backbone, or distortion flags); --mode head trains on cached features")
    if (config.scratch if scratch else config.finetune).device == "cuda":
        _device("cuda")  # a missing GPU is said before the scan and the features, not after them


def _given_for_live_training(config: TrainConfig) -> list[str]:
    """The settings given that only training on live images reads: fine-tuning's, and --resume."""
    return given_live_image_settings(config) + (["--resume (resume)"] * config.resume)


def given_live_image_settings(config: TrainConfig) -> list[str]:
    """The fine-tuning settings given other than the recipe's, as flags."""
    return _given(config.finetune, FinetuneConfig(), FINETUNE_RULES, LIVE_IMAGE_SETTINGS)


def _given(part: object, recipe: object, rules: dict, names: Sequence[str]) -> list[str]:
    """The settings in `names` that `part` holds other than `recipe` does, as '--flag (setting)', or the bare
    setting where no flag sets it (one given equal to its default cannot be told apart)."""
    return [_spelt(rules, name) for name in names if getattr(part, name) != getattr(recipe, name)]


def _spelt(rules: dict, setting: str) -> str:
    rule = rules.get(setting)
    flag = rule.flag if rule else f"--{setting}"  # validate.py's rules record the flags spelt otherwise
    return f"{flag} ({setting})" if flag.startswith("--") else setting


def _refuse_head_settings(config: TrainConfig) -> None:
    """A scratch backbone trains the whole network from random weights: no head on cached features
    trains, so the head's settings (its seed apart, which seeds more than the head) would be ignored."""
    unread = _given(config.head, HeadConfig(), HEAD_RULES, [name for name in HEAD_RULES if name != "seed"])
    if unread:
        raise UserError(f"{', '.join(unread)}: settings of the head on cached features, which a scratch backbone "
                        f"({config.backbone}) does not train; it trains the whole network: use --epochs, "
                        "--finetune_learning_rate and --finetune_batch_size")


def plan_training(config: TrainConfig, backbone: Backbone, n_train: int,
                  head_validation: tuple[float | None, int] = (None, 0), n_photos: int = 0) -> TrainingPlan:
    """The plan for `n_train` training photos; imports PyTorch only when live images may train.

    head_validation: (accuracy, photos) of the head on cached features, which the default run
    (mode auto) weighs before spending its time budget on fine-tuning. n_photos: all the usable
    photos (every split), whose features a backbone comparison would extract.
    """
    if not backbone.pretrained:
        cfg = config.scratch
        epochs, batch_size = scratch_schedule(cfg, n_train)
        return TrainingPlan(Mode.SCRATCH, f"{backbone.name} has no pretrained weights, so the whole network trains "
                            "from random initialisation" + (f" (--mode {config.mode} does not apply)"
                                                            if config.mode == "finetune" else ""),
                            device=_device(cfg.device), epochs=epochs, batch_size=batch_size,
                            train_size=backbone.prep.size,
                            stretch_to_budget=not cfg.epochs)
    if config.mode == "auto" and config.finetune.augment is None:  # distortions: the head on live photos
        plan = _anytime_plan(config, backbone, n_train, *head_validation, n_photos)
        # The default may decide not to fine-tune: settings given for fine-tuning are then said to go unused,
        # and so is the time budget where no backbone comparison spends it either.
        budget = ["--time_budget (time_budget)"] if config.time_budget and not plan.backbone_candidates else []
        return plan if plan.live else replace(plan, unused=tuple(_given_for_live_training(config) + budget))
    mode, reason = _pretrained_mode(config)
    if mode is Mode.HEAD:
        return TrainingPlan(mode, reason)
    cfg, device = config.finetune, _device(config.finetune.device)
    train_size, batch_size = finetune_geometry(cfg, backbone.prep.size, n_train, device == "cuda")
    return TrainingPlan(mode, reason, device=device, epochs=cfg.epochs, batch_size=batch_size, train_size=train_size)


def unused_note(unused: Sequence[str]) -> str:
    """What a plan without fine-tuning says of the fine-tuning settings it leaves unread."""
    return f"not fine-tuning, so {', '.join(unused)} go unused"


def _pretrained_mode(config: TrainConfig) -> tuple[Mode, str]:
    if config.mode == "finetune":
        return Mode.FINETUNE, "as asked (--mode finetune)"
    if config.finetune.augment is not None:
        return Mode.HEAD_LIVE, ("distortions need live images: training the head on distorted photos, backbone frozen, "
                                "from the head on cached features (the steps, batch and learning rate given for the "
                                "head shape that one; these epochs follow --epochs, --finetune_batch_size and "
                                "--finetune_learning_rate)")
    return Mode.HEAD, "as asked"


def _anytime_plan(config: TrainConfig, backbone: Backbone, n_train: int, head_accuracy: float | None,
                  n_val: int, n_photos: int) -> TrainingPlan:
    """The default: keep the head's model, and fine-tune within the budget only where a gain can show."""
    budget = config.time_budget or AUTO_BUDGET_SECONDS
    if backbone.torch_network is None:
        return TrainingPlan(Mode.HEAD, f"{backbone.name} has no PyTorch network to fine-tune")
    if n_val < MIN_VALIDATION:
        return _small_validation_plan(config, n_val, n_train + n_val, n_photos, budget)
    if head_accuracy is not None and head_accuracy >= NEAR_PERFECT:
        return TrainingPlan(Mode.HEAD, "not fine-tuning: the head is already "
                            f"{describe_accuracy(head_accuracy, n_val, 'validation photos')} right on validation")
    cfg, device = config.finetune, _device(config.finetune.device)
    gpu = device == "cuda"
    epoch_seconds = n_train / (GPU_IMAGES_PER_SECOND if gpu else CPU_IMAGES_PER_SECOND)
    epochs = min(cfg.epochs, int(budget / epoch_seconds))
    if epochs < 1:
        return TrainingPlan(Mode.HEAD, f"not fine-tuning: one epoch of {n_train} photos would take "
                            f"~{_duration(epoch_seconds)}, over the budget of {_duration(budget)} (--time_budget)")
    train_size, batch_size = finetune_geometry(cfg, backbone.prep.size, n_train, gpu)
    rates = _short_schedule_rates(cfg, epochs)
    # If the head stays, the Lite sizes' heads compete: on intel_scenes, where fine-tuning never beat the
    # head on validation, 5-fold accuracy on the 1,200 labelled photos ranks lite1 first (1,092 right
    # against lite0's 1,086 and lite2's 1,079), and its head scores 0.915 on the test photos against 0.902.
    # That time is kept out of fine-tuning's share, so the run as a whole stays within the budget.
    compare_seconds = _comparison_seconds(n_photos)
    fallback = is_auto(config.backbone) and epochs * epoch_seconds + compare_seconds <= budget
    return TrainingPlan(Mode.FINETUNE, (
        (f"head: {describe_accuracy(head_accuracy, n_val, 'validation photos')} on validation"
         if head_accuracy is not None else
         f"the head first, measured on {n_val} validation photos") + "; fine-tuning for up to "
        f"~{_duration(min(budget, epochs * epoch_seconds))} to improve it ({epochs} epoch(s) on the "
        f"{'GPU' if gpu else 'CPU'}" + (", at gentler learning rates for so short a schedule" if rates else "") +
        "), kept only if it does better on validation" +
        (f"; if the head stays, {', '.join(AUTO_CANDIDATES)} heads compete by {FOLDS}-fold cross-validation "
         f"(~{_duration(compare_seconds)})" if fallback else "") + "; Ctrl-C keeps the best model so far"),
        device=device, epochs=epochs, batch_size=batch_size, train_size=train_size,
        time_budget=budget - compare_seconds if fallback else budget, anytime=True, rates=rates,
        rates_if_cut=_rates_if_cut(cfg, epochs),
        backbone_candidates=AUTO_CANDIDATES if fallback else ())


def _comparison_seconds(n_photos: int) -> float:
    """Roughly how long extracting every photo's features through the other Lite sizes takes."""
    return sum(n_photos / get_backbone(name).images_per_second for name in AUTO_CANDIDATES if name != AUTO_FIRST)


def _small_validation_plan(config: TrainConfig, n_val: int, n_labelled: int, n_photos: int,
                           budget: float) -> TrainingPlan:
    """No fine-tuning; with the default backbone, the Lite sizes compete by cross-validation where it fits the budget.

    Measured on hymenoptera (245 training photos, 24 for validation): 5-fold out-of-fold accuracy of
    the head 0.946 (lite0), 0.964 (lite1), 0.977 (lite2); on its 153 test photos 0.948, 0.961, 0.967.
    """
    reason = (f"not fine-tuning: {n_val} validation photos are too few to tell a gain from noise (it needs "
              f"{MIN_VALIDATION}; --validation_percentage holds out more)")
    if not is_auto(config.backbone):
        return TrainingPlan(Mode.HEAD, reason)
    seconds = _comparison_seconds(n_photos)
    if seconds > budget:
        return TrainingPlan(Mode.HEAD, f"{reason}; comparing backbones would take ~{_duration(seconds)}, over the "
                            f"budget of {_duration(budget)} (--time_budget)")
    return TrainingPlan(Mode.HEAD, f"{reason}; instead, {', '.join(AUTO_CANDIDATES)} compete by {FOLDS}-fold "
                        f"cross-validated accuracy on the {n_labelled} training and validation photos "
                        f"(~{_duration(seconds)} of feature extraction)", backbone_candidates=AUTO_CANDIDATES,
                        time_budget=budget)


def _duration(seconds: float) -> str:
    if seconds < 1:  # a budget of a fraction of a second is said as it is, not as "1 s" or "0 min"
        return f"{seconds:.2g} s"
    return f"{round(seconds)} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _short_schedule_rates(cfg: FinetuneConfig, epochs: int) -> dict | None:
    """The gentler rates for a schedule the budget cut short, unless the rates were set by hand."""
    return dict(GENTLE_RATES) if _recipe_rates(cfg) and epochs <= SHORT_SCHEDULE < cfg.epochs else None


def _rates_if_cut(cfg: FinetuneConfig, epochs: int) -> GentlerIfCut | None:
    """The gentler rates to switch to if the machine proves slower than planned and the budget then cuts a
    longer schedule to a short one (unless the rates were set by hand)."""
    return GentlerIfCut(SHORT_SCHEDULE, **GENTLE_RATES) if _recipe_rates(cfg) and epochs > SHORT_SCHEDULE else None


def _recipe_rates(cfg: FinetuneConfig) -> bool:
    recipe = FinetuneConfig()
    return (cfg.learning_rate, cfg.backbone_lr_ratio) == (recipe.learning_rate, recipe.backbone_lr_ratio)


def _device(name: str) -> str:
    if name == "cpu":
        return "cpu"
    from .finetune import pick_device  # imports PyTorch, only to ask whether a GPU is there

    return pick_device(name).type


def estimated_seconds(config: TrainConfig, class_sizes: Sequence[int]) -> tuple[float, TrainingPlan]:
    """Roughly the longest a first run takes on the CPU for classes of these sizes, and the plan behind it.

    The head's validation accuracy is not known before the run, so fine-tuning is assumed to go ahead
    where the plan allows it; features already cached make a run faster than this.
    """
    held_out = [held_out_targets(n, config.validation_percentage, config.testing_percentage) or (0, 0)
                for n in class_sizes]
    n_val = sum(v for v, _ in held_out)
    n_photos = sum(class_sizes)
    n_train = n_photos - n_val - sum(t for _, t in held_out)
    backbone = get_backbone(config.backbone)  # auto: lite0, the run's first
    cpu = replace(config, finetune=replace(config.finetune, device="cpu"),  # never import PyTorch to estimate
                  scratch=replace(config.scratch, device="cpu"))
    plan = plan_training(cpu, backbone, n_train, (None, n_val), n_photos)
    seconds = STARTUP_SECONDS + n_photos / (backbone.images_per_second or CPU_IMAGES_PER_SECOND)
    if plan.live:
        epochs_seconds = plan.epochs * n_train / CPU_IMAGES_PER_SECOND  # the rate the plan itself counts on
        seconds += FINETUNE_STARTUP_SECONDS + min(epochs_seconds, plan.time_budget or float("inf"))
    if plan.backbone_candidates:
        seconds += _comparison_seconds(n_photos)
    return seconds, plan
