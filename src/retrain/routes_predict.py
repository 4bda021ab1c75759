"""Routes that classify with the served model, and the server's health and metrics."""
from __future__ import annotations

import asyncio

import numpy as np
from fastapi import FastAPI, Query, Request

from .batching import ranked
from .uploads import MULTIPART_BODY, check_image, read_uploads
from .webstate import state


def add_prediction_routes(app: FastAPI) -> None:
    @app.post("/predict", openapi_extra=MULTIPART_BODY,
              summary="Classify one or several images (multipart file parts named 'files')")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)) -> dict:
        s = state(request)
        clf = s.models.clf  # this request's model, even if another is switched in meanwhile
        # The body is complete already (CompleteBody): a slow sender never holds one of the queue's slots.
        s.gate.enter(s.config.retry_after_s)
        try:
            uploads = await read_uploads(request, s.config.max_files)
            checked = await asyncio.gather(*(s.in_threads(check_image, name, data, clf.prep) for name, data in uploads))
            probs = await s.batcher.classify(clf, np.stack([image for _, image in checked]))
            return {"results": ranked(clf, [name for name, _ in uploads], probs, top_k)}
        finally:
            s.gate.leave()

    @app.get("/labels", summary="The classes the served model predicts, in output order")
    async def labels(request: Request) -> dict:
        return {"labels": state(request).models.clf.labels, "model": state(request).models.active}

    @app.get("/healthz", summary="200 while the server can classify")
    async def healthz(request: Request) -> dict:
        return {"status": "ok", "labels": len(state(request).models.clf.labels)}

    @app.get("/metrics", summary="Request counts and latency by route; batching and queue figures")
    async def metrics(request: Request) -> dict:
        s = state(request)
        b = s.batcher
        return s.metrics.summary() | {"predict": {
            "in_flight": s.gate.inside, "queue_limit": s.gate.limit, "refused_busy": s.gate.refused,
            "onnxruntime_calls": b.calls, "images": b.images,
            "mean_batch": round(b.images / b.calls, 2) if b.calls else None}}
