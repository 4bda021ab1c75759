"""The features stage: a feature vector per image content and backbone, computed once, cached.

compute_features fills the store (store.py) with what it lacks, through the decode -> inference
pipeline (runtime.py), locally or on a Ray cluster; feature_matrix() then builds training
matrices in blocks, spilling big ones to a memory-mapped temporary file, so memory stays flat
however many images there are.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .backbones import Backbone
from .engine import Engine
from .files import empty_matrix
from .preprocess import Preprocessing
from .progress import say
from .runtime import extract, inference_session, reported, run_model
from .scan import SampleTable
from .store import FeatureStore, StoreFeatures


def features_of(session: ort.InferenceSession, samples: SampleTable, prep: Preprocessing, *,
                workers: int = 2, quiet: bool = False) -> dict[str, np.ndarray]:
    """{digest: vector} from an extractor that is not cached (a fine-tuned backbone); each content decoded once."""
    _, first = np.unique(samples.keys, return_index=True)
    distinct, found = samples[np.sort(first)], {}  # sorted: in scan order
    for ok, vectors, _ in extract(session, distinct.paths, prep, workers=workers, quiet=quiet,
                                  desc="Features (tuned backbone)"):
        found |= {distinct.digest_hex(i): v for i, v in zip(ok, vectors)}
    return found


MATRIX_IN_MEMORY_BYTES = 64 << 20  # bigger feature matrices (12.5k Lite0 vectors) go to a memory-mapped file
MATRIX_CHUNK_ROWS = 8192  # rows gathered at a time, so building the matrix needs no second copy


def feature_matrix(samples: SampleTable, features: Mapping[str, np.ndarray], dim: int, *,
                   max_in_memory: int = MATRIX_IN_MEMORY_BYTES, spill_dir: Path | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, dim) float32 in sample order and labels (N,) int64, for training or evaluation.

    Up to `max_in_memory` bytes the matrix is an ordinary array; beyond, an np.memmap over an
    unlinked temporary file (in `spill_dir`, by default beside the feature store), so the head
    trains out of core and nothing is left behind if the process dies. A missing digest raises
    KeyError, as indexing a dict would.
    """
    y = samples.labels.astype(np.int64)
    x = empty_matrix(len(samples), dim, max_in_memory,
                      spill_dir or (features.store.folder if isinstance(features, StoreFeatures) else None))
    for start in range(0, len(samples), MATRIX_CHUNK_ROWS):
        chunk = samples[start:start + MATRIX_CHUNK_ROWS]
        _vectors_of(chunk, features, x[start:start + len(chunk)])
    return x, y


def feature_matrices(splits: Mapping[str, SampleTable], features: Mapping[str, np.ndarray], dim: int, *,
                     max_in_memory: int = MATRIX_IN_MEMORY_BYTES) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """feature_matrix for each split under one budget: all in memory if together they fit, else all memory-mapped.

    One budget for the run rather than one per matrix, so memory held by matrices stays under
    `max_in_memory` however the images divide into splits (three matrices just under the
    limit each would hold three times it).
    """
    together = sum(len(rows) for rows in splits.values()) * dim * 4
    limit = max_in_memory if together <= max_in_memory else 0
    return {name: feature_matrix(rows, features, dim, max_in_memory=limit) for name, rows in splits.items()}


def _vectors_of(samples: SampleTable, features: Mapping[str, np.ndarray], out: np.ndarray) -> None:
    """Fill `out` (len(samples), dim) with the samples' vectors."""
    if isinstance(features, StoreFeatures):
        rows = features.rows_of(samples.keys)
        if (rows < 0).any():
            raise KeyError(samples.digest_hex(int(np.argmax(rows < 0))))
        features.store.vectors(rows, out)
    elif len(samples):
        out[:] = np.stack([features[samples.digest_hex(i)] for i in range(len(samples))])


def store_folder(cache_dir: Path, store_dir: Path | str | None = None) -> Path:
    """Where the feature stores live: `store_dir` (--bottleneck_dir) if given, else CACHE/features."""
    return Path(store_dir or Path(cache_dir) / "features")


def compute_features(samples: SampleTable, backbone: Backbone, extractor: Path, stores: Path, *,
                     batch_size: int = 32, workers: int = 2, quiet: bool = False,
                     engine: Engine | None = None) -> tuple[StoreFeatures, dict[str, str]]:
    """Features for every sample's content (from the store in `stores`, or computed by `extractor`), and the
    reasons for failures.

    `extractor` is the backbone's ONNX feature extractor (graphs.extractor_path), which the
    caller already holds: it also becomes part of the exported model. Returns ({digest: vector}
    as a StoreFeatures view, {digest: reason}); each distinct image content is decoded once, in
    scan order. `engine` (a RayEngine) computes the missing vectors elsewhere; this process still
    writes them to the store, under the same keys.
    """
    store = FeatureStore(Path(stores) / backbone.identity, backbone.feature_dim)
    if store.corrupt and not quiet:
        say(f"Feature cache: ignored {store.corrupt} damaged record(s); those images are recomputed.")
    keys = samples.keys
    todo = samples[_first_missing(keys, store.rows(keys))]
    failures: dict[str, str] = {}
    # The session does not spin (see inference_session): extracting 640 rock_paper_scissors photos on 2 busy
    # cores took 15.5 CPU ms an image against 18.2 with spinning, at 0.98 of the model-only rate measured
    # beside it against 0.83 (means of 2 runs each, alternated); bench_features.py, one run: 0.95 vs 0.92.
    if len(todo):
        if not quiet:
            say(f"Features ({backbone.name}): {len(np.unique(keys)) - len(todo)} distinct images cached, "
                f"extracting {len(todo)}")
        paths = todo.paths
        batches = (engine.run(extractor, paths, backbone.prep, batch_size, workers) if engine
                   else run_model(inference_session(extractor, spinning=False), paths, backbone.prep, batch_size,
                                  workers))
        for ok, vectors, failed in reported(batches, paths, f"Extracting features ({backbone.name})", quiet):
            failures |= {todo.digest_hex(i): why for i, why in failed}
            store.append([(todo.digest_hex(i), v) for i, v in zip(ok, vectors)])
    rows = store.rows(keys)
    return StoreFeatures(store, rows[rows >= 0]), failures


def features_cached(samples: SampleTable, backbone: Backbone, stores: Path) -> bool:
    """Whether the store in `stores` holds every sample's features through `backbone` (nothing to extract)."""
    store = FeatureStore(Path(stores) / backbone.identity, backbone.feature_dim)
    return bool((store.rows(samples.keys) >= 0).all())


def _first_missing(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions of the first sample of each distinct digest the store lacks, in scan order."""
    missing = np.flatnonzero(rows < 0)
    _, first = np.unique(keys[missing], return_index=True)
    return np.sort(missing[first])
