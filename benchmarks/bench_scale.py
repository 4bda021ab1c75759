"""One machine, any size: peak memory and throughput per stage as the folder grows (issue #8).

    python benchmarks/bench_scale.py --sizes 2000 20000           # tiny generated ONNX CNN (default)
    python benchmarks/bench_scale.py --sizes 20000 --backbone lite0
    python benchmarks/bench_scale.py --generate 200000            # only make the synthetic folder

For each size N it makes (or reuses) a folder of N generated 32x32 PNGs of coloured shapes in
10 classes, then runs scan -> extract -> train -> predict in a fresh child process with an
empty feature cache, so each size's memory is its own: one child for what `retrain train` does
(scan_dataset + the scan-only checks, compute_features, feature_matrices + train_head, export),
one for `retrain predict MODEL FOLDER --output predictions.csv` (predict_to_file).

Memory, per stage and for the whole child:
- peak RSS: the kernel's high-water mark VmHWM, reset at each stage start through
  /proc/self/clear_refs (a process's peak is the largest of its stages'). It counts resident pages
  of memory-mapped files too (page cache the kernel may drop at any time);
- peak anonymous RSS: RssAnon sampled every 10 ms: the heap, what memory pressure cannot evict.

What grows with N in the train process, by design: the sample table (~66 bytes an image), the
feature store's index (40 bytes a record) and the splits' row numbers (8 bytes an image), ~115 MB
at a million images. Peak RSS also counts the pages of the feature store file (4 * dim + 36 bytes
a record) and of memory-mapped feature matrices (4 * dim bytes a row) that the process has
touched: page cache, so it grows with N while the anonymous figure stays near flat. After each
stage `retrain train` hands the heap that stage freed back to the OS (glibc's malloc_trim; the
child does the same): without it the scan's and extraction's temporaries stayed in the heap and
the 200k train process peaked 29% above the 20k one instead of 17%.

The default backbone is a tiny random CNN (2 convolutions, 256 features) written with onnx.helper,
so the numbers measure the pipeline (walk, hash, decode, store, matrix, head, CSV) rather than
EfficientNet's arithmetic; --backbone lite0 (or any .onnx) measures the real thing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = ("circle", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "diagonal", "dots", "checker")
COMPLETE_MARK = ".complete"  # hidden, so the scan ignores it


# ---------------------------------------------------------------- the synthetic folder

def draw_shape(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One image of a shape class: random colours, position and scale, a little noise."""
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int(v) for v in (np.array(bg) + rng.integers(96, 160, 3)) % 256)  # always far from bg
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.25, 0.45)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    box = [cx - r, cy - r, cx + r, cy + r]
    step = int(rng.integers(3, 6))
    if kind == "circle":
        d.ellipse(box, fill=fg)
    elif kind == "square":
        d.rectangle(box, fill=fg)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif kind == "cross":
        d.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=fg)
        d.rectangle([cx - r / 4, cy - r, cx + r / 4, cy + r], fill=fg)
    elif kind == "ring":
        d.ellipse(box, outline=fg, width=max(2, int(r / 3)))
    elif kind == "hstripes":
        for y in range(0, size, 2 * step):
            d.rectangle([0, y, size, y + step - 1], fill=fg)
    elif kind == "vstripes":
        for x in range(0, size, 2 * step):
            d.rectangle([x, 0, x + step - 1, size], fill=fg)
    elif kind == "diagonal":
        d.line([(0, 0), (size, size)], fill=fg, width=max(2, int(r / 2)))
    elif kind == "dots":
        for y in range(step, size, 2 * step):
            for x in range(step, size, 2 * step):
                d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=fg)
    else:  # checker
        for y in range(0, size, step):
            for x in range((y // step % 2) * step, size, 2 * step):
                d.rectangle([x, y, x + step - 1, y + step - 1], fill=fg)
    noise = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def make_synthetic_folder(root: str | os.PathLike, n: int, *, size: int = 32, seed: int = 0) -> Path:
    """ROOT/shapes_N/<shape>/img_XXXXXXX.png: N images, class i % 10 for image i; reused if complete."""
    folder = Path(root) / f"shapes_{n}"
    mark = folder / COMPLETE_MARK
    if mark.exists() and mark.read_text() == f"{n} {size} {seed}\n":
        return folder
    rng = np.random.default_rng(seed)
    for kind in SHAPES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        kind = SHAPES[i % len(SHAPES)]
        draw_shape(kind, rng, size).save(folder / kind / f"img_{i:07d}.png", compress_level=1)
    mark.write_text(f"{n} {size} {seed}\n")
    return folder


def tiny_backbone(path: str | os.PathLike, size: int = 32, seed: int = 0) -> Path:
    """A random 2-convolution CNN as ONNX, (N, 3, S, S) -> (N, 16 * (S/8)^2): stands in for a real backbone.

    Flattened rather than average-pooled, so the features keep where things are: enough for
    the head to tell the shapes apart (a check that labels and features stay aligned).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (16, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (16, 16, 3, 3)).astype(np.float32)
    side = size // 8
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p2"], ["out"], axis=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 16 * side * side])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


# ---------------------------------------------------------------- measuring a child run

def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


class StageMeter:
    """Seconds, peak RSS (VmHWM, reset per stage) and peak anonymous RSS (sampled) per stage."""

    def __init__(self):
        self.stages: dict[str, dict] = {}
        self.start_peak_mb = round(_status_kb("VmHWM") / 1024, 1)  # imports, before any stage
        self._anon_peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._anon_peak = max(self._anon_peak, _status_kb("RssAnon"))

    @contextmanager
    def __call__(self, name: str, items: int):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self._anon_peak = _status_kb("RssAnon")
        start = time.perf_counter()
        yield self.stages.setdefault(name, {})
        seconds = time.perf_counter() - start
        self._anon_peak = max(self._anon_peak, _status_kb("RssAnon"))
        self.stages[name] |= {"seconds": round(seconds, 2), "items": items,
                              "per_second": round(items / seconds, 1) if seconds else None,
                              "peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1),
                              "peak_anon_mb": round(self._anon_peak / 1024, 1)}


def run_child(args: argparse.Namespace) -> dict:
    """One process's stages on one folder: 'train' (scan, extract, train, export) or 'predict'."""
    meter = StageMeter()
    (train_stages if args.child == "train" else predict_stage)(args, meter)
    return {"stages": meter.stages,
            "peak_rss_mb": max([meter.start_peak_mb] + [  # not ru_maxrss: clear_refs resets it
                s["peak_rss_mb"] for s in meter.stages.values()]),
            "peak_anon_mb": max(s["peak_anon_mb"] for s in meter.stages.values())}


def train_stages(args: argparse.Namespace, meter: StageMeter) -> None:
    """What `retrain train` does, stage by stage (the head path of api._features_by_split and train)."""
    import onnx

    from retrain.pipeline import release_free_heap, usable_splits
    from retrain.backbones import get_backbone
    from retrain.checks import quick_summary
    from retrain.features import compute_features, feature_matrices, store_folder
    from retrain.graphs import classifier_model, extractor_path, model_metadata
    from retrain.head import HeadConfig, train_head
    from retrain.scan import scan_dataset

    work, image_dir, cache = Path(args.work), Path(args.image_dir), Path(args.work) / "cache"
    backbone = get_backbone(args.backbone)
    extractor = extractor_path(backbone, cache)  # export once, outside the timed stages
    with meter("scan", args.n):
        dataset = scan_dataset(image_dir, workers=4, quiet=True)
        quick_summary(dataset)  # the scan-only checks `retrain train` prints
        release_free_heap()  # as `retrain train` does after every stage
    with meter("extract", len(dataset.samples)):
        features, failures = compute_features(dataset.samples, backbone, extractor, store_folder(cache),
                                              workers=2, quiet=True)
        release_free_heap()
    with meter("train", len(dataset.samples)) as info:
        split = usable_splits(dataset, features.covers(dataset.samples), failures)
        limit = args.max_in_memory_mb << 20 if args.max_in_memory_mb is not None else None
        kw = {} if limit is None else {"max_in_memory": limit}
        x = feature_matrices(split, features, backbone.feature_dim, **kw)  # test too: evaluate uses it
        info["memory_mapped"] = isinstance(x["train"][0], np.memmap)
        head = train_head(*x["train"], *x["validation"], len(dataset.classes), HeadConfig(steps=args.steps),
                          log=lambda line: None)
        info |= {"steps": head.steps_run, "validation_accuracy": head.history[-1].get("validation_accuracy"),
                 "backbone": backbone.name, "feature_dim": backbone.feature_dim, "failures": len(failures)}
    model = classifier_model(onnx.load(str(extractor)), head.layers,
                             model_metadata(backbone, dataset.classes, {}))
    onnx.save(model, str(work / "model.onnx"))


def predict_stage(args: argparse.Namespace, meter: StageMeter) -> None:
    """What `retrain predict MODEL FOLDER --output predictions.csv --top-k 3` does."""
    from retrain.prediction import predict_to_file

    work = Path(args.work)
    with meter("predict", args.n) as info:
        summary = predict_to_file(work / "model.onnx", [args.image_dir], work / "predictions.csv", top_k=3)
        info |= {"rows": summary.rows, "failures": summary.failures}


# ---------------------------------------------------------------- driver

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--root", default="/tmp/retrain-scale", help="where folders, caches and outputs go")
    p.add_argument("--backbone", help="lite0, lite1, lite2 or an .onnx file (default: a tiny generated CNN)")
    p.add_argument("--steps", type=int, default=4000, help="head training steps (early stopping may end sooner)")
    p.add_argument("--max-in-memory-mb", type=int,
                   help="feature matrices above this go to a memory-mapped file (0: always; default: the library's)")
    p.add_argument("--generate", type=int, metavar="N", help="only make the synthetic folder of N images")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", choices=("train", "predict"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--image-dir", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_size(args: argparse.Namespace, n: int) -> dict:
    root = Path(args.root)
    start = time.perf_counter()
    folder = make_synthetic_folder(root, n)
    print(f"[{n}] folder {folder} ready in {time.perf_counter() - start:.0f} s "
          f"(made by: python benchmarks/bench_scale.py --root {root} --generate {n})", file=sys.stderr)
    work = root / f"run_{n}"
    subprocess.run(["rm", "-rf", str(work)], check=True)  # an empty cache: extraction is cold
    work.mkdir(parents=True)
    backbone = args.backbone or str(tiny_backbone(root / "tiny_cnn.onnx"))
    cmd = [sys.executable, __file__, "--n", str(n), "--image-dir", str(folder), "--work", str(work),
           "--backbone", backbone, "--steps", str(args.steps)]
    if args.max_in_memory_mb is not None:
        cmd += ["--max-in-memory-mb", str(args.max_in_memory_mb)]
    result = {"n": n, "processes": {}}
    for child in ("train", "predict"):  # two commands, as a user runs them
        out = subprocess.run(cmd + ["--child", child], check=True, stdout=subprocess.PIPE, text=True,
                             env=os.environ | {"RETRAIN_CACHE": str(work / "cache")}).stdout
        result["processes"][child] = json.loads(out.strip().splitlines()[-1])
    return result


def print_table(results: list[dict]) -> None:
    print(f"{'N':>8} {'stage':<8} {'seconds':>8} {'items/s':>9} {'peak RSS MB':>12} {'peak anon MB':>13}")
    for r in results:
        for proc in r["processes"].values():
            for name, s in proc["stages"].items():
                print(f"{r['n']:>8} {name:<8} {s['seconds']:>8.2f} {s['per_second']:>9.1f} "
                      f"{s['peak_rss_mb']:>12.1f} {s['peak_anon_mb']:>13.1f}")
        train, predict = r["processes"]["train"], r["processes"]["predict"]
        t = train["stages"]["train"]
        print(f"{r['n']:>8} peak RSS (anonymous) of the train process {train['peak_rss_mb']:.1f} MB "
              f"({train['peak_anon_mb']:.1f} MB), predict process {predict['peak_rss_mb']:.1f} MB "
              f"({predict['peak_anon_mb']:.1f} MB); {t['backbone']} ({t['feature_dim']} features), "
              f"{t['steps']} head steps, validation accuracy {t['validation_accuracy']:.3f}, "
              f"matrix memory-mapped: {t['memory_mapped']}, predictions rows {predict['stages']['predict']['rows']}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    if args.generate:
        print(make_synthetic_folder(args.root, args.generate))
        return
    results = [run_size(args, n) for n in args.sizes]
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
