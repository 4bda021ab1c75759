"""Training data sources: photos held decoded on the device and distorted there (the GPU path, run here on the CPU)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import retrain
from retrain import finetune as ft
from retrain.augment import Augment, apply_distortion, draw_distortion
from retrain.data import DevicePhotos, distort, held_bytes
from retrain.preprocess import Preprocessing
from retrain.scan import scan_dataset
from retrain.prediction import Classifier
from test_finetune import assert_onnx_matches_network, config


def smooth_image(side: int) -> np.ndarray:
    """Gradients plus a block: every distortion (crop, mirror, colour) changes it visibly."""
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)
    img[side // 3:side // 2, side // 5:side * 3 // 4] = (200, 30, 90)
    return img


def test_device_distortions_match_pil_for_the_same_draws():
    """At the sizes DevicePhotos uses (held at training size / 0.875: crops shrink by 1.14x at most,
    so PIL's antialiasing and grid_sample's plain bilinear sampling barely differ)."""
    img = smooth_image(256)
    aug = Augment(size=224)
    draws = [draw_distortion(256, 256, aug, np.random.default_rng(i)) for i in range(16)]
    on_device = distort(torch.from_numpy(img).expand(16, -1, -1, -1), draws, 224).numpy().astype(float)
    for d, ours in zip(draws, on_device):
        diff = np.abs(apply_distortion(Image.fromarray(img), d, 224).astype(float) - ours)
        assert diff.mean() < 2.5 and np.percentile(diff, 99) <= 8, (diff.mean(), np.percentile(diff, 99))
    # Not a test that cannot fail: the draws of another image look nothing alike.
    other = apply_distortion(Image.fromarray(img), draws[1], 224).astype(float)
    assert np.abs(other - on_device[0]).mean() > 10
    assert any(d.flip for d in draws) and any(not d.flip for d in draws)


def test_held_photos_give_reproducible_batches_of_the_training_size(shapes):
    ds = scan_dataset(shapes, validation_percentage=20, testing_percentage=0, quiet=True)
    splits = {name: ds.split(name) for name in ("train", "validation", "test")}
    prep = Preprocessing(size=64)
    data = DevicePhotos(splits, Augment(size=48), prep, batch_size=8, seed=3, workers=2, device=torch.device("cpu"))
    first, again, later = (list(data.train_batches(e)) for e in (1, 1, 2))
    assert data.train_x.shape[1:] == (73, 73, 3)  # the centre square at the pre-crop size, round(64 / 0.875)
    assert len(first) == data.n_train // 8 and first[0][0].shape == (8, 48, 48, 3)
    assert first[0][0].dtype == torch.uint8 and len(first[0][1]) == 8
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and np.array_equal(ya, yb)
    assert not torch.equal(first[0][0], later[0][0])
    x, y = next(data.eval_batches("validation"))
    assert x.shape[1:] == (64, 64, 3) and len(y) == data.count("validation") == len(splits["validation"])
    assert held_bytes({"train": 10, "validation": 2}, prep, 48) == 3 * (10 * 73 ** 2 + 2 * 64 ** 2)


def test_finetuning_on_held_photos_learns_and_exports_what_it_trained(shapes, cache_dir, tmp_path, monkeypatch):
    kept, logs = {}, []
    real = ft.finetune
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: kept.setdefault("r", real(*a, **k)))
    cfg = config(cache_dir, validation_percentage=0, testing_percentage=40)  # 28 training, 20 test images
    cfg.finetune = ft.FinetuneConfig(**(cfg.finetune.to_dict() | {"hold_images": True, "epochs": 3}))
    model = retrain.train(shapes, cfg, log=logs.append)
    assert any("Decoded" in line and "distortions run on the cpu" in line for line in logs)
    history = model.metrics.finetune.history
    # Chance is 1/3; photos decoded every epoch reach 0.75 with this recipe, and so do held ones.
    assert history[-1]["train_accuracy"] > 0.8 and model.metrics.test_accuracy >= 0.65
    model.save(tmp_path / "m", report=False)
    assert_onnx_matches_network(Classifier(tmp_path / "m" / "model.onnx"), kept["r"], sorted(shapes.glob("*/*.jpg"))[::6])


def test_scratch_networks_refuse_to_decode_every_epoch(shapes, tmp_path, capsys):
    from retrain.cli import retrain_main

    assert retrain_main(["train", str(shapes), "--backbone", "scratch-small", "--no-hold_images",
                         "--output", str(tmp_path / "m")]) != 0
    assert "always trains on images decoded once" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
