"""Sample the class folders into reproducible, leak-free train / validation / test manifests.

The stage (``run_stage``), in order:

1. **Scan** each class folder (``data.root / data.class_dirs[class]``) recursively for image
   file names (``images.IMAGE_EXTENSIONS``, any case); hidden files and folders are skipped.
2. **Hash** every candidate by content (SHA-256, read in chunks on a few threads: memory does
   not grow with file sizes, only by ~200 bytes of bookkeeping per file).
3. **Deduplicate**: identical files within a class keep one copy (the first path in sorted
   order); identical files filed under more than one class are dropped altogether (their label
   is unknowable). Every dropped copy is reported. So no content can reach two splits.
   With ``data.dedup: near`` every candidate is also decoded once (small, by the one loader) for
   a perceptual hash, and near-duplicate photos (re-encoded, resized, mirrored, recoloured) are
   linked into capped groups (``grouping``); that decode also serves as the decode check.
   ``data.groups`` adds the user's groups (e.g. one per person). A group never crosses splits.
4. **Order** each class's unique images by ``sha256(seed, content hash)``: a random order that
   depends only on the seed and the images themselves, not on file names, the folder's listing
   order, the platform or library versions. Adding images to a folder does not reshuffle the
   others.
5. **Draw** the held-out test set first, then the training sample, walking that order and
   decode-verifying each image with the project's one loader; a file that fails is reported and
   the next one in the order takes its place, so the requested counts still hold. Only the
   drawn images (and their replacements) are decoded. A ``test_per_class`` of ``all`` means
   "every usable image not in the sample": then the sample is drawn first.
6. **Split** each class's sample into validation (``round(n * val_fraction)``, the first in the
   order) and training: stratified by construction. Groups are drawn whole (the test set keeps
   one image per near-duplicate set); one too large for what a split still needs is passed over,
   so counts hold exactly where the groups allow, else to within one group's size.
7. **Write** ``work_dir/splits/{train,val,test}.csv`` (``path,label,sha256``; path relative to
   ``data.root`` with ``/`` separators; rows sorted by class, then path) and ``summary.json``,
   as one set with its commit record (``workdir.atomic_paths``). No timestamps: the same images, config and seed give byte-identical files.

With ``faces.detect: mtcnn`` the draw's decode check is a face check: each drawn image is
decoded at full resolution and detected once (TensorFlow is imported only then); its face crop
is written to ``work_dir/faces/<sha256 of the PNG bytes>.png`` and the manifest gains the columns
``crop,crop_sha256,x,y,w,h,confidence`` (crop relative to ``work_dir``; box in pixels of the
image as the user sees it, after EXIF orientation). An image without a usable face (none found,
or several with ``faces.multiple: skip``) is reported with its reason and replaced like an
undecodable one.

Nothing under ``data.root`` is created, changed or removed; files are only opened for reading.
Imports neither TensorFlow nor matplotlib unless faces.detect is on.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from . import faces, grouping, images
from .config import ALL
from .errors import ConfigError, DataError, ImageError
from .progress import Progress
from .workdir import WorkDir, atomic_open, atomic_paths, require, sha256_file

SPLITS = ("train", "val", "test")
MANIFEST_HEADER = ("path", "label", "sha256")
FACE_COLUMNS = ("crop", "crop_sha256", "x", "y", "w", "h", "confidence")
FACE_MANIFEST_HEADER = MANIFEST_HEADER + FACE_COLUMNS
FACES_DIR = "faces"  # under work_dir: the training crops (never beside the user's images)
SUMMARY_FORMAT = "vggface_gender.splits/1"
STAGE_SCRIPT = "data_preprocess.py"

# Reasons a file is not used (summary.json "skipped"[].reason); details say more.
HIDDEN = "hidden"
NOT_IMAGE_NAME = "not an image file name"
BAD_NAME = "file name not UTF-8"
UNREADABLE = "unreadable"
EMPTY = "empty file"
DUPLICATE = "duplicate"
IN_BOTH_CLASSES = "in more than one class"
UNDECODABLE = "undecodable"
NEAR_DUPLICATE = "near-duplicate"
NO_FACE = "no face found"
SEVERAL_FACES = "several faces"

_HASH_BATCH = 32  # files per hashing task
_PROCESS_HASHING_FROM = 1000  # candidates: perceptual hashing in worker processes from this many
_ORDER_DOMAIN = b"vggface_gender.dataset.order\0"


# --------------------------------------------------------------------------- manifests (read side)
class ManifestEntry(NamedTuple):
    """One manifest row for train/predict: the image's absolute path, its class name and the
    SHA-256 of its bytes when the split was made (the image's identity for lineage checks).

    With face detection on, ``image`` is the face crop written under ``work_dir`` and
    ``image_sha256`` its hash; the network sees the crop, the lineage stays the user's file.
    """

    path: Path
    label: str
    sha256: str
    image: Path | None = None
    image_sha256: str | None = None

    @property
    def source(self) -> Path:
        """The file the network decodes: the face crop if there is one, else the image."""
        return self.image or self.path

    @property
    def source_sha256(self) -> str:
        """The content hash of ``source`` (what the feature cache is keyed and checked by)."""
        return self.image_sha256 or self.sha256


def read_manifest(path: str | os.PathLike, data_root: str | os.PathLike,
                  classes: Sequence[str] | None = None,
                  work_dir: str | os.PathLike | None = None) -> list[ManifestEntry]:
    """Read a split manifest written by ``data_preprocess.py``.

    Paths in the file are relative to ``data_root`` (so the data folder may move); labels are
    class names. With ``classes``, a label outside them is a one-line ``DataError``. A missing
    manifest is a ``MissingInputError`` that names ``data_preprocess.py``. A manifest made with
    face detection also fills ``image``/``image_sha256`` (the crop, relative to ``work_dir``:
    by default the folder above the manifest's ``splits/``).
    """
    path = require(Path(path), STAGE_SCRIPT, "split manifest")
    data_root = Path(data_root)
    work_root = Path(work_dir) if work_dir is not None else path.parent.parent
    allowed = None if classes is None else set(classes)
    entries: list[ManifestEntry] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            expected = tuple(header or ()) if tuple(header or ()) in (
                MANIFEST_HEADER, FACE_MANIFEST_HEADER) else None
            if expected is None:
                raise DataError(f"{path}: not a split manifest (header {header!r}, expected "
                                f"{','.join(MANIFEST_HEADER)}[,{','.join(FACE_COLUMNS)}]); "
                                f"run `python {STAGE_SCRIPT}` again")
            for row in reader:
                line = reader.line_num
                if len(row) != len(expected) or not row[0] or not row[1]:
                    raise DataError(f"{path}: line {line}: expected {','.join(expected)}, got {row!r}")
                rel, label = row[0], row[1]
                if allowed is not None and label not in allowed:
                    raise DataError(
                        f"{path}: line {line}: label {label!r} is not one of the configured classes "
                        f"({', '.join(classes)}); run `python {STAGE_SCRIPT}` with this config")
                crop = (work_root / PurePosixPath(row[3]), row[4]) if len(row) > 3 else (None, None)
                entries.append(ManifestEntry(data_root / PurePosixPath(rel), label, row[2], *crop))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable split manifest ({type(exc).__name__}: {exc})") from None
    return entries


def split_face_policy(work_dir: str | os.PathLike) -> faces.FacePolicy | None:
    """The face policy the splits under ``work_dir`` were made with (``summary.json``), or None
    when not recorded (manifests written by hand, or by an earlier version)."""
    try:
        with open(WorkDir(work_dir).split_summary, encoding="utf-8") as f:
            recorded = json.load(f)["config"]["faces"]
        return faces.FacePolicy.from_dict(recorded)
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- the stage
@dataclass
class _Skip:
    path: str
    label: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"path": self.path, "class": self.label, "reason": self.reason, "detail": self.detail}


@dataclass
class _ClassReport:
    folder: str
    image_files: int = 0
    unique: int = 0
    duplicates: int = 0
    in_both_classes: int = 0
    unreadable: int = 0
    verified: int = 0
    undecodable: int = 0
    near_duplicates: int = 0
    no_face: int = 0
    counts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        used = sum(self.counts.values())
        return {
            "folder": self.folder,
            "image_files": self.image_files,
            "unique_candidates": self.unique,
            "duplicates_dropped": self.duplicates,
            "in_both_classes_dropped": self.in_both_classes,
            "unreadable_or_empty": self.unreadable,
            "decode_verified": self.verified,
            "undecodable": self.undecodable,
            "near_duplicates_unused": self.near_duplicates,
            "no_usable_face": self.no_face,
            "used": used,
            "unused_not_verified": self.unique - self.verified,
        }



def run_stage(cfg, *, workers: int | None = None, quiet: bool = False) -> dict:
    """Write the split manifests and ``summary.json`` under ``work_dir/splits``; return the summary.

    ``workers``: threads for hashing and decoding (default: from the CPU count); ``quiet``: no
    progress bars or report.
    """
    where = str(cfg.source) if getattr(cfg, "source", None) else "config"
    classes = cfg.classes
    data = cfg.data
    root = Path(data.root)
    test_n, sample_n = data.test_per_class, data.sample_per_class
    if test_n == ALL and sample_n == ALL:
        raise ConfigError(f"{where}: data.test_per_class and data.sample_per_class cannot both be "
                          f"'all' (which one gets the images?)")
    folders = _check_folders(cfg, root, classes, where)
    rule = grouping.group_rule(cfg)  # a bad regex or CSV fails before any work
    face_policy = faces.FacePolicy.from_config(cfg)
    crops = _FaceCrops(face_policy, Path(cfg.work_dir) / FACES_DIR) if face_policy.detect != "none" else None
    if images_truncation_allowed():
        print("warning: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated "
              "images will not be detected", file=sys.stderr)

    # 1. scan
    skipped: list[_Skip] = []
    paths: list[str] = []
    labels = bytearray()  # class index per candidate, parallel to paths
    reports = {}
    for c, cls in enumerate(classes):
        found = _scan_class(root, folders[cls], cls, skipped)
        if not found:
            raise DataError(f"{root / folders[cls]}: no image files for class '{cls}' (searched all "
                            f"subfolders for {', '.join(images.IMAGE_EXTENSIONS)}, any case)")
        reports[cls] = _ClassReport(folder=folders[cls], image_files=len(found))
        paths.extend(found)
        labels.extend([c] * len(found))

    # 2. hash (in order; results do not depend on thread timing)
    n = len(paths)
    with contextlib.ExitStack() as stack:  # the hashing workers, if any, end with step 3
        hash_pool = _hash_pool(n, workers or _cpu_count(), stack) if data.dedup == "near" else None
        digests = bytearray(32 * n)
        hashed = np.zeros(n, dtype=bool)
        hash_workers = workers or min(8, 2 * _cpu_count())
        root_text = os.fspath(root)
        with Progress(n, "hashing", enabled=not quiet) as bar:
            # Batches of files per task: for small files the per-task overhead would dominate.
            batches = (paths[i: i + _HASH_BATCH] for i in range(0, n, _HASH_BATCH))
            results = _ordered_map(lambda batch: [_hash_file(os.path.join(root_text, rel)) for rel in batch],
                                   batches, hash_workers)
            i = 0
            for batch_results in results:
                for result in batch_results:
                    if isinstance(result, bytes):
                        digests[32 * i: 32 * i + 32] = result
                        hashed[i] = True
                    else:
                        skipped.append(_Skip(paths[i], classes[labels[i]],
                                             EMPTY if result == EMPTY else UNREADABLE,
                                             "" if result == EMPTY else result))
                        reports[classes[labels[i]]].unreadable += 1
                    i += 1
                bar.update(len(batch_results))
        digest_rows = np.frombuffer(digests, dtype=np.uint8).reshape(n, 32)  # a view, no copy
        if crops is not None:
            crops.digests = digest_rows

        # 3. deduplicate: identical files, then (data.dedup: near) near-duplicate photos
        unique = _deduplicate(paths, labels, digest_rows, hashed, classes, skipped, reports)
        for c, cls in enumerate(classes):
            reports[cls].unique = len(unique[c])
        near_root, near_info, decoded = None, None, np.zeros(n, dtype=bool)
        if data.dedup == "near":
            unique, near_root, near_info, decoded = _near_duplicates(
                paths, labels, unique, classes, root, skipped, reports, data.near_threshold, hash_pool,
                quiet)

    # 4.-6. order (in groups), draw with verification, split
    rows: dict[str, list[tuple[str, str, str]]] = {s: [] for s in SPLITS}
    warnings: list[str] = []
    verify_workers = workers or _cpu_count()
    needed = sum(x for x in (test_n, sample_n) if x != ALL)
    units: dict[str, list] = {}
    group_info = {"rule": rule.describe if rule else None, "per_class": {}}
    for c, cls in enumerate(classes):
        order = _ordered(unique[c], digest_rows, cfg.seed)
        units[cls] = _units(order, paths, near_root, rule, folders[cls], group_info["per_class"], cls)
        if len(unique[c]) < needed and not data.allow_fewer:
            # Fail before decoding the other classes; decoding this short pool (cheaper than a
            # successful run) makes the error's count of usable images exact.
            drawn = _draw(units[cls], test_n, sample_n, paths, root, cls, reports[cls], [],
                          verify_workers, quiet=True, decoded=decoded, crops=crops)
            raise _too_few(root / folders[cls], cls, reports[cls],
                           _size(drawn["test"]) + _size(drawn["sample"]), test_n, sample_n)
        _check_enough_groups(units[cls], root / folders[cls], cls, test_n, sample_n, data.val_fraction)
    for c, cls in enumerate(classes):
        report = reports[cls]
        drawn = _draw(units[cls], test_n, sample_n, paths, root, cls, report, skipped,
                      verify_workers, quiet, decoded, crops)
        largest = max((sum(len(sub) for sub in unit) for unit in units[cls]), default=1)
        slack = largest - 1  # whole groups: a count may fall short by less than one group
        got = {"test": _size(drawn["test"]), "sample": _size(drawn["sample"])}
        usable = got["test"] + got["sample"]
        short = any(requested != ALL and got[split] < requested - slack
                    for split, requested in (("test", test_n), ("sample", sample_n)))
        if short and not data.allow_fewer:
            raise _too_few(root / folders[cls], cls, report, usable, test_n, sample_n)
        if not usable and (needed or ALL in (test_n, sample_n)):
            raise DataError(f"{root / folders[cls]}: no usable images for class '{cls}' "
                            f"({report.image_files} image files, none both unique and decodable)")
        for split, requested in (("test", test_n), ("sample", sample_n)):
            if requested != ALL and got[split] < requested:
                why = ("data.allow_fewer is true" if got[split] < requested - slack else
                       f"whole groups of up to {largest} images")
                warnings.append(f"class '{cls}': {got[split]} {split} images, "
                                f"{requested} requested ({why})")
        sample = drawn["sample"]
        n_val = math.floor(_size(sample) * data.val_fraction + 0.5)
        val, train, in_val = [], [], 0
        for unit in sample:  # in the seeded order; a group goes to validation if it fits
            if in_val + len(unit) <= n_val:
                val.extend(unit)
                in_val += len(unit)
            else:
                train.extend(unit)
        chosen = {"val": val, "train": train, "test": [i for unit in drawn["test"] for i in unit]}
        for split in SPLITS:
            report.counts[split] = len(chosen[split])
            rows[split].extend(sorted((paths[i], cls, digest_rows[i].tobytes().hex(),
                                       *(crops.columns[i] if crops else ()))
                                      for i in chosen[split]))
        for split, requested in (("train", sample_n), ("test", test_n)):
            if not chosen[split] and requested != 0:
                warnings.append(f"class '{cls}': the {split} split is empty")

    # 7. write
    return _write_outputs(cfg, classes, rows, reports, skipped, warnings, quiet,
                          near_info, group_info if rule else None, face_policy)


def images_truncation_allowed() -> bool:
    """Whether Pillow was switched (by someone in this process) to pad truncated files."""
    from PIL import ImageFile
    return bool(ImageFile.LOAD_TRUNCATED_IMAGES)


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _check_folders(cfg, root: Path, classes: list[str], where: str) -> dict[str, str]:
    """Validate data.root, data.class_dirs and work_dir; return class -> folder (POSIX, relative)."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "folder not found"
        raise DataError(f"{root}: data {what} (data.root in {where})")
    folders: dict[str, str] = {}
    for cls in classes:
        raw = cfg.data.class_dirs[cls]
        rel = PurePosixPath(raw.replace("\\", "/"))
        if rel.is_absolute() or Path(raw).is_absolute() or ".." in rel.parts or str(rel) in ("", "."):
            raise ConfigError(f"{where}: data.class_dirs.{cls}: expected a folder name inside "
                              f"data.root, got {raw!r}")
        folder = root / rel
        if not folder.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            listing = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "") or "no folders"
            what = "is not a folder" if folder.exists() else "not found"
            raise DataError(f"{folder}: folder for class '{cls}' {what} (data.class_dirs.{cls} = "
                            f"{raw!r}); {root} holds: {listing}; e.g. "
                            f"--set data.class_dirs.{cls}=<folder>")
        folders[cls] = str(rel)
    names = list(folders.items())
    for i, (a, fa) in enumerate(names):
        for b, fb in names[i + 1:]:
            pa, pb = PurePosixPath(fa).parts, PurePosixPath(fb).parts
            if pa == pb[: len(pa)] or pb == pa[: len(pb)]:
                raise ConfigError(f"{where}: data.class_dirs: the folders of '{a}' ({fa!r}) and "
                                  f"'{b}' ({fb!r}) overlap; each class needs its own folder")
    work = Path(os.path.realpath(cfg.work_dir))
    real_root = Path(os.path.realpath(root))
    if work == real_root or real_root in work.parents:
        raise ConfigError(f"{where}: work_dir ({cfg.work_dir}) is inside data.root ({root}); "
                          f"nothing may be written there: choose a work_dir outside it")
    return folders


def _scan_class(root: Path, folder: str, cls: str, skipped: list[_Skip]) -> list[str]:
    """Image files under ``root/folder`` as sorted POSIX paths relative to ``root``."""
    found: list[str] = []

    def unreadable_folder(exc: OSError) -> None:
        rel = _relative(root, exc.filename) if exc.filename else folder
        skipped.append(_Skip(rel, cls, UNREADABLE, f"cannot list folder ({exc.strerror or exc})"))

    for dirpath, dirnames, filenames in os.walk(root / folder, onerror=unreadable_folder):
        rel_dir = _relative(root, dirpath)
        for name in sorted(d for d in dirnames if d.startswith(".")):
            skipped.append(_Skip(f"{rel_dir}/{name}", cls, HIDDEN, "hidden folder, not searched"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            rel = f"{rel_dir}/{name}"
            if name.startswith("."):
                skipped.append(_Skip(rel, cls, HIDDEN, "hidden file"))
            elif not images.is_image_file(name):
                skipped.append(_Skip(rel, cls, NOT_IMAGE_NAME,
                                     f"extension not one of {', '.join(images.IMAGE_EXTENSIONS)}"))
            elif not _utf8(rel):
                # The manifest is UTF-8 text; such a name cannot be written into it faithfully.
                skipped.append(_Skip(rel.encode("utf-8", "backslashreplace").decode("ascii", "replace"),
                                     cls, BAD_NAME, "rename the file to use it"))
            else:
                found.append(rel)
    found.sort()
    return found


def _relative(root: Path, path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _hash_file(path: str) -> bytes | str:
    """SHA-256 digest of the file's bytes, or the reason it cannot be read (``EMPTY`` if empty).

    ``hashlib.file_digest`` reads through one fixed buffer (memory stays flat whatever the file
    sizes) and releases the GIL while hashing, so threads help on large files.
    """
    try:
        with open(path, "rb", buffering=0) as f:
            digest = hashlib.file_digest(f, "sha256")
            size = f.tell()  # file_digest read up to the end
    except OSError as exc:
        return f"cannot read ({exc.strerror or type(exc).__name__})"
    return digest.digest() if size else EMPTY


def _ordered_map(fn: Callable, items: Iterable, workers: int, pool: ProcessPoolExecutor | None = None
                 ) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads (or on ``pool``'s processes: then ``fn`` and the
    items must pickle), results in input order, few tasks in flight.

    Bounded so that memory does not grow with the number of items.
    """
    if pool is None and workers <= 1:
        yield from map(fn, items)
        return
    executor = pool or ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        if pool is None:
            executor.shutdown(wait=True, cancel_futures=True)
        else:
            for future in pending:
                future.cancel()


def _deduplicate(paths, labels, digest_rows, hashed, classes, skipped, reports) -> list[np.ndarray]:
    """Indices of the unique, single-class files of each class; report every dropped copy."""
    lab = np.frombuffer(labels, dtype=np.uint8)
    keep = hashed.copy()
    idx = np.flatnonzero(hashed)
    # Group by the digest's first 8 bytes (8 bytes per file, not 32); only the rare runs that
    # share a prefix are compared in full. Ties sort by index: paths are sorted within a class and
    # classes come in label order, so the first file of a group is the one kept.
    prefix = np.ascontiguousarray(digest_rows[idx, :8]).view(">u8").ravel()
    perm = np.lexsort((idx, prefix))
    order, prefix = idx[perm], prefix[perm]
    repeated = np.flatnonzero(prefix[1:] == prefix[:-1])
    del perm, prefix
    run_starts = repeated[np.r_[True, np.diff(repeated) > 1]] if repeated.size else repeated
    run_stops = np.r_[repeated[np.r_[np.diff(repeated) > 1, True]] + 2] if repeated.size else repeated
    for start, stop in zip(run_starts.tolist(), run_stops.tolist()):
        groups: dict[bytes, list[int]] = {}
        for i in order[start:stop].tolist():
            groups.setdefault(digest_rows[i].tobytes(), []).append(i)
        for group in groups.values():
            if len(group) > 1:
                _drop_copies(group, paths, lab, classes, keep, skipped, reports)
    return [np.flatnonzero(keep & (lab == c)) for c in range(len(classes))]


def _drop_copies(group, paths, lab, classes, keep, skipped, reports) -> None:
    """Identical files: in one class keep the first; in several classes drop them all."""
    if len({int(lab[i]) for i in group}) > 1:
        names = [f"{paths[i]} ({classes[lab[i]]})" for i in group]
        for i in group:
            keep[i] = False
            others = [name for j, name in zip(group, names) if j != i]
            skipped.append(_Skip(paths[i], classes[lab[i]], IN_BOTH_CLASSES,
                                 "same content as " + ", ".join(others)))
            reports[classes[lab[i]]].in_both_classes += 1
    else:
        for i in group[1:]:
            keep[i] = False
            skipped.append(_Skip(paths[i], classes[lab[i]], DUPLICATE,
                                 f"same content as {paths[group[0]]} (kept)"))
            reports[classes[lab[i]]].duplicates += 1


def _ordered(members: np.ndarray, digest_rows: np.ndarray, seed: int) -> np.ndarray:
    """``members`` in the seeded random order: by sha256(domain, seed, content hash)."""
    prefix = _ORDER_DOMAIN + str(int(seed)).encode("ascii") + b"\0"  # any size of seed
    keys = np.fromiter(
        (int.from_bytes(hashlib.sha256(prefix + digest_rows[i].tobytes()).digest()[:8], "big")
         for i in members), dtype=np.uint64, count=members.size)
    # 64-bit keys: a tie is astronomically unlikely; the member index (path order) breaks it.
    return members[np.lexsort((members, keys))]


def _perceptual_hashes(task: tuple[str, list[str]]) -> list[bytes | str]:
    """One hashing task, run in a worker process: ``(root, relative paths)`` -> their pHashes."""
    root, rel_paths = task
    return [grouping.perceptual_hash(os.path.join(root, rel)) for rel in rel_paths]


def _hash_pool(n_files: int, workers: int, stack: contextlib.ExitStack) -> ProcessPoolExecutor | None:
    """Worker processes for perceptual hashing, started now so that their start-up (~0.5 s of
    imports) overlaps the file hashing; None (hash in this process) for small folders or one core.

    pHash works on tiny numpy/scipy arrays and holds the GIL: threads would share one core, worker
    processes use them all (6000 files on 2 cores: 7.2-8.6 s -> 4.7-4.8 s, run back to back).
    "spawn": a fresh interpreter, safe beside threads and in notebooks, on every OS.
    """
    if n_files < _PROCESS_HASHING_FROM or workers <= 1:
        return None
    pool = stack.enter_context(ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_warm_worker))
    for _ in range(workers):
        pool.submit(int)  # each task may start a worker: all of them start importing now
    return pool


def _warm_worker() -> None:
    import imagehash  # noqa: F401  (the import is the warm-up)


def _near_duplicates(paths, labels, unique, classes, root, skipped, reports, threshold, pool,
                     quiet):
    """Perceptual hashes of every candidate, near-duplicate links (``grouping``), cross-class drops.

    Returns ``(unique, near_root, info)``: the candidates still usable per class (a file that
    cannot be decoded is reported now), ``near_root[i]``: the first file of ``i``'s near-duplicate
    group (``i`` itself when alone), and the ``summary.json`` block.
    """
    lab = np.frombuffer(labels, dtype=np.uint8)
    candidates = np.sort(np.concatenate(unique)) if unique else np.zeros(0, np.int64)
    width = 2 * grouping.HASH_BYTES
    hashes = np.zeros((candidates.size, width), dtype=np.uint8)
    ok = np.zeros(candidates.size, dtype=bool)
    root_text = os.fspath(root)
    with Progress(candidates.size, "near-duplicate hashing", enabled=not quiet) as bar:
        batches = ((root_text, [paths[i] for i in candidates[k: k + _HASH_BATCH].tolist()])
                   for k in range(0, candidates.size, _HASH_BATCH))
        results = _ordered_map(_perceptual_hashes, batches, 1, pool)
        k = 0
        for batch_results in results:
            for result in batch_results:
                i = int(candidates[k])
                cls = classes[lab[i]]
                if isinstance(result, bytes):
                    hashes[k] = np.frombuffer(result, dtype=np.uint8)
                    ok[k] = True
                else:  # decoded now, so reported now
                    reports[cls].verified += 1
                    reports[cls].undecodable += 1
                    skipped.append(_Skip(paths[i], cls, UNDECODABLE, result))
                k += 1
            bar.update(len(batch_results))
    members = candidates[ok]
    for i in members.tolist():  # decoded completely (at a reduced DCT scale) by the one loader
        reports[classes[lab[i]]].verified += 1
    uf, pairs, refused, (n_pairs, n_refused) = grouping.link_near(hashes[ok], threshold)
    del hashes
    roots = uf.roots()
    near_root = np.arange(len(paths), dtype=np.int64)
    near_root[members] = members[roots]
    groups: dict[int, list[int]] = {}
    for local in np.flatnonzero(uf.size[roots] > 1).tolist():
        groups.setdefault(int(members[roots[local]]), []).append(int(members[local]))
    keep = np.zeros(len(paths), dtype=bool)
    keep[members] = True
    listed, crossing = [], []
    for first, group in sorted(groups.items()):
        names = [paths[i] for i in group]
        if len({int(lab[i]) for i in group}) > 1:  # one photo filed under both classes
            for i in group:
                keep[i] = False
                others = ", ".join(f"{paths[j]} ({classes[lab[j]]})" for j in group if j != i)
                skipped.append(_Skip(paths[i], classes[lab[i]], IN_BOTH_CLASSES,
                                     f"near-duplicate of {others}"))
                reports[classes[lab[i]]].in_both_classes += 1
            crossing.append(names)
        else:
            listed.append(names)
    info = {
        "method": grouping.METHOD,
        "threshold": threshold,
        "max_group_size": grouping.MAX_NEAR_GROUP,
        "hashed": int(members.size),
        "pairs_found": n_pairs,
        "links_refused_count": n_refused,
        "links_refused": [[paths[members[a]], paths[members[b]], d] for a, b, d in refused],
        "groups_count": len(listed),
        "images_in_groups": sum(len(g) for g in listed),
        "groups": listed,
        "groups_in_both_classes_dropped": crossing,
        "pairs": [[paths[members[a]], paths[members[b]], d] for a, b, d in pairs],
    }
    lab_keep = [np.flatnonzero(keep & (lab == c)) for c in range(len(classes))]
    decoded = np.zeros(len(paths), dtype=bool)
    decoded[members] = True
    return lab_keep, near_root, info, decoded


def _units(order, paths, near_root, rule, folder, info, cls) -> list[list[list[int]]]:
    """The draw units of one class, in the seeded order: each a group kept in one split, made of
    near-duplicate sets (the test set keeps one image of each), each set's files in order.

    A unit is the union of near-duplicate links and ``data.groups``; it comes in the order of its
    first file, so with neither every file is a unit of its own, in the plain seeded order.
    """
    n = order.size
    ids = order.tolist()
    if near_root is None and rule is None:
        return [[[i]] for i in ids]
    uf = grouping.UnionFind(n)
    first: dict = {}
    unmatched = 0
    keys_seen: set = set()
    for p, i in enumerate(ids):
        keys = [("near", int(near_root[i]))] if near_root is not None else []
        if rule is not None:
            key = rule.group_of(paths[i], folder)
            if key is None:
                unmatched += 1
            else:
                keys.append(("group", key))
                keys_seen.add(key)
        for key in keys:
            if key in first:
                uf.union(first[key], p)
            else:
                first[key] = p
    roots = uf.roots()
    by_root: dict[int, dict[int, list[int]]] = {}
    for p, i in enumerate(ids):
        sub = int(near_root[i]) if near_root is not None else i
        by_root.setdefault(int(roots[p]), {}).setdefault(sub, []).append(i)
    units = [list(subs.values()) for _, subs in sorted(by_root.items())]
    if rule is not None:
        sizes = [sum(len(s) for s in u) for u in units]
        info[cls] = {"groups": len(units), "group_ids_matched": len(keys_seen),
                     "images_not_matched": unmatched, "largest_group": max(sizes, default=0)}
    return units


def _size(units) -> int:
    return sum(len(unit) for unit in units)


def _check_enough_groups(units, folder, cls, test_n, sample_n, val_fraction) -> None:
    """One group per non-empty split at least; else a one-line error."""
    need = [name for name, wanted in (("test", test_n != 0), ("train", sample_n != 0),
                                      ("validation", sample_n != 0 and val_fraction > 0)) if wanted]
    if len(units) < len(need):
        raise DataError(f"{folder}: too few groups for class '{cls}': {len(units)} group(s), the "
                        f"splits need at least {len(need)} ({', '.join(need)}); use a finer "
                        f"data.groups or add images")


_MAX_PASSES = 64  # groups too large for the remaining count passed over in a row before stopping


def _draw(units, test_n, sample_n, paths, root, cls, report, skipped, workers, quiet,
          decoded=None, crops=None) -> dict:
    """Walk the units in order, taking decodable images: the test set first (unless it is 'all').

    Returns ``{"test": [...], "sample": [...]}``, lists of taken units (lists of file indices).
    A sample unit is taken whole; a test unit gives one image per near-duplicate set (the others
    are reported). A unit that would overshoot the count is passed over (offered again to the
    next split), so counts hold exactly where the groups allow, else to within one group.
    ``decoded``: files already decoded completely by the loader (near-duplicate hashing reads
    every byte, at a reduced DCT scale) and counted as verified: not decoded again.
    ``crops`` (face detection on): each drawn image is checked by ``crops`` instead (decoded,
    detected, its crop written); one without a usable face is reported and replaced.
    """
    position = 0
    deferred: list[int] = []  # unit numbers passed over, offered first to the next take
    problems: dict[int, str | None] = {}

    def verify(batch_units) -> None:
        todo = [i for u in batch_units for sub in units[u] for i in sub if i not in problems]
        if crops is not None:
            # one detector, run in this thread: TensorFlow already uses every core
            for i in todo:
                problem = crops.check(i, root / paths[i])
                problems[i] = problem
                if decoded is None or not decoded[i]:
                    report.verified += 1
                if problem is not None:
                    reason, detail = problem
                    if reason == UNDECODABLE:
                        report.undecodable += 1
                    else:
                        report.no_face += 1
                    skipped.append(_Skip(paths[i], cls, reason, detail))
            return
        if decoded is not None:
            for i in (i for i in todo if decoded[i]):
                problems[i] = None
            todo = [i for i in todo if not decoded[i]]
        outcomes = _ordered_map(lambda i: _verify(root / paths[i]), todo, workers)
        for i, problem in zip(todo, outcomes):
            problems[i] = problem
            report.verified += 1
            if problem is not None:
                report.undecodable += 1
                skipped.append(_Skip(paths[i], cls, UNDECODABLE, problem))

    def take(count, one_per_set: bool, bar) -> list[list[int]]:
        nonlocal position, deferred
        want = math.inf if count == ALL else count
        taken: list[list[int]] = []
        n_taken = passes = 0
        passed: list[int] = []
        while n_taken < want and passes < _MAX_PASSES:
            shortfall = want - n_taken
            limit = 512 if count == ALL else int(min(shortfall, 512))
            if deferred:
                batch, deferred = deferred[:limit], deferred[limit:]
            elif position < len(units):
                batch = list(range(position, min(len(units), position + limit)))
                position = batch[-1] + 1
            else:
                break
            verify(batch)
            for k, u in enumerate(batch):
                if n_taken >= want or passes >= _MAX_PASSES:
                    deferred = sorted(deferred + batch[k:])
                    break
                good = [[i for i in sub if problems[i] is None] for sub in units[u]]
                good = [sub for sub in good if sub]
                items = [sub[0] for sub in good] if one_per_set else [i for sub in good for i in sub]
                if not items:
                    continue
                if n_taken + len(items) > want:
                    passed.append(u)
                    passes += 1
                    continue
                passes = 0
                taken.append(items)
                n_taken += len(items)
                bar.update(len(items))
                if one_per_set:
                    for sub in good:
                        for i in sub[1:]:
                            report.near_duplicates += 1
                            skipped.append(_Skip(paths[i], cls, NEAR_DUPLICATE,
                                                 f"near-duplicate of {paths[sub[0]]} (in the test "
                                                 f"set, which keeps one image per group)"))
        deferred = sorted(deferred + passed)
        return taken

    total = _size_all(units) if ALL in (test_n, sample_n) else min(_size_all(units), test_n + sample_n)
    with Progress(total, f"verifying {cls}", enabled=not quiet) as bar:
        if test_n == ALL:
            sample = take(sample_n, False, bar)
            return {"sample": sample, "test": take(ALL, True, bar)}
        test = take(test_n, True, bar)
        return {"test": test, "sample": take(sample_n, False, bar)}


def _size_all(units) -> int:
    return sum(len(sub) for unit in units for sub in unit)


def _verify(path: Path) -> str | None:
    """None if the project's loader decodes ``path``; else why not (without the path)."""
    try:
        images.verify_image(path)
        return None
    except ImageError as exc:
        return _without_path(exc, path)


def _without_path(exc: ImageError, path: Path) -> str:
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


class _FaceCrops:
    """The draw's check with face detection: decode at full resolution, detect once, write the
    crop (content-addressed, so a re-run rewrites nothing), keep its manifest columns."""

    def __init__(self, policy: faces.FacePolicy, folder: Path):
        self.policy = policy
        self.folder = folder
        self.columns: dict[int, tuple[str, ...]] = {}  # file index -> FACE_COLUMNS values
        self.digests = None  # file index -> the SHA-256 the manifest will list (set once hashed)

    def check(self, index: int, path: Path) -> tuple[str, str] | None:
        """None when the image has a usable face (its crop written); else ``(reason, detail)``."""
        try:
            # the bytes cropped are the bytes the manifest's sha256 (the lineage) names
            expected = self.digests[index].tobytes().hex() if self.digests is not None else None
            image, found = faces.faces_in_file(path, self.policy, sha256=expected)
        except ImageError as exc:
            return UNDECODABLE, _without_path(exc, path)
        kept = faces.select_faces(found, self.policy)
        if not kept:
            if found:
                return SEVERAL_FACES, f"{len(found)} faces and faces.multiple is 'skip'"
            return NO_FACE, (f"no face at faces.min_confidence {self.policy.min_confidence:g}"
                             f" and faces.min_size {self.policy.min_size}")
        face = kept[0]
        buffer = io.BytesIO()
        faces.crop_face(image, face, self.policy).save(buffer, "PNG")  # lossless: training sees the crop
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        target = self.folder / f"{digest}.png"
        # Crops are named by their content and written before the splits' commit record; one left
        # damaged by an interrupted run on a weak-rename folder is written again, not trusted.
        if not target.is_file() or sha256_file(target) != digest:
            with atomic_open(target, "wb") as f:
                f.write(data)
        self.columns[index] = (f"{FACES_DIR}/{target.name}", digest,
                               *(f"{v:.2f}" for v in face.box), f"{face.confidence:.6f}")
        return None


def _too_few(folder: Path, cls: str, report: _ClassReport, usable: int, test_n, sample_n) -> DataError:
    needed = " + ".join(f"{n} {what}" for n, what in ((test_n, "test"), (sample_n, "sample"))
                        if n != ALL)
    total = sum(n for n in (test_n, sample_n) if n != ALL)
    dropped = []
    for count, what in ((report.duplicates, "duplicates"), (report.in_both_classes, "in both classes"),
                        (report.unreadable, "empty/unreadable"), (report.undecodable, "undecodable"),
                        (report.no_face, "without a usable face")):
        if count:
            dropped.append(f"{count} {what}")
    found = f"{report.image_files} image files" + (f" ({', '.join(dropped)})" if dropped else "")
    return DataError(
        f"{folder}: too few usable images for class '{cls}': found {usable}, need {total} "
        f"({needed}); {found}; lower data.test_per_class / data.sample_per_class or set "
        f"data.allow_fewer=true")


def _manifest_text(rows: list[tuple[str, ...]], header=MANIFEST_HEADER) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_outputs(cfg, classes, rows, reports, skipped, warnings, quiet, near_info=None,
                   group_info=None, face_policy=None) -> dict:
    wd = WorkDir(cfg.work_dir)
    manifests, texts = {}, {}
    for split in SPLITS:
        # Sorted by class (label order), then path: stable and easy to diff.
        ordered = sorted(rows[split], key=lambda r: (classes.index(r[1]), r[0]))
        detecting = face_policy is not None and face_policy.detect != "none"
        texts[split] = _manifest_text(ordered, FACE_MANIFEST_HEADER if detecting else MANIFEST_HEADER)
        manifests[split] = {"file": wd.manifest(split).name, "rows": len(ordered),
                            "sha256": hashlib.sha256(texts[split].encode("utf-8")).hexdigest()}
    skipped_sorted = sorted(skipped, key=lambda s: (s.path, s.reason, s.detail))
    data = cfg.data
    summary = {
        "format": SUMMARY_FORMAT,
        "config": {
            "data": {
                "root": str(data.root),
                "class_dirs": dict(data.class_dirs),
                "sample_per_class": data.sample_per_class,
                "val_fraction": data.val_fraction,
                "test_per_class": data.test_per_class,
                "allow_fewer": data.allow_fewer,
                "dedup": data.dedup,
                "near_threshold": data.near_threshold,
                "groups": data.groups,
            },
            "seed": cfg.seed,
            "faces": (face_policy or faces.FacePolicy()).to_dict(),
        },
        "classes": list(classes),
        "counts": {split: {cls: reports[cls].counts[split] for cls in classes} | {
            "total": sum(reports[cls].counts[split] for cls in classes)} for split in SPLITS},
        "pool": {cls: reports[cls].to_dict() for cls in classes},
        "skipped_counts": dict(sorted(Counter(s.reason for s in skipped).items())),
        "skipped": [s.to_dict() for s in skipped_sorted],
        "warnings": warnings,
        "manifests": manifests,
        "near_duplicates": near_info,
        "groups": group_info,
    }
    texts["summary"] = json.dumps(summary, indent=2) + "\n"
    outputs = {split: wd.manifest(split) for split in SPLITS} | {"summary": wd.split_summary}
    # one set: the commit record, written last, vouches for the four files together
    with atomic_paths(outputs, wd.splits_record, STAGE_SCRIPT) as tmp:
        for name, path in tmp.items():
            path.write_bytes(texts[name].encode("utf-8"))
    _prune_crops(wd.root / FACES_DIR, {r[3] for split in SPLITS for r in rows[split] if len(r) > 3})
    if not quiet:
        _print_report(wd, cfg.seed, classes, summary)
    return summary


def _prune_crops(folder: Path, listed: set[str]) -> None:
    """Remove the crops no manifest lists any more (earlier splits' faces), once the new set is
    committed: ``work_dir/faces`` holds what the current splits need, and no more."""
    if folder.is_dir():
        for crop in folder.glob("*.png"):
            if f"{FACES_DIR}/{crop.name}" not in listed:
                crop.unlink(missing_ok=True)


def _print_report(wd: WorkDir, seed: int, classes, summary: dict) -> None:
    width = max(8, *(len(c) for c in classes))
    print(f"splits written to {wd.splits} (seed {seed}):")
    print("        " + "".join(f"{c:>{width + 2}}" for c in classes) + f"{'total':>{width + 2}}")
    for split in SPLITS:
        counts = summary["counts"][split]
        print(f"  {split:<6}" + "".join(f"{counts[c]:>{width + 2}}" for c in classes)
              + f"{counts['total']:>{width + 2}}")
    skipped = summary["skipped_counts"]
    if skipped:
        parts = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
        print(f"not used: {sum(skipped.values())} files ({parts}); see {wd.split_summary}")
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
