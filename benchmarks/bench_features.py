"""Feature-extraction throughput: cold (empty cache) against the model alone, baselines, and a warm rerun.

Run: python benchmarks/bench_features.py [IMAGE_DIR] [--backbone lite0] [--torch_images 64]
Prints, in one process: the model-only rate (the extractor on random uint8 batches of 32, timed
before and after the cold run, averaged), images/s end to end for a cold run (scan, hash, decode,
extract, store) and its ratio to the model-only rate; the same decode-and-infer pipeline with
ONNX Runtime's threads spinning (the setting before extraction turned it off); a serial
decode-then-infer loop; a naive PyTorch-eager loop (PIL decode, then the network one image at a
time, over the first --torch_images); and the warm rerun's wall time as a fraction of the cold one.
Uses a fresh temporary feature cache; the exported backbone is reused from the normal cache so its
one-off export is not timed. Other load on the machine moves every rate: compare within one run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from retrain.backbones import get_backbone
from retrain.decode import UnreadableImage, load_image
from retrain.features import compute_features
from retrain.runtime import inference_session, run_model
from retrain.files import default_cache_dir
from retrain.graphs import extractor_path
from retrain.scan import scan_dataset

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "rock_paper_scissors" / "training"


def serial_baseline(samples, backbone, cache: Path, batch_size: int = 32) -> float:
    """Decode a batch, then infer it, one after the other: no overlap."""
    session = inference_session(extractor_path(backbone, cache))
    start = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        arrays = []
        for s in samples[i:i + batch_size]:
            try:
                arrays.append(load_image(s.path, backbone.prep))
            except UnreadableImage:
                pass
        session.run(None, {"Placeholder": np.stack(arrays)})
    return time.perf_counter() - start


def model_only(backbone, cache: Path, batches: int = 4) -> float:
    """images/s of the extractor alone on random uint8 batches of 32 (one warm-up batch)."""
    session = inference_session(extractor_path(backbone, cache))
    x = np.random.default_rng(0).integers(0, 256, (32, backbone.prep.size, backbone.prep.size, 3), np.uint8)
    session.run(None, {"Placeholder": x})
    start = time.perf_counter()
    for _ in range(batches):
        session.run(None, {"Placeholder": x})
    return 32 * batches / (time.perf_counter() - start)


def spinning_pipeline(samples, backbone, cache: Path, workers: int) -> float:
    """Seconds for the decode-and-infer pipeline with ONNX Runtime's threads spinning (no cache)."""
    session = inference_session(extractor_path(backbone, cache), spinning=True)
    start = time.perf_counter()
    for _ in run_model(session, samples.paths, backbone.prep, 32, workers):
        pass
    return time.perf_counter() - start


def torch_loop(samples, backbone, n: int) -> float:
    """images/s of the naive loop: decode one photo with PIL, run the PyTorch network on it, repeat."""
    import torch

    from retrain.preprocess import normalize_torch

    torch.set_num_threads(os.cpu_count() or 1)
    net = backbone.torch_network().eval()
    paths = list(samples.paths)[:n]
    start = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            try:
                net(normalize_torch(torch.from_numpy(load_image(path, backbone.prep)[None]), backbone.prep))
            except UnreadableImage:
                pass
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image_dir", nargs="?", default=str(DEFAULT))
    ap.add_argument("--backbone", default="lite0")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--torch_images", type=int, default=64, help="photos for the PyTorch loop (it is slow)")
    args = ap.parse_args()
    cache = default_cache_dir()
    backbone = get_backbone(args.backbone)
    extractor_path(backbone, cache)  # export once, untimed

    before = model_only(backbone, cache)
    with tempfile.TemporaryDirectory() as store:
        t0 = time.perf_counter()
        ds = scan_dataset(args.image_dir, validation_percentage=0, testing_percentage=0, quiet=True)
        found, _ = compute_features(ds.samples, backbone, extractor_path(backbone, cache), Path(store),
                                    workers=args.workers, quiet=True)
        cold = time.perf_counter() - t0
        after = model_only(backbone, cache)
        t0 = time.perf_counter()
        ds = scan_dataset(args.image_dir, validation_percentage=0, testing_percentage=0, quiet=True)
        compute_features(ds.samples, backbone, extractor_path(backbone, cache), Path(store), quiet=True)
        warm = time.perf_counter() - t0
    n = len(ds.samples)
    serial = serial_baseline(ds.samples, backbone, cache)
    spinning = spinning_pipeline(ds.samples, backbone, cache, args.workers)
    naive = torch_loop(ds.samples, backbone, args.torch_images)
    alone = (before + after) / 2
    print(f"images: {n} ({len(found)} distinct contents), backbone {backbone.name}, {os.cpu_count()} cores")
    print(f"model only, random batches of 32: {alone:.1f} images/s (before {before:.1f}, after {after:.1f})")
    print(f"cold scan+hash+decode+extract: {cold:.2f} s = {n / cold:.1f} images/s = "
          f"{n / cold / alone:.2f} of model only")
    print(f"decode+extract with ONNX Runtime threads spinning: {n / spinning:.1f} images/s = "
          f"{n / spinning / alone:.2f} of model only")
    print(f"naive PyTorch loop (PIL decode, eager network, one image at a time; {args.torch_images} photos): "
          f"{naive:.1f} images/s; cold retrain is {n / cold / naive:.1f}x that")
    print(f"serial decode-then-infer baseline: {serial:.2f} s = {n / serial:.1f} images/s")
    print(f"pipelined / serial throughput: {serial / cold:.2f}x")
    print(f"warm rerun (scan+hash+cache lookup): {warm:.2f} s = {warm / cold:.3f} of cold")


if __name__ == "__main__":
    main()
