"""ONNX Runtime on image files: CPU sessions, and the decode -> inference pipeline.

run_model is the whole per-image computation for any exported graph (a feature extractor or a
classifier): decoding in worker threads a few batches ahead, then one session call per batch.
Training's feature extraction, prediction, the Ray engine and doctor all go through it, so they
compute the same numbers.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .decode import UnreadableImage, describe, load_image
from .prefetch import batched, ordered_map
from .preprocess import INPUT_NAME, Preprocessing
from .progress import progress, say

Batch = tuple[list[int], np.ndarray, list[tuple[int, str]]]  # (indices that decoded, their outputs, [(index, reason)])


def _session_options(threads: int | None, spinning: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def inference_session(model: Path | bytes, threads: int | None = None, *, spinning: bool = True
                      ) -> ort.InferenceSession:
    """A CPU session for an ONNX file, or for its serialized bytes (what a Ray worker receives).

    spinning False: ONNX Runtime's threads sleep instead of spinning while they wait for work, leaving
    the cores to the decoding threads that run beside them during feature extraction.
    """
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, _session_options(threads, spinning), providers=["CPUExecutionProvider"])


def inference_session_from(model, threads: int | None = None) -> ort.InferenceSession:
    """A session for an in-memory onnx.ModelProto."""
    return inference_session(model.SerializeToString(), threads)


def decoded_batches(paths: Sequence[Path], prep: Preprocessing, batch_size: int, workers: int,
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

    sizes = [min(batch_size, len(paths) - start) for start in range(0, len(paths), batch_size)]
    decoded = ordered_map(decode, range(len(paths)), workers, ahead=prefetch * batch_size)
    for results in batched(decoded, sizes):
        ok = [(i, a) for i, a, _ in results if a is not None]
        failed = [(i, why) for i, _, why in results if why is not None]
        batch = np.stack([a for _, a in ok]) if ok else np.zeros((0, prep.size, prep.size, 3), np.uint8)
        yield [i for i, _ in ok], batch, failed


def run_model(session: ort.InferenceSession, paths: Sequence[Path], prep: Preprocessing, batch_size: int,
              workers: int) -> Iterator[Batch]:
    """Decode `paths` and run an ONNX model (extractor or classifier) on each batch, in order.

    Yields (indices that decoded, (n, ...) first output, [(index, reason) that failed]). This is
    the whole per-image computation: the local engine calls it in this process, the Ray engine
    calls it on each worker for a chunk of paths, so both give the same numbers.
    """
    for ok, batch, failed in decoded_batches(paths, prep, batch_size, workers):
        outputs = session.run(None, {INPUT_NAME: batch})[0] if len(ok) else np.zeros((0, 0), np.float32)
        yield ok, outputs, failed


def reported(batches: Iterator[Batch], paths: Sequence[Path], desc: str, quiet: bool) -> Iterator[Batch]:
    """Pass batches through, naming each unreadable file on stderr and advancing a progress bar."""
    bar = progress(total=len(paths), desc=desc, unit="img", disable=quiet)
    for ok, outputs, failed in batches:
        for i, why in failed:
            say(f"Skipping {describe(paths[i])}: {why}")
        yield ok, outputs, failed
        bar.update(len(ok) + len(failed))
    bar.close()


def extract(session: ort.InferenceSession, paths: Sequence[Path], prep: Preprocessing, *, batch_size: int = 32,
            workers: int = 2, desc: str = "Extracting features", quiet: bool = False) -> Iterator[Batch]:
    """Run a feature extractor over image files: yields (indices, (n, D) vectors, [(index, reason)])."""
    return reported(run_model(session, paths, prep, batch_size, workers), paths, desc, quiet)
