"""Where each stage writes under ``work_dir``, and atomic writes.

Stages talk through files. Every file is written under a temporary name in the same folder
and renamed into place, so an interrupted run never leaves a half-written file that a
later stage would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
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

    # train.py
    @property
    def classifier(self) -> Path:
        return self.model_dir / "classifier.keras"

    @property
    def classifier_info(self) -> Path:
        return self.model_dir / "classifier.json"

    @property
    def features(self) -> Path:
        return self.root / "features"

    # train.py and predict.py
    @property
    def reports(self) -> Path:
        return self.root / "reports"


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
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_paths(paths: dict) -> Iterator[dict]:
    """Several outputs written as one: yield ``{key: temporary path}`` for ``{key: path}``.

    Only when the block succeeds are all of them flushed to disk and renamed into place; on an
    error none is, and the temporaries are removed (a later stage never sees half a set).
    """
    with contextlib.ExitStack() as stack:
        temporaries = {key: stack.enter_context(atomic_path(path)) for key, path in paths.items()}
        yield temporaries
        for path in temporaries.values():
            fsync_file(path)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs):
    """``open()`` for writing, made atomic: the file appears complete or not at all."""
    with atomic_path(path) as tmp:
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")
            kwargs.setdefault("newline", "")  # write exactly what we give (csv needs this)
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | os.PathLike, stage_script: str | None = None):
    if stage_script:
        require(Path(path), stage_script)
    with open(path, encoding="utf-8") as f:
        return json.load(f)
