"""train.py's stage: train the classifier head on the frozen VGG-Face base.

``run_stage(cfg, early_stopping=True)`` loads ``work_dir/model/base.keras`` and the train/val manifests, cuts
the base at ``model.embedding_layer`` (and, with ``train.trainable_from``, unfreezes it from
that layer on), and trains a head of dense layers with Adam, categorical cross-entropy and
early stopping on the validation loss (best weights restored).

With ``train.cache: true`` (the default) the frozen part runs once per image: its outputs for
train and validation are stored in ``work_dir/features/`` (see ``features``) and the head
trains on them. ``train.cache: false`` trains end-to-end through the frozen model, decoding
every image every epoch: the same arithmetic, much slower.

Both paths read the examples in the same seeded order (a fresh permutation per epoch, drawn
from ``seed``) and the head's initial weights come from seeded initialisers, so a run is
reproducible and the two paths end with the same weights up to float rounding.

Writes ``work_dir/model/classifier.keras`` (what was trained, alone: the head, plus the base
layers unfrozen by ``train.trainable_from``; the frozen base's features in, softmax probabilities
in ``cfg.classes`` order out), ``classifier.json`` (classes, image policy, precision, where the
base was cut, the base's content hash and the content hashes of every training and validation
image), and ``work_dir/reports/{history.csv, training_curves.png, train_summary.json}``, all
together at the end: a run that fails writes none of them. ``classifier.Classifier.load``
composes base and head again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import features
from .errors import DataError, ModelFileError, PipelineError
from .classifier import FORMAT as CLASSIFIER_FORMAT
from .features import Split
from .images import resolve_policy
from .progress import keras_verbose
from .workdir import WorkDir, atomic_paths, read_json, require_set

DATA_STAGE = "data_preprocess.py"
CONVERSION_STAGE = "model_conversion.py"


class TrainingDivergedError(PipelineError):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------------- inputs
def read_split(cfg, work: WorkDir, name: str) -> Split:
    """One manifest as absolute paths and label indices (the data stage's reader checks that
    every label is a configured class)."""
    from .dataset import read_manifest

    path = work.manifest(name)
    require_set(work.splits_record, DATA_STAGE, path, f"{name} manifest")
    entries = read_manifest(path, cfg.data.root, cfg.classes)
    if not entries:
        why = " (early stopping needs validation images: set data.val_fraction > 0)" if name == "val" else ""
        raise DataError(f"{path}: the {name} manifest lists no images{why}; run `python {DATA_STAGE}` again")
    index = {c: i for i, c in enumerate(cfg.classes)}
    labels = np.array([index[e.label] for e in entries], np.int64)
    return Split(name, path, [Path(e.source) for e in entries], labels, features.sha256_file(path),
                 [e.sha256 for e in entries], [e.source_sha256 for e in entries])


def training_face_policy(cfg, work: WorkDir):
    """The face policy the training crops were made with (the splits' ``summary.json``), else
    the config's; a line says so when the config now says otherwise."""
    from .dataset import split_face_policy
    from .faces import FacePolicy

    configured = FacePolicy.from_config(cfg)
    recorded = split_face_policy(work.root)
    if recorded is None:
        return configured
    if recorded != configured:
        made, now = recorded.to_dict(), configured.to_dict()
        differ = ", ".join(f"faces.{k}={made[k]} (config: {now[k]})" for k in made if made[k] != now.get(k))
        print(f"note: the splits were made with {differ} ({work.split_summary.name}); the classifier "
              f"records those, not the config's")
    return recorded


def read_base_info(work: WorkDir) -> dict:
    path = work.base_info
    require_set(work.base_record, CONVERSION_STAGE, path, "base model description")
    try:
        info = read_json(path)
        size = [int(s) for s in info["input_size"][:2]]
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"input_size {info['input_size']!r}")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelFileError(f"{path}: not a valid base model description ({type(exc).__name__}: {exc}); "
                             f"run `python {CONVERSION_STAGE}` again") from None
    return info


def load_base(path: Path, strategy):
    """``base.keras`` loaded inside the strategy's scope (its variables then live on every replica)."""
    from .keras_model import load_saved_model

    return load_saved_model(path, "base model", CONVERSION_STAGE, scope=strategy.scope(), compile=False)


def make_strategy(name: str):
    """``default``: TensorFlow's default (one device). ``mirrored``: every visible GPU, else
    every logical CPU device (MirroredStrategy alone would take one CPU)."""
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


# --------------------------------------------------------------------------- the head
def derived_seed(seed: int, purpose: str) -> int:
    """An independent 31-bit seed for one purpose (an initialiser, a dropout layer, the order)."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def build_head(hidden_units, dropout: float, n_classes: int, seed: int, flatten: bool) -> list:
    """Dense ReLU layers (each followed by dropout when > 0), then ``Dense(n_classes, softmax)``.

    Every initialiser and dropout layer has its own explicit seed: loading a ``.keras`` file
    consumes Keras' global random state, so the global seed alone would not pin them down.
    """
    import keras

    def glorot(name):
        return keras.initializers.GlorotUniform(seed=derived_seed(seed, name))

    layers = [keras.layers.Flatten(name="head_flatten")] if flatten else []
    for i, units in enumerate(hidden_units, start=1):
        layers.append(keras.layers.Dense(units, activation="relu", name=f"head_dense{i}",
                                         kernel_initializer=glorot(f"head_dense{i}")))
        if dropout > 0:
            layers.append(keras.layers.Dropout(dropout, seed=derived_seed(seed, f"head_dropout{i}"),
                                               name=f"head_dropout{i}"))
    layers.append(keras.layers.Dense(n_classes, activation="softmax", name="head_output",
                                     kernel_initializer=glorot("head_output")))
    return layers


def epoch_orders(n: int, epochs: int, seed: int) -> np.ndarray:
    """``(epochs, n)``: a seeded permutation of the examples per epoch (same for both paths)."""
    rng = np.random.default_rng(derived_seed(seed, "epoch_order"))
    return np.stack([rng.permutation(n) for _ in range(epochs)])


# --------------------------------------------------------------------------- datasets
def feature_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, orders: np.ndarray | None = None):
    """Batches of cached ``(features, one-hot labels)``: epoch after epoch in ``orders``, or
    once in manifest order. Rows are gathered on the host from the (memory-mapped) array."""
    import tensorflow as tf

    from .tf_images import pipeline_options

    def gather(index):
        return np.ascontiguousarray(x[index], dtype=np.float32), y[index]

    def load(index):
        xb, yb = tf.numpy_function(gather, [index], (tf.float32, tf.float32), stateful=False)
        xb.set_shape((None, *x.shape[1:]))
        yb.set_shape((None, y.shape[1]))
        return xb, yb

    if orders is None:
        ds = tf.data.Dataset.from_tensor_slices(np.arange(len(x), dtype=np.int64)).batch(batch_size)
    else:
        ds = tf.data.Dataset.from_tensor_slices(orders.astype(np.int64)).flat_map(
            lambda row: tf.data.Dataset.from_tensor_slices(row).batch(batch_size))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options())


def image_epochs(split: Split, y: np.ndarray, policy, batch_size: int, trap, orders: np.ndarray | None = None):
    """Batches of ``(images, one-hot labels)`` streamed through the project's loader, epoch
    after epoch in ``orders`` (or once in manifest order); bad files go to ``trap``."""
    from .tf_images import image_dataset, pipeline_options

    orders = [np.arange(len(split.paths))] if orders is None else orders
    ds = None
    for order in orders:
        part = image_dataset([split.paths[i] for i in order], policy, batch_size, labels=y[order],
                             hashes=[split.source_hashes[i] for i in order])
        ds = part if ds is None else ds.concatenate(part)
    return trap.strip(ds).with_options(pipeline_options())


# --------------------------------------------------------------------------- the training loop
def _guard_callback(traps, learning_rate: float):
    """Stops training with one line: a bad image (from a trap) or a NaN/infinite loss."""
    import keras

    class Guard(keras.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def _check(self, logs, key, where):
            for trap in traps:
                trap.check()
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(np.asarray(value))):
                text = "NaN" if math.isnan(float(np.asarray(value))) else "infinite"
                raise TrainingDivergedError(
                    f"train.learning_rate={learning_rate:g}: the {where} loss became {text} in epoch "
                    f"{self.epoch + 1}; training diverged (try a smaller learning rate); nothing was written")

        def on_train_batch_end(self, batch, logs=None):
            self._check(logs, "loss", "training")

        def on_test_batch_end(self, batch, logs=None):
            self._check(None, "loss", "validation")

        def on_epoch_end(self, epoch, logs=None):
            self._check(logs, "val_loss", "validation")

    return Guard()


@dataclass
class FitResult:
    history: dict          # metric -> list per epoch
    epochs_run: int
    best_epoch: int        # 1-based, by validation loss
    kept_epoch: int        # 1-based: the epoch whose weights were kept
    stopped_early: bool
    seconds: float


def fit(model, train_ds, val_ds, steps_per_epoch: int, cfg, early_stopping: bool, strategy,
        traps=(), verbose: int = 1) -> FitResult:
    import keras

    with strategy.scope():  # the optimizer's and metrics' variables live on every replica too
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=cfg.train.learning_rate),
                      loss=keras.losses.CategoricalCrossentropy(),
                      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                      # XLA would compile the step once per process: ~1.5 s on a CPU, more than
                      # it saves on a head of a few dense layers.
                      jit_compile=False)
    callbacks = [_guard_callback(traps, cfg.train.learning_rate)]
    stopper = None
    if early_stopping:
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.train.patience,
                                                restore_best_weights=True)
        callbacks.append(stopper)
    start = time.perf_counter()
    keras_history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.max_epochs,
                              steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=verbose,
                              shuffle=False)  # the datasets carry the seeded order
    seconds = time.perf_counter() - start
    history = {k: [float(v) for v in values] for k, values in keras_history.history.items()}
    epochs_run = len(history["loss"])
    val_loss = history["val_loss"]
    best_epoch = int(np.argmin(val_loss)) + 1  # argmin takes the first minimum, as EarlyStopping does
    kept = best_epoch if stopper is not None else epochs_run
    return FitResult(history, epochs_run, best_epoch, kept,
                     bool(stopper is not None and stopper.stopped_epoch > 0), seconds)


# --------------------------------------------------------------------------- the stage
def run_stage(cfg, *, early_stopping: bool = True) -> dict:
    """Train and write the classifier and its reports; return ``train_summary.json``'s dict.

    ``early_stopping=False`` (train.py's ``--no-early-stopping``): train exactly
    ``train.max_epochs`` epochs and keep the last weights.
    """
    from .precision import resolve_precision, with_precision

    started = time.perf_counter()
    work = WorkDir(cfg.work_dir)
    # inputs in the order of the stages that make them, so the error names the first to run
    splits = [read_split(cfg, work, "train"), read_split(cfg, work, "val")]
    base_info = read_base_info(work)  # checks the whole set, base.keras included
    policy = resolve_policy(cfg, base_info)
    face_policy = training_face_policy(cfg, work)
    classes = cfg.classes
    verbose = keras_verbose()  # 1 in a terminal or notebook, 2 in a log file
    precision = resolve_precision(cfg.model.precision)
    print(f"precision: the frozen base runs in {precision.name}"
          + (f" ({precision.reason})" if precision.reason else ""))

    import keras

    strategy = make_strategy(cfg.train.strategy)
    if cfg.train.strategy == "mirrored":
        print(f"MirroredStrategy over {strategy.num_replicas_in_sync} devices "
              f"({', '.join(strategy.extended.worker_devices)}); global batch {cfg.train.batch_size}")
    base = load_base(work.base_model, strategy)
    if tuple(int(d) for d in base.inputs[0].shape[1:3]) != policy.size:
        raise ModelFileError(f"{work.base_model}: takes {tuple(base.inputs[0].shape[1:3])} images but "
                             f"{work.base_info.name} says {list(policy.size)}; run `python {CONVERSION_STAGE}` again")
    cut = features.cut_base(base, cfg.model.embedding_layer, cfg.train.trainable_from)
    keras.utils.set_random_seed(cfg.seed)  # after loading: loading consumes the global RNG

    train, val = splits
    n_classes = len(classes)
    y_train = np.eye(n_classes, dtype=np.float32)[train.labels]
    y_val = np.eye(n_classes, dtype=np.float32)[val.labels]
    batch = cfg.train.batch_size
    orders = epoch_orders(len(train.paths), cfg.train.max_epochs, cfg.seed)
    steps = math.ceil(len(train.paths) / batch)
    flatten = len(cut.embedding_shape()) > 1
    base_sha256 = features.keras_model_sha256(work.base_model)  # not its save date: see there
    traps = ()
    cache_info: dict = {"enabled": bool(cfg.train.cache)}

    with strategy.scope():
        extractor = with_precision(features.frozen_model(cut), precision)
    if cfg.train.cache:
        key = features.cache_key(base_sha256, cut.feature_layer, policy, splits, precision=precision.name)
        cached = features.cached_features(work.features, key, extractor, splits, policy, batch,
                                          strategy, verbose=verbose)
        print(f"features of {cut.feature_layer!r} {cached.status}: {cached.folder}")
        cache_info.update(status=cached.status, folder=str(cached.folder),
                          feature_layer=cut.feature_layer, shape=list(cut.feature_shape()))
        extract_seconds = cached.seconds
        train_ds = feature_dataset(cached.arrays["train"], y_train, batch, orders)
        val_ds = feature_dataset(cached.arrays["val"], y_val, batch)
        with strategy.scope():
            head = build_head(cfg.train.hidden_units, cfg.train.dropout, n_classes, cfg.seed, flatten)
            model = head_model(cut, head)
    else:
        extract_seconds = 0.0
        traps = (features.ErrorTrap(f" (listed in {train.manifest})"),
                 features.ErrorTrap(f" (listed in {val.manifest})"))
        train_ds = image_epochs(train, y_train, policy, batch, traps[0], orders)
        val_ds = image_epochs(val, y_val, policy, batch, traps[1])
        with strategy.scope():
            head = build_head(cfg.train.hidden_units, cfg.train.dropout, n_classes, cfg.seed, flatten)
            images = keras.Input(cut.input_shape, name="image")
            model = keras.Model(images, features.apply_layers(extractor(images), cut.trainable + head))

    result = fit(model, train_ds, val_ds, steps, cfg, early_stopping, strategy, traps, verbose)
    # What was trained, alone and uncompiled (no optimizer state in the file): the base stays in base.keras.
    trained = head_model(cut, head)

    info = {
        "format": CLASSIFIER_FORMAT,
        "classes": classes,
        "input_size": list(policy.size),
        "policy": policy.to_dict(),
        # part of the image policy: prediction finds and crops faces as the training crops were
        "faces": face_policy.to_dict(),
        "precision": precision.to_dict(),
        "embedding_layer": cut.embedding_layer,
        "trainable_from": cut.trainable_from,
        "feature_layer": cut.feature_layer,
        "feature_shape": list(cut.feature_shape()),
        "base_sha256": base_sha256,
        "source_sha256": (base_info.get("source") or {}).get("sha256"),
        "head": {"hidden_units": list(cfg.train.hidden_units), "dropout": cfg.train.dropout},
        # What it was trained on, by content: predict.py refuses a test set that overlaps it.
        "lineage": {
            "manifests": {s.name: s.manifest_sha256 for s in splits},
            "images_sha256": sorted({h for s in splits for h in s.hashes}),
        },
    }
    best = result.best_epoch - 1
    summary = {
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "best_val_loss": result.history["val_loss"][best],
        "best_val_accuracy": result.history["val_accuracy"][best],
        "weights_from_epoch": result.kept_epoch,
        "stopped_early": result.stopped_early,
        "early_stopping": early_stopping,
        "extract_seconds": round(extract_seconds, 3),
        "train_seconds": round(result.seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "n_train": len(train.paths),
        "n_val": len(val.paths),
        "classes": classes,
        "embedding_layer": cut.embedding_layer,
        "trainable_from": cut.trainable_from,
        "strategy": cfg.train.strategy,
        "replicas": int(strategy.num_replicas_in_sync),
        "cache": cache_info,
        "precision": precision.name,
        "seed": cfg.seed,
    }
    write_outputs(work, trained, info, result, summary)
    kept = result.kept_epoch - 1
    print(f"trained {result.epochs_run} epoch(s)" + (" (stopped early)" if result.stopped_early else "")
          + f"; kept epoch {result.kept_epoch}: val_loss {result.history['val_loss'][kept]:.4f}, "
          f"val_accuracy {result.history['val_accuracy'][kept]:.4f}")
    print(f"wrote {work.classifier} and reports in {work.reports}")
    return summary


def head_model(cut, head):
    """The feature layer's activations -> unfrozen base layers (if any) -> head -> probabilities."""
    import keras

    inputs = keras.Input(cut.feature_shape(), name="features")
    return keras.Model(inputs, features.apply_layers(inputs, cut.trainable + head), name="head")


HISTORY_COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy")


def write_outputs(work: WorkDir, classifier, info: dict, result: FitResult, summary: dict) -> None:
    """Write every output to a temporary file first and rename them only when all succeeded;
    the commit record, written last, makes them one set."""
    from . import reports
    from .keras_model import save_model

    with atomic_paths({"model": work.classifier, "info": work.classifier_info,
                       "history": work.reports / "history.csv", "curves": work.reports / "training_curves.png",
                       "summary": work.reports / "train_summary.json"},
                      work.classifier_record, "train.py") as tmp:
        save_model(classifier, tmp["model"])
        tmp["info"].write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        with open(tmp["history"], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("epoch", *HISTORY_COLUMNS))
            for epoch in range(result.epochs_run):
                writer.writerow((epoch + 1, *(repr(result.history[c][epoch]) for c in HISTORY_COLUMNS)))
        reports.plot_training_curves(result.history, tmp["curves"], best_epoch=result.kept_epoch)
        tmp["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
