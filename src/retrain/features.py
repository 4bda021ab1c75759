"""Bottleneck features: computed once per image content and backbone, cached on disk.

The store is one append-only file of fixed-size records per backbone identity:
(sha256 of the image bytes, feature vector, crc32). Appends happen under a file lock, a torn
record left by a killed run is cut off before the next append, and a record that fails its
checksum is ignored (so its image is recomputed). Nothing is ever unpickled.
"""
from __future__ import annotations

import os
import sys
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnxruntime as ort
from filelock import FileLock
from tqdm import tqdm

from .backbones import Backbone
from .decode import UnreadableImage, describe, load_image
from .graphs import extractor_path
from .preprocess import INPUT_NAME, Preprocessing
from .scan import Sample

STORE_FILE = "features.bin"


def _record_dtype(dim: int) -> np.dtype:
    # Raw bytes, not "S32": numpy strips trailing NULs from S fields, mangling 1 digest in 256.
    return np.dtype([("digest", "V32"), ("vector", "<f4", (dim,)), ("crc", "<u4")])


def _crc(digest: bytes, vector: np.ndarray) -> int:
    return zlib.crc32(digest + vector.astype("<f4").tobytes())


class FeatureStore:
    """Append-only, checksummed feature vectors keyed by image content hash."""

    def __init__(self, folder: Path, dim: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / STORE_FILE
        self.dtype = _record_dtype(dim)
        self.lock = FileLock(str(self.folder / "store.lock"))
        self._index: dict[bytes, np.ndarray] = {}
        self.corrupt = 0
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        n = self.path.stat().st_size // self.dtype.itemsize
        if n == 0:
            return
        records = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(n,))
        for rec in records:
            digest, vector = rec["digest"].tobytes(), np.array(rec["vector"])
            if _crc(digest, vector) == int(rec["crc"]):
                self._index.setdefault(digest, vector)
            else:
                self.corrupt += 1
        del records

    def __contains__(self, digest: str) -> bool:
        return bytes.fromhex(digest) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, digest: str) -> np.ndarray:
        return self._index[bytes.fromhex(digest)]

    def append(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Durably add (hex digest, vector) pairs."""
        if not items:
            return
        recs = np.zeros(len(items), dtype=self.dtype)
        for rec, (digest, vector) in zip(recs, items):
            raw = bytes.fromhex(digest)
            rec["digest"], rec["vector"] = np.void(raw), vector
            rec["crc"] = _crc(raw, rec["vector"])
        with self.lock:
            with open(self.path, "ab") as f:
                whole = f.tell() - f.tell() % self.dtype.itemsize
                if whole != f.tell():  # a torn record from a killed run: drop it
                    f.truncate(whole)
                f.write(recs.tobytes())
                f.flush()
                os.fsync(f.fileno())
        for digest, vector in items:
            self._index.setdefault(bytes.fromhex(digest), np.asarray(vector, np.float32))


def _session_options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def inference_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), _session_options(threads), providers=["CPUExecutionProvider"])


def inference_session_from(model, threads: int | None = None) -> ort.InferenceSession:
    """A session for an in-memory onnx.ModelProto."""
    return ort.InferenceSession(model.SerializeToString(), _session_options(threads), providers=["CPUExecutionProvider"])


def decoded_batches(paths: list[Path], prep: Preprocessing, batch_size: int, workers: int,
                    prefetch: int = 3) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Decode `paths` in worker threads, a few batches ahead of the consumer, in order.

    Yields (indices that decoded, (n, S, S, 3) uint8 batch, [(index, reason) that failed]).
    Only `prefetch` batches are ever in flight, so memory stays flat however many paths.
    """
    def decode(i: int):
        try:
            return i, load_image(paths[i], prep), None
        except UnreadableImage as e:
            return i, None, str(e)

    starts = iter(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append([pool.submit(decode, i) for i in range(start, min(start + batch_size, len(paths)))])

        for _ in range(prefetch):
            submit_next()
        while pending:
            results = [f.result() for f in pending.popleft()]
            submit_next()
            ok = [(i, a) for i, a, _ in results if a is not None]
            failed = [(i, why) for i, _, why in results if why is not None]
            batch = np.stack([a for _, a in ok]) if ok else np.zeros((0, prep.size, prep.size, 3), np.uint8)
            yield [i for i, _ in ok], batch, failed


def extract(session: ort.InferenceSession, paths: list[Path], prep: Preprocessing, *, batch_size: int = 32,
            workers: int = 2, desc: str = "Extracting features", quiet: bool = False
            ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Run a feature extractor over image files: yields (indices, (n, D) vectors, [(index, reason)])."""
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=quiet)
    for ok, batch, failed in decoded_batches(paths, prep, batch_size, workers):
        for i, why in failed:
            tqdm.write(f"Skipping {describe(paths[i])}: {why}", file=sys.stderr)
        vectors = session.run(None, {INPUT_NAME: batch})[0] if len(ok) else np.zeros((0, 0), np.float32)
        yield ok, vectors, failed
        bar.update(len(ok) + len(failed))
    bar.close()


def features_of(session: ort.InferenceSession, samples: list[Sample], prep: Preprocessing, *,
                workers: int = 2, quiet: bool = False) -> dict[str, np.ndarray]:
    """{digest: vector} from an extractor that is not cached (a fine-tuned backbone)."""
    first = {s.digest: s.path for s in samples}
    digests, found = list(first), {}
    for ok, vectors, _ in extract(session, list(first.values()), prep, workers=workers, quiet=quiet,
                                  desc="Features (tuned backbone)"):
        found |= {digests[i]: v for i, v in zip(ok, vectors)}
    return found


def compute_features(samples: Iterable[Sample], backbone: Backbone, cache_dir: Path,
                     store_dir: Path | None = None, *, batch_size: int = 32, workers: int = 2,
                     quiet: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Features for every sample's content (from cache or computed), and the reasons for failures.

    Returns ({digest: vector}, {digest: reason}); each distinct image content is processed once.
    """
    store = FeatureStore(Path(store_dir or Path(cache_dir) / "features") / backbone.identity, backbone.feature_dim)
    if store.corrupt and not quiet:
        print(f"Feature cache: ignored {store.corrupt} damaged record(s); those images are recomputed.",
              file=sys.stderr)
    first_path: dict[str, Path] = {}
    for s in samples:
        first_path.setdefault(s.digest, s.path)
    todo = [d for d in first_path if d not in store]
    failures: dict[str, str] = {}
    if todo:
        session = inference_session(extractor_path(backbone, cache_dir))
        batches = extract(session, [first_path[d] for d in todo], backbone.prep, batch_size=batch_size,
                          workers=workers, desc=f"Extracting features ({backbone.name})", quiet=quiet)
        for ok, vectors, failed in batches:
            failures |= {todo[i]: why for i, why in failed}
            store.append([(todo[i], v) for i, v in zip(ok, vectors)])
    found = {d: store.get(d) for d in first_path if d in store}
    return found, failures
