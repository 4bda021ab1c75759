"""Whole-network fine-tuning rate on the CPU: retrain's training step beside a plain PyTorch loop.

Run: python benchmarks/bench_finetune_speed.py [--photos 96] [--size 160] [--steps 4] [--rounds 3] [--bf16]

Both loops train Lite0 with its head on the same decoded photos (rock_paper_scissors, or generated
images where the shared datasets are absent), batch 32, AdamW, in the same process, taking turns
round by round so that a busy machine slows both alike. The plain loop is what a first PyTorch
script does: fp32, NCHW, BatchNorm in training mode, the batch in one pass. retrain's step is
finetune.py's forward_backward: channels-last, pretrained BatchNorm in eval mode, the batch in
passes of pass_size() photos ("one pass": the same step with the whole batch at once); with --bf16
also that one pass under bfloat16 autocast (worth it only where the CPU has native bf16: see the
flags printed). Then validation, as fine-tuning runs it after every epoch (both views of each photo
at the inference size): finetune.predict_logits, in passes, beside the network on the whole batch
of 64 at once. Figures are photos per second; ratios are against the plain loop (training) or the
one pass (validation), since machines differ.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retrain.backbones import get_backbone
from retrain.decode import load_image
from retrain.finetune import Network, _set_train_mode, _trainable_stages, forward_backward, pass_size, predict_logits
from retrain.preprocess import normalize_torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "rock_paper_scissors" / "training"


def photos(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, S, 3) uint8 photos and labels: real ones where the shared datasets are present."""
    prep = replace(get_backbone("lite0").prep, size=size)
    every = sorted(SHARED.glob("*/*")) if SHARED.is_dir() else []
    paths = every[:: max(1, len(every) // n)][:n]
    if paths:
        images = np.stack([load_image(p, prep) for p in paths])
        labels = [sorted({p.parent.name for p in paths}).index(p.parent.name) for p in paths]
    else:
        images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        labels = [i % 3 for i in range(n)]
    return torch.from_numpy(images), torch.tensor(labels)


def network() -> tuple[Network, list]:
    torch.manual_seed(0)
    head = [(np.random.default_rng(0).normal(0, 0.01, (1280, 3)).astype(np.float32), np.zeros(3, np.float32))]
    net = Network(get_backbone("lite0").torch_network(), head)
    return net, _trainable_stages(net, -1)


def rate(kind: str, net: Network, trainable: list, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    """Images per second of `steps` training steps of one kind of loop."""
    prep, cpu = get_backbone("lite0").prep, torch.device("cpu")
    plain = kind == "plain"
    net = net.to(memory_format=torch.contiguous_format if plain else torch.channels_last)
    net.train() if plain else _set_train_mode(net, trainable)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    start, seen = time.perf_counter(), 0
    for step in range(steps):
        i = (np.arange(32) + 32 * step) % len(images)
        x = normalize_torch(images[i], prep)
        x = x if plain else x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        if kind in ("plain", "bf16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "bf16"):
                loss = F.cross_entropy(net(x).float(), labels[i])
            loss.backward()
        else:
            forward_backward(net, x, labels[i], 0.0, cpu, pass_size(net, x, cpu) if kind == "retrain" else len(x))
        opt.step()
        seen += 32
    return seen / (time.perf_counter() - start)


def validation_rate(kind: str, net: Network, images: torch.Tensor) -> float:
    """Photos per second of validation (both views at the inference size) in batches of 64."""
    prep, cpu = get_backbone("lite0").prep, torch.device("cpu")
    net = net.to(memory_format=torch.channels_last).eval()
    batches = [(images[s:s + 64].numpy(), np.zeros(len(images[s:s + 64]), np.int64)) for s in range(0, len(images), 64)]
    start = time.perf_counter()
    if kind == "retrain":
        predict_logits(net, iter(batches), prep, cpu)
    else:
        with torch.no_grad():
            for batch, _ in batches:
                net(normalize_torch(torch.from_numpy(batch), prep).contiguous(memory_format=torch.channels_last))
    return len(images) / (time.perf_counter() - start)


def in_turns(measure, kinds: list[str], rounds: int) -> dict[str, list[float]]:
    """Each kind measured once to warm up, then `rounds` times, taking turns."""
    for kind in kinds:  # warm-up: first calls pick kernels and allocate
        measure(kind)
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind in kinds:
            rates[kind].append(measure(kind))
    return rates


def show(rates: dict[str, list[float]], what: str, baseline: str) -> None:
    base = statistics.median(rates[baseline])
    for kind, values in rates.items():
        median = statistics.median(values)
        print(f"{kind:<9} {what}: median {median:6.1f} photos/s (min {min(values):.1f}, max {max(values):.1f}); "
              f"ratio to {baseline} {median / base:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=96)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="also time retrain's step under bfloat16 autocast")
    args = ap.parse_args()
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"bf16 flags: {sorted({f for f in flags if 'bf16' in f or f.startswith('amx')}) or 'none'}")
    images, labels = photos(args.photos, args.size)
    kinds = ["plain", "one pass", "retrain"] + (["bf16"] if args.bf16 else [])
    net, trainable = network()
    show(in_turns(lambda kind: rate(kind, net, trainable, images, labels, args.steps), kinds, args.rounds),
         f"training at {args.size} px", "plain")
    size = get_backbone("lite0").prep.size
    validation, _ = photos(args.photos, size)
    show(in_turns(lambda kind: validation_rate(kind, net, validation), ["one pass", "retrain"], args.rounds),
         f"validation at {size} px, both views", "one pass")

if __name__ == "__main__":
    main()
