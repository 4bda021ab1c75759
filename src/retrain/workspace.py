"""The web app's workspace: classes and their photos on disk, kept across restarts, with undo for deletions.

Layout under the workspace folder:
    data/<class>/<content hash><sniffed ext>   the training photos (the name is chosen here, never by a client)
    trash/<token>/<class>[/<photo>]            a deleted class or photo, until undone or pruned
    models/<id>/                               trained models (modelstore.py)
    jobs/<id>/                                 a training run in progress (jobs.py)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import unicodedata
import uuid
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UserError
from .files import atomic_write_bytes, atomic_write_json
from .scan import SPLIT_DIR_NAMES, is_hidden
from .uploads import EXTENSIONS, check_image
from .webconfig import ApiError, ServeConfig

MAX_NAME = 64  # characters in a class name
NAME = re.compile(r"[^\W_][\w .+-]*")  # starts with a letter or digit; no path separators
PHOTO = re.compile(r"[0-9a-f]{32}(" + "|".join(re.escape(e) for e in EXTENSIONS) + ")")
TOKEN = re.compile(r"[0-9a-f]{12}")
RESERVED = {n for names in SPLIT_DIR_NAMES.values() for n in names}  # scan would read them as splits


def class_name(text: str) -> str:
    """A class name safe to use as one folder name, or ApiError explaining the rule."""
    name = unicodedata.normalize("NFC", text.strip())
    if len(name) > MAX_NAME:
        raise ApiError(400, f"class name too long: {len(name)} characters, the limit is {MAX_NAME}")
    if not NAME.fullmatch(name) or is_hidden(name) or name.lower() in RESERVED:
        raise ApiError(400, f"invalid class name '{text[:80]}': use letters, digits, spaces or _ . + - , "
                            f"starting with a letter or digit, and not {', '.join(sorted(RESERVED))}")
    return name


def photo_name(text: str) -> str:
    """A photo's server-chosen file name, or 404: nothing else ever becomes a path."""
    if not PHOTO.fullmatch(text):
        raise ApiError(404, "no such photo")
    return text


def photo_count(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if PHOTO.fullmatch(p.name))


def _images(folder: Path) -> list[Path]:
    """A class's photos, oldest first (the order they were added in)."""
    return sorted((p for p in folder.iterdir() if PHOTO.fullmatch(p.name)), key=lambda p: (p.stat().st_mtime, p.name))


def claim(root: Path) -> FileLock:
    """The workspace's folders made and its lock held, or UserError in one line (unusable, or in use)."""
    try:
        for folder in ("data", "trash", "models", "jobs"):
            (root / folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot use {root} as the workspace: {e.strerror or e} (choose another folder)") from None
    # One server per workspace: two would delete each other's runs and race on the same photos.
    holder = FileLock(root / ".serve.lock", timeout=0, thread_local=False)
    try:
        holder.acquire()
    except Timeout:
        raise UserError(f"the workspace {root} is in use by another `retrain serve`: stop that one, or "
                        "choose another workspace") from None
    return holder


class Workspace:
    def __init__(self, root: Path, config: ServeConfig):
        self.root, self.config = root, config
        self.data, self.trash = root / "data", root / "trash"
        self.holder = claim(root)
        for stale in (root / "jobs").iterdir():  # runs a stopped server left behind; this one has none yet
            shutil.rmtree(stale, ignore_errors=True)
        self.lock = threading.RLock()  # uploads are checked and written in decode threads
        self.writing: set[Path] = set()  # photos being written, so a second copy of one is a duplicate
        self.used_bytes = sum(f.stat().st_size for f in self.data.rglob("*") if f.is_file())

    def close(self) -> None:
        self.holder.release()

    # ---------------------------------------------------------------- classes

    def _find(self, name: str) -> Path | None:
        """The class folder whose name equals `name` ignoring case, if any."""
        key = name.casefold()
        return next((p for p in self.data.iterdir() if p.is_dir() and p.name.casefold() == key), None)

    def folder(self, name: str) -> Path:
        """The folder of an existing class; 404 if there is none."""
        path = self._find(class_name(name))
        if path is None:
            raise ApiError(404, f"no class named '{name[:80]}': create it first")
        return path

    def classes(self) -> list[dict]:
        return [{"name": p.name, "images": photo_count(p)}
                for p in sorted(self.data.iterdir(), key=lambda p: p.name.casefold()) if p.is_dir()]

    def create(self, name: str) -> str:
        name = class_name(name)
        with self.lock:
            existing = self._find(name)
            if existing:
                raise ApiError(409, f"a class named '{existing.name}' exists already (class names ignore case)")
            if self._at_class_limit():
                raise ApiError(409, f"at most {self.config.max_classes} classes")
            (self.data / name).mkdir()
        return name

    def photos(self, name: str) -> list[str]:
        return [p.name for p in _images(self.folder(name))]

    # ---------------------------------------------------------------- photos

    def where(self) -> dict[str, str]:
        """{photo: class} of every photo now in the workspace, from one walk of the class folders."""
        return {p.name: f.name for f in self.data.iterdir() if f.is_dir()
                for p in f.iterdir() if PHOTO.fullmatch(p.name)}

    def class_of(self, photo: str) -> str | None:
        """The class holding a photo now, or None (deleted, or not a photo name)."""
        if PHOTO.fullmatch(photo):
            return next((f.name for f in self.data.iterdir() if (f / photo).is_file()), None)
        return None

    def find_photo(self, photo: str) -> Path:
        """A photo's path in whichever class holds it."""
        where = self.class_of(photo_name(photo))
        if where is None:
            raise ApiError(404, "no such photo (deleted?)")
        return self.data / where / photo

    def add(self, folder: Path, name: str, data: bytes, prep) -> dict:
        """Check and store one photo under a server-chosen name: {"file", "status", "error"?, "image"?}."""
        try:
            ext, image = check_image(name, data, prep)
        except ApiError as e:
            return {"file": name, "status": "rejected", "error": e.message}
        photo = hashlib.sha256(data).hexdigest()[:32] + ext
        with self.lock:
            if (folder / photo).exists() or folder / photo in self.writing:  # the same photo twice in a request too
                return {"file": name, "status": "duplicate", "photo": photo}
            other = self.class_of(photo)
            if other:
                return {"file": name, "status": "rejected",
                        "error": f"{name}: the same photo is already in class '{other}'"}
            if self.used_bytes + len(data) > self.config.max_workspace_bytes:
                return {"file": name, "status": "rejected",
                        "error": f"{name}: the training workspace is full ({self.config.max_workspace_bytes >> 20} MiB)"}
            self.used_bytes += len(data)
            self.writing.add(folder / photo)
        written = False
        try:
            atomic_write_bytes(folder / photo, data)  # temp name starts with '.', so a scan never sees half a file
            written = True
        finally:
            with self.lock:
                self.writing.discard(folder / photo)
                if not written:  # a full disk: the photo takes no room in the workspace's limit
                    self.used_bytes -= len(data)
        return {"file": name, "status": "added", "photo": photo, "image": image}

    def move(self, name: str, photo: str, to: str) -> str:
        """Move a photo to another class; returns the class it is in now."""
        source, target = self.folder(name) / photo_name(photo), self.folder(to)
        with self.lock:
            if not source.is_file():
                raise ApiError(404, f"no such photo in class '{source.parent.name}'")
            os.replace(source, target / photo)
        return target.name

    # ---------------------------------------------------------------- deletion and undo

    def delete_class(self, name: str) -> dict:
        folder = self.folder(name)
        return self._discard(folder, {"class": folder.name})

    def delete_photo(self, name: str, photo: str) -> dict:
        path = self.folder(name) / photo_name(photo)
        if not path.is_file():
            raise ApiError(404, f"no such photo in class '{path.parent.name}'")
        return self._discard(path, {"class": path.parent.name, "photo": photo})

    def _discard(self, path: Path, what: dict) -> dict:
        """Move a class folder or a photo into the trash; {"undo": token} plus what went."""
        token = uuid.uuid4().hex[:12]
        place = self.trash / token
        dest = place / what["class"] / what.get("photo", "")  # a photo goes inside its class's folder
        with self.lock:
            dest.parent.mkdir(parents=True)
            size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()))
            os.replace(path, dest)
            atomic_write_json(place / "what.json", what | {"deleted": time.time()})  # whole after a crash: undo reads it
            self.used_bytes -= size
            self._prune_trash()
        return {"undo": token} | what

    def undo(self, token: str) -> dict:
        """Put a deleted class or photo back (into the class of that name, made again if need be)."""
        place = self.trash / token if TOKEN.fullmatch(token) else None
        if place is None or not (place / "what.json").is_file():
            raise ApiError(404, "nothing to undo under that token (already undone, or too old)")
        what = json.loads((place / "what.json").read_text(encoding="utf-8"))
        with self.lock:
            target = self._find(what["class"]) or self.data / what["class"]
            self._check_undo(place / what["class"], target)
            target.mkdir(exist_ok=True)
            for photo in (place / what["class"]).iterdir():
                self.used_bytes += photo.stat().st_size
                os.replace(photo, target / photo.name)
            shutil.rmtree(place)
        return what | {"restored": True}

    def _check_undo(self, held: Path, target: Path) -> None:
        """Refuse an undo of `held` (the class folder in the trash) that would break a rule the upload keeps: one
        class per photo, at most max_classes. The photos stay in the trash, so the undo can be tried again."""
        where = self.where()
        elsewhere = {p.name: where[p.name] for p in held.iterdir() if where.get(p.name, target.name) != target.name}
        if elsewhere:
            named = ", ".join(f"{p} (now in '{c}')" for p, c in list(elsewhere.items())[:3])
            raise ApiError(409, f"cannot undo: {len(elsewhere)} of its photos were added to another class since: "
                           f"{named}; a photo belongs to one class: delete or move it there, then undo again")
        if not target.is_dir() and self._at_class_limit():
            raise ApiError(409, f"cannot undo: it would make a class again, and there are {self.config.max_classes} "
                           "already (the most); delete one, then undo again")

    def _at_class_limit(self) -> bool:
        return sum(p.is_dir() for p in self.data.iterdir()) >= self.config.max_classes

    def _prune_trash(self) -> None:
        held = sorted(self.trash.iterdir(), key=lambda p: p.stat().st_mtime)
        for place in held[:max(0, len(held) - self.config.trash_kept)]:
            shutil.rmtree(place, ignore_errors=True)

    # ---------------------------------------------------------------- training

    def snapshot(self, dest: Path) -> Path:
        """Hard-linked copy of the photos, so changes during training cannot change the run."""
        with self.lock:
            return Path(shutil.copytree(self.data, dest, copy_function=os.link, ignore=shutil.ignore_patterns(".*")))

    def ready_to_train(self) -> None:
        classes = self.classes()
        empty = [c["name"] for c in classes if not c["images"]]
        if len(classes) - len(empty) < 2:
            raise ApiError(400, "add photos to at least two classes first" +
                           (f" (no photos yet in: {', '.join(empty)})" if empty else ""))
        if empty:
            raise ApiError(400, f"every class needs photos: none yet in {', '.join(empty)} (add some, or delete "
                           f"{'it' if len(empty) == 1 else 'them'})")
