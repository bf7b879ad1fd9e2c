"""Shared set-up for the training and feature-cache tests: a converted VGG-Face-structured base
(tiny width), generated image folders, split manifests and configs.

Manifests are written here in the data stage's format (``path,label,sha256``, paths relative
to ``data.root``) so these tests do not depend on the sampling rules of ``data_preprocess.py``.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np

from vggface_gender import synthetic
from vggface_gender.config import load_config
from vggface_gender.features import sha256_file

CLASSES = ("female", "male")
WIDTH = 1 / 16
INPUT_SIZE = 32


def convert_base(model_dir: Path, *, width: float = WIDTH, input_size: int = INPUT_SIZE, seed: int = 0,
                 n_classes: int = 10) -> Path:
    """``model_dir/base.keras`` + ``base.json`` from a generated MatConvNet file, through the
    project's converter (the same path ``model_conversion.py`` takes)."""
    from vggface_gender.conversion import convert

    model_dir = Path(model_dir)
    mat = model_dir.parent / f"vggface_{seed}.mat"
    synthetic.write_vggface_mat(mat, width=width, n_classes=n_classes, input_size=input_size, seed=seed)
    convert(mat, model_dir)
    mat.unlink()
    return model_dir


def install_base(source_dir: Path, work_dir: Path) -> None:
    """Copy a converted base into ``work_dir/model`` (conversion runs once per session)."""
    target = Path(work_dir) / "model"
    target.mkdir(parents=True, exist_ok=True)
    # copy2 keeps sizes and mtimes: the commit record still vouches for the copies
    for name in ("base.keras", "base.json", "model_conversion.commit.json"):
        shutil.copy2(Path(source_dir) / name, target / name)


def write_manifest(path: Path, root: Path, files, labels) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "label", "sha256"))
        for file, label in zip(files, labels):
            writer.writerow((Path(file).relative_to(root).as_posix(), label, sha256_file(file)))
    return path


def make_data(root: Path, work_dir: Path, *, per_class: int = 24, n_val: int = 8, size: int = 40,
              seed: int = 0, shuffle_labels: bool = False) -> dict:
    """Generated folders under ``root`` and ``work_dir/splits/{train,val}.csv``.

    ``n_val`` images per class go to validation. ``shuffle_labels``: labels are a seeded random
    permutation (nothing to learn: the validation loss rises as the head memorises).
    """
    synthetic.write_image_folders(root, per_class, classes=CLASSES, size=size, seed=seed)
    files, labels = [], []
    for name in CLASSES:
        found = sorted((root / name).iterdir())
        files.append(found)
        labels.append([name] * len(found))
    train_files = [f for group in files for f in group[n_val:]]
    train_labels = [l for group in labels for l in group[n_val:]]
    val_files = [f for group in files for f in group[:n_val]]
    val_labels = [l for group in labels for l in group[:n_val]]
    if shuffle_labels:
        rng = np.random.default_rng(seed + 1)
        train_labels = list(rng.permutation(train_labels))
        val_labels = list(rng.permutation(val_labels))
    splits = Path(work_dir) / "splits"
    manifests = {
        "train": write_manifest(splits / "train.csv", root, train_files, train_labels),
        "val": write_manifest(splits / "val.csv", root, val_files, val_labels),
    }
    commit_splits(work_dir)
    return manifests | {
        "train_files": train_files, "val_files": val_files,
        "train_labels": train_labels, "val_labels": val_labels,
    }


def commit_splits(work_dir: Path) -> None:
    """Record the manifests in ``work_dir/splits`` as data_preprocess.py's output set (as the
    stage does after writing them), so that train.py and predict.py accept them."""
    from vggface_gender.workdir import WorkDir, commit_set

    work = WorkDir(work_dir)
    commit_set(work.splits_record, sorted(work.splits.glob("*.csv")), "data_preprocess.py")


def config(tmp: Path, work_dir: Path, root: Path, **overrides):
    """A validated config for ``work_dir`` and ``root``; ``overrides`` as dotted keys with '__'."""
    # float32: reproducibility and cross-path comparisons must not depend on this CPU's AMX
    values = [("work_dir", str(work_dir)), ("data.root", str(root)), ("train.batch_size", 8),
              ("model.precision", "float32")]
    values += [(key.replace("__", "."), value) for key, value in overrides.items()]
    return load_config(None, values, cwd=tmp)


def flat_layers(model) -> list:
    """The layers of ``model``, nested models (the composed base + head) opened up."""
    import keras
    out = []
    for layer in model.layers:
        out += flat_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return out


def weights_of(model) -> dict:
    """Layer name -> list of weight arrays (numpy)."""
    return {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in flat_layers(model)
            if layer.get_weights()}


def max_rel_diff(a: dict, b: dict, names) -> float:
    """max |a - b| / max |a| over the named layers' weights."""
    diff = max(float(np.max(np.abs(x - y))) for n in names for x, y in zip(a[n], b[n]))
    scale = max(float(np.max(np.abs(x))) for n in names for x in a[n])
    return diff / scale



_BASES: dict = {}


def base_once(tmp_path_factory, **kwargs) -> Path:
    """A converted base per distinct ``kwargs``, converted once per test session."""
    key = tuple(sorted(kwargs.items()))
    if key not in _BASES:
        _BASES[key] = convert_base(tmp_path_factory.mktemp("base") / "model", **kwargs)
    return _BASES[key]


class Project:
    """A temporary project: ``data/`` with generated images, ``work/`` with a converted base and
    split manifests, and a ``config.yaml`` pointing at them."""

    def __init__(self, tmp: Path, base_dir: Path, **data_kwargs):
        self.tmp = Path(tmp)
        self.root = self.tmp / "data"
        self.work = self.tmp / "work"
        install_base(base_dir, self.work)
        self.data = make_data(self.root, self.work, **data_kwargs)
        self.config_path = self.tmp / "config.yaml"
        self.config_path.write_text(
            "work_dir: work\ndata:\n  root: data\nmodel:\n  precision: float32\n"
            "train:\n  batch_size: 8\n  max_epochs: 2\n", encoding="utf-8")

    def cfg(self, *sets: str):
        from vggface_gender.config import parse_override
        return load_config(self.config_path, [parse_override(s) for s in sets], cwd=self.tmp)

    def train(self, *sets: str, early_stopping: bool = True) -> int:
        import train
        argv = ["--config", str(self.config_path)]
        for s in sets:
            argv += ["--set", s]
        if not early_stopping:
            argv.append("--no-early-stopping")
        return train.main(argv)

    def summary(self) -> dict:
        import json
        return json.loads((self.work / "reports" / "train_summary.json").read_text())

    def classifier(self):
        """The composed model (base + trained head), images in, probabilities out."""
        from vggface_gender import Classifier
        return Classifier.load(self.work).model

    def head(self):
        """``classifier.keras`` alone, loaded as any user would (plain ``load_model``, safe mode)."""
        import keras
        return keras.saving.load_model(self.work / "model" / "classifier.keras")

    def outputs(self) -> list[Path]:
        """Every file train.py writes (that exists now), temporaries included."""
        found = []
        for folder in (self.work / "model", self.work / "reports", self.work / "features"):
            if folder.exists():
                found += [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("base.")
                          and p.name != "model_conversion.commit.json"]
        return sorted(found)
