"""Where training batches come from: the data sources `finetune.fit` reads.

Each source has n_train, train_size, batch_size, count(split), train_batches(epoch) and
eval_batches(split); batches are (uint8 NHWC images, as NumPy or a tensor already on the
training device, int64 labels).

- PhotoFiles: photos decoded afresh every epoch and distorted from full resolution by PIL
  (fine-tuning on the CPU, where the network, not decoding, is the bottleneck).
- DecodedImages: every split decoded once into memory; random shifts and flips (networks trained
  from random weights, fast enough that decoding every epoch would dominate).
- DevicePhotos: every split decoded once into the GPU's memory; the fine-tuning distortions are
  drawn exactly as PhotoFiles draws them and applied by PyTorch on the device, so thousands of
  images a second need no CPU decoding after the first pass.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .prefetch import batched, ordered_map
from .progress import progress
from . import distributed
from .augment import Distortion, augment, draw_distortion
from .config import Augment
from .decode import UnreadableImage, decode_all, open_rgb
from .runtime import decoded_batches
from .preprocess import Preprocessing
from .scan import SampleTable

Batch = tuple["np.ndarray | torch.Tensor", np.ndarray]


def shard_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This process's sample indices for each batch of the epoch: a seeded shuffle, the ragged last
    batch dropped; under torchrun each process takes every WORLD_SIZE-th sample of every batch."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    starts = range(0, n - batch_size + 1, batch_size) if n >= batch_size else [0]
    return [order[s:s + batch_size][distributed.rank()::distributed.world_size()] for s in starts]


def _image_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Each image's own draws: thread timing, batch order and device cannot change them."""
    return np.random.default_rng([seed, epoch, int(index)])


def train_batches(samples: SampleTable, aug: Augment, batch_size: int, seed: int, epoch: int,
                  workers: int) -> Iterator[Batch]:
    """Shuffled, augmented (uint8 NHWC batch, labels) for one epoch; reproducible from (seed, epoch)."""

    def load(i: int) -> np.ndarray | None:
        try:
            return augment(open_rgb(samples.path(i), aug.size), aug, _image_rng(seed, epoch, i))
        except UnreadableImage:
            return None

    batches, labels = shard_batches(len(samples), batch_size, seed, epoch), samples.labels.astype(np.int64)
    order = (int(i) for idx in batches for i in idx)
    loaded = ordered_map(load, order, workers, ahead=3 * batch_size)  # three batches ahead of the trainer
    for idx, arrays in zip(batches, batched(loaded, [len(idx) for idx in batches])):
        keep = [k for k, a in enumerate(arrays) if a is not None]
        if keep:
            yield np.stack([arrays[k] for k in keep]), labels[idx[keep]]


class PhotoFiles:
    """Photos decoded afresh every epoch and augmented from full resolution (fine-tuning pretrained backbones)."""

    def __init__(self, splits: dict[str, SampleTable], aug: Augment, prep: Preprocessing, batch_size: int,
                 seed: int, workers: int):
        self.splits, self.aug, self.prep = splits, aug, prep
        self.batch_size, self.seed, self.workers = batch_size, seed, workers
        self.train_size, self.n_train = aug.size, len(splits["train"])

    def count(self, split: str) -> int:
        return len(self.splits[split])

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        return train_batches(self.splits["train"], self.aug, self.batch_size, self.seed, epoch, self.workers)

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """(uint8 batch, labels) at inference preprocessing (centre crop at prep.size); unreadable files skipped."""
        samples = self.splits[split]
        labels = samples.labels.astype(np.int64)
        for ok, batch, _ in decoded_batches(samples.paths, self.prep, 64, self.workers):
            if len(ok):
                yield batch, labels[ok]


class DecodedImages:
    """Every split decoded once into uint8 arrays; training batches are random shifts and flips of them.

    Training images are stored a little larger than the input (edge padding for scratch-small, the
    uncropped centre square for scratch-color), so a random crop of the input size shifts the
    content while keeping the scale inference sees.
    """

    def __init__(self, splits: dict[str, SampleTable], prep: Preprocessing, shift: int, batch_size: int,
                 seed: int, workers: int, quiet: bool = False, train_size: int | None = None):
        self.prep, self.batch_size, self.seed = prep, batch_size, seed
        self.train_size, self.failures = train_size or prep.size, {}
        x, self.train_y = self._decode(splits["train"], stored_preprocessing(prep, self.train_size), workers, quiet)
        self.train_x = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge") if shift else x
        self.n_train = len(self.train_x)
        self.eval = {name: self._decode(splits[name], prep, workers, quiet) for name in ("validation", "test")}

    def _decode(self, samples: SampleTable, prep: Preprocessing, workers: int, quiet: bool
                ) -> tuple[np.ndarray, np.ndarray]:
        bar = progress(total=len(samples), desc="Decoding into memory", unit="img", disable=quiet or not samples,
                   leave=False)
        x, failed = decode_all(samples.paths, prep, workers, progress=bar.update)
        bar.close()
        self.failures |= {samples.digest_hex(i): why for i, why in failed.items()}
        labels = samples.labels.astype(np.int64)
        if not failed:
            return x, labels
        keep = np.ones(len(samples), bool)
        keep[list(failed)] = False
        return x[keep], labels[keep]

    def count(self, split: str) -> int:
        return self.n_train if split == "train" else len(self.eval[split][1])

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        """Shuffled batches of random crops (and mirror images); reproducible from (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch, distributed.rank()])
        s, room = self.prep.size, self.train_x.shape[1] - self.prep.size
        for idx in shard_batches(self.n_train, self.batch_size, self.seed, epoch):
            offsets = rng.integers(0, room + 1, (len(idx), 2))
            batch = np.stack([self.train_x[i, a:a + s, b:b + s] for i, (a, b) in zip(idx, offsets)])
            flip = rng.random(len(idx)) < 0.5
            batch[flip] = batch[flip, :, ::-1]
            yield batch, self.train_y[idx]

    def eval_batches(self, split: str) -> Iterator[Batch]:
        x, y = self.eval[split]
        for start in range(0, len(x), 512):
            yield x[start:start + 512], y[start:start + 512]


def stored_preprocessing(prep: Preprocessing, train_size: int) -> Preprocessing:
    """How training images are held when decoded once: the uncropped centre square, at the size
    inference resizes to before its crop (scaled up for a training size above the input size)."""
    side = max(prep.resize_target(), int(round(train_size / prep.crop_fraction)))
    return Preprocessing(size=side, crop_fraction=1.0, mean=prep.mean, std=prep.std)


def held_bytes(counts: dict[str, int], prep: Preprocessing, train_size: int) -> int:
    """Memory DecodedImages / DevicePhotos need for these split sizes."""
    stored = stored_preprocessing(prep, train_size).size
    return 3 * (counts.get("train", 0) * stored ** 2
                + (counts.get("validation", 0) + counts.get("test", 0)) * prep.size ** 2)


class DevicePhotos(DecodedImages):
    """Every split decoded once and held on `device`; fine-tuning distortions applied there, batch by batch.

    Crops are drawn from the stored centre square (the part of a photo inference sees, plus its
    margin), with the draws PhotoFiles would make for the same (seed, epoch, image).
    """

    def __init__(self, splits: dict[str, SampleTable], aug: Augment, prep: Preprocessing, batch_size: int,
                 seed: int, workers: int, device: torch.device, quiet: bool = False):
        super().__init__(splits, prep, 0, batch_size, seed, workers, quiet, train_size=aug.size)
        self.aug, self.device = aug, device
        self.train_x = torch.from_numpy(self.train_x).to(device)
        self.eval = {k: (torch.from_numpy(x).to(device), y) for k, (x, y) in self.eval.items()}

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        stored = self.train_x.shape[1]
        for idx in shard_batches(self.n_train, self.batch_size, self.seed, epoch):
            draws = [draw_distortion(stored, stored, self.aug, _image_rng(self.seed, epoch, i)) for i in idx]
            images = self.train_x[torch.from_numpy(idx).to(self.device)]
            yield distort(images, draws, self.aug.size), self.train_y[idx]


def distort(images: torch.Tensor, draws: list[Distortion], size: int) -> torch.Tensor:
    """PyTorch twin of augment.apply_distortion for a batch: (N, S, S, 3) uint8 -> (N, size, size, 3) uint8.

    One affine sampling grid per image does the crop, the resize and the mirror; the colour
    factors blend with black, the mean grey level and the grey image, as PIL's enhancers do.
    """
    n, stored = len(images), images.shape[1]
    x = images.permute(0, 3, 1, 2).float()
    box = torch.tensor([d.box for d in draws], dtype=torch.float32, device=x.device) / stored  # 0..1
    sign = torch.tensor([-1.0 if d.flip else 1.0 for d in draws], device=x.device)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = (box[:, 2] - box[:, 0]) * sign  # half-width in the -1..1 frame, mirrored when flipped
    theta[:, 1, 1] = box[:, 3] - box[:, 1]
    theta[:, 0, 2] = box[:, 0] + box[:, 2] - 1  # centre in the -1..1 frame
    theta[:, 1, 2] = box[:, 1] + box[:, 3] - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    factor = lambda name: torch.tensor([getattr(d, name) for d in draws], device=x.device).view(n, 1, 1, 1)  # noqa: E731
    x = (x * factor("brightness")).clamp(0, 255)
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + factor("contrast") * (x - mean)).clamp(0, 255)
    grey = _grey(x)
    x = (grey + factor("saturation") * (x - grey)).clamp(0, 255)
    return x.round().to(torch.uint8).permute(0, 2, 3, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, the weights of PIL's convert('L'): (N, 3, H, W) -> (N, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b
