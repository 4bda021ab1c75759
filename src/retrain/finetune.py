"""Fine-tuning: train the backbone's top stages (or all of it) with the head, on live images.

The recipe: the head starts from the one trained on cached features (a free warm-up with the
backbone frozen), then the chosen stages unfreeze with a lower learning rate than the head
(discriminative rates), linear warm-up then cosine decay, label smoothing, augmentation, and
early stopping on validation accuracy that restores the best epoch. Every BatchNorm layer keeps
its ImageNet statistics (its scale and shift still train): with CPU-sized batches, batch
statistics are noisy, and they would also shift the features away from those the warm-started
head was fitted to, so the first steps would undo the warm-up. Training runs at
a lower resolution than inference on the CPU (160 px: ~3x cheaper per image), which costs
little accuracy since testing at a higher resolution than training suits random-resized crops.
On the CPU a batch goes through the network in passes of about 16 photos at 160 px, its gradients
summed into one step (BatchNorm being frozen, the same step): smaller passes keep the activations
in the CPU's caches (CPU_PIXELS_PER_PASS). After every epoch a checkpoint is written atomically;
`resume` continues from it.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .progress import progress
from . import distributed
from .config import Augment, Checkpoint, FinetuneConfig, GentlerIfCut, finetune_geometry
from .backbones import Backbone
from .data import DevicePhotos, PhotoFiles, held_bytes
from .errors import UserError
from .evidence import describe_accuracy
from .interrupts import StopRequest, stop_requested_by_interrupt
from .head import Diverged
from .metrics import FinetuneRecord
from .stopping import EarlyStopping
from .preprocess import Preprocessing, normalize_torch
from .scan import SampleTable

MAX_EPOCHS = 200  # the most a time budget can stretch a schedule to
# On the CPU a forward pass over fewer pixels at once is faster per image (the activations stay in the
# caches) and needs less memory: Lite0 on the 2-core development machine, photos/s by pass size, training
# step at 160 px: 32 photos 36.5, 16 50.2, 8 47.3; validating both views at 224 px: 64 photos 13.7, 8 29.9,
# 4 41.3, 2 43.8. So a CPU batch runs in passes of about 16 photos at 160 px (README: what it gains in a run).
CPU_PIXELS_PER_PASS = 16 * 160 * 160
CHECK_EVERY = 10  # training steps between reads of the running loss (progress, divergence)
EpochHook = Callable[[Callable[[], float]], None]  # called after each epoch with a test-accuracy function



@dataclass
class FinetuneResult:
    features: nn.Module  # the tuned backbone feature network (pixels -> features)
    layers: list[tuple[np.ndarray, np.ndarray]]
    record: FinetuneRecord  # history, best epoch, device, resolution, whether Ctrl-C ended it: metrics.json's


class Network(nn.Module):
    """Backbone features, then the dense head: pixels (N, 3, S, S) -> logits (N, C)."""

    def __init__(self, features: nn.Module, layers: list[tuple[np.ndarray, np.ndarray]]):
        super().__init__()
        self.features = features
        dense = []
        for i, (w, b) in enumerate(layers):
            linear = nn.Linear(*w.shape)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(w.T.copy()))
                linear.bias.copy_(torch.from_numpy(b.copy()))
            dense += [linear] if i == len(layers) - 1 else [linear, nn.ReLU()]
        self.head = nn.Sequential(*dense)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))

    def head_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(m.weight.detach().float().cpu().numpy().T.copy(), m.bias.detach().float().cpu().numpy().copy())
                for m in self.head if isinstance(m, nn.Linear)]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch")
    return torch.device(name)


def _trainable_stages(net: Network, unfreeze: int) -> list[nn.Module]:
    stages = net.features.stages()
    chosen = stages if unfreeze < 0 else stages[len(stages) - unfreeze:] if unfreeze else []
    for p in net.features.parameters():
        p.requires_grad_(False)
    for stage in chosen:
        for p in stage.parameters():
            p.requires_grad_(True)
    return chosen


def _set_train_mode(net: Network, trainable: list[nn.Module] | None, flips: bool = True) -> None:
    """Train mode (dropout, stochastic depth) only where weights move; pretrained BatchNorm stays in eval mode.

    flips: the augmentation mirrors photos at random, so one view of each is enough; without flips
    (retrain.py's distortions without --flip_left_right) the network sees both, as in prediction.
    """
    if trainable is None:  # from random weights: everything trains, batch statistics included
        net.train()
        return
    net.eval()
    net.features.training = flips  # the wrapper alone, not its layers: one view or both (lite_feature_network)
    net.head.train()
    for stage in trainable:
        stage.train()
        for m in stage.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _schedule(total_steps: Callable[[], int], warmup_fraction: float) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to zero over total_steps() (read each step: it may shrink)."""

    def factor(step: int) -> float:
        total = total_steps()
        warmup = max(1, int(total * warmup_fraction))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def pass_size(net: Network, x: torch.Tensor, device: torch.device) -> int:
    """How many of the photos in x (N, 3, S, S) one forward pass takes: all of them on a GPU; on the CPU
    as many as fit in CPU_PIXELS_PER_PASS, counting every view the network looks at."""
    if device.type != "cpu":
        return len(x)
    return max(1, round(CPU_PIXELS_PER_PASS / (x.shape[2] * x.shape[3] * net.features.views())))


def predict_logits(net: Network, batches: Iterator[tuple[np.ndarray, np.ndarray]], prep: Preprocessing,
                   device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of uint8 batches."""
    net.eval()
    out, labels = [], []
    with torch.no_grad(), _autocast(device):
        for batch, y in batches:
            x = _to_device(torch.as_tensor(batch), prep, device)
            out += [net(part).float().cpu().numpy() for part in x.split(pass_size(net, x, device))]
            labels.append(y)
    if not out:
        return np.zeros((0, net.head[-1].out_features), np.float32), np.zeros(0, np.int64)
    return np.concatenate(out), np.concatenate(labels)


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float,
                     device: torch.device, per_pass: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and mean loss of a batch, its gradient accumulated over passes of `per_pass` photos (the batch
    mean's gradient: each pass's mean loss is weighted by its share of the batch)."""
    logits, loss_sum = [], torch.zeros((), device=device)
    for xs, ys in zip(x.split(per_pass), y.split(per_pass)):
        with _autocast(device):
            out = model(xs)
            loss = F.cross_entropy(out.float(), ys, label_smoothing=label_smoothing)
        (loss * (len(ys) / max(len(y), 1))).backward()  # an empty batch still gives its NaN loss, as one pass did
        logits.append(out.detach())
        loss_sum = loss_sum + loss.detach() * len(ys)
    return torch.cat(logits), loss_sum / len(y)


def _to_device(batch: torch.Tensor, prep: Preprocessing, device: torch.device) -> torch.Tensor:
    x = normalize_torch(batch.to(device, non_blocking=True), prep)
    return x.contiguous(memory_format=torch.channels_last)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:  # a damaged file: say so rather than crash
        raise UserError(f"cannot resume from {path}: {e}") from None


@dataclass
class FitState:
    """What the epoch loop carries from one epoch to the next. With the network's, optimiser's and
    schedule's own state it is the checkpoint, so --resume continues exactly where a run stopped."""
    planned_epochs: int
    stopping: EarlyStopping
    epoch: int = 0  # the last finished epoch
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_model: dict | None = None
    warm_key: tuple | None = None  # the network before the first epoch: (validation key, weights)
    warm_model: dict | None = None
    model: dict | None = None  # these three only when loaded from a checkpoint
    optimizer: dict | None = None
    scheduler: dict | None = None
    interrupted: bool = False  # not saved: a resumed run is not interrupted

    def to_checkpoint(self, identity: dict, net: nn.Module, opt, sched) -> dict:
        """Plain containers and tensors only: torch.load(weights_only=True) reads it back."""
        return {"identity": identity, "model": net.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": self.epoch, "planned_epochs": self.planned_epochs,
                "history": self.history, "best_key": list(self.stopping.best or []), "stale": self.stopping.stale,
                "best_epoch": self.best_epoch, "best_model": self.best_model,
                "warm_key": list(self.warm_key or []), "warm_model": self.warm_model}

    @classmethod
    def from_checkpoint(cls, saved: dict, patience: int | None) -> FitState:
        return cls(planned_epochs=int(saved["planned_epochs"]), epoch=int(saved["epoch"]),
                   stopping=EarlyStopping(patience, tuple(saved["best_key"]) or None, int(saved["stale"])),
                   history=list(saved["history"]), best_epoch=int(saved["best_epoch"]), best_model=saved["best_model"],
                   warm_key=tuple(saved["warm_key"]) or None, warm_model=saved["warm_model"], model=saved["model"],
                   optimizer=saved["optimizer"], scheduler=saved["scheduler"])


def _resumed_state(checkpoint: Checkpoint | None, resume: bool, cfg: FinetuneConfig,
                   log: Callable[[str], None]) -> FitState | None:
    """The state to continue from, if asked to resume and the checkpoint is of this very run."""
    if not resume:
        return None
    if checkpoint is None or not checkpoint.path.exists():
        log("No checkpoint of this run to resume from (same data, backbone and training settings): starting afresh.")
        return None
    try:
        saved = _load_checkpoint(checkpoint.path)
    except UserError as e:
        log(f"{e}: the checkpoint is damaged, starting afresh.")
        return None
    if saved.get("identity") != checkpoint.identity:
        log(f"The checkpoint {checkpoint.path} is of another run (data, backbone or training settings differ): "
            "starting afresh.")
        return None
    return FitState.from_checkpoint(saved, cfg.patience)


def finetune(train: SampleTable, val: SampleTable, backbone: Backbone, head_layers: list[tuple[np.ndarray, np.ndarray]],
             cfg: FinetuneConfig, log: Callable[[str], None], checkpoint: Checkpoint | None = None,
             resume: bool = False, after_epoch: EpochHook | None = None, test: SampleTable | None = None,
             quiet: bool = False, time_budget: float | None = None, anytime: bool = False,
             rates_if_cut: GentlerIfCut | None = None) -> FinetuneResult:
    """Fine-tune `backbone` with a head initialised from `head_layers`; returns the best epoch's network."""
    if backbone.torch_network is None:
        raise UserError(f"backbone {backbone.name} has no PyTorch network to fine-tune; use --mode head")
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    size, batch_size = finetune_geometry(cfg, backbone.prep.size, len(train), device.type == "cuda")
    aug = replace(cfg.augment, size=size) if cfg.augment else Augment(size=size)
    cfg = replace(cfg, batch_size=batch_size)
    splits = {"train": train, "validation": val, "test": train[:0] if test is None else test}
    data = _data_source(splits, aug, backbone.prep, cfg, device, distributed.rank0_log(log), quiet)
    net = Network(backbone.torch_network(), head_layers)
    trainable = _trainable_stages(net, cfg.unfreeze)
    unfrozen = "all stages" if cfg.unfreeze < 0 else f"the top {len(trainable)} stage(s)" if trainable else "no stages (head only)"
    return fit(net, trainable, data, backbone, cfg, log, checkpoint=checkpoint, resume=resume, warm_start=True,
               after_epoch=after_epoch, what=f"Fine-tuning {backbone.name}", detail=f"{unfrozen} unfrozen",
               quiet=quiet, time_budget=time_budget, anytime=anytime, rates_if_cut=rates_if_cut)


def _data_source(splits: dict[str, SampleTable], aug: Augment, prep: Preprocessing, cfg: FinetuneConfig,
                 device: torch.device, log: Callable[[str], None], quiet: bool) -> PhotoFiles | DevicePhotos:
    """Photos held decoded on the device (a GPU, when they fit in half its free memory), else read every epoch."""
    workers = cfg.workers or os.cpu_count() or 1
    need = held_bytes({k: len(v) for k, v in splits.items()}, prep, aug.size)
    hold = cfg.hold_images
    if hold is None and device.type == "cuda":
        hold = need < torch.cuda.mem_get_info(device)[0] // 2
        if not hold:
            log(f"Decoded photos would need {need / 2**30:.1f} GiB, over half the GPU's free memory: "
                "decoding them afresh every epoch instead.")
    if not hold:
        return PhotoFiles(splits, aug, prep, cfg.batch_size, cfg.seed, workers)
    started = time.perf_counter()
    data = DevicePhotos(splits, aug, prep, cfg.batch_size, cfg.seed, workers, device, quiet)
    n = sum(len(v) for v in splits.values())
    seconds = time.perf_counter() - started
    log(f"Decoded {n} photos once into {device.type} memory ({need / 2**30:.2f} GiB) in {seconds:.1f} s "
        f"({n / max(seconds, 1e-9):.0f} img/s); distortions run on the {device.type}.")
    return data


def fit(net: Network, trainable: list[nn.Module] | None, data, backbone: Backbone, cfg: FinetuneConfig,
        log: Callable[[str], None], *, checkpoint: Checkpoint | None, resume: bool, warm_start: bool,
        after_epoch: EpochHook | None = None, time_budget: float | None = None, stretch_to_budget: bool = False,
        what: str, detail: str, quiet: bool = False, anytime: bool = False,
        rates_if_cut: GentlerIfCut | None = None) -> FinetuneResult:
    """The epoch loop shared by fine-tuning and from-scratch training.

    trainable None: every layer trains, BatchNorm statistics included (random initialisation has no
    statistics worth keeping). warm_start: the network before the first epoch is a candidate too.
    time_budget: seconds of epochs; after the first epoch the schedule shortens to the epochs that
    fit (or, with stretch_to_budget, also lengthens to them), and no epoch starts that would end
    past it. anytime: a better model than the warm start is all that may replace it (a tie keeps the
    warm start), and Ctrl-C ends the loop like an early stop, keeping the best epoch so far.
    rates_if_cut: see GentlerIfCut (checked a few steps into a fresh run's first epoch).
    """
    distributed.init()
    # The budget counts from here: building the optimiser and validating the warm start are part of the run's time.
    deadline = time.perf_counter() + time_budget if time_budget else None
    # One voice: rank 0 logs and writes checkpoints; the others train (and resume) in silence.
    log, checkpoint_to_write = distributed.rank0_log(log), checkpoint if distributed.is_main() else None
    if not distributed.is_main():
        quiet, after_epoch = True, None
    device = pick_device(cfg.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick its fastest kernels
    net = net.to(device).to(memory_format=torch.channels_last)
    head_lr, backbone_lr = _group_rates(cfg.learning_rate, cfg.backbone_lr_ratio)
    groups = [{"params": list(net.head.parameters()), "lr": head_lr}]
    if trainable is None:
        groups[0]["params"] = list(net.parameters())
    elif backbone_params := [p for s in trainable for p in s.parameters()]:
        groups.append({"params": backbone_params, "lr": backbone_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    steps_per_epoch = max(1, data.n_train // cfg.batch_size)
    resumed = _resumed_state(checkpoint, resume, cfg, log)
    state = resumed or FitState(planned_epochs=cfg.epochs, stopping=EarlyStopping(cfg.patience))
    # The LR schedule reads the state's planned epochs, so a time budget can change them.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(lambda: state.planned_epochs * steps_per_epoch,
                                                             cfg.warmup_fraction))
    model = net
    if distributed.active():
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)  # averages gradients: the global batch is cfg.batch_size
    model = torch.compile(model) if cfg.compile else model
    validate = lambda entry: _validate(net, data, backbone.prep, device, entry)  # noqa: E731

    if resumed:
        net.load_state_dict(state.model)
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
        log(f"Resuming after epoch {state.epoch} from {checkpoint.path}")
    else:
        # The warm start is the fallback: kept if no fine-tuned epoch beats it on validation.
        checked = validate({"epoch": 0}) if warm_start else None
        if checked:
            (state.warm_key, entry), state.warm_model = checked, _cpu_state(net)
            state.history.append(entry)
            log("Before fine-tuning: Validation accuracy = "
                + describe_accuracy(entry["validation_accuracy"], data.count("validation"), "validation photos"))

    log(f"{what} on {device.type} at {data.train_size} px: {detail}, "
        f"{state.planned_epochs} epoch(s) of {steps_per_epoch} steps, batch {cfg.batch_size}")
    started, first = time.perf_counter(), state.epoch + 1
    left = deadline - started if deadline else None  # seconds the epochs have
    pace_check = _gentler_if_cut(rates_if_cut, opt, sched, steps_per_epoch, left, log) \
        if rates_if_cut and left is not None and first == 1 else None
    # The first Ctrl-C ends the loop at its next step; a KeyboardInterrupt raised inside it could land while a
    # prefetching generator is being closed and be lost. anytime keeps the best epoch so far; otherwise the run
    # ends interrupted after the loop (a --resume run continues from its last checkpoint). Under torchrun every
    # rank must leave at the same step, which a per-process request cannot promise: without anytime Ctrl-C
    # raises there as it always did; with it, ranks may leave at different steps (a known limit).
    asked = stop_requested_by_interrupt() if anytime or not distributed.active() else nullcontext(StopRequest())
    with asked as stop:
        while state.epoch < state.planned_epochs:
            epoch = state.epoch + 1
            entry = _train_epoch(model, net, trainable, opt, sched, data, cfg, epoch, state.planned_epochs, device,
                                 backbone.prep, quiet, deadline, stop, pace_check if epoch == 1 else None)
            if entry.pop("cut_by_stop", False):  # Ctrl-C cut the epoch: the weights it left are not compared or kept
                break
            if not math.isfinite(entry["train_loss"]):  # stop: every later epoch would be NaN too
                raise Diverged(f"epoch {epoch}", cfg.learning_rate, cfg.weight_decay, "--finetune_learning_rate")
            checked = validate(entry)
            key, entry = checked if checked else ((entry["train_accuracy"], -entry["train_loss"]), entry)
            state.history.append(entry)
            state.epoch = epoch
            log(f"Epoch {epoch}/{state.planned_epochs}: Train accuracy = {100 * entry['train_accuracy']:.1f}%, loss "
                f"{entry['train_loss']:.4f}" + ("; Validation accuracy = " + describe_accuracy(
                    entry["validation_accuracy"], data.count("validation"), "validation photos")
                    if "validation_accuracy" in entry else "")
                + f" [{entry['seconds']:.0f} s, {entry['images_per_second']:.1f} img/s]")
            if state.stopping.improved(key):
                state.best_epoch, state.best_model = epoch, _cpu_state(net)
            if time_budget and epoch == first == 1 and not stop:  # a run asked to stop has no schedule left to fit
                _fit_schedule_to_budget(state, epoch, time.perf_counter() - started, left, stretch_to_budget, log)
            if checkpoint_to_write:
                _save_checkpoint(checkpoint_to_write.path, state.to_checkpoint(checkpoint_to_write.identity, net, opt, sched))
            if after_epoch:
                after_epoch(lambda: _accuracy(net, data, backbone.prep, device, "test"))
            if stop:
                break
            if state.stopping.should_stop:
                log(f"Early stop after epoch {epoch}: no validation improvement since epoch {state.best_epoch}.")
                break
            if entry.get("cut_short") or left and _budget_spent(state, first, time.perf_counter() - started, left):
                log(f"The epochs' share of the time budget ({time_budget / 60:.1f} min) spent " +
                    (f"during epoch {epoch}: it ended there." if entry.get("cut_short") else f"after epoch {epoch}."))
                break
    if stop and not anytime:
        raise KeyboardInterrupt
    if stop:
        state.interrupted = True
        log(f"Interrupted (Ctrl-C) after {state.epoch} finished epoch(s): keeping the best network so far.")
    elif checkpoint_to_write:  # a finished run has nothing to resume: its checkpoint (84 MB for lite0) would only stay
        checkpoint_to_write.path.unlink(missing_ok=True)
    # Accuracy alone decides here: the warm head trained without label smoothing, so its validation
    # loss is not comparable with the fine-tuned network's. A tie keeps the fine-tuning when it was
    # asked for, and the head when fine-tuning is only a try at improving it (anytime).
    best_model = state.best_model
    if state.warm_key is not None and (state.stopping.best is None or state.warm_key[0] > state.stopping.best[0]
                                       or (anytime and state.warm_key[0] == state.stopping.best[0])):
        log("No fine-tuned epoch beat the warm start on validation: keeping the head trained on cached features.")
        best_model, state.best_epoch = state.warm_model, 0
    elif state.best_epoch:
        log(_kept_epoch(state.history, state.best_epoch, data.count("validation")))
    if best_model is not None:
        net.load_state_dict(best_model)
    net.eval().cpu().to(memory_format=torch.contiguous_format)
    return FinetuneResult(net.features, net.head_layers(), FinetuneRecord(
        state.best_epoch, state.history, device.type, data.train_size, state.interrupted))


def _group_rates(learning_rate: float, backbone_lr_ratio: float) -> tuple[float, float]:
    """The optimiser's rates by group: the head's, and the unfrozen backbone stages' (discriminative rates)."""
    return learning_rate, learning_rate * backbone_lr_ratio


def _gentler_if_cut(gentle: GentlerIfCut, opt, sched, steps_per_epoch: int, left: float,
                    log: Callable[[str], None]) -> Callable[[int, float], None]:
    """A check of the first steps' pace: where the budget then leaves `gentle.epochs` epochs or fewer, the
    optimiser's rates become the gentler ones from the next step on (still in warm-up: little is lost)."""
    def check(steps: int, seconds: float) -> None:
        epoch_seconds = max(seconds / steps * steps_per_epoch, 1e-9)
        if left / epoch_seconds >= gentle.epochs + 1:
            return
        bases = list(_group_rates(gentle.learning_rate, gentle.backbone_lr_ratio))[:len(opt.param_groups)]
        for group, base in zip(opt.param_groups, bases):
            group["initial_lr"] = base
        sched.base_lrs = bases  # the schedule scales these from the next step on
        log(f"At ~{epoch_seconds:.0f} s an epoch the budget leaves {gentle.epochs} epoch(s) or fewer: switching to the "
            f"gentler rates of so short a schedule (head {bases[0]:g}, backbone {bases[-1]:g})")
    return check


def _kept_epoch(history: list[dict], epoch: int, n_val: int) -> str:
    """What early stopping kept, with the validation accuracy it was chosen by."""
    entry = next(e for e in history if e["epoch"] == epoch)
    return f"Keeping the network of epoch {epoch}" + (
        f" (validation accuracy {describe_accuracy(entry['validation_accuracy'], n_val, 'validation photos')})"
        if "validation_accuracy" in entry else " (no validation photos: the last epoch)")


def _budget_spent(state: FitState, first: int, seconds: float, budget: float) -> bool:
    """Whether another epoch at this run's pace would end past the budget."""
    pace = seconds / max(1, state.epoch - first + 1)
    return state.epoch < state.planned_epochs and seconds + pace > budget


def _fit_schedule_to_budget(state: FitState, epoch: int, seconds: float, budget: float, stretch: bool,
                            log: Callable[[str], None]) -> None:
    """Set the planned epochs to what the budget allows at the first epoch's pace (only shorten unless stretch)."""
    pace = max(seconds / epoch, 1e-9)
    affordable = min(MAX_EPOCHS, max(epoch, int(budget / pace)))
    if affordable < state.planned_epochs or (stretch and affordable > state.planned_epochs):
        log(f"The epochs' share of the time budget, {budget / 60:.1f} min, at {pace:.1f} s per epoch: the schedule "
            f"now ends after epoch {affordable} (planned {state.planned_epochs}).")
        state.planned_epochs = affordable


def _cpu_state(net: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _accuracy(net: Network, data, prep: Preprocessing, device: torch.device, split: str) -> float:
    logits, labels = predict_logits(net, data.eval_batches(split), prep, device)
    return float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan")


def _validate(net: Network, data, prep: Preprocessing, device: torch.device,
              entry: dict) -> tuple[tuple[float, float], dict] | None:
    """((accuracy, -loss), entry with validation figures) on the validation split; None without one."""
    if not data.count("validation"):
        return None
    v_logits, v_labels = predict_logits(net, data.eval_batches("validation"), prep, device)
    if not len(v_labels):
        return None
    val_loss = float(F.cross_entropy(torch.from_numpy(v_logits), torch.from_numpy(v_labels)))
    val_acc = float((v_logits.argmax(1) == v_labels).mean())
    return (val_acc, -val_loss), entry | {"validation_accuracy": val_acc, "validation_loss": val_loss}


def _train_epoch(model, net: Network, trainable, opt, sched, data, cfg: FinetuneConfig, epoch: int, epochs: int,
                 device: torch.device, prep: Preprocessing, quiet: bool = False, deadline: float | None = None,
                 stop: StopRequest | None = None, on_pace: Callable[[int, float], None] | None = None) -> dict:
    """One pass over the training photos; at `deadline` (perf_counter seconds) or a stop request it ends after
    the current step (marked cut_short or cut_by_stop when that was before the last one). on_pace gets
    (steps, seconds) once, a tenth of the way in (at least 3 steps: the first ones are slow)."""
    _set_train_mode(net, trainable, flips=trainable is None or data.aug.flip)
    start, seen, cut_short, cut_by_stop = time.perf_counter(), 0, False, False
    steps = max(1, data.n_train // cfg.batch_size)
    pace_at = min(steps, max(3, steps // 10))
    # Summed on the device: reading them every step would make the CPU wait for the GPU each time.
    correct, loss_sum = torch.zeros((), device=device), torch.zeros((), dtype=torch.float64, device=device)
    bar = progress(total=steps, desc=f"Epoch {epoch}/{epochs}", unit="step",
               leave=False, disable=quiet)
    batches = iter(data.train_batches(epoch))
    # Passes share one optimiser step, which equals one pass where BatchNorm is frozen; a network from random
    # weights trains its batch statistics, and torchrun's gradient averaging runs once a pass: one pass there.
    split = trainable is not None and not distributed.active()
    for step, (batch, labels) in enumerate(batches):
        x = _to_device(torch.as_tensor(batch), prep, device)
        per_pass = pass_size(net, x, device) if split else len(x)
        y = torch.as_tensor(labels).to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        out, loss = forward_backward(model, x, y, cfg.label_smoothing, device, per_pass)
        opt.step()
        sched.step()
        seen += len(y)
        correct += (out.argmax(1) == y).sum()
        loss_sum += loss.detach() * len(y)
        bar.update(1)
        if on_pace and step + 1 == pace_at:
            on_pace(pace_at, time.perf_counter() - start)
        if step % CHECK_EVERY == 0:
            so_far = float(loss_sum)  # read every few steps only: on a GPU each read waits for it
            # Diverged: every later step would be NaN too, and the caller ends the run. Under torchrun every
            # process must leave the loop at the same step, so there it waits for the epoch's end.
            if not math.isfinite(so_far) and not distributed.active():
                break
            if not quiet:
                bar.set_postfix(loss=f"{so_far / seen:.3f}", acc=f"{float(correct) / seen:.3f}")
        if stop:
            # A request on the last step leaves a whole epoch, kept like any other. Only the source knows
            # whether a batch is left: batches of unreadable photos are skipped.
            cut_by_stop = next(batches, None) is not None
            break
        if deadline and time.perf_counter() > deadline:
            cut_short = step + 1 < steps
            break
    bar.close()
    correct, loss_sum = int(correct), float(loss_sum)
    secs = time.perf_counter() - start
    seen, correct, loss_sum = distributed.sum_across(seen, correct, loss_sum)
    return {"epoch": epoch, "train_accuracy": correct / max(1, seen), "train_loss": loss_sum / max(1, seen),
            "seconds": round(secs, 2), "images_per_second": seen / secs if secs else 0.0} | (
        {"cut_short": True} if cut_short else {}) | ({"cut_by_stop": True} if cut_by_stop else {})
