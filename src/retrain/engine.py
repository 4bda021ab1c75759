"""Where decoding and ONNX inference run: in this process (local, the default) or on a Ray cluster.

The Ray engine (issue #8, past one machine) splits the image paths into chunks of whole batches
and hands them, a bounded window at a time, to Ray tasks; each runs runtime.run_model on its
chunk with an ONNX Runtime session kept in its worker process: the same decoding, preprocessing
and model as a local run, on the same batch boundaries, so the numbers are bitwise the same.
The driver gets the batches back in input order and does everything else itself (feature store
appends under the same keys, ranking and output rows), so a later local run reuses the work.

Plain tasks rather than Ray Data: the job is an ordered map over a list of paths with per-file
failures, which a deque of task results does in a few lines; Ray Data would add pyarrow/pandas to
the install, reorder rows unless told not to, and turn per-file errors into table columns.

On a multi-node cluster the image paths must be readable at the same path on every node (a
shared file system), and the same retrain and Ray versions installed there; the model itself
travels through Ray's object store, so the cache folder need not be shared.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from .validate import check_engine
from .runtime import Batch, inference_session, run_model
from .preprocess import Preprocessing

CHUNK_BATCHES = 8  # batches per task: amortises its ~ms of overhead, small enough to balance the load
CALLS_PER_SLOT = 2  # chunks in flight per CPU slot: one running, one queued, so no worker waits for the driver


class Engine(Protocol):
    def run(self, model: Path, paths: Sequence[Path], prep: Preprocessing, batch_size: int,
            workers: int) -> Iterator[Batch]:
        """What runtime.run_model yields for `paths` through the ONNX file `model`, in order."""


@contextmanager
def open_engine(name: str, ray_address: str | None = None) -> Iterator[Engine | None]:
    """None for the local engine (callers run in this process), else a RayEngine closed on exit."""
    check_engine(name, ray_address)
    if name == "local":
        yield None
    else:
        with RayEngine(ray_address) as engine:
            yield engine


_SESSION: dict[str, object] = {}  # in a Ray worker process: the last model's session, by object id


def _run_chunk(model: list, prep: Preprocessing, threads: int, paths: list[str], batch_size: int,
               workers: int) -> list[Batch]:
    """A Ray task: runtime.run_model over one chunk of paths.

    The model comes as [ObjectRef] (nested, so Ray does not fetch it for every chunk) and its
    session is kept in the worker process, which Ray reuses for the next chunk: per-chunk cost
    is only the decoding and inference.
    """
    import ray

    key = model[0].hex()
    if key not in _SESSION:
        _SESSION.clear()  # one model at a time: a new one replaces the old
        # Threads = the CPUs Ray reserved for this task, so tasks sharing a node do not oversubscribe it.
        _SESSION[key] = inference_session(ray.get(model[0]), threads)
    return list(run_model(_SESSION[key], [Path(p) for p in paths], prep, batch_size, workers))


class RayEngine:
    """Runs decode + ONNX inference as Ray tasks; starts or finds a local Ray, or joins `address`.

    Tasks rather than actors: Ray places each chunk on whichever worker is free (a slow node takes
    fewer chunks) and reruns a chunk whose worker or node died (max_retries), which is safe
    because a chunk is a pure function of its paths. Ray is joined on the first run(), so a run
    with every feature already cached costs nothing.
    """

    def __init__(self, address: str | None = None, cpus_per_task: int = 1):
        check_engine("ray", address)
        self.address, self.cpus_per_task = address, cpus_per_task
        self.ray = None
        self.started_ray = False
        self._model: tuple[Path, object] | None = None  # (model file, its ObjectRef)

    def _connect(self):
        """The ray module, joined to the cluster."""
        if self.ray is None:
            import ray

            self.ray, self.started_ray = ray, not ray.is_initialized()
            if self.started_ray:
                # address None: RAY_ADDRESS, else the cluster `ray start` made on this machine, else a
                # new local Ray with one CPU per core. No dashboard: a web server nobody asked for.
                ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING)
        return self.ray

    def run(self, model: Path, paths: Sequence[Path], prep: Preprocessing, batch_size: int,
            workers: int) -> Iterator[Batch]:
        ray = self._connect()
        ref = self._model_ref(Path(model))
        task = ray.remote(num_cpus=self.cpus_per_task, max_retries=3)(_run_chunk)
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_task))
        # Chunks are whole batches, so every batch holds the same images as in a local run.
        size = batch_size * CHUNK_BATCHES
        pending: deque = deque()  # (first index of the chunk, its result's ObjectRef), in input order
        for start in range(0, len(paths), size):
            if len(pending) >= CALLS_PER_SLOT * slots:  # bounded: memory stays flat however many paths
                yield from self._collect(*pending.popleft())
            chunk = [str(p) for p in paths[start:start + size]]
            pending.append((start, task.remote([ref], prep, self.cpus_per_task, chunk, batch_size, workers)))
        while pending:
            yield from self._collect(*pending.popleft())

    def _collect(self, start: int, ref) -> Iterator[Batch]:
        """A chunk's batches with indices into the whole path list, as the local engine numbers them."""
        for ok, outputs, failed in self.ray.get(ref):
            yield [start + i for i in ok], outputs, [(start + i, why) for i, why in failed]

    def _model_ref(self, model: Path):
        """The model's bytes in Ray's object store, put once per model (each node fetches them once)."""
        if self._model is None or self._model[0] != model:
            self._model = (model, self.ray.put(model.read_bytes()))
        return self._model[1]

    def close(self) -> None:
        """Shut Ray down if this engine started it (a cluster it joined keeps running)."""
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.ray, self.started_ray, self._model = None, False, None

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
