"""Where each stage writes under ``work_dir``, atomic writes and commit records.

Stages talk through sets of files. Every file is written under a temporary name in the same
folder, flushed to disk and renamed into place. A stage's outputs form a *set* whose *commit
record* (``<folder>/<stage>.commit.json``: each file's size, mtime and SHA-256) is removed before
the first file is replaced and written last, once every file is on disk. Readers go through
``require_set``: a set without its record, or whose files do not match it, is absent (one line
naming the stage to run again). Correctness rests on the record being written last and checked
on read, not on renames being atomic (they are not on every mounted folder, e.g. Google Drive).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import MissingInputError


class WorkDir:
    """Paths of every stage output, given the config's ``work_dir``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # data_preprocess.py
    @property
    def splits(self) -> Path:
        return self.root / "splits"

    @property
    def splits_record(self) -> Path:
        return self.splits / "data_preprocess.commit.json"

    def manifest(self, split: str) -> Path:
        return self.splits / f"{split}.csv"

    @property
    def split_summary(self) -> Path:
        return self.splits / "summary.json"

    # model_conversion.py
    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def base_model(self) -> Path:
        return self.model_dir / "base.keras"

    @property
    def base_info(self) -> Path:
        return self.model_dir / "base.json"

    @property
    def base_record(self) -> Path:
        return self.model_dir / "model_conversion.commit.json"

    # train.py
    @property
    def classifier(self) -> Path:
        return self.model_dir / "classifier.keras"

    @property
    def classifier_info(self) -> Path:
        return self.model_dir / "classifier.json"

    @property
    def classifier_record(self) -> Path:
        return self.model_dir / "train.commit.json"

    @property
    def features(self) -> Path:
        return self.root / "features"

    # train.py and predict.py
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def reports_record(self) -> Path:
        return self.reports / "predict.commit.json"


STAGE_OF = {
    "splits": "data_preprocess.py",
    "model": "model_conversion.py",
    "classifier": "train.py",
}


def require(path: Path, stage_script: str, what: str = "") -> Path:
    """Return ``path`` if it exists, else raise an error that names the stage to run first."""
    if not Path(path).exists():
        label = f"{what} " if what else ""
        raise MissingInputError(f"{path}: {label}not found; run `python {stage_script}` first")
    return Path(path)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place if the block succeeds.

    The temporary name keeps the suffix (``.keras``, ``.png``) because some writers check it.
    On error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should look like any other file
    try:
        yield tmp_path
        fsync_file(tmp_path)  # the data is on disk before the name points at it
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    kill_point(f"wrote:{path.name}")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename, a removal) to disk where the OS allows it (not Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def kill_point(name: str) -> None:
    """Test hook: die at once (SIGKILL, as a power cut or an OOM kill would) when the environment
    variable ``VGGFACE_GENDER_KILL_AT`` names this point. The crash-safety tests use it."""
    if os.environ.get("VGGFACE_GENDER_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_paths(paths: dict, record: str | os.PathLike | None = None,
                 stage_script: str = "") -> Iterator[dict]:
    """Several outputs written as one: yield ``{key: temporary path}`` for ``{key: path}``.

    Only when the block succeeds are they flushed to disk and renamed into place; on an error
    none is, the temporaries are removed and the previous set stays as it was. With ``record``,
    the old commit record is removed before the first rename and the new one written after the
    last (``commit_set``): a kill in between leaves a set that readers refuse, never a mix.
    """
    with contextlib.ExitStack() as stack:
        temporaries = {key: stack.enter_context(atomic_path(path)) for key, path in paths.items()}
        yield temporaries
        if record is not None:
            invalidate_set(record)  # leaving the ExitStack renames the files: the old record goes first
    if record is not None:
        commit_set(record, paths.values(), stage_script)


# --------------------------------------------------------------------------- commit records
COMMIT_FORMAT = "vggface_gender.commit/1"


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def invalidate_set(record: str | os.PathLike) -> None:
    """Remove a set's commit record (before any of its files is replaced)."""
    record = Path(record)
    with contextlib.suppress(FileNotFoundError):
        record.unlink()
        fsync_dir(record.parent)


def commit_set(record: str | os.PathLike, files, stage_script: str, extra: dict | None = None) -> dict:
    """Write the commit record of ``files`` (already written and fsynced), atomically and last.

    Format: ``{"format", "stage", "files": {name: {"size", "mtime_ns", "sha256"}}, **extra}``,
    names relative to the record's folder with ``/``. Each file is hashed once, here.
    """
    record = Path(record)
    entries = {}
    for path in files:
        path = Path(path)
        st = path.stat()
        name = Path(os.path.relpath(path, record.parent)).as_posix()
        entries[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
    data = {"format": COMMIT_FORMAT, "stage": stage_script, "files": entries, **(extra or {})}
    kill_point(f"commit:{record.name}")
    write_json(record, data)
    return data


def check_set(record: str | os.PathLike) -> tuple[dict | None, str]:
    """``(record, "")`` when the set is complete and unchanged, else ``(None, what is wrong)``.

    A file is unchanged when its size and mtime are those recorded; otherwise it is hashed and
    compared. Hashing on every read would cost seconds for the 540 MB VGG-Face base; a file
    rewritten by any writer gets a new mtime, and a folder that does not keep mtimes (some
    synced drives) only costs the hash.
    """
    record = Path(record)
    try:
        with open(record, encoding="utf-8") as f:
            data = json.load(f)
        files = data["files"]
        if data.get("format") != COMMIT_FORMAT or not isinstance(files, dict):
            return None, f"{record}: not a commit record of this version"
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{record}: unreadable commit record ({type(exc).__name__})"
    for name, expected in files.items():
        path = record.parent / name
        try:
            st = path.stat()
            if st.st_size != expected["size"]:
                return None, f"{path}: size differs from its commit record {record.name}"
            if st.st_mtime_ns != expected["mtime_ns"] and sha256_file(path) != expected["sha256"]:
                return None, f"{path}: content differs from its commit record {record.name}"
        except FileNotFoundError:
            return None, f"{path}: missing from the set its commit record {record.name} lists"
        except (OSError, KeyError, TypeError) as exc:
            return None, f"{path}: cannot check against its commit record ({type(exc).__name__})"
    return data, ""


def require_set(record: str | os.PathLike, stage_script: str, path: str | os.PathLike,
                what: str = "") -> dict:
    """The commit record of the complete set that holds ``path``, else a one-line
    ``MissingInputError`` naming the stage to run (again)."""
    record, path = Path(record), Path(path)
    data, problem = check_set(record)
    if data is None and not problem:
        if not path.exists():
            require(path, stage_script, what)
        problem = (f"{path}: no commit record {record.name} beside it (its run was interrupted, or an "
                   f"earlier version of this project wrote it)")
    if data is not None and Path(os.path.relpath(path, record.parent)).as_posix() not in data["files"]:
        problem = f"{path}: not part of the set recorded in {record}"
    if problem:
        raise MissingInputError(f"{problem}; run `python {stage_script}` again")
    return data


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs):
    """``open()`` for writing, made atomic: the file appears complete or not at all."""
    with atomic_path(path) as tmp:
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")
            kwargs.setdefault("newline", "")  # write exactly what we give (csv needs this)
        with open(tmp, mode, **kwargs) as f:
            yield f  # atomic_path flushes it to disk before the rename


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike, stage_script: str | None = None):
    if stage_script:
        require(Path(path), stage_script)
    with open(path, encoding="utf-8") as f:
        return json.load(f)
