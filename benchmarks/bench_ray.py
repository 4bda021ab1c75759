"""--engine ray against the local path (issue #8): images/s of feature extraction and prediction.

    python benchmarks/bench_ray.py                       # 3000 generated 32x32 PNGs, tiny ONNX CNN
    python benchmarks/bench_ray.py --n 5000 --workers 1 2
    python benchmarks/bench_ray.py --n 200 --backbone lite0     # a real backbone: inference dominates

On one machine it runs the local path (decode threads + one ONNX Runtime session in this process),
then for each worker count K a fresh local Ray with num_cpus=K (K task slots). Every measurement
starts from an empty feature store. Ray's start-up is timed on its own; extraction is timed twice:
cold (worker processes start and build their sessions, as in a one-off `retrain train --engine ray`)
and warm (a second folder's worth on the same workers, as on a long-lived cluster). Prediction is
predict_to_file of the whole folder to CSV with a model trained on the local features.

The default backbone is bench_scale.py's tiny CNN, so the numbers show the engine's own cost (task
round trips, pickling batches, the ordered window) against the local path's (one process: its
decode threads and the driver's Python share one GIL); with --backbone lite0 inference dominates. Ray pays off with more cores or more machines, not on a 2-core box
where the local path already keeps both cores busy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import make_synthetic_folder, tiny_backbone  # noqa: E402


def extraction(samples, backbone, store: Path, engine=None) -> float:
    """Images per second of compute_features into an empty store (the extractor is already exported)."""
    from retrain.features import compute_features
    from retrain.files import default_cache_dir
    from retrain.graphs import extractor_path

    start = time.perf_counter()
    found, failures = compute_features(samples, backbone, extractor_path(backbone, default_cache_dir()), store,
                                       batch_size=32, workers=2, quiet=True, engine=engine)
    assert len(found) == len(samples) and not failures
    return len(samples) / (time.perf_counter() - start)


def prediction(model: Path, folder: Path, out: Path, n: int, engine=None) -> float:
    """Images per second of predict_to_file over the folder."""
    from retrain.prediction import load, predict_to_file

    start = time.perf_counter()
    assert predict_to_file(load(model, engine=engine), [folder], out, top_k=3).rows == n
    return n / (time.perf_counter() - start)


def local_run(samples, backbone, spec: str, folder: Path, work: Path, n: int) -> tuple[dict, Path]:
    """The local path's numbers, and a model trained on its features (reused from its store)."""
    import retrain
    from retrain.api import TrainConfig
    from retrain.head import HeadConfig

    result = {"engine": "local", "workers": "-", "start_s": 0.0,
              "extract_cold": extraction(samples, backbone, work / "local")}
    result["extract_warm"] = extraction(samples, backbone, work / "local2")
    cfg = TrainConfig(backbone=spec, bottleneck_dir=str(work / "local"), quiet=True, head=HeadConfig(steps=200))
    model = work / "model"
    retrain.train(folder, cfg).save(model, report=False)
    result["predict"] = prediction(model, folder, work / "local.csv", n)
    return result, model


def ray_run(samples, backbone, folder: Path, work: Path, n: int, k: int, model: Path) -> dict:
    import ray

    from retrain.engine import RayEngine

    start = time.perf_counter()
    ray.init(num_cpus=k, include_dashboard=False, logging_level="WARNING")
    result = {"engine": "ray", "workers": k, "start_s": time.perf_counter() - start}
    try:
        with RayEngine() as engine:
            result["extract_cold"] = extraction(samples, backbone, work / f"ray{k}", engine)
            result["extract_warm"] = extraction(samples, backbone, work / f"ray{k}b", engine)
            result["predict"] = prediction(model, folder, work / f"ray{k}.csv", n, engine)
    finally:
        ray.shutdown()
    rows = [(work / name).read_text() for name in ("local.csv", f"ray{k}.csv")]
    result["same_rows"] = rows[0] == rows[1]
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=3000, help="generated images")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray CPUs (task slots) to try")
    p.add_argument("--root", default="/tmp/retrain-ray-bench")
    p.add_argument("--backbone", help="lite0, lite1, lite2 or an .onnx file (default: a tiny generated CNN)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import shutil

    from retrain.backbones import get_backbone
    from retrain.files import default_cache_dir
    from retrain.graphs import extractor_path
    from retrain.scan import scan_dataset

    root = Path(args.root)
    folder = make_synthetic_folder(root, args.n)
    work = root / f"run_{args.n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = args.backbone or str(tiny_backbone(root / "tiny_cnn.onnx"))
    backbone = get_backbone(spec)
    extractor_path(backbone, default_cache_dir())  # exported once, outside the timings
    samples = scan_dataset(folder, quiet=True).samples
    first, model = local_run(samples, backbone, spec, folder, work, args.n)
    results = [first] + [ray_run(samples, backbone, folder, work, args.n, k, model) for k in args.workers]
    print(f"{args.n} images, {backbone.name} ({backbone.feature_dim} features), images/s:")
    print(f"{'engine':<7} {'workers':>7} {'start s':>8} {'extract cold':>13} {'extract warm':>13} {'predict':>8}")
    for r in results:
        print(f"{r['engine']:<7} {r['workers']:>7} {r['start_s']:>8.1f} {r['extract_cold']:>13.0f} "
              f"{r['extract_warm']:>13.0f} {r['predict']:>8.0f}" + ("" if r.get("same_rows", True) else "  ROWS DIFFER"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
