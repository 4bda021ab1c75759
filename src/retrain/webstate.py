"""Everything a running `retrain serve` holds, created at startup and torn down at shutdown."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fastapi import Request

from .batching import Batcher, Gate
from .httpguard import Metrics
from .jobs import Trainer
from .modelstore import ModelStore
from .prediction import Classifier
from .webconfig import ServeConfig
from .workspace import Workspace


class State:
    def __init__(self, startup: Classifier | None, config: ServeConfig, metrics: Metrics,
                 fallback: Callable[[], Classifier]):
        self.config, self.metrics = config, metrics
        self.gate = Gate(config.max_queue)
        self.batcher = Batcher(config.max_batch)
        self.decoder = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
        self.workspace = Workspace(config.workspace_dir(), config)
        self.models = ModelStore(self.workspace.root / "models", startup, config.models_kept, fallback)
        self.trainer = Trainer(self.workspace, lambda job, folder: self.models.add(job.id, folder))

    def close(self) -> None:
        self.trainer.stop_all()
        self.decoder.shutdown(wait=True)
        self.batcher.runner.shutdown(wait=True)
        self.workspace.close()

    async def in_threads(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)


def state(request: Request) -> State:
    return request.app.state.serve
