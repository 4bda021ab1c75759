"""The NumPy head trainer: exact gradients, determinism, early stopping, and what it learns."""
from __future__ import annotations

import numpy as np

from retrain.head import HeadConfig, _forward_backward, _init_layers, predict_proba, train_head


def _loss(layers, x, y, smoothing):
    z = x
    for i, (w, b) in enumerate(layers):
        z = z @ w + b
        if i < len(layers) - 1:
            z = np.maximum(z, 0)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    target = np.full_like(log_p, smoothing / z.shape[1])
    target[np.arange(len(y)), y] += 1 - smoothing
    return -(target * log_p).sum(axis=1).mean()


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    cfg = HeadConfig(hidden_units=6, dropout=0.0, label_smoothing=0.1)
    layers = [[w.astype(np.float64), b.astype(np.float64)] for w, b in _init_layers(5, 3, cfg, rng)]
    x, y = rng.normal(size=(7, 5)), rng.integers(0, 3, 7)
    grads = _forward_backward(layers, x, y, cfg, rng)
    eps = 1e-6
    for layer, grad in zip(layers, grads):
        for a, g in zip(layer, grad):
            for idx in list(np.ndindex(a.shape))[:6]:
                old = a[idx]
                a[idx] = old + eps
                up = _loss(layers, x, y, 0.1)
                a[idx] = old - eps
                down = _loss(layers, x, y, 0.1)
                a[idx] = old
                assert abs((up - down) / (2 * eps) - g[idx]) < 1e-6


def _blobs(n=300, d=20, classes=3, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (classes, d))
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_learns_separable_data_and_is_deterministic():
    x, y = _blobs()
    cfg = HeadConfig(steps=300, eval_interval=50, seed=3)
    a = train_head(x[:200], y[:200], x[200:], y[200:], 3, cfg, log=lambda m: None)
    b = train_head(x[:200], y[:200], x[200:], y[200:], 3, cfg, log=lambda m: None)
    assert (predict_proba(a.layers, x[200:]).argmax(1) == y[200:]).mean() > 0.95
    assert a.history == b.history
    for (wa, ba), (wb, bb) in zip(a.layers, b.layers):
        np.testing.assert_array_equal(wa, wb)
        np.testing.assert_array_equal(ba, bb)


def test_early_stopping_keeps_the_best_step():
    x, y = _blobs(n=120, d=200, seed=1, spread=0.15)  # overlapping classes, few samples: it overfits
    logs = []
    r = train_head(x[:80], y[:80], x[80:], y[80:], 3, HeadConfig(steps=5000, eval_interval=10, patience=5),
                   log=logs.append)
    assert r.steps_run < 5000 and any(line.startswith("Early stop") for line in logs)
    best = max(r.history, key=lambda e: (e["validation_accuracy"], -e["validation_loss"]))
    assert best["step"] == r.best_step
    acc = (predict_proba(r.layers, x[80:]).argmax(1) == y[80:]).mean()
    assert acc == best["validation_accuracy"]


def test_a_head_fits_only_its_feature_size_and_classes_with_finite_float32_layers():
    from retrain.head import HeadResult

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)).astype(np.float32), np.arange(60) % 3
    for hidden in (0, 5):
        head = train_head(x, y, x, y, 3, HeadConfig(steps=20, hidden_units=hidden, seed=0))
        assert head.fits(8, 3) and not head.fits(9, 3) and not head.fits(8, 2)
    w, b = head.layers[-1]
    assert not HeadResult(head.layers[:-1] + [(w.astype(np.float64), b)]).fits(8, 3)
    assert not HeadResult(head.layers[:-1] + [(np.full_like(w, np.nan), b)]).fits(8, 3)
    assert not HeadResult(head.layers[:-1] + [(w, b[:, None])]).fits(8, 3)
    assert not HeadResult([]).fits(8, 3)
