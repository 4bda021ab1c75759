"""Train the classification head on cached features: softmax, optionally one hidden layer.

The head sees raw backbone features: standardising them cost 1-2 points of accuracy on
hymenoptera in our measurements, so the exported head is plain MatMul/Add layers.
Early stopping keeps the weights with the best validation accuracy (lower loss breaks ties).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .errors import UserError
from .evidence import describe_accuracy
from .files import empty_matrix
from .stopping import EarlyStopping
from .config import HeadConfig


class Diverged(UserError):
    """The loss became NaN or infinite: training stops and no model is written."""

    def __init__(self, where: str, learning_rate: float, weight_decay: float, flag: str = "--learning_rate"):
        super().__init__(f"training diverged at {where}: the weights or the loss became NaN or infinite "
                         f"(learning rate {learning_rate:g}, weight decay {weight_decay:g}); no model was "
                         f"written: lower {flag}")


@dataclass
class HeadResult:
    layers: list[tuple[np.ndarray, np.ndarray]]  # [(W (in, out), b (out,)), ...]
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    steps_run: int = 0

    def fits(self, dim: int, n_classes: int) -> bool:
        """Whether these are finite float32 layers from `dim` features to `n_classes` logits."""
        sizes = [dim] + [b.shape[0] if b.ndim == 1 else -1 for _, b in self.layers]
        return bool(self.layers) and sizes[-1] == n_classes and all(
            w.dtype == b.dtype == np.float32 and w.shape == (fan_in, fan_out) and np.isfinite(w).all()
            and np.isfinite(b).all() for (w, b), fan_in, fan_out in zip(self.layers, sizes, sizes[1:]))


def _init_layers(dim: int, n_classes: int, cfg: HeadConfig, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Uniform(+-1/sqrt(fan_in)) weights and biases, as torch.nn.Linear starts."""
    sizes = [dim, cfg.hidden_units, n_classes] if cfg.hidden_units else [dim, n_classes]
    layers = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        bound = 1 / np.sqrt(fan_in)
        layers.append([rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
                       rng.uniform(-bound, bound, fan_out).astype(np.float32)])
    return layers


def _forward_backward(layers: list[list[np.ndarray]], x: np.ndarray, y: np.ndarray, cfg: HeadConfig,
                      rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Gradients of the label-smoothed cross-entropy (mean over the batch), dropout on the hidden layer."""
    acts, h = [x], x
    masks = []
    for i, (w, b) in enumerate(layers[:-1]):
        h = np.maximum(h @ w + b, 0)
        mask = (rng.uniform(size=h.shape) >= cfg.dropout) / (1 - cfg.dropout) if cfg.dropout else 1.0
        h = h * mask
        masks.append(mask)
        acts.append(h)
    z = h @ layers[-1][0] + layers[-1][1]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n_classes = z.shape[1]
    target = np.full_like(p, cfg.label_smoothing / n_classes)
    target[np.arange(len(y)), y] += 1 - cfg.label_smoothing
    dz = (p - target) / len(y)
    grads = []
    for i in range(len(layers) - 1, -1, -1):
        grads.append([acts[i].T @ dz, dz.sum(axis=0)])
        if i:
            dz = (dz @ layers[i][0].T) * masks[i - 1] * (acts[i] > 0)
    return grads[::-1]


class _AdamW:
    """Decoupled weight decay Adam (Loshchilov & Hutter) over lists of numpy arrays."""

    def __init__(self, params: list[list[np.ndarray]], lr: float, weight_decay: float):
        self.params, self.lr, self.wd, self.t = params, lr, weight_decay, 0
        self.m = [[np.zeros_like(a) for a in layer] for layer in params]
        self.v = [[np.zeros_like(a) for a in layer] for layer in params]

    def step(self, grads: list[list[np.ndarray]], lr: float, b1: float = 0.9, b2: float = 0.999) -> None:
        self.t += 1
        for layer, grad, m, v in zip(self.params, grads, self.m, self.v):
            for a, g, ma, va in zip(layer, grad, m, v):
                a *= 1 - lr * self.wd
                ma += (1 - b1) * (g - ma)
                va += (1 - b2) * (g * g - va)
                a -= lr * (ma / (1 - b1 ** self.t)) / (np.sqrt(va / (1 - b2 ** self.t)) + 1e-8)


MEASURE_ROWS = 16_384  # training accuracy/loss is measured on at most this many fixed rows (84 MB at D=1280)
CHUNK_ROWS = 65_536  # rows per block in logits(); up to this many rows, results are bit-identical to one matmul


def _measure(layers, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    z = logits([(w, b) for w, b in layers], x)
    return float((z.argmax(1) == y).mean()), nll(z, y)


def nll(z: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels y under softmax(z / T)."""
    zt = z / temperature
    zt = zt - zt.max(axis=1, keepdims=True)
    log_p = zt - np.log(np.exp(zt).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def logits(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """The exported head's dense layers in numpy: raw features (N, D) -> logits (N, C).

    Runs in blocks of CHUNK_ROWS, so an (N, D) np.memmap is read block by block and never
    copied whole into memory.
    """
    if len(x) <= CHUNK_ROWS:
        return _dense(layers, x)
    return np.concatenate([_dense(layers, x[i:i + CHUNK_ROWS]) for i in range(0, len(x), CHUNK_ROWS)])


def _dense(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    h = np.asarray(x, np.float32)  # no copy of float32 input (a memmap block is read in place)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = z / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict_proba(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """What the exported model computes after the backbone: (N, D) features -> (N, C) probabilities."""
    return softmax(logits(layers, x), temperature)


def _measured_rows(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All training rows, or a fixed sorted sample of MEASURE_ROWS of them when there are more.

    A full pass over a million memory-mapped rows at every check would dominate training; a
    16k sample, read once, estimates accuracy within about +-0.8 points (95%). It has its own
    generator, so the training batches are the same as without it.
    """
    if len(x) <= MEASURE_ROWS:
        return x, y
    keep = np.sort(np.random.default_rng([seed, 1]).choice(len(x), MEASURE_ROWS, replace=False))
    if not isinstance(x, np.memmap):
        return x[keep], y[keep]
    # Out of core in, out of core sample: copied once into its own spill file, a block at a time,
    # rather than held in memory (84 MB at D=1280).
    sample = empty_matrix(len(keep), x.shape[1], 0)
    for i in range(0, len(keep), 1024):
        sample[i:i + 1024] = x[keep[i:i + 1024]]
    return sample, y[keep]


QUIET_CHECKS = 10  # without an accuracy gain, one progress line every this many validation checks


def _kept_line(result: HeadResult, cfg: HeadConfig, watched: str, n: int) -> str:
    """What early stopping kept and why, in one line."""
    best = next(e for e in result.history if e["step"] == result.best_step)
    accuracy = best.get(f"{watched}_accuracy", best["train_accuracy"])
    ending = (f"Early stop at step {result.steps_run}: {watched} accuracy did not improve for {cfg.patience} checks"
              if result.steps_run < cfg.steps else f"Finished {cfg.steps} steps")
    return (f"{ending}; keeping the weights of step {result.best_step} ({watched} accuracy "
            f"{describe_accuracy(accuracy, n)}, the best seen).")


@np.errstate(over="ignore", invalid="ignore")  # divergence is detected and reported as Diverged instead
def train_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               n_classes: int, cfg: HeadConfig, log: Callable[[str], None] = print,
               progress: Callable[[int], None] | None = None) -> HeadResult:
    """Mini-batch AdamW with cosine decay, in NumPy; deterministic for a given cfg.seed.

    NumPy rather than PyTorch here: a step on a 100 x 1280 batch costs ~50 us instead of ~1 ms
    of framework overhead, and head-only runs skip importing torch (1.3 s), which is most of a
    warm rerun's time.

    Out of core: float32 inputs are used as given (an np.memmap from features.feature_matrix
    stays on disk; each step reads its mini-batch's rows), and beyond MEASURE_ROWS training
    rows the progress measurement uses a fixed sample of them instead of a full pass.
    """
    rng = np.random.default_rng(cfg.seed)
    x_train, y_train = x_train.astype(np.float32, copy=False), y_train.astype(np.int64)
    x_val, y_val = x_val.astype(np.float32, copy=False), y_val.astype(np.int64)
    x_seen, y_seen = _measured_rows(x_train, y_train, cfg.seed)
    layers = _init_layers(x_train.shape[1], n_classes, cfg, rng)
    opt = _AdamW(layers, cfg.learning_rate, cfg.weight_decay)
    batch = min(cfg.batch_size, len(x_train))
    result = HeadResult(layers=[(w.copy(), b.copy()) for w, b in layers])
    stopping, order, pos = EarlyStopping(cfg.patience), rng.permutation(len(x_train)), 0
    for step in range(1, cfg.steps + 1):
        if pos + batch > len(order):
            order, pos = rng.permutation(len(x_train)), 0
        idx = order[pos:pos + batch]
        pos += batch
        lr = cfg.learning_rate * 0.5 * (1 + np.cos(np.pi * (step - 1) / max(1, cfg.steps)))  # cosine decay
        opt.step(_forward_backward(layers, x_train[idx], y_train[idx], cfg, rng), lr)
        if not all(np.isfinite(a).all() for a in layers[-1]):  # a NaN anywhere reaches the output layer in a step
            raise Diverged(f"step {step}", cfg.learning_rate, cfg.weight_decay)
        if progress:
            progress(1)
        if step % cfg.eval_interval and step != cfg.steps:
            continue
        train_acc, train_loss = _measure(layers, x_seen, y_seen)
        if not np.isfinite(train_loss):  # finite weights whose logits overflow float32
            raise Diverged(f"step {step}", cfg.learning_rate, cfg.weight_decay)
        entry = {"step": step, "train_accuracy": train_acc, "train_loss": train_loss}
        line = f"Step {step}: Train accuracy = {100 * train_acc:.1f}%, cross entropy = {train_loss:.4f}"
        key = (train_acc, -train_loss)
        if len(x_val):
            val_acc, val_loss = _measure(layers, x_val, y_val)
            entry |= {"validation_accuracy": val_acc, "validation_loss": val_loss}
            line += f"; Validation accuracy = {describe_accuracy(val_acc, len(x_val), 'validation photos')}"
            key = (val_acc, -val_loss)
        result.history.append(entry)
        if stopping.best is None or key[0] > stopping.best[0] or len(result.history) % QUIET_CHECKS == 0:
            log(line)  # a line when accuracy improves, and now and then (a lower loss alone is no news)
        if stopping.improved(key):
            result.best_step, result.layers = step, [(w.copy(), b.copy()) for w, b in layers]
        result.steps_run = step
        if stopping.should_stop:
            break
    if result.history:
        log(_kept_line(result, cfg, watched="validation" if len(x_val) else "training", n=len(x_val) or len(x_seen)))
    return result


OUT_OF_FOLD_MAX_ROWS = 20_000  # beyond this the validation split alone is ample evidence for calibration


def out_of_fold_logits(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: HeadConfig, steps: int,
                       folds: int = 3) -> np.ndarray:
    """Logits of each training row from a head that never saw it (k-fold, stratified by class).

    Each fold's head trains for `steps` (the full head's best step) without early stopping, so
    the k extra heads cost about k x that run's training, a second or two on a few thousand photos.
    """
    fold = np.empty(len(y), np.int64)
    rng = np.random.default_rng([cfg.seed, 2])
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        fold[members] = np.arange(len(members)) % folds
    out = np.zeros((len(y), n_classes), np.float32)
    quiet_cfg = replace(cfg, steps=max(1, steps), eval_interval=max(1, steps))
    none = np.empty((0, x.shape[1]), np.float32)
    for k in range(folds):
        held = fold == k
        if held.all() or not held.any():
            continue
        head = train_head(x[~held], y[~held], none, np.empty(0, np.int64), n_classes, quiet_cfg, log=lambda m: None)
        out[held] = logits(head.layers, x[held])
    return out
