"""`retrain export` per shared dataset, side by side in one run: fp32 vs int8 vs a naive PyTorch loop, and
the any-size model's agreement with `retrain predict`.

Run: python benchmarks/bench_export.py [--datasets hymenoptera rock_paper_scissors sign_language_digits intel_scenes]
         [--agreement_photos 400] [--cache_dir DIR]

For each dataset, a Lite0 head is trained as `retrain train DATASET` would (features cached in
--cache_dir), then, in this one process:
- speed: images/s at batch 1 and 32 of the fp32 model.onnx and its int8 export in ONNX Runtime, and
  of the same classifier in PyTorch eager fed one image at a time in a Python loop (the naive
  baseline, timed at batch 1 only since it loops anyway), on the same photos; the runners take
  turns, median of 3 (batch 1) or 5 (batch 32), so other load on the machine falls on all alike.
  Quote the ratios: absolute rates move with that load.
- size and validation/test accuracy of fp32 and int8 (export's own steps; the verdict is what
  `retrain export --int8` would do with the default 0.5-point tolerance).
- any size: photos decoded whole by PIL, as a user's own code would, through model_any_size.onnx,
  against `retrain predict`'s pipeline (JPEG draft decoding, PIL resize and crop, model.onnx):
  same top-1 label, and the largest probability difference. --agreement_photos evenly spaced
  photos per dataset (all splits), 0 for all.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import retrain
from retrain.api import TrainConfig
from retrain.decode import open_rgb
from retrain.config import DEFAULT_TOLERANCE, ExportConfig
from retrain.export import (calibration_images, compare_accuracy, compare_speed,
                            cpu_instructions, ort_runner, quantize, training_dataset)
from retrain.runtime import inference_session
from retrain.graphs import any_size_model, tidy_opsets
from retrain.prediction import Classifier, load
from retrain.preprocess import IMAGE_NAME

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATASETS = ["hymenoptera", "rock_paper_scissors", "sign_language_digits", "intel_scenes"]


def torch_loop(model: onnx.ModelProto, clf: Classifier):
    """The classifier in PyTorch eager, one image at a time in a Python loop: the naive baseline."""
    import torch

    from retrain.backbones import get_backbone
    from retrain.preprocess import normalize_torch

    torch.set_num_threads(os.cpu_count() or 1)
    weights = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer
               if t.name.startswith("head_")}
    layers = [(weights[f"head_w{i}"], weights[f"head_b{i}"]) for i in range(len(weights)) if f"head_w{i}" in weights]
    net = get_backbone(clf.metadata["retrain:backbone"]).torch_network().eval()

    def classify(image: np.ndarray):
        x = net(normalize_torch(torch.from_numpy(image[None]), clf.prep))
        for i, (w, b) in enumerate(layers):
            x = x @ w + b
            x = torch.relu(x) if i < len(layers) - 1 else x
        return torch.softmax(x / weights["head_temperature"], dim=-1)

    def run(batch: np.ndarray) -> list:
        with torch.inference_mode():
            return [classify(image) for image in batch]
    return run


def whole_photo(path: Path) -> np.ndarray:
    """The photo decoded at full size (no JPEG draft scaling), upright, RGB: what a user's code hands over."""
    return np.asarray(open_rgb(path, sys.maxsize))


def agreement(clf: Classifier, any_size: ort.InferenceSession, paths: list[Path]) -> dict[str, dict]:
    """The any-size model against `retrain predict`, fed the whole photo (as users would) and fed the decode
    retrain itself makes (JPEG draft scaling for photos over twice the resize target: isolates the graph)."""
    decoders = {"the whole photo": whole_photo,
                "retrain's own decode": lambda p: np.asarray(open_rgb(p, clf.prep.resize_target()))}
    agree, diffs = {k: 0 for k in decoders}, {k: [] for k in decoders}
    for i, probs, error in clf.probabilities_of(paths):
        if error:
            continue
        for name, decode in decoders.items():
            ours = any_size.run(None, {IMAGE_NAME: decode(paths[i])})[0][0]
            agree[name] += int(ours.argmax() == probs.argmax())
            diffs[name].append(float(np.abs(ours - probs).max()))
    return {name: {"n": len(d), "top1": agree[name] / len(d), "within_0.02": float(np.mean(np.array(d) <= 0.02)),
                   "max_diff": max(d)} for name, d in diffs.items()}


def bench(name: str, cache_dir: str, work: Path, agreement_photos: int) -> None:
    model_dir = retrain.train(SHARED / name, TrainConfig(cache_dir=cache_dir, quiet=True, mode="head")).save(work / name,
                                                                                                  report=False)
    clf = load(model_dir)
    model = tidy_opsets(onnx.load(str(clf.path)))
    dataset = training_dataset(clf, None, print)
    calibration = calibration_images(dataset.split("train"), clf, ExportConfig())
    quantized = quantize(model, calibration, work)
    int8 = inference_session(quantized.SerializeToString())
    runners = {"fp32": ort_runner(clf.session), "int8": ort_runner(int8)}
    # The PyTorch loop takes images one at a time whatever the batch: timed once, at batch 1.
    speed = compare_speed(runners | {"torch": torch_loop(model, clf)}, calibration, batches=(1,), rounds=3)
    for runner, rates in compare_speed(runners, calibration, batches=(32,)).items():
        speed[runner] |= rates
    accuracy, images, agree = compare_accuracy(clf.session, int8, dataset, clf, workers=2)
    drops = {s: 100 * (accuracy["fp32"][s] - accuracy["int8"][s]) for s in images}
    b1, b32 = (lambda k: speed[k]["batch_1"]), (lambda k: speed[k].get("batch_32", speed[k]["batch_1"]))
    print(f"\n== {name}")
    print(f"images/s batch 1:  fp32 {b1('fp32'):.1f}  int8 {b1('int8'):.1f}  torch loop {b1('torch'):.1f}  "
          f"int8/fp32 {b1('int8') / b1('fp32'):.2f}x  fp32/torch {b1('fp32') / b1('torch'):.2f}x")
    print(f"images/s batch 32: fp32 {b32('fp32'):.1f}  int8 {b32('int8'):.1f}  torch loop {b32('torch'):.1f}  "
          f"int8/fp32 {b32('int8') / b32('fp32'):.2f}x  int8/torch {b32('int8') / b32('torch'):.2f}x")
    print(f"size: fp32 {clf.path.stat().st_size / 1e6:.1f} MB, int8 {quantized.ByteSize() / 1e6:.1f} MB "
          f"({quantized.ByteSize() / clf.path.stat().st_size:.2f})")
    for split, n in images.items():
        print(f"{split} accuracy (N={n}): fp32 {100 * accuracy['fp32'][split]:.1f}%  int8 "
              f"{100 * accuracy['int8'][split]:.1f}%  ({0 - drops[split]:+.1f} points)")
    verdict = "kept" if all(d <= DEFAULT_TOLERANCE for d in drops.values()) else "refused"
    print(f"same top-1: {100 * agree:.1f}%; `retrain export --int8` (tolerance {DEFAULT_TOLERANCE}): {verdict}")
    paths = list(dataset.samples.paths)
    if agreement_photos:
        paths = [paths[int(i)] for i in np.unique(np.linspace(0, len(paths) - 1, agreement_photos).astype(int))]
    anywhere = inference_session(any_size_model(model, clf.prep).SerializeToString())
    for fed, a in agreement(clf, anywhere, paths).items():
        print(f"any size fed {fed} vs retrain predict (N={a['n']} of {len(dataset.samples)}): same top-1 "
              f"{100 * a['top1']:.2f}%, probabilities within 0.02 {100 * a['within_0.02']:.2f}%, largest difference "
              f"{a['max_diff']:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    ap.add_argument("--agreement_photos", type=int, default=400, help="photos per dataset for any-size (0: all)")
    ap.add_argument("--cache_dir", help="feature cache (default: a temporary one, so features are extracted cold)")
    args = ap.parse_args()
    print(f"CPU: {os.cpu_count()} cores; {', '.join(cpu_instructions()) or 'no AVX2/VNNI flags'}; "
          f"onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            bench(name, args.cache_dir or str(Path(tmp) / "cache"), Path(tmp), args.agreement_photos)


if __name__ == "__main__":
    main()
