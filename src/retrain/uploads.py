"""Images from requests: recognised by their bytes, never their name, and decoded under decode.py's pixel limit."""
from __future__ import annotations

from pathlib import PurePath

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile

from .decode import UnreadableImage, load_image
from .webconfig import ApiError

# Leading bytes of the formats we decode, and the extension a training image is saved under.
# Anything else (SVG, PDF, EPS, which Pillow would hand to Ghostscript, ...) is refused unread.
SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF87a", ".gif"),
              (b"GIF89a", ".gif"), (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))
EXTENSIONS = (".jpg", ".png", ".gif", ".bmp", ".tif", ".webp")
FORMATS = "JPEG, PNG, GIF, BMP, WebP or TIFF"
MULTIPART_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


def sniff(data: bytes) -> str | None:
    """The extension for `data`'s image format judged by its first bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in SIGNATURES if data.startswith(magic)), None)


def display_name(filename: str | None) -> str:
    """The client's file name for messages only: last component, bounded length."""
    name = PurePath((filename or "").replace("\\", "/")).name
    return name[:120] or "upload"


def check_image(name: str, data: bytes, prep) -> tuple[str, np.ndarray]:
    """(extension, (S, S, 3) uint8 image) for an upload, or ApiError saying what is wrong."""
    if not data:
        raise ApiError(422, f"{name}: empty file (0 bytes)")
    ext = sniff(data)
    if ext is None:
        raise ApiError(415, f"{name}: not a {FORMATS} image (judged by its content, not its name)")
    try:
        return ext, load_image(data, prep)
    except UnreadableImage as e:
        raise ApiError(422, f"{name}: {e}") from None


async def read_uploads(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    """[(display name, bytes)] of every file part of a multipart/form-data request, whatever the
    part's name ('files' by convention; clients that say 'file' or 'image' are served too)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "send the images as multipart/form-data file parts (field name 'files')")
    form = await request.form(max_files=max_files, max_fields=16)
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise ApiError(400, "no image in the request: add one or more file parts named 'files'")
        return [(display_name(f.filename), await f.read()) for f in files]
    finally:
        await form.close()
