"""The GPU fine-tuning path, end to end: images/s including decoding, against a naive fp32 loop (issue #3).

    python benchmarks/bench_gpu.py --photos 20000 --out results/ [--rps ../shared/datasets/rock_paper_scissors]

Sections (each timed on its own; one failing does not stop the others):
1. steps: Lite0 training steps at 224 px on tensors already on the GPU (the network's ceiling),
   batch 256: naive fp32 (NCHW, no autocast), bf16 autocast, bf16 + channels_last.
2. photos: a folder of N generated 320x320 JPEG photos in 10 classes (bench_scale's shapes, drawn
   large, with noise), made with one process per core; decode: decoding them all once into memory
   (as held photos are) with a thread per core against a worker process per core.
3. naive: the obvious loop over those photos: each epoch decoded and distorted by PIL in a thread
   per core (retrain's CPU data path), fp32 network, the loss read every step. Images/s over one epoch.
4. retrain: `retrain.train(--mode finetune)` over the same folder, batch 256, three ways: photos
   decoded every epoch (bf16 + channels_last); held on the GPU after one decode (the default on
   a GPU); held + torch.compile. End-to-end fine-tuning images/s = images trained on / (one-off
   decode + all epochs, validation included); the steady rate is the last epoch's alone.
5. rps (with --rps): default GPU settings on rock_paper_scissors, test accuracy on testing/, and
   the same through `torchrun --standalone --nproc_per_node=1` (the NCCL/DDP path on one GPU).
Writes bench_gpu.json and prints a table last.

Measured on one H200 (2026-11-28, PyTorch 2.11, 16 cores; 20,000 photos, batch 256), images/s:
steps fp32 2,162, bf16 1,964, bf16 + channels_last 5,779; naive loop 405; retrain decoding every
epoch 532 (1.3x); held on the GPU 4,470 per epoch (11.0x), 1,173 all in over 2 epochs with the
20 s thread decode; held + compile 6,513 per epoch (16.1x), 727 all in over 3 epochs (38 s of
compiling). A fresh machine, 10,000 photos: decoding 1,381/s in threads, 2,308/s in processes;
first epoch 35 s (warm-up), then 4,474. rps at the GPU defaults: 0.951 on testing/ (N=470).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import SHAPES, draw_shape  # noqa: E402

RESULTS: dict = {}
DEVICE = "cuda"  # --dry-run: "cpu", tiny sizes, to check this script before spending GPU time


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def section(name: str):
    """Run a section, keep what it returns under RESULTS[name], print a traceback instead of stopping."""
    def wrap(fn):
        def run(*a, **k):
            print(f"== {name}", flush=True)
            start = time.perf_counter()
            try:
                RESULTS[name] = fn(*a, **k) | {"wall_s": round(time.perf_counter() - start, 1)}
            except Exception:
                traceback.print_exc()
                RESULTS[name] = {"error": traceback.format_exc(limit=3)}
            print(json.dumps(RESULTS[name], default=str)[:1500], flush=True)
        return run
    return wrap


def _network(classes: int):
    import torch

    from retrain.backbones import get_backbone
    from retrain.finetune import Network

    layers = [(np.zeros((1280, classes), np.float32), np.zeros(classes, np.float32))]
    return Network(get_backbone("lite0").torch_network(), layers).to(DEVICE).train(), torch


@section("steps")
def step_rates(batch: int, steps: int) -> dict:
    """Images/s of forward + backward + AdamW on one batch held on the GPU."""
    import torch.nn.functional as F

    out = {}
    for name, bf16, channels_last in (("fp32", False, False), ("bf16", True, False), ("bf16+channels_last", True, True)):
        net, torch = _network(10)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, 224, 224, device=DEVICE).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,), device=DEVICE)
        for i in range(steps + 5):
            if i == 5:
                sync()
                start = time.perf_counter()
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        out[name] = round(batch * steps / (time.perf_counter() - start), 1)
    return out


def _draw_chunk(args: tuple[Path, int, int]) -> int:
    folder, start, stop = args
    for i in range(start, stop):
        kind = SHAPES[i % len(SHAPES)]
        draw_shape(kind, np.random.default_rng([7, i]), 320).save(folder / kind / f"p{i:07d}.jpg", quality=90)
    return stop - start


@section("photos")
def make_photos(folder: Path, n: int) -> dict:
    for kind in SHAPES:
        (folder / kind).mkdir(parents=True, exist_ok=True)
    chunks = [(folder, s, min(n, s + 500)) for s in range(0, n, 500)]
    with Pool(os.cpu_count()) as pool:
        made = sum(pool.map(_draw_chunk, chunks))
    return {"images": made, "bytes": sum(f.stat().st_size for f in folder.rglob("*.jpg"))}


@section("decode")
def decode_rates(folder: Path, limit: int) -> dict:
    """One-off decode into memory (what held photos cost first): threads against worker processes."""
    from retrain.data import stored_preprocessing
    from retrain.decode import decode_all
    from retrain.preprocess import Preprocessing

    paths = sorted(folder.rglob("*.jpg"))[:limit]
    prep, out = stored_preprocessing(Preprocessing(), 224), {"images": len(paths)}
    for name, processes in (("threads", False), ("processes", True)):
        start = time.perf_counter()
        decode_all(paths, prep, os.cpu_count() or 1, processes=processes)
        out[name + "_images_per_second"] = round(len(paths) / (time.perf_counter() - start), 1)
    return out


@section("naive")
def naive_loop(folder: Path, batch: int) -> dict:
    """One epoch of the plain loop: decode + distort on the CPU every epoch, fp32, loss read every step."""
    import torch.nn.functional as F

    from retrain.augment import Augment
    from retrain.data import train_batches
    from retrain.preprocess import Preprocessing, normalize_torch
    from retrain.scan import scan_dataset

    samples = scan_dataset(folder, quiet=True).split("train")
    net, torch = _network(len(SHAPES))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    prep, seen, losses = Preprocessing(), 0, []
    sync()
    start = time.perf_counter()
    for images, labels in train_batches(samples, Augment(size=224), batch, 0, 1, os.cpu_count() or 1):
        x = normalize_torch(torch.from_numpy(images).to(DEVICE), prep)
        loss = F.cross_entropy(net(x), torch.from_numpy(labels).to(DEVICE))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        seen += len(labels)
    seconds = time.perf_counter() - start
    return {"images": seen, "seconds": round(seconds, 1), "images_per_second": round(seen / seconds, 1),
            "first_loss": losses[0], "last_loss": losses[-1]}


def _retrain_run(folder: Path, cache: Path, epochs: int, batch: int, **finetune) -> dict:
    import retrain
    from retrain.api import TrainConfig
    from retrain.config import FinetuneConfig

    logs: list[str] = []
    cfg = TrainConfig(mode="finetune", cache_dir=str(cache), workers=os.cpu_count() or 2, quiet=True,
                      finetune=FinetuneConfig(device=DEVICE, epochs=epochs, batch_size=batch, patience=None, **finetune))
    start = time.perf_counter()
    model = retrain.train(folder, cfg, log=logs.append)
    wall = time.perf_counter() - start
    history = [e for e in model.metrics.finetune.history if e["epoch"] >= 1]
    decoded = next((float(m.group(1)) for line in logs if (m := re.search(r"Decoded \d+ photos .* in ([\d.]+) s", line))),
                   0.0)
    trained = sum(e["images_per_second"] * e["seconds"] for e in history)
    validation = [float(m.group(1)) for line in logs if (m := re.search(r"Validation accuracy = ([\d.]+)%", line))]
    return {"test_accuracy": model.metrics.test_accuracy, "validation_accuracy": validation[-1] if validation else None,
            "n": model.metrics.num_images, "stage_seconds": model.metrics.seconds, "wall_s_train_call": round(wall, 1),
            "decode_once_s": decoded,
            "epoch_seconds": [e["seconds"] for e in history],
            "epoch_images_per_second": [round(e["images_per_second"], 1) for e in history],
            "end_to_end_images_per_second": round(trained / (decoded + sum(e["seconds"] for e in history)), 1),
            "log": [line for line in logs if "Epoch" in line or "Decoded" in line or f"on {DEVICE}" in line][:12]}


@section("retrain_files")
def retrain_files(folder: Path, cache: Path, batch: int) -> dict:
    return _retrain_run(folder, cache, 2, batch, hold_images=False)


@section("retrain_held")
def retrain_held(folder: Path, cache: Path, batch: int) -> dict:
    return _retrain_run(folder, cache, 2, batch)


@section("retrain_held_compile")
def retrain_held_compile(folder: Path, cache: Path, batch: int) -> dict:
    return _retrain_run(folder, cache, 3, batch, compile=True)


@section("rps")
def rps_accuracy(rps: Path, cache: Path) -> dict:
    import retrain
    from retrain.api import TrainConfig
    from retrain.config import FinetuneConfig

    start = time.perf_counter()
    model = retrain.train(rps, TrainConfig(mode="finetune", cache_dir=str(cache), workers=os.cpu_count() or 2,
                                           quiet=True, finetune=FinetuneConfig(device=DEVICE)))
    return {"test_accuracy": model.metrics.test_accuracy, "n": model.metrics.num_images,
            "stage_seconds": model.metrics.seconds, "train_call_s": round(time.perf_counter() - start, 1),
            "history": [{k: round(v, 4) for k, v in e.items()} for e in model.metrics.finetune.history]}


@section("torchrun")
def torchrun_rps(rps: Path, cache: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "retrain",
           "train", str(rps), "--mode", "finetune", "--device", DEVICE, "--epochs", "3", "--cache_dir", str(cache),
           "--output", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).splitlines()
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "lines": [line for line in lines
                      if re.search(r"Train accuracy|Final test|Decoded|rror|on (cuda|cpu) at", line)][-12:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rps", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_gpu"))
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--skip", nargs="*", default=[], help="sections to leave out")
    ap.add_argument("--only", nargs="*", help="run only these sections")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, to check the script itself")
    args = ap.parse_args()
    import torch

    global DEVICE
    DEVICE = "cpu" if args.dry_run else "cuda"
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "none (dry run)"
    RESULTS["device"] = {"gpu": gpu, "torch": torch.__version__, "cpus": os.cpu_count()}
    print(RESULTS["device"], flush=True)
    folder, cache = args.work / "photos", args.work / "cache"
    todo = [("steps", lambda: step_rates(args.batch, args.steps)),
            ("photos", lambda: make_photos(folder, args.photos)),
            ("decode", lambda: decode_rates(folder, args.photos)),
            ("naive", lambda: naive_loop(folder, args.batch)),
            ("retrain_files", lambda: retrain_files(folder, cache, args.batch)),
            ("retrain_held", lambda: retrain_held(folder, cache, args.batch)),
            ("retrain_held_compile", lambda: retrain_held_compile(folder, cache, args.batch))]
    if args.rps:
        todo += [("rps", lambda: rps_accuracy(args.rps, cache)),
                 ("torchrun", lambda: torchrun_rps(args.rps, cache, args.work / "rps_model"))]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, fn in todo:
        if name not in args.skip and (not args.only or name in args.only):
            fn()
            (args.out / "bench_gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print_table()


def print_table() -> None:
    naive = RESULTS.get("naive", {}).get("images_per_second")
    print(f"\n{'what':<46} {'img/s':>9} {'x naive':>8}")
    for name, rate in RESULTS.get("steps", {}).items():
        if name != "wall_s":
            print(f"{'steps only, ' + name:<46} {rate:>9}")
    rows = [("naive fp32 loop, decode every epoch", naive)]
    for key, label in (("retrain_files", "retrain, decode every epoch"), ("retrain_held", "retrain, held on GPU"),
                       ("retrain_held_compile", "retrain, held + compile")):
        r = RESULTS.get(key, {})
        rows.append((label + " (end to end)", r.get("end_to_end_images_per_second")))
        if r.get("epoch_images_per_second"):
            rows.append((label + " (last epoch)", r["epoch_images_per_second"][-1]))
    for label, rate in rows:
        ratio = f"{rate / naive:8.2f}" if rate and naive else ""
        print(f"{label:<46} {rate if rate is not None else 'n/a':>9} {ratio}")
    for key in ("rps", "torchrun"):
        if key in RESULTS:
            print(key, json.dumps({k: v for k, v in RESULTS[key].items() if k != "history"}, default=str)[:600])


if __name__ == "__main__":
    main()
