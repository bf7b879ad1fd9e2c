"""The frozen base's features: computed once per image, cached on disk, never served stale.

The base network is a chain of layers (MatConvNet SimpleNN nets are). ``cut_base`` splits it
at ``model.embedding_layer`` (where the base ends) and, optionally, at ``train.trainable_from``
(where fine-tuning starts): the layers below the first trainable one are the *frozen part*,
whose output (the *feature layer*) is what the cache stores.

The cache lives in ``work_dir/features/<key>/`` as ``train.npy`` and ``val.npy`` (float32, one
row per manifest row, in manifest order) and ``meta.json``. The key is a hash of everything
the features depend on: the content of ``base.keras`` (config and weights, not its save date),
the feature layer, the image policy, the precision and the content hash of every image the
network decodes, in manifest order (``Split.source_hashes``). Each image's bytes are checked
against that hash as they are decoded, so an image changed after ``data_preprocess.py`` ran is
an error naming it, never stale features. An entry is written in place, in chunks of whole
batches with a progress record (``progress.json``) rewritten after each chunk is on disk, so a
killed run resumes at its last complete chunk; ``meta.json`` is the entry's commit record
(``workdir.commit_set``), written last: without it, or with a file that does not match it, the
entry is not used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, ImageError, ModelFileError, PipelineError
from .progress import Progress
from .workdir import check_set, commit_set, fsync_file, invalidate_set, kill_point, sha256_file, write_json

CACHE_FORMAT = 2  # 1: keyed by the images' paths, sizes and mtimes
KEEP_ENTRIES = 3  # cache entries kept: the one in use and the most recently used others
# Batches per chunk: the progress record is rewritten (and the array flushed) once per chunk.
# At least a few seconds of work per chunk on a GPU, at most a few minutes lost on a CPU.
CHUNK_BATCHES = 8
ENTRY_RECORD = "meta.json"
PROGRESS = "progress.json"


# --------------------------------------------------------------------------- hashing
def keras_model_sha256(path: str | os.PathLike) -> str:
    """Content hash of a ``.keras`` file: its config and weights, not its save date.

    A ``.keras`` file is a zip whose ``metadata.json`` holds the time it was saved, so converting
    the same ``.mat`` twice gives files with different bytes but the same network; hashing the
    other members keeps the feature cache valid across such re-runs.
    """
    import zipfile

    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(path) as archive:
            for member in sorted(archive.infolist(), key=lambda m: m.filename):
                if member.filename == "metadata.json":
                    continue
                digest.update(member.filename.encode("utf-8") + b"\0")
                with archive.open(member) as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
    except zipfile.BadZipFile:
        return sha256_file(path)
    return digest.hexdigest()


def _sha256_text(lines) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------- splitting the base
def base_chain(base) -> list:
    """The base's layers in order, without the input layer; an error if they are not a chain."""
    import keras

    layers = [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not layers:
        raise ModelFileError(f"{base.name}: the base model has no layers")
    if not isinstance(base, keras.Sequential):
        previous = base.inputs[0]
        for layer in layers:
            inputs = layer.input
            if isinstance(inputs, (list, tuple)) or inputs is not previous:
                raise ModelFileError(
                    f"base model: layer {layer.name!r} does not follow the previous layer; "
                    "only a chain of layers (a MatConvNet SimpleNN net) can be split")
            previous = layer.output
    return layers


@dataclass
class BaseCut:
    """The base split for training.

    ``frozen``: layers that run once per image (their output is cached); ``trainable``: layers
    from ``train.trainable_from`` up to the embedding layer (empty when the base is frozen);
    ``feature_layer``: the name of the layer whose output the cache holds (the embedding layer
    when nothing is unfrozen; ``"input"`` when the whole base is trainable).
    """

    input_shape: tuple
    frozen: list
    trainable: list
    feature_layer: str
    embedding_layer: str
    trainable_from: str | None

    def feature_shape(self) -> tuple:
        if not self.frozen:
            return tuple(self.input_shape)
        return tuple(int(d) for d in self.frozen[-1].output.shape[1:])

    def embedding_shape(self) -> tuple:
        last = (self.trainable or self.frozen)
        return tuple(int(d) for d in last[-1].output.shape[1:]) if last else tuple(self.input_shape)


def cut_base(base, embedding_layer: str, trainable_from: str | None = None) -> BaseCut:
    """Split the base at ``embedding_layer`` and ``trainable_from``; unknown names list valid ones.

    Sets ``trainable`` on every layer: False for the frozen part, True for the unfrozen one.
    Must be called before the layers are reused in other models (the chain check reads each
    layer's single inbound connection).
    """
    layers = base_chain(base)
    names = [layer.name for layer in layers]
    if embedding_layer not in names:
        raise ConfigError(
            f"model.embedding_layer: no layer named {embedding_layer!r} in the base model; "
            f"valid names: {', '.join(names)}")
    end = names.index(embedding_layer) + 1
    start = end
    if trainable_from is not None:
        if trainable_from not in names[:end]:
            raise ConfigError(
                f"train.trainable_from: no layer named {trainable_from!r} at or below the embedding "
                f"layer {embedding_layer!r}; valid names: {', '.join(names[:end])}")
        start = names.index(trainable_from)
    frozen, trainable = layers[:start], layers[start:end]
    for layer in frozen:
        layer.trainable = False
    for layer in trainable:
        layer.trainable = True
    input_shape = tuple(int(d) for d in base.inputs[0].shape[1:])
    return BaseCut(input_shape, frozen, trainable, frozen[-1].name if frozen else "input",
                   embedding_layer, trainable_from)


def apply_layers(x, layers: Sequence):
    """Call ``layers`` in order on a Keras tensor (the layers are shared, not copied)."""
    for layer in layers:
        x = layer(x)
    return x


def frozen_model(cut: BaseCut):
    """Images (float32 RGB 0-255) -> the feature layer's activations."""
    import keras

    images = keras.Input(cut.input_shape, name="image")
    return keras.Model(images, apply_layers(images, cut.frozen), name="frozen_base")


# --------------------------------------------------------------------------- bad images
class ErrorTrap:
    """Takes the per-image error strings out of an ``image_dataset`` and remembers the first.

    Keras' ``fit`` and distributed datasets want plain tensors, and strings cannot go to a
    GPU, so the errors are recorded on the host as batches pass and ``check()`` (called after
    every step) raises the first as a one-line ``ImageError``.
    """

    def __init__(self, where: str = ""):
        self.where = where  # appended to the message, e.g. " (listed in train.csv)"
        self.first: str | None = None
        self._lock = threading.Lock()

    def _record(self, errors):
        if self.first is None:
            for e in np.asarray(errors).ravel():
                if e:
                    with self._lock:
                        if self.first is None:
                            self.first = e.decode("utf-8", "replace") if isinstance(e, bytes) else str(e)
                    break
        return np.bool_(True)

    def strip(self, dataset):
        """``(images[, labels], errors)`` batches -> ``images`` or ``(images, labels)``."""
        import tensorflow as tf

        def take_errors(*element):
            recorded = tf.numpy_function(self._record, [element[-1]], tf.bool, stateful=True)
            with tf.control_dependencies([recorded]):
                rest = tuple(tf.identity(t) for t in element[:-1])
            return rest if len(rest) > 1 else rest[0]

        return dataset.map(take_errors)

    def check(self) -> None:
        if self.first is not None:
            raise ImageError(self.first + self.where)


# --------------------------------------------------------------------------- extraction
def extract(model, paths: Sequence, policy, batch_size: int, out: np.ndarray, strategy=None,
            desc: str = "features", verbose: int = 1, where: str = "", hashes: Sequence[str] | None = None,
            start: int = 0, on_batch=None) -> None:
    """Run ``model`` over the images at ``paths[start:]`` (streamed, in order) into ``out[i]``.

    ``hashes``: each image's expected content hash (checked as it is decoded). ``start`` must be
    a multiple of ``batch_size``, so a resumed pass computes the very batches a whole one would.
    ``on_batch(batch_index, rows_done)`` is called after each batch is in ``out``.
    Under a ``MirroredStrategy`` each batch is split over the replicas and gathered back in
    order. A bad image stops the pass with an ``ImageError`` naming the file.
    """
    import tensorflow as tf

    from .tf_images import image_dataset, pipeline_options

    n = len(paths)
    if len(out) != n:
        raise ValueError(f"out has {len(out)} rows for {n} images")
    if start % batch_size and start != n:
        raise ValueError(f"start {start} is not a multiple of the batch size {batch_size}")
    trap = ErrorTrap(where)
    dataset = image_dataset(paths[start:], policy, batch_size, hashes=None if hashes is None else hashes[start:])
    dataset = trap.strip(dataset).with_options(pipeline_options())
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if replicas > 1:
        dataset = strategy.experimental_distribute_dataset(dataset)

        @tf.function
        def step(images):
            per_replica = strategy.run(lambda x: model(x, training=False), args=(images,))
            return strategy.gather(per_replica, axis=0)
    else:
        @tf.function(input_signature=[tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)])
        def step(images):
            return model(images, training=False)

    done = start
    with Progress(n, f"extracting {desc}", enabled=bool(verbose)) as bar:
        bar.update(start)
        for batch, images in enumerate(dataset, start=start // batch_size):
            values = step(images).numpy()
            trap.check()
            out[done:done + len(values)] = values
            done += len(values)
            bar.update(len(values))
            if on_batch is not None:
                on_batch(batch, done)
    trap.check()
    if done != n:  # pragma: no cover - the pipeline yields every row
        raise RuntimeError(f"extracted {done} of {n} images")


# --------------------------------------------------------------------------- the cache
@dataclass
class Split:
    """One manifest: the absolute paths of the files the network decodes, label indices, the
    manifest file's checksum, each image's content hash as the manifest lists it (the user's
    file: lineage) and that of the decoded file (the face crop, when detection made one)."""

    name: str
    manifest: Path
    paths: list
    labels: np.ndarray
    manifest_sha256: str
    hashes: list = field(default_factory=list)
    source_hashes: list = field(default_factory=list)


def cache_key(base_sha256: str, feature_layer: str, policy, splits: Sequence[Split],
              precision: str = "float32") -> dict:
    """Everything the cached features depend on (see the module docstring)."""
    return {
        "format": CACHE_FORMAT,
        "base_sha256": base_sha256,
        "feature_layer": feature_layer,
        "precision": precision,
        "policy": policy.to_dict(),
        "images": {s.name: _sha256_text(s.source_hashes) for s in splits},
        "counts": {s.name: len(s.paths) for s in splits},
    }


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]


@dataclass
class CachedFeatures:
    arrays: dict          # split name -> float32 array (memory-mapped)
    status: str           # "reused" | "built" | "resumed"
    folder: Path
    seconds: float        # time spent extracting (0 when reused)


def _open_arrays(folder: Path, counts: dict, names: Sequence[str], mode: str = "r") -> dict | None:
    """The entry's arrays, memory-mapped, if each is float32 with the expected rows; else None."""
    try:
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode=mode) for name in names}
    except (OSError, ValueError):  # missing or damaged
        return None
    if any(a.dtype != np.float32 or len(a) != counts[name] for name, a in arrays.items()):
        return None
    return arrays


def load_entry(folder: Path, key: dict, names: Sequence[str]) -> dict | None:
    """The arrays of a committed entry whose key matches exactly, else None."""
    record, _ = check_set(folder / ENTRY_RECORD)
    if record is None or record.get("key") != key or any(f"{n}.npy" not in record["files"] for n in names):
        return None
    return _open_arrays(folder, key["counts"], names)


def _resume_point(folder: Path, key: dict, names: Sequence[str], batch_size: int, replicas: int) -> dict:
    """Rows already extracted per split by an interrupted run with the same key and batching
    (same batches: same values), as its progress record says; ``{}`` to start afresh."""
    try:
        progress = json.loads((folder / PROGRESS).read_text(encoding="utf-8"))
        if (progress["key"], progress["batch_size"], progress["replicas"]) != (key, batch_size, replicas):
            return {}
        done = {name: int(progress["done"].get(name, 0)) for name in names}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    started = [name for name in names if done[name]]
    if any(not 0 <= done[n] <= key["counts"][n] for n in names) or (
            started and _open_arrays(folder, key["counts"], started) is None):
        return {}
    return done


def cached_features(cache_root: str | os.PathLike, key: dict, model, splits: Sequence[Split],
                    policy, batch_size: int, strategy=None, verbose: int = 1) -> CachedFeatures:
    """Reuse the entry for ``key``, resume its interrupted extraction or build it by running
    ``model`` over every split once."""
    cache_root = Path(cache_root)
    folder = cache_root / key_id(key)
    with _cache_lock(cache_root):
        return _cached_features(cache_root, folder, key, model, splits, policy, batch_size, strategy, verbose)


@contextlib.contextmanager
def _cache_lock(cache_root: Path):
    """One run at a time in a cache: a second ``train.py`` (a notebook beside a script) waits, then
    reuses what the first built, and never prunes an entry the first is writing. The lock is
    ``flock`` on the folder itself (no lock file), released by the OS when the holder dies, so a
    killed run leaves no stale lock; where there is no ``flock`` (Windows, some mounted drives)
    runs are not serialised."""
    cache_root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
        fd = os.open(cache_root, os.O_RDONLY)
    except (ImportError, OSError):
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _cached_features(cache_root: Path, folder: Path, key: dict, model, splits: Sequence[Split],
                     policy, batch_size: int, strategy, verbose: int) -> CachedFeatures:
    names = [s.name for s in splits]
    arrays = load_entry(folder, key, names)
    if arrays is not None:
        with contextlib.suppress(OSError):
            os.utime(folder)  # most recently used: pruning keeps it
        return CachedFeatures(arrays, "reused", folder, 0.0)

    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    done = _resume_point(folder, key, names, batch_size, replicas)
    if not done:  # nothing to resume: whatever is there (a damaged entry, an old run's rows) goes
        shutil.rmtree(folder, ignore_errors=True)
        done = {name: 0 for name in names}
    folder.mkdir(parents=True, exist_ok=True)
    invalidate_set(folder / ENTRY_RECORD)  # a record left beside rows about to change vouches for nothing
    resumed = any(done.values())
    shape = tuple(int(d) for d in model.outputs[0].shape[1:])
    start = time.perf_counter()
    for split in splits:
        n = len(split.paths)
        if done[split.name] == n and n:
            continue
        path = folder / f"{split.name}.npy"
        out = np.lib.format.open_memmap(path, mode="r+" if done[split.name] else "w+",
                                        dtype=np.float32, shape=(n, *shape))
        if done[split.name]:
            print(f"resuming the {split.name} features at image {done[split.name] + 1} of {n}")

        def save(rows, out=out, path=path, name=split.name):
            out.flush()
            fsync_file(path)
            done[name] = rows  # only now: the rows it vouches for are on disk
            write_json(folder / PROGRESS, {"key": key, "batch_size": batch_size, "replicas": replicas,
                                           "done": done})

        def after_batch(batch, rows, name=split.name, save=save):
            kill_point(f"extract:{name}:{batch}")
            if (batch + 1) % CHUNK_BATCHES == 0:
                save(rows)

        extract(model, split.paths, policy, batch_size, out, strategy, desc=f"{split.name} features",
                verbose=verbose, where=f" (listed in {split.manifest})", hashes=split.source_hashes,
                start=done[split.name], on_batch=after_batch)
        save(n)
        del out
    seconds = time.perf_counter() - start
    commit_set(folder / ENTRY_RECORD, [folder / f"{name}.npy" for name in names], "train.py",
               {"key": key, "shape": list(shape), "extract_seconds": round(seconds, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    with contextlib.suppress(FileNotFoundError):
        (folder / PROGRESS).unlink()
    prune(cache_root, keep=folder)
    arrays = load_entry(folder, key, names)
    if arrays is None:  # pragma: no cover - we just wrote it
        raise PipelineError(f"{folder}: feature cache could not be read back")
    return CachedFeatures(arrays, "resumed" if resumed else "built", folder, seconds)


def prune(cache_root: Path, keep: Path, limit: int = KEEP_ENTRIES) -> None:
    """Keep ``keep`` and the most recently used entries, ``limit`` in all."""
    entries = [p for p in cache_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: (p == keep, p.stat().st_mtime), reverse=True)
    for old in entries[limit:]:
        shutil.rmtree(old, ignore_errors=True)
