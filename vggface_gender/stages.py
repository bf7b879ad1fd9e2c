"""The four stages as Python functions with keyword arguments (what the scripts run).

    from vggface_gender import make_splits, convert, train, evaluate, Classifier
    make_splits("faces", "work", sample_per_class=500)
    convert("vgg_face.mat", "work")
    train("work", data_root="faces", hidden_units=[256])
    report = evaluate("work", data_root="faces")
    Classifier.load("work").predict_proba(["photo.jpg"])

Each argument is a config key (README's Configuration table). ``None`` means the value of
``config`` (a ``config.yaml`` path), else the default; ``settings`` takes any other key in its
dotted form, e.g. ``{"images.resize": "crop"}``. Every value is validated by the one config
schema before any work starts; a bad one raises ``ConfigError`` naming the key. Relative paths
resolve against the current folder. Each function returns what its stage wrote down (the
summary dict).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from .config import Config, load_config

PathLike = str | os.PathLike


def build_config(config: PathLike | None = None, settings: dict[str, Any] | None = None,
                 **keys: Any) -> Config:
    """A validated ``Config``: ``config`` (a file, or the defaults), then ``settings``, then ``keys``
    (dotted keys given with ``__`` for ``.``, e.g. ``train__dropout``), skipping ``None`` values."""
    overrides = [(key, value) for key, value in (settings or {}).items()]
    overrides += [(key.replace("__", "."), os.fspath(value) if isinstance(value, os.PathLike) else value)
                  for key, value in keys.items() if value is not None]
    return load_config(config, overrides)


def _prepare(stage_import: str) -> None:
    if stage_import != "dataset":  # the data stage needs no TensorFlow
        from .cli import import_tensorflow_quietly

        import_tensorflow_quietly()


def make_splits(data_root: PathLike, work_dir: PathLike = "work", *, class_dirs: dict | None = None,
                sample_per_class: int | str | None = None, val_fraction: float | None = None,
                test_per_class: int | str | None = None, allow_fewer: bool | None = None,
                dedup: str | None = None, groups: str | None = None, seed: int | None = None,
                config: PathLike | None = None, settings: dict | None = None,
                workers: int | None = None, quiet: bool = False) -> dict:
    """Stage 1 (``data_preprocess.py``): sample ``data_root/<class folders>`` into train,
    validation and test manifests under ``work_dir/splits``; return ``summary.json``'s dict."""
    from . import dataset

    cfg = build_config(config, settings, data__root=data_root, work_dir=work_dir, data__class_dirs=class_dirs,
                       data__sample_per_class=sample_per_class, data__val_fraction=val_fraction,
                       data__test_per_class=test_per_class, data__allow_fewer=allow_fewer,
                       data__dedup=dedup, data__groups=groups, seed=seed)
    if cfg.faces.detect != "none":  # the face detector needs TensorFlow
        _prepare("faces")
    return dataset.run_stage(cfg, workers=workers, quiet=quiet)


def convert(mat_path: PathLike, work_dir: PathLike = "work", *, input_size: Sequence[int] | None = None,
            verify_images: Sequence[PathLike] = (), config: PathLike | None = None,
            settings: dict | None = None) -> dict:
    """Stage 2 (``model_conversion.py``): convert the MatConvNet file into ``work_dir/model/base.keras``
    (+ ``base.json``); return ``base.json``'s dict."""
    cfg = build_config(config, settings, model__mat_path=mat_path, work_dir=work_dir,
                       model__input_size=None if input_size is None else list(input_size))
    _prepare("conversion")
    from . import conversion
    from .workdir import WorkDir, read_json

    conversion.run_stage(cfg, verify_images=verify_images)
    return read_json(WorkDir(cfg.work_dir).base_info)


def train(work_dir: PathLike = "work", *, data_root: PathLike | None = None,
          embedding_layer: str | None = None, hidden_units: Sequence[int] | None = None,
          dropout: float | None = None, learning_rate: float | None = None, batch_size: int | None = None,
          max_epochs: int | None = None, patience: int | None = None, trainable_from: str | None = None,
          cache: bool | None = None, precision: str | None = None, strategy: str | None = None,
          seed: int | None = None, early_stopping: bool = True, config: PathLike | None = None,
          settings: dict | None = None) -> dict:
    """Stage 3 (``train.py``): train the head on the frozen base; write ``work_dir/model/classifier.*``
    and the training reports; return ``train_summary.json``'s dict."""
    cfg = build_config(config, settings, work_dir=work_dir, data__root=data_root,
                       model__embedding_layer=embedding_layer, model__precision=precision,
                       train__hidden_units=None if hidden_units is None else list(hidden_units),
                       train__dropout=dropout, train__learning_rate=learning_rate,
                       train__batch_size=batch_size, train__max_epochs=max_epochs, train__patience=patience,
                       train__trainable_from=trainable_from, train__cache=cache, train__strategy=strategy,
                       seed=seed)
    _prepare("training")
    from . import training

    return training.run_stage(cfg, early_stopping=early_stopping)


def evaluate(work_dir: PathLike = "work", *, data_root: PathLike | None = None,
             positive_class: str | None = None, groups: str | None = None, bootstrap: int | None = None,
             batch_size: int | None = None, seed: int | None = None, config: PathLike | None = None,
             settings: dict | None = None) -> dict:
    """Stage 4 (``predict.py``): evaluate on the held-out test manifest; write ``work_dir/reports``;
    return ``metrics.json``'s dict. Refuses a test set that overlaps the training data."""
    cfg = build_config(config, settings, work_dir=work_dir, data__root=data_root,
                       evaluate__positive_class=positive_class, evaluate__groups=groups,
                       evaluate__bootstrap=bootstrap, evaluate__batch_size=batch_size, seed=seed)
    _prepare("evaluation")
    from . import evaluation

    return evaluation.evaluate(cfg)
