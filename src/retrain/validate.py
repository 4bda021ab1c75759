"""Numbers checked where the API receives them: the training configs call these from __post_init__.

NaN passes every `x <= 0` test, so a learning rate of `nan` used to train a model of NaNs and
save it with exit status 0; a hidden layer of 10^9 units asked for terabytes. Each rule is a
closed or half-open range; a value outside it is a one-line UserError naming the setting and
its command-line flag, raised before any work is done.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from .errors import UserError

# 1280 features x 16,384 units x 4 bytes = 84 MB of weights, 336 MB with AdamW's two moments.
MAX_HIDDEN_UNITS = 16_384
MAX_SEED = 2 ** 32 - 1  # what torch, NumPy and Python's random all accept
ENGINES = ("local", "ray")
RAY_REQUIREMENT = "ray==2.60.0"  # the pin of pyproject.toml's `ray` extra


@dataclass(frozen=True)
class Rule:
    """`low <= value <= high` (`low < value` when low_open); integers only when `integer`; None allowed when `optional`."""
    flag: str  # the command-line flag that sets it, for the message
    low: float
    high: float = math.inf
    low_open: bool = False
    integer: bool = False
    optional: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, Integral if self.integer else Real):
            return f"must be {'an integer' if self.integer else 'a number'}"
        if not math.isfinite(value) or value < self.low or (self.low_open and value == self.low) or value > self.high:
            return f"must be {'an integer' if self.integer else 'a finite number'} in {self.interval()}"
        return None

    def interval(self) -> str:
        def show(x: float) -> str:
            return f"{int(x):,}" if self.integer else f"{x:g}"
        high = "inf)" if math.isinf(self.high) else f"{show(self.high)}]"
        return f"{'(' if self.low_open else '['}{show(self.low)}, {high}"


def check(owner: str, config: Any, rules: dict[str, Rule]) -> None:
    """Raise UserError for the first field of `config` that breaks its rule."""
    for name, rule in rules.items():
        value = getattr(config, name)
        problem = rule.problem(value)
        if problem:
            raise UserError(f"{rule.flag} ({owner}.{name}) {problem}; got {value!r}")


def check_argument(name: str, value: Any, rule: Rule) -> None:
    """A function argument's check: UserError naming it (and its flag) when it breaks `rule`."""
    problem = rule.problem(value)
    if problem:
        raise UserError(f"{name} ({rule.flag}) {problem}; got {value!r}")


def check_kinds(owner: str, config: Any, kinds: dict[str, tuple[type, ...]]) -> None:
    """Raise UserError for the first field of `config` whose value is none of its allowed types
    (a dict where a config belongs, a number where a path does): one line, not an AttributeError deep in a run."""
    for name, allowed in kinds.items():
        value = getattr(config, name)
        if not isinstance(value, allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise UserError(f"{owner}.{name} must be {names}; got {value!r}")


def _seed(flag: str = "--seed") -> Rule:
    return Rule(flag, 0, MAX_SEED, integer=True)


HEAD_RULES = {
    "steps": Rule("--how_many_training_steps", 1, 10_000_000, integer=True),
    "learning_rate": Rule("--learning_rate", 0, 100, low_open=True),
    "batch_size": Rule("--train_batch_size", 1, 1_000_000, integer=True),
    "hidden_units": Rule("--hidden_units", 0, MAX_HIDDEN_UNITS, integer=True),
    "dropout": Rule("dropout", 0, 0.99),
    "weight_decay": Rule("--weight_decay", 0, 10),
    "label_smoothing": Rule("label_smoothing", 0, 0.99),
    "eval_interval": Rule("--eval_step_interval", 1, 10_000_000, integer=True),
    "patience": Rule("patience", 1, 10_000_000, integer=True),
    "seed": _seed(),
}

FINETUNE_RULES = {
    "epochs": Rule("--epochs", 0, 100_000, integer=True),  # 0: chosen from the data size
    "train_size": Rule("--train_size", 16, 1024, integer=True, optional=True),
    "batch_size": Rule("--finetune_batch_size", 0, 4096, integer=True),  # 0: chosen from device and data
    "learning_rate": Rule("--finetune_learning_rate", 0, 100, low_open=True),
    "backbone_lr_ratio": Rule("backbone_lr_ratio", 0, 100),
    "weight_decay": Rule("weight_decay", 0, 10),
    "label_smoothing": Rule("label_smoothing", 0, 0.99),
    "warmup_fraction": Rule("warmup_fraction", 0, 0.99),
    "unfreeze": Rule("--unfreeze", -1, 10_000, integer=True),
    "patience": Rule("patience", 1, 100_000, integer=True, optional=True),
    "workers": Rule("workers", 0, 1024, integer=True),
    "seed": _seed(),
}

TRAIN_RULES = {
    "validation_percentage": Rule("--validation_percentage", 0, 99.99),
    "testing_percentage": Rule("--testing_percentage", 0, 99.99),
    "time_budget": Rule("--time_budget", 0, 10 ** 9, low_open=True, optional=True),
    "workers": Rule("--workers", 1, 1024, integer=True),
    "batch_size": Rule("batch_size", 1, 4096, integer=True),
    "input_mean": Rule("--input_mean", -1e6, 1e6, optional=True),
    "input_std": Rule("--input_std", 0, 1e6, low_open=True, optional=True),
}


EXPORT_RULES = {
    "tolerance": Rule("--tolerance", 0, 100),  # accuracy points
    "calibration_images": Rule("--calibration_images", 1, 1_000_000, integer=True),
    "workers": Rule("--workers", 1, 1024, integer=True),
}


def check_train(config: Any) -> None:
    """TrainConfig's own numbers (its head/finetune/scratch configs check themselves)."""
    check("TrainConfig", config, TRAIN_RULES)
    if config.validation_percentage + config.testing_percentage >= 100:
        raise UserError("--validation_percentage and --testing_percentage must leave images for training "
                        f"(together under 100; got {config.validation_percentage:g} + {config.testing_percentage:g})")
    threshold = config.unknown_threshold
    if threshold is not None and threshold != "auto" and Rule("--unknown_threshold", 0, 1).problem(threshold):
        raise UserError(f"--unknown_threshold must be a probability in [0, 1] or 'auto'; got {threshold!r}")


def check_engine(name: str, ray_address: str | None) -> None:
    """Refuse a bad engine choice before any work starts (scanning a big folder takes a while)."""
    if name not in ENGINES:
        raise UserError(f"unknown engine '{name}': choose {' or '.join(ENGINES)}")
    if ray_address and name != "ray":
        raise UserError("--ray_address applies to --engine ray only")
    if name == "ray" and importlib.util.find_spec("ray") is None:  # without importing it (a second)
        raise UserError(f"--engine ray needs Ray, which is not installed: pip install 'retrain[ray]' "
                        f"(installs {RAY_REQUIREMENT})")
