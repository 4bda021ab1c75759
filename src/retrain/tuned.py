"""Fine-tuned networks kept in the cache, so the same command on the same folder fine-tunes once.

A finished (not interrupted) fine-tuning run stores what evaluation and export need afterwards:
the network as an ONNX extractor, the head's layers, the validation and test features through
that network, and the run's record (history, best epoch); or, where no fine-tuned epoch beat
the head, the record alone (the head is retrained from cached features in a second). The key is the run's training identity
(the data's fingerprint, the backbone, the settings that shape training), so a changed folder or
setting has another key and fine-tunes afresh: the split of the new photos may hold photos the
cached network trained on, so starting from it would make validation lie.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .files import atomic_write_bytes, atomic_write_json, prune_least_recent
from .head import HeadResult
from .metrics import BackboneScore, FinetuneRecord

RECORD, ARRAYS, NETWORK = "record.json", "arrays.npz", "network.onnx"
TUNED_KEPT = 8  # fine-tuned runs kept, the least recently used beyond go (15-30 MB each: the network is most of it)


@dataclass(frozen=True)
class TunedRun:
    extractor: onnx.ModelProto | None  # uint8 image -> features through the tuned network; None: the head stayed
    layers: list[tuple[np.ndarray, np.ndarray]]
    x: dict[str, tuple[np.ndarray, np.ndarray]]  # validation and test features through it, with labels
    record: FinetuneRecord  # what metrics.json says of the run


def identity_key(identity: dict) -> str:
    """A short name for a training identity (checkpoints and cached networks are filed under it)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def tuned_path(cache: Path, identity: dict) -> Path:
    return cache / "tuned" / identity_key(identity)


def save_tuned(path: Path, run: TunedRun, identity: dict) -> None:
    """Write the run into a folder beside `path`, then rename it into place (a crash leaves no half entry)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        if run.extractor is not None:
            onnx.save(run.extractor, str(staging / NETWORK))
        arrays = _layer_arrays(run.layers)
        for split, (x, y) in run.x.items():
            arrays |= {f"x_{split}": x, f"y_{split}": y}
        np.savez(staging / ARRAYS, **arrays)
        record = {"identity": identity, "layers": len(run.layers), "splits": sorted(run.x),
                  "network": run.extractor is not None, "run": asdict(run.record)}
        (staging / RECORD).write_text(json.dumps(record, default=str), encoding="utf-8")
        os.replace(staging, path)
    except OSError:  # a full or read-only cache, or another process stored the same run first: not needed
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prune_least_recent(path.parent, TUNED_KEPT, lambda e: e.is_dir(follow_symlinks=False) and not e.name.startswith("."))


def load_tuned(path: Path, identity: dict) -> TunedRun | None:
    """The cached run of this identity; None when there is none, or it is damaged or of another run."""
    try:
        record = json.loads((path / RECORD).read_text(encoding="utf-8"))
        if record.get("identity") != identity:
            return None
        with np.load(path / ARRAYS) as arrays:
            layers = _layers_from(arrays, record["layers"])
            x = {split: (arrays[f"x_{split}"], arrays[f"y_{split}"]) for split in record["splits"]}
        network = onnx.load(str(path / NETWORK)) if record["network"] else None
        run = TunedRun(network, layers, x, FinetuneRecord(**record["run"]))
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, DecodeError):
        return None  # missing, damaged or of an older layout
    with contextlib.suppress(OSError):  # a read-only cache: still a hit
        os.utime(path)  # recently used: pruned last
    return run


@dataclass(frozen=True)
class Winner:
    """A backbone comparison's winner: its head, and the out-of-fold logits of the training and
    validation photos that its score was counted from, with their labels (calibration reuses them;
    None: not stored)."""
    backbone: str
    head: HeadResult
    held_out: np.ndarray | None = None
    held_out_labels: np.ndarray | None = None

    def held_out_fits(self, y: np.ndarray, n_classes: int) -> bool:
        """Whether the stored logits are finite float32 rows of these labels, in this order, and classes."""
        h, labels = self.held_out, self.held_out_labels
        return h is not None and labels is not None and h.dtype == np.float32 and h.shape == (len(y), n_classes) \
            and np.array_equal(labels, y) and bool(np.isfinite(h).all())


def scores_path(cache: Path, identity: dict) -> Path:
    return cache / "tuned" / f"{identity_key(identity)}.backbones.json"


def save_scores(path: Path, scores: list[BackboneScore], identity: dict, winner: Winner) -> None:
    """A backbone comparison's counts and its winner, so that the same command on the same folder
    neither cross-validates nor trains the winner's head again."""
    head = winner.head
    record = {"layers": len(head.layers), "history": head.history, "best_step": head.best_step,
              "steps_run": head.steps_run}
    # The logits only with their labels: a cache without them computes both again, never pairs them wrongly.
    held_out = {} if winner.held_out is None or winner.held_out_labels is None else {
        "held_out": winner.held_out, "held_out_labels": np.asarray(winner.held_out_labels, np.int64)}
    buffer = io.BytesIO()
    np.savez(buffer, record=np.array(json.dumps(record)), **_layer_arrays(head.layers), **held_out)
    data = buffer.getvalue()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(_head_path(path), data)  # first: the counts' record, naming its digest, is the commit
        atomic_write_json(path, {"identity": identity, "scores": [asdict(score) for score in scores],
                                 "head": {"backbone": winner.backbone, "sha256": hashlib.sha256(data).hexdigest()}})
    except OSError:  # a full or read-only cache: the next run compares again
        pass


def load_scores(path: Path, identity: dict) -> tuple[list[BackboneScore], Winner | None] | None:
    """The stored comparison of this identity, with its winner where that is intact; None when there
    is none, or it is damaged or of another run."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("identity") != identity:
            return None
        scores = [BackboneScore(**score) for score in record["scores"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return scores, _stored_head(path, record.get("head"))


def _stored_head(path: Path, head: object) -> Winner | None:
    """The winner saved beside the counts, if its bytes are the ones the counts name; None where it
    is missing, damaged or another run's (it is trained again)."""
    try:
        data = _head_path(path).read_bytes()
        if hashlib.sha256(data).hexdigest() != head["sha256"]:
            return None
        with np.load(io.BytesIO(data)) as arrays:
            record = json.loads(str(arrays["record"]))
            layers = _layers_from(arrays, record["layers"])
            stored = {k: arrays[k] for k in ("held_out", "held_out_labels") if k in arrays.files}  # older caches lack them
        return Winner(head["backbone"], HeadResult(layers, record["history"], record["best_step"], record["steps_run"]),
                      stored.get("held_out"), stored.get("held_out_labels"))
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None


def _head_path(scores: Path) -> Path:
    return scores.with_name(scores.name.replace(".json", ".head.npz"))


def _layer_arrays(layers: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"w{i}": w for i, (w, _) in enumerate(layers)} | {f"b{i}": b for i, (_, b) in enumerate(layers)}


def _layers_from(arrays: np.lib.npyio.NpzFile, n: object) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(arrays[f"w{i}"], arrays[f"b{i}"]) for i in range(int(n))]
