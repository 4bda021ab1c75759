"""Feature-extraction throughput: cold (empty cache) vs warm rerun, and a serial baseline.

Run: python benchmarks/bench_features.py [IMAGE_DIR] [--backbone lite0]
Prints images/s end to end for a cold run of the pipelined extractor, for a serial
decode-then-infer loop over the same images (the baseline), and the warm rerun's wall time
as a fraction of the cold one. Uses a fresh temporary feature cache; the exported backbone is
reused from the normal cache so its one-off export is not timed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from retrain.backbones import get_backbone
from retrain.decode import UnreadableImage, load_image
from retrain.features import compute_features
from retrain.runtime import inference_session
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image_dir", nargs="?", default=str(DEFAULT))
    ap.add_argument("--backbone", default="lite0")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    cache = default_cache_dir()
    backbone = get_backbone(args.backbone)
    extractor_path(backbone, cache)  # export once, untimed

    with tempfile.TemporaryDirectory() as store:
        t0 = time.perf_counter()
        ds = scan_dataset(args.image_dir, validation_percentage=0, testing_percentage=0, quiet=True)
        found, _ = compute_features(ds.samples, backbone, cache, Path(store), workers=args.workers, quiet=True)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = scan_dataset(args.image_dir, validation_percentage=0, testing_percentage=0, quiet=True)
        compute_features(ds.samples, backbone, cache, Path(store), quiet=True)
        warm = time.perf_counter() - t0
    n = len(ds.samples)
    serial = serial_baseline(ds.samples, backbone, cache)
    print(f"images: {n} ({len(found)} distinct contents), backbone {backbone.name}")
    print(f"cold scan+hash+decode+extract: {cold:.2f} s = {n / cold:.1f} images/s")
    print(f"serial decode-then-infer baseline: {serial:.2f} s = {n / serial:.1f} images/s")
    print(f"pipelined / serial throughput: {serial / cold:.2f}x")
    print(f"warm rerun (scan+hash+cache lookup): {warm:.2f} s = {warm / cold:.3f} of cold")


if __name__ == "__main__":
    main()
