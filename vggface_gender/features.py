"""The frozen base's features: computed once per image, cached on disk, never served stale.

The base network is a chain of layers (MatConvNet SimpleNN nets are). ``cut_base`` splits it
at ``model.embedding_layer`` (where the base ends) and, optionally, at ``train.trainable_from``
(where fine-tuning starts): the layers below the first trainable one are the *frozen part*,
whose output (the *feature layer*) is what the cache stores.

The cache lives in ``work_dir/features/<key>/`` as ``train.npy`` and ``val.npy`` (float32, one
row per manifest row, in manifest order) and ``meta.json``. The key is a hash of everything
the features depend on: the content of ``base.keras`` (config and weights, not its save date), the feature layer, the image policy, the
bytes of the manifests (rows, order and each image's content hash) and each listed image file's
size and modification time (an image edited after ``data_preprocess.py`` ran). A changed input
changes the key, so it is never served stale. An entry is written to a temporary folder and
renamed into place whole, so an interrupted run leaves no entry a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, ImageError, ModelFileError, PipelineError
from .progress import Progress
from .workdir import fsync_file, write_json

CACHE_FORMAT = 1
KEEP_ENTRIES = 3  # cache entries kept: the one in use and the most recently used others
_STALE_TEMP_SECONDS = 6 * 3600  # a temporary entry this old belongs to a run that died


# --------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
            desc: str = "features", verbose: int = 1, where: str = "") -> None:
    """Run ``model`` over the images at ``paths`` (streamed, in order) into ``out[i]``.

    Under a ``MirroredStrategy`` each batch is split over the replicas and gathered back in
    order. A bad image stops the pass with an ``ImageError`` naming the file.
    """
    import tensorflow as tf

    from .tf_images import image_dataset, pipeline_options

    n = len(paths)
    if len(out) != n:
        raise ValueError(f"out has {len(out)} rows for {n} images")
    trap = ErrorTrap(where)
    dataset = trap.strip(image_dataset(paths, policy, batch_size)).with_options(pipeline_options())
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

    done = 0
    with Progress(n, f"extracting {desc}", enabled=bool(verbose)) as bar:
        for images in dataset:
            values = step(images).numpy()
            trap.check()
            out[done:done + len(values)] = values
            done += len(values)
            bar.update(len(values))
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


def image_fingerprint(splits: Sequence[Split]) -> str:
    """A hash of every listed image's path, size and modification time.

    Cheap (one ``stat`` per file) and checks up front that every image is still there: a
    vanished file is a one-line ``ImageError`` naming it and its manifest.
    """
    files = []
    for split in splits:
        for path in split.paths:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise ImageError(f"{path}: file not found (listed in {split.manifest})") from None
            except OSError as exc:
                raise ImageError(f"{path}: cannot read ({exc.strerror}; listed in {split.manifest})") from None
            files.append(f"{os.fspath(path)}\t{st.st_size}\t{st.st_mtime_ns}")
    return _sha256_text(files)


def cache_key(base_sha256: str, feature_layer: str, policy, splits: Sequence[Split],
              fingerprint: str | None = None, precision: str = "float32") -> dict:
    """Everything the cached features depend on (see the module docstring)."""
    return {
        "format": CACHE_FORMAT,
        "base_sha256": base_sha256,
        "feature_layer": feature_layer,
        "precision": precision,
        "policy": policy.to_dict(),
        "manifests": {s.name: s.manifest_sha256 for s in splits},
        "counts": {s.name: len(s.paths) for s in splits},
        "files": fingerprint or image_fingerprint(splits),
    }


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]


@dataclass
class CachedFeatures:
    arrays: dict          # split name -> float32 array (memory-mapped)
    status: str           # "reused" | "built"
    folder: Path
    seconds: float        # time spent extracting (0 when reused)


def load_entry(folder: Path, key: dict, names: Sequence[str]) -> dict | None:
    """The arrays of a complete entry whose key matches exactly, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        arrays = {}
        for name in names:
            array = np.load(folder / f"{name}.npy", mmap_mode="r")
            if array.dtype != np.float32 or len(array) != key["counts"][name]:
                return None
            arrays[name] = array
        return arrays
    except (OSError, ValueError):  # missing or damaged entry: rebuild it
        return None


def cached_features(cache_root: str | os.PathLike, key: dict, model, splits: Sequence[Split],
                    policy, batch_size: int, strategy=None, verbose: int = 1) -> CachedFeatures:
    """Reuse the entry for ``key`` or build it by running ``model`` over every split once."""
    cache_root = Path(cache_root)
    folder = cache_root / key_id(key)
    names = [s.name for s in splits]
    arrays = load_entry(folder, key, names)
    if arrays is not None:
        with contextlib.suppress(OSError):
            os.utime(folder)  # most recently used: pruning keeps it
        return CachedFeatures(arrays, "reused", folder, 0.0)

    cache_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(cache_root)
    shape = tuple(int(d) for d in model.outputs[0].shape[1:])
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".tmp-"))
    try:
        for split in splits:
            out = np.lib.format.open_memmap(tmp / f"{split.name}.npy", mode="w+", dtype=np.float32,
                                            shape=(len(split.paths), *shape))
            extract(model, split.paths, policy, batch_size, out, strategy,
                    desc=f"{split.name} features", verbose=verbose,
                    where=f" (listed in {split.manifest})")
            out.flush()
            del out
        seconds = time.perf_counter() - start
        write_json(tmp / "meta.json", {"key": key, "shape": list(shape),
                                       "extract_seconds": round(seconds, 3),
                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        for name in names:
            fsync_file(tmp / f"{name}.npy")
        if folder.exists():
            if load_entry(folder, key, names) is not None:  # another run finished it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                return CachedFeatures(load_entry(folder, key, names), "built", folder, seconds)
            shutil.rmtree(folder, ignore_errors=True)  # a damaged entry under the same name
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(cache_root, keep=folder)
    arrays = load_entry(folder, key, names)
    if arrays is None:  # pragma: no cover - we just wrote it
        raise PipelineError(f"{folder}: feature cache could not be read back")
    return CachedFeatures(arrays, "built", folder, seconds)


def _remove_stale_temporaries(cache_root: Path) -> None:
    now = time.time()
    for entry in cache_root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)


def prune(cache_root: Path, keep: Path, limit: int = KEEP_ENTRIES) -> None:
    """Keep ``keep`` and the most recently used entries, ``limit`` in all."""
    entries = [p for p in cache_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: (p == keep, p.stat().st_mtime), reverse=True)
    for old in entries[limit:]:
        shutil.rmtree(old, ignore_errors=True)
