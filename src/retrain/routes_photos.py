"""Routes over the workspace's classes and photos: create, upload, view, move, delete and undo."""
from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from PIL import Image
from pydantic import Field

from .prediction import Classifier
from .trainjob import QUALITIES, estimate
from .uploads import EXTENSIONS, MULTIPART_BODY, read_uploads
from .webconfig import ApiError, RequestBody
from .webstate import State, state
from .workspace import photo_count

BROWSERS_SHOW = set(EXTENSIONS) - {".tif"}  # of the formats stored, browsers draw all but TIFF
PREVIEW_SIDE = 1024


def as_png(path: Path) -> bytes:
    """A stored photo browsers cannot show (TIFF), as a PNG of at most PREVIEW_SIDE pixels a side."""
    with Image.open(path) as image:
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        buffer = io.BytesIO()
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


DOUBT = 0.8  # the served model's probability for another class at which an added photo is questioned


async def doubts(s: State, clf: Classifier, name: str, added: list[dict]) -> list[str]:
    """Added photos that the served model, trained on this class, confidently puts in another class."""
    if not added or name not in clf.labels:
        return []
    probs = await s.batcher.classify(clf, np.stack([o["image"] for o in added]))
    found = []
    for outcome, p in zip(added, probs):
        top = int(p.argmax())
        if clf.labels[top] != name and p[top] >= DOUBT:
            found.append(f"{outcome['file']} looks like '{clf.labels[top]}' ({100 * p[top]:.0f}%) to the served model")
    return found


class NewClass(RequestBody):
    name: str = Field(max_length=1000)  # class_name says what is wrong with a long one


class MoveTo(RequestBody):
    to: str = Field(max_length=1000)


def add_photo_routes(app: FastAPI) -> None:
    @app.get("/classes", summary="Training classes, their photo counts, and how long training would take")
    async def classes(request: Request) -> dict:
        s = state(request)
        found = s.workspace.classes()
        sizes = [c["images"] for c in found]
        # The page sizes its upload requests by these, so that a batch of big phone photos is not refused whole.
        limits = {"bytes": s.config.max_upload_bytes, "files": s.config.max_files}
        return {"classes": found, "estimates": {q: estimate(q, sizes) for q in QUALITIES}, "upload_limits": limits}

    @app.post("/classes", status_code=201, summary="Create a training class (names are unique ignoring case)")
    async def create_class(request: Request, body: NewClass) -> dict:
        return {"name": state(request).workspace.create(body.name)}

    @app.delete("/classes/{name}", summary="Delete a training class and its photos (undo with POST /undo/{token})")
    async def delete_class(request: Request, name: str) -> dict:
        return state(request).workspace.delete_class(name)

    @app.get("/classes/{name}/photos", summary="A class's photos, oldest first")
    async def photos(request: Request, name: str) -> dict:
        return {"class": state(request).workspace.folder(name).name, "photos": state(request).workspace.photos(name)}

    @app.post("/classes/{name}/images", openapi_extra=MULTIPART_BODY, summary="Add photos to a training class")
    async def add_images(request: Request, name: str) -> dict:
        s = state(request)
        folder = s.workspace.folder(name)
        uploads = await read_uploads(request, s.config.max_files)
        clf = s.models.clf
        outcomes = await asyncio.gather(*(s.in_threads(s.workspace.add, folder, n, data, clf.prep)
                                          for n, data in uploads))
        rejected = [{"file": o["file"], "error": o["error"]} for o in outcomes if o["status"] == "rejected"]
        if len(rejected) == len(uploads):
            raise ApiError(422, "; ".join(r["error"] for r in rejected))
        added = [o for o in outcomes if o["status"] == "added"]
        return {"added": [o["photo"] for o in added], "doubts": await doubts(s, clf, folder.name, added),
                "duplicates": [o["file"] for o in outcomes if o["status"] == "duplicate"],
                "rejected": rejected, "images": photo_count(folder)}

    @app.get("/photos/{photo}", summary="One training photo, whichever class holds it")
    async def photo(request: Request, photo: str):
        path = state(request).workspace.find_photo(photo)
        cache = {"Cache-Control": "max-age=3600"}
        if path.suffix in BROWSERS_SHOW:
            return FileResponse(path, headers=cache)  # media type from the extension
        return Response(await asyncio.to_thread(as_png, path), media_type="image/png", headers=cache)

    @app.delete("/classes/{name}/photos/{photo}", summary="Delete one photo (undo with POST /undo/{token})")
    async def delete_photo(request: Request, name: str, photo: str) -> dict:
        return state(request).workspace.delete_photo(name, photo)

    @app.post("/classes/{name}/photos/{photo}/move", summary="Move a photo to another class")
    async def move_photo(request: Request, name: str, photo: str, body: MoveTo) -> dict:
        return {"photo": photo, "class": state(request).workspace.move(name, photo, body.to)}

    @app.post("/undo/{token}", summary="Put back a deleted class or photo")
    async def undo(request: Request, token: str) -> dict:
        return state(request).workspace.undo(token)
