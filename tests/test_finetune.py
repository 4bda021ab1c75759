"""Fine-tuning: the exported ONNX matches PyTorch, interrupt + resume, determinism, augmentation, auto mode."""
from __future__ import annotations

import os
import signal
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import retrain
from retrain import finetune as ft
from retrain.api import TrainConfig
from retrain.augment import Augment, augment
from retrain.backbones import get_backbone
from retrain.decode import load_image
from retrain.config import Checkpoint
from retrain.data import PhotoFiles
from retrain.finetune import FinetuneConfig, Network
from retrain.head import HeadConfig, softmax
from retrain.prediction import Classifier
from retrain.preprocess import normalize_torch
from retrain.scan import scan_dataset


def tiny(**kw) -> FinetuneConfig:
    return FinetuneConfig(**({"epochs": 2, "train_size": 96, "batch_size": 8, "unfreeze": 2, "workers": 2} | kw))


def zero_head() -> list[tuple[np.ndarray, np.ndarray]]:
    """A head for Lite0's 1,280 features and the 3 shape classes, all zeros: every class equally likely."""
    return [(np.zeros((1280, 3), np.float32), np.zeros(3, np.float32))]


def config(cache_dir, **kw) -> TrainConfig:
    return TrainConfig(cache_dir=str(cache_dir), quiet=True, head=HeadConfig(steps=100), mode="finetune",
                       finetune=tiny(), **kw)


def test_exported_finetuned_model_matches_pytorch(shapes, cache_dir, tmp_path, monkeypatch):
    kept = {}
    real = ft.finetune
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: kept.setdefault("r", real(*a, **k)))
    # No validation split: nothing to fall back on, so the tuned weights are exported.
    model = retrain.train(shapes, config(cache_dir, validation_percentage=0))
    model.save(tmp_path / "m")
    tuned = kept["r"]
    assert model.metrics.mode == "finetune" and len(model.metrics.finetune.history) >= 1
    # The tuned weights differ from ImageNet's in the unfrozen stages only.
    fresh = get_backbone("lite0").torch_network().state_dict()
    changed = {k.split(".")[1] for k, v in tuned.features.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, fresh[k])}
    assert changed and "_conv_stem" not in changed and "_blocks" in changed

    assert_onnx_matches_network(Classifier(tmp_path / "m" / "model.onnx"), tuned, sorted(shapes.glob("*/*.jpg"))[::6])


def assert_onnx_matches_network(clf: Classifier, tuned, images) -> None:
    """The exported model's probabilities equal the trained PyTorch network's, with the baked temperature."""
    batch = np.stack([load_image(p, clf.prep) for p in images])
    net = Network(tuned.features, tuned.layers).eval()
    with torch.no_grad():
        logits = net(normalize_torch(torch.from_numpy(batch), clf.prep)).numpy()
    temperature = float(clf.metadata["retrain:temperature"])
    np.testing.assert_allclose(clf.probabilities(batch), softmax(logits, temperature), atol=2e-4)


def test_interrupt_then_resume_equals_an_uninterrupted_run(shapes, cache_dir, tmp_path, monkeypatch):
    ds = scan_dataset(shapes, validation_percentage=20, testing_percentage=0, quiet=True)
    train, val = ds.split("train"), ds.split("validation")
    backbone = get_backbone("lite0")
    head = zero_head()
    logs: list[str] = []
    run = {"data": ds.fingerprint()}
    whole = ft.finetune(train, val, backbone, head, tiny(patience=5), logs.append, Checkpoint(tmp_path / "a.pt", run))
    assert not (tmp_path / "a.pt").exists()  # a finished run has nothing to resume: its checkpoint goes

    real_epoch, calls = ft._train_epoch, []

    def interrupt_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)
    monkeypatch.setattr(ft, "_train_epoch", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(train, val, backbone, head, tiny(patience=5), logs.append, Checkpoint(tmp_path / "b.pt", run))
    assert (tmp_path / "b.pt").exists()  # the last good checkpoint: after epoch 1
    monkeypatch.setattr(ft, "_train_epoch", real_epoch)
    resumed = ft.finetune(train, val, backbone, head, tiny(patience=5), logs.append, Checkpoint(tmp_path / "b.pt", run),
                          resume=True)
    assert any("Resuming after epoch 1" in line for line in logs)
    drop = ("seconds", "images_per_second")
    strip = lambda h: [{k: v for k, v in e.items() if k not in drop} for e in h]  # noqa: E731
    assert strip(resumed.record.history) == strip(whole.record.history)  # same seed, same result
    for (wa, ba), (wb, bb) in zip(whole.layers, resumed.layers):
        np.testing.assert_array_equal(wa, wb)
        np.testing.assert_array_equal(ba, bb)


def interrupted_fine_tuning(shapes, tmp_path, train_batches) -> list[str]:
    """Fine-tune 3 epochs with `train_batches` in place of PhotoFiles'; assert Ctrl-C ended it; its log lines."""
    ds = scan_dataset(shapes, validation_percentage=20, testing_percentage=0, quiet=True)
    head = zero_head()
    logs: list[str] = []
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's Ctrl-C finds it
    try:
        with mock.patch.object(PhotoFiles, "train_batches", train_batches), pytest.raises(KeyboardInterrupt):
            # On the CPU: a GPU would hold the photos on the device instead of decoding them per epoch.
            ft.finetune(ds.split("train"), ds.split("validation"), get_backbone("lite0"), head,
                        tiny(epochs=3, device="cpu"), logs.append,
                        Checkpoint(tmp_path / "c.pt", {"data": ds.fingerprint()}))
    finally:
        signal.signal(signal.SIGINT, before)
    return logs


def test_a_ctrl_c_that_lands_while_an_epochs_prefetching_is_finalised_still_interrupts(shapes, tmp_path):
    # What failed in CI: --mode finetune went on to a complete model after Ctrl-C, because the
    # KeyboardInterrupt was raised inside a generator being finalised, where Python prints and drops it.
    real = PhotoFiles.train_batches

    def finalised_with_ctrl_c(self, epoch):
        def left_unfinished():
            try:
                yield
            finally:
                if epoch == 2:
                    os.kill(os.getpid(), signal.SIGINT)
        pending = left_unfinished()
        next(pending)
        yield from real(self, epoch)
        del pending  # dropped unexhausted: its finaliser runs now, as a prefetching pool's does
    logs = interrupted_fine_tuning(shapes, tmp_path, finalised_with_ctrl_c)
    # The request came as epoch 2's last batch was drawn: that epoch is whole, so it is kept, and no third starts.
    assert torch.load(tmp_path / "c.pt", weights_only=False)["epoch"] == 2
    assert any(line.startswith("Epoch 2/3") for line in logs) and not any(line.startswith("Epoch 3/3") for line in logs)


def test_a_ctrl_c_in_the_middle_of_an_epoch_drops_that_epoch_and_keeps_the_last_checkpoint(shapes, tmp_path):
    real = PhotoFiles.train_batches

    def ctrl_c_after_the_first_batch(self, epoch):
        for i, batch in enumerate(real(self, epoch)):
            yield batch
            if epoch == 2 and i == 0:
                os.kill(os.getpid(), signal.SIGINT)
    logs = interrupted_fine_tuning(shapes, tmp_path, ctrl_c_after_the_first_batch)
    assert torch.load(tmp_path / "c.pt", weights_only=False)["epoch"] == 1  # a --resume run continues from epoch 1
    assert any(line.startswith("Epoch 1/3") for line in logs) and not any(line.startswith("Epoch 2/3") for line in logs)


def test_warm_start_is_kept_when_no_epoch_beats_it(shapes, cache_dir, monkeypatch):
    """Fine-tuning that wrecks the network (an absurd learning rate) must not replace a perfect head."""
    logs: list[str] = []
    cfg = config(cache_dir, validation_percentage=30)
    cfg.finetune = replace(cfg.finetune, learning_rate=50.0, unfreeze=-1)
    model = retrain.train(shapes, cfg, log=logs.append)
    assert model.metrics.finetune.best_epoch == 0
    assert model.metrics.finetune.history[0]["validation_accuracy"] == 1.0
    assert any("keeping the head trained on cached features" in line for line in logs)


def test_a_damaged_or_foreign_checkpoint_is_named_and_training_starts_afresh(shapes, tmp_path):
    bad = tmp_path / "c.pt"
    bad.write_bytes(b"not a checkpoint")
    ds = scan_dataset(shapes, quiet=True)
    head = zero_head()
    logs: list[str] = []
    cfg = tiny(epochs=1)
    ft.finetune(ds.split("train"), [], get_backbone("lite0"), head, cfg, logs.append, Checkpoint(bad, {"run": 1}),
                resume=True)
    assert any("cannot resume from" in line and "damaged, starting afresh" in line for line in logs)
    assert not bad.exists()  # the run finished: nothing to resume, so its checkpoint went
    torch.save({"identity": {"run": 1}, "epoch": 1}, bad)  # another run's, left by a Ctrl-C
    logs.clear()
    ft.finetune(ds.split("train"), [], get_backbone("lite0"), head, cfg, logs.append, Checkpoint(bad, {"run": 2}),
                resume=True)
    assert any("is of another run" in line for line in logs)
    assert not any("Resuming" in line for line in logs)


def test_augment_is_reproducible_and_shaped():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8))
    aug = Augment(size=64)
    a = augment(img, aug, np.random.default_rng(1))
    b = augment(img, aug, np.random.default_rng(1))
    c = augment(img, aug, np.random.default_rng(2))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_legacy_flip_only_is_the_centre_crop_or_its_mirror():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8))
    aug = Augment.from_retrain_flags(80, True, 0, 0, 0)
    centre = np.asarray(img)
    outs = [augment(img, aug, np.random.default_rng(i)) for i in range(8)]
    assert all(np.array_equal(o, centre) or np.array_equal(o, centre[:, ::-1]) for o in outs)
    assert any(np.array_equal(o, centre[:, ::-1]) for o in outs)


def test_a_tie_on_validation_accuracy_keeps_the_fine_tuned_network(shapes, cache_dir):
    """Label smoothing raises the fine-tuned loss; at equal accuracy the fine-tuned epoch must still win."""
    cfg = config(cache_dir, validation_percentage=20, testing_percentage=0)
    cfg.finetune = tiny(epochs=3)
    logs: list[str] = []
    model = retrain.train(shapes, cfg, log=logs.append)
    history = model.metrics.finetune.history
    assert history[0]["validation_accuracy"] == 1.0  # the warm head is already perfect on validation
    best = model.metrics.finetune.best_epoch
    assert best >= 1 and history[best]["validation_accuracy"] == 1.0
    assert f"Keeping the network of epoch {best} (validation accuracy not measurable on 9 validation photos (9/9" in "\n".join(logs)  # says what it kept


def test_fine_tuning_trains_on_one_view_where_it_flips_and_validates_on_the_photo_and_its_mirror_image():
    net = Network(get_backbone("lite0").torch_network(), zero_head())
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        plain, flipped = net.features.pooled(pixels), net.features.pooled(pixels.flip(3))
        ft._set_train_mode(net, [])  # what trains does not matter here: all stages stay in eval mode
        assert torch.equal(net.features(pixels), plain)
        net.eval()
        torch.testing.assert_close(net.features(pixels), (plain + flipped) / 2)
        ft._set_train_mode(net, [], flips=False)  # an augmentation that never mirrors: both views, as predicted
        torch.testing.assert_close(net.features(pixels), (plain + flipped) / 2)


def test_on_the_cpu_a_batch_runs_in_passes_of_about_16_photos_at_160_px_counting_both_views():
    net = Network(get_backbone("lite0").torch_network(), zero_head())
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    ft._set_train_mode(net, [])  # training: one view
    assert ft.pass_size(net, torch.zeros(32, 3, 160, 160), cpu) == 16
    assert ft.pass_size(net, torch.zeros(32, 3, 224, 224), cpu) == 8
    assert ft.pass_size(net, torch.zeros(32, 3, 160, 160), gpu) == 32  # a GPU takes the whole batch at once
    net.eval()  # prediction: the photo and its mirror image
    assert ft.pass_size(net, torch.zeros(64, 3, 224, 224), cpu) == 4
    assert ft.pass_size(net, torch.zeros(64, 3, 16, 16), cpu) == 800  # more than the batch: one pass


def test_a_batch_split_into_passes_trains_and_predicts_as_one_pass():
    """With BatchNorm frozen and no dropout drawn, passes of 3 photos give the batch's logits, mean loss and gradient."""
    torch.manual_seed(0)
    head = [(np.random.default_rng(0).normal(0, 0.1, (1280, 3)).astype(np.float32), np.zeros(3, np.float32))]
    net = Network(get_backbone("lite0").torch_network(), head).eval()  # eval: no stochastic depth to draw
    x, y, cpu = torch.rand(8, 3, 64, 64) * 4 - 2, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.device("cpu")
    grads = []
    for per_pass in (8, 3):
        net.zero_grad(set_to_none=True)
        logits, loss = ft.forward_backward(net, x, y, 0.1, cpu, per_pass)
        grads.append(([p.grad.clone() for p in net.parameters() if p.grad is not None], logits, loss))
    (whole, logits, loss), (parts, part_logits, part_loss) = grads
    torch.testing.assert_close(part_logits, logits)
    torch.testing.assert_close(part_loss, loss)
    assert loss > 0 and any(g.abs().sum() > 0 for g in whole)
    assert len(whole) == len(parts) > 100
    for a, b in zip(whole, parts):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    empty, loss = ft.forward_backward(net, x[:0], y[:0], 0.1, cpu, 3)  # a rank given no photos: NaN, as one pass gave
    assert empty.shape == (0, 3) and torch.isnan(loss)


def test_the_time_budget_counts_the_warm_starts_validation(shapes, monkeypatch):
    import time

    ds = scan_dataset(shapes, validation_percentage=20, testing_percentage=0, quiet=True)
    head = zero_head()
    real, logs = ft._validate, []

    def slow_warm_start(net, data, prep, device, entry):
        if entry["epoch"] == 0:
            time.sleep(1.5)  # a large validation split: longer than the whole budget
        return real(net, data, prep, device, entry)
    monkeypatch.setattr(ft, "_validate", slow_warm_start)
    ft.finetune(ds.split("train"), ds.split("validation"), get_backbone("lite0"), head, tiny(epochs=3, device="cpu"),
                logs.append, time_budget=1.0, anytime=True)
    assert any("spent during epoch 1: it ended there" in line for line in logs), logs


def test_a_first_epoch_slower_than_planned_switches_to_the_gentler_rates_at_once(shapes, monkeypatch):
    from retrain.config import GentlerIfCut

    ds = scan_dataset(shapes, validation_percentage=20, testing_percentage=0, quiet=True)
    head = zero_head()
    import time

    made, real, to_device = [], torch.optim.AdamW, ft._to_device
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    cfg = tiny(epochs=3, device="cpu")
    # A slow, busy machine with a budget for two 4-step epochs at most; then a slow one with a budget for all three.
    for budget, switched, delay in ((6.0, True, 0.5), (600.0, False, 0.1)):
        monkeypatch.setattr(ft, "_to_device", lambda *a, delay=delay: time.sleep(delay) or to_device(*a))
        logs: list[str] = []
        ft.finetune(ds.split("train"), ds.split("validation"), get_backbone("lite0"), head, cfg, logs.append,
                    time_budget=budget, anytime=True, rates_if_cut=GentlerIfCut(2, 1e-4, 0.5))
        said = [line for line in logs if "switching to the gentler rates" in line]
        rates = [group["initial_lr"] for group in made[-1].param_groups]
        if switched:
            assert len(said) == 1 and said[0].endswith("(head 0.0001, backbone 5e-05)") and rates == [1e-4, 5e-5]
        else:
            assert not said and rates == [cfg.learning_rate, cfg.learning_rate * cfg.backbone_lr_ratio], logs
