"""Predictions under load: at most `limit` requests admitted, and one ONNX Runtime call for all waiting images."""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .prediction import Classifier
from .webconfig import ApiError


class Gate:
    """Admits at most `limit` requests at once; the event loop is single-threaded, so no lock."""

    def __init__(self, limit: int):
        self.limit, self.inside, self.refused = limit, 0, 0

    def enter(self, retry_after_s: int) -> None:
        if self.inside >= self.limit:
            self.refused += 1
            raise ApiError(503, f"busy: {self.inside} request{'s' * (self.inside != 1)} in progress; retry shortly",
                           {"Retry-After": str(retry_after_s)})
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1


class Batcher:
    """Runs a model on the images of all waiting requests for it, up to `max_batch` per call.

    There is no waiting timer: while one call runs, new requests queue up and the next call
    takes them all, so a lone request pays no extra latency. Each request names its model, so
    switching the served model never runs an image through a model it was not prepared for.
    """

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.waiting: deque[tuple[Classifier, np.ndarray, asyncio.Future]] = deque()
        self.ready = asyncio.Event()
        self.runner = ThreadPoolExecutor(1, thread_name_prefix="onnxruntime")  # ORT uses every core itself
        self.calls = self.images = 0

    async def classify(self, clf: Classifier, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, C) probabilities."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((clf, images, future))
        self.ready.set()
        return await future

    def _take(self) -> list[tuple[Classifier, np.ndarray, asyncio.Future]]:
        taken = [self.waiting.popleft()]
        clf, count = taken[0][0], len(taken[0][1])
        while self.waiting and self.waiting[0][0] is clf and count + len(self.waiting[0][1]) <= self.max_batch:
            taken.append(self.waiting.popleft())
            count += len(taken[-1][1])
        if not self.waiting:
            self.ready.clear()
        return taken

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.ready.wait()
            taken = self._take()
            batch = np.concatenate([images for _, images, _ in taken])
            parts = []
            try:  # one request of more images than max_batch still goes max_batch at a time
                for start in range(0, len(batch), self.max_batch):
                    parts.append(await loop.run_in_executor(self.runner, taken[0][0].probabilities,
                                                            batch[start:start + self.max_batch]))
            except Exception as e:  # a model failure fails these requests, not the server
                for _, _, future in taken:
                    future.done() or future.set_exception(ApiError(500, f"inference failed: {e}"))
                continue
            probs = np.concatenate(parts)
            self.calls, self.images = self.calls + len(parts), self.images + len(batch)
            start = 0
            for _, images, future in taken:  # a cancelled future is a client that went away
                future.done() or future.set_result(probs[start:start + len(images)])
                start += len(images)


def ranked(clf: Classifier, names: list[str], probs: np.ndarray, top_k: int) -> list[dict]:
    """One result dict per image: Prediction.to_dict(), keyed by 'file' instead of 'path'."""
    return [{"file": name} | {key: v for key, v in clf.rank(name, p, top_k).to_dict().items() if key != "path"}
            for name, p in zip(names, probs)]
