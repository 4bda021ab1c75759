"""Where trained models are written, checked before training so that no output destroys the user's files.

`retrain train --output DIR` used to replace whatever report.html or labels.txt the user kept in DIR,
and `--output photos/ants` wrote report PNGs into a class folder that the next run trained on. Now:
- DIR must be new, empty, or a folder retrain wrote (it holds MARKER), unless the user says --overwrite;
- no output may lie inside an image folder;
- an output that is an existing file (for a folder) or a folder (for a file) is refused;
all before any work. The model's files are written into a staging folder inside DIR and renamed
into place only when every one is complete, so a full or read-only disk leaves the previous model
whole and a one-line message naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import UserError
from .files import atomic_write_json
from .guards import not_a_regular_file
from .interrupts import interrupts_deferred

MARKER = ".retrain-output"  # a JSON note of what retrain wrote here: its presence makes the folder retrain's
_LEGACY_METRICS = "metrics.json"  # model folders written before MARKER existed hold one with a "provenance" key


def os_error_message(e: OSError, doing: str, what: str | os.PathLike | None = None) -> str:
    """'cannot write PATH: No space left on device (what to do)', for the errors a user causes.

    `what` names the path when the one in the error is an internal temporary name."""
    what = what or e.filename or "?"
    hints = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
             errno.EROFS: "the file system is read-only: write elsewhere",
             errno.EACCES: "check the permissions or write elsewhere", errno.EPERM: "check the permissions"}
    hint = hints.get(e.errno)
    return f"cannot {doing} {what}: {e.strerror or e}" + (f" ({hint})" if hint else "")


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _refuse_inside_inputs(path: Path, flag: str, inputs: Iterable[str | os.PathLike | None],
                          top_level_ok: bool = False) -> None:
    """`top_level_ok`: a file directly in an image folder is never read as a photo (only class folders are)."""
    for folder in inputs:
        if top_level_ok and folder and path.resolve().parent == Path(folder).resolve():
            continue
        if folder and _inside(path, Path(folder)):
            raise UserError(f"{flag} {path} is inside the image folder {folder}: the next scan would read "
                            "the outputs as photos; write it somewhere else")


def written_by_retrain(folder: Path) -> bool:
    if (folder / MARKER).is_file():
        return True
    try:
        return "provenance" in json.loads((folder / _LEGACY_METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def check_output_dir(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], overwrite: bool,
                     flag: str = "--output", replaces: str = "model.onnx, labels.txt, metrics.json and report.html"
                     ) -> None:
    """Refuse, before any work, a model folder that would destroy user files or land among the photos, is a file
    or sits in one's place, or cannot be written. overwrite: the folder's other files may stay beside the output
    (with --overwrite, or a folder shared by runs such as --summaries_dir)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is an existing file: give the path of a folder")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker:
        raise UserError(f"{flag} {out}: {blocker} is a file, not a folder")
    _refuse_inside_inputs(out, flag, inputs)
    if out.is_dir() and not overwrite and not written_by_retrain(out):
        theirs = sorted(p.name for p in out.iterdir())
        if theirs:
            raise UserError(f"{flag} {out} already holds files retrain did not write ({', '.join(theirs[:4])}"
                            f"{', ...' if len(theirs) > 4 else ''}): give a new or empty folder, or add --overwrite "
                            f"to replace {replaces} there")
    _probe_writable(out)


def check_output_file(path: str | os.PathLike, flag: str, inputs: Iterable[str | os.PathLike | None] = (),
                      example: str = "output_graph.onnx") -> None:
    """Refuse, before any work, a file output that names a folder, sits in a file's place, or lies among the photos."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name, e.g. {path / example}")
    refusal = not_a_regular_file(path)
    if refusal:  # replacing it would turn a device or pipe (/dev/null for one) into a file
        raise UserError(f"{flag} {path} is {refusal.strerror}: give the path of a file (retrain writes whole "
                        "files, each replaced at once)")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    _refuse_inside_inputs(path, flag, inputs, top_level_ok=True)
    _probe_writable(path.parent)


def _probe_writable(folder: Path) -> None:
    """A scratch file in `folder`, or in its nearest existing parent, now: a read-only or forbidden place fails
    before training, and a run that fails later leaves no empty folder behind."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        e.filename = str(folder)
        raise UserError(os_error_message(e, "write to")) from None


def write_model_dir(out: str | os.PathLike, write: Callable[[Path], None], kind: str) -> Path:
    """Run `write(staging)` in a staging folder inside `out`, then rename every file it made into `out`.

    A failure part-way (a full disk, a read-only mount) removes the staging folder and leaves the
    previous model in `out` untouched; the UserError names the path and what to do. The note lists
    each kind's files ("model", "export", "comparison"). A write replaces its own kind's files and
    those of any kind it shares a name with (a model and an export both write model.onnx): what
    those listed and this write did not make (a saliency map, the plots of a split that is gone, an
    export's .ort) is removed, since beside the new model it would describe the old one. A kind
    that shares no name with it (a comparison beside a model) is left as it is.
    """
    out = Path(out)
    previous = _files_by_kind(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(out)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{socket.gethostname()}-{os.getpid()}-", dir=out))
    except OSError as e:
        raise UserError(os_error_message(e, "write the model to")) from None
    try:
        names = _stage(staging, write, out)
        made = set(names)
        kept = {k: files for k, files in previous.items() if k != kind and not files & made}
        stale = set().union(*previous.values()) - made - set().union(*kept.values())
        try:
            _note(staging, kind, names, kept)
        except OSError as e:
            raise _not_written(e, out) from None
        try:
            with interrupts_deferred():  # Ctrl-C between two renames would pair a new model with old labels
                for name in names:  # renames within one folder: no space needed, each one atomic
                    os.replace(staging / name, out / name)
                for name in stale:
                    with contextlib.suppress(OSError):  # a stale file that cannot go is no reason to fail the model
                        (out / name).unlink(missing_ok=True)
                os.replace(staging / MARKER, out / MARKER)  # last: until it lands, the old note lists the old files
        except OSError as e:
            raise UserError(os_error_message(e, "move the model into", out)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


STAGING = ".retrain-staging-"  # + host-pid-random: a write's folder inside the output until its files move out


def _remove_abandoned_staging(out: Path) -> None:
    """Staging folders of writes that were killed (SIGKILL, a power cut) before they could clean up: those made
    on this host by a process that is gone. Another host's, or a live process's, are left alone."""
    host = socket.gethostname()
    for folder in out.glob(f"{STAGING}*"):
        made_on, _, rest = folder.name[len(STAGING):].rpartition("-")[0].rpartition("-")
        if made_on == host and rest.isdigit() and not _alive(int(rest)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but is not ours to signal
        pass
    return True


def _files_by_kind(out: Path) -> dict[str, set[str]]:
    """{kind: plain file names} from the MARKER in `out`; {} if there is none or it is unreadable. A note
    from before kinds were recorded lists one write's files: its kind is told by them."""
    try:
        note = json.loads((out / MARKER).read_text(encoding="utf-8"))
        by_kind = note.get("by_kind") or {_kind_of(note["files"]): note["files"]}
        return {str(k): _plain_names(files) for k, files in by_kind.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _kind_of(files: list) -> str:
    return "comparison" if "compare.json" in files else "export" if "export.json" in files else "model"


def _plain_names(files: object) -> set[str]:
    """Only names of files directly in the folder: a note edited by hand must not reach anything else."""
    if not isinstance(files, list):
        raise TypeError("not a list of names")
    return {f for f in files if isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..", MARKER)}


def _not_written(e: OSError, out: Path) -> UserError:
    return UserError(os_error_message(e, "write the model to", out) + "; the folder's previous contents are unchanged")


def _note(staging: Path, kind: str, names: list[str], kept: dict[str, set[str]]) -> None:
    """MARKER: this write's files and those of the kinds it leaves in place, each under its kind."""
    by_kind = {k: sorted(files) for k, files in kept.items()} | {kind: names}
    atomic_write_json(staging / MARKER, {"written_by": "retrain", "by_kind": by_kind,
                                         "files": sorted(set().union(*map(set, by_kind.values())))})


def _stage(staging: Path, write: Callable[[Path], None], out: Path) -> list[str]:
    """Every file of the model written into `staging`; their names (MARKER, written by _note, is not one)."""
    try:
        write(staging)
        names = sorted(p.name for p in staging.iterdir())
    except OSError as e:
        raise _not_written(e, out) from None
    return names
