"""Routes for training runs and the models they made: start, follow, cancel; switch, report, download."""
from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import Field

from .httpguard import REPORT_HEADERS
from .modelstore import ZIP_FILE
from .prediction import REPORT_FILE
from .webconfig import ApiError, RequestBody
from .webstate import state


class NewJob(RequestBody):
    quality: str = Field("fast", description="fast: a new last layer on cached features (seconds); accurate: "
                                             "fine-tuning the whole network when it fits the time budget")


class UseModel(RequestBody):
    model: str = Field(max_length=40)


def add_training_routes(app: FastAPI) -> None:
    @app.post("/jobs", status_code=202, summary="Start training on the classes' photos (one run at a time)")
    async def start_job(request: Request, body: NewJob | None = None) -> dict:
        s = state(request)
        job = await asyncio.get_running_loop().run_in_executor(None, s.trainer.start, (body or NewJob()).quality)
        return job.to_dict()

    @app.get("/jobs", summary="Recent training runs, newest last")
    async def jobs(request: Request) -> dict:
        return {"jobs": [j.to_dict() for j in state(request).trainer.all()]}

    @app.get("/jobs/{job_id}", summary="A training run's status, progress and log")
    async def job(request: Request, job_id: str) -> dict:
        return state(request).trainer.get(job_id).to_dict()

    @app.delete("/jobs/{job_id}", summary="Cancel a training run (from any tab)")
    async def cancel(request: Request, job_id: str) -> dict:
        return state(request).trainer.cancel(job_id).to_dict()

    @app.get("/models", summary="Trained models, newest first, and which one is served")
    async def models(request: Request) -> dict:
        return state(request).models.listing()

    @app.put("/model", summary="Serve another model from now on, without a restart")
    async def use(request: Request, body: UseModel) -> dict:
        s = state(request)
        await asyncio.get_running_loop().run_in_executor(None, s.models.use, body.model)
        return s.models.listing()

    @app.get("/models/{model_id}/report.html", summary="The model's report: curves, confusion matrix, mistakes")
    async def report(request: Request, model_id: str):
        path = state(request).models.folder(model_id) / REPORT_FILE
        if not path.is_file():
            raise ApiError(404, "this model has no report")
        return FileResponse(path, media_type="text/html", headers=REPORT_HEADERS)

    @app.get("/models/{model_id}/model.zip", summary="The model: model.onnx, labels.txt, metrics.json, report.html")
    async def download(request: Request, model_id: str):
        path = state(request).models.folder(model_id) / ZIP_FILE
        return FileResponse(path, media_type="application/zip", filename=f"retrain-model-{model_id}.zip")

    @app.get("/models/{model_id}/mistakes", summary="Test photos the model got wrong, most confident first")
    async def mistakes(request: Request, model_id: str) -> dict:
        s = state(request)
        where = s.workspace.where()
        return {"mistakes": [m | {"class": where.get(m["photo"])} for m in s.models.mistakes(model_id)]}

    @app.get("/models/{model_id}/findings", summary="doctor's findings: duplicates, suspected mislabels, outliers")
    async def findings(request: Request, model_id: str) -> dict:
        s = state(request)
        found, where = s.models.findings(model_id), s.workspace.where()
        for item in found["items"]:  # where each photo is now: it may have been moved or deleted since
            item["photos"] = [p | {"class": where.get(p["photo"])} for p in item["photos"]]
        return found
