"""``tf.data`` pipelines over the one image loader (``images.load_image``).

Decoding runs in parallel threads (Pillow releases the GIL while decoding) and overlaps with
the model's compute through ``prefetch``; images are streamed, never all held in memory.
Order is deterministic: batch ``i`` always holds the same files.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from .errors import ImageError
from .images import ImagePolicy, load_image


def _decode(policy: ImagePolicy):
    height, width = policy.size

    def decode(path_bytes: bytes, sha256: bytes):
        path = os.fsdecode(path_bytes)
        try:
            return load_image(path, policy, sha256.decode("ascii") or None), b""
        except ImageError as exc:
            return np.zeros((height, width, 3), np.uint8), str(exc).encode("utf-8")

    return decode


def pipeline_options():
    """``tf.data`` options for every image pipeline (training, extraction, prediction).

    - Autotuning off: with it on, deleting an iterator waits for the autotuner's next wake-up,
      whose period doubles from 10 ms (a pass that ends at 8 s returns at 10.2 s; Keras deletes
      an iterator per epoch and per ``predict``). Decoding keeps its parallel threads and one
      batch of prefetch, which is all the overlap a model-bound pass needs.
    - Sharding off: under ``MirroredStrategy`` on one machine the replicas split each batch;
      there are no files to shard by.

    Decoding runs at the model's priority: a lower priority for the decoding threads (nice +5 on
    a private pool) was measured at +11% images/s with the model on one core and within the
    machine's noise otherwise, below the 20% a speed trick must earn here, so it was removed.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


def image_dataset(paths: Sequence[str | os.PathLike], policy: ImagePolicy, batch_size: int,
                  labels: np.ndarray | None = None, hashes: Sequence[str] | None = None) -> tf.data.Dataset:
    """Batches of ``(images, errors)`` or, with ``labels``, ``(images, labels, errors)``.

    ``images`` is float32 ``(B, H, W, 3)`` RGB in 0-255 (what the converted models take);
    ``errors`` is a string per image, empty when it decoded (a bad file yields a black image
    and its one-line error, so callers decide whether to stop or to report and go on).
    ``hashes``: each file's expected SHA-256 (a manifest's); a file whose bytes differ is an error.
    """
    height, width = policy.size
    decode = _decode(policy)

    def load(path, sha256):
        image, error = tf.numpy_function(decode, [path, sha256], (tf.uint8, tf.string), stateful=False)
        image = tf.cast(tf.ensure_shape(image, (height, width, 3)), tf.float32)
        return image, tf.ensure_shape(error, ())

    hashes = [""] * len(paths) if hashes is None else list(hashes)
    ds = tf.data.Dataset.from_tensor_slices(([os.fspath(p) for p in paths], hashes))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if labels is not None:
        label_ds = tf.data.Dataset.from_tensor_slices(np.asarray(labels))
        ds = tf.data.Dataset.zip((ds, label_ds)).map(lambda x, y: (x[0], y, x[1]))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(pipeline_options())
