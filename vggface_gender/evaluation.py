"""predict.py's stage: evaluate the classifier on the held-out test set, or classify new images.

``run_stage(cfg, images=None, out=None)``:

- without ``--images``: predicts every image of ``work_dir/splits/test.csv`` and writes
  ``work_dir/reports/{metrics.json, predictions.csv, roc_curve.png, confusion_matrix.png,
  errors.png}`` (plus ``groups.png`` when ``evaluate.groups`` is set) and prints the report;
- with ``--images PATH...``: classifies files and folders (recursively) into a CSV on stdout
  or ``--out FILE``, streaming batch by batch; a file that cannot be read gets a row with its
  error and the batch goes on. A classifier trained with face detection gives one row per face
  (box, detector confidence), a "no face found" row for a photo without one, and with
  ``--annotate DIR`` copies of the photos with the boxes and labels drawn.

Both paths run the same function (``Classifier.predict_batches``) through the project's one
loader with the resize policy stored beside the model (``classifier.json``), so an image gets
the same probabilities either way. TensorFlow is imported only when a model is loaded.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import features, metrics
from .errors import ConfigError, DataError, ImageError, ModelFileError, PipelineError
from .images import IMAGE_EXTENSIONS, find_images
from .classifier import Classifier, read_info
from .progress import Progress
from .workdir import WorkDir, atomic_open, atomic_path, atomic_paths, read_json, require_set, sha256_file

TRAIN_STAGE = "train.py"
DATA_STAGE = "data_preprocess.py"
ERRORS_SHOWN = 18  # images in errors.png (three rows of six)


# --------------------------------------------------------------------------- the classifier
def load_classifier(work: WorkDir) -> Classifier:
    """``Classifier.load`` with the work dir's paths; one-line errors otherwise."""
    return Classifier.load(work.root)


def _note_policy(cfg, classifier: Classifier) -> None:
    """Say so when the config's image settings differ from those the classifier was trained with:
    the classifier's win (an image must reach the model as it did in training)."""
    policy = classifier.policy
    changed = [f"images.{key}={wanted}" for key, wanted, used in (
        ("resize", cfg.images.resize, policy.resize),
        ("interpolation", cfg.images.interpolation, policy.interpolation)) if wanted not in (None, used)]
    if changed:
        print(f"note: images are resized by '{policy.resize}' with '{policy.interpolation}' interpolation, "
              f"as the classifier was trained (the config now says {', '.join(changed)})", file=sys.stderr)
    if cfg.faces.detect != classifier.faces.detect:
        print(f"note: faces are found with faces.detect={classifier.faces.detect}, as the classifier was "
              f"trained (the config now says faces.detect={cfg.faces.detect})", file=sys.stderr)


# --------------------------------------------------------------------------- the test manifest
def read_test_manifest(cfg, work: WorkDir, classes: Sequence[str]) -> tuple[Path, list]:
    """``(manifest path, entries)`` of the test split.

    Labels must be classes of the classifier (which are normally ``cfg.classes``).
    """
    from .dataset import read_manifest

    path = work.manifest("test")
    require_set(work.splits_record, DATA_STAGE, path, "test manifest")
    entries = read_manifest(path, cfg.data.root)
    if not entries:
        raise PipelineError(f"{path}: the test manifest lists no images; run `python {DATA_STAGE}` again")
    labels = [e.label for e in entries]
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise PipelineError(f"{path}: labels {unknown} are not classes of the classifier {list(classes)}; "
                            f"run `python {DATA_STAGE}` and `python {TRAIN_STAGE}` with the same config")
    return path, entries


def check_lineage(cfg, work: WorkDir, info: dict, manifest: Path, entries) -> dict:
    """Refuse a test set any image of which (by content) trained or validated the classifier.

    Names the stage to re-run: ``train.py`` when the splits were made again after training
    (the classifier is older than the splits), else ``data_preprocess.py``.
    Returns the lineage record for ``metrics.json``.
    """
    lineage = info["lineage"]
    trained_on = set(lineage["images_sha256"])
    overlap = sum(1 for e in entries if e.sha256 in trained_on)
    current = {}
    for name in ("train", "val"):
        with contextlib.suppress(OSError):
            current[name] = sha256_file(work.manifest(name))
    resplit = current != lineage["manifests"]
    if overlap:
        if resplit:
            why = ("the splits were made again after the classifier was trained; "
                   f"re-run `python {TRAIN_STAGE}` on the new splits")
        else:
            why = f"the test split is not disjoint from training; re-run `python {DATA_STAGE}`"
        raise DataError(f"{manifest}: {overlap} of the {len(entries)} test images were training or "
                        f"validation images of the classifier ({work.classifier.name}): {why}")
    return {
        "test_manifest_sha256": sha256_file(manifest),
        "classifier_trained_on": lineage["manifests"],
        "splits_changed_since_training": resplit,
        "overlap_with_training": 0,
    }


def _relative(path: Path, root: Path) -> str:
    """The manifest's spelling of a path: relative to ``data.root``, with ``/``."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- group rules
# UTKFace's file names: AGE_GENDER_RACE_DATETIME.jpg.chip.jpg (race 0 White, 1 Black, 2 Asian,
# 3 Indian, 4 Others). Some files lack the race field: they fall under "(unknown)".
UTKFACE_PATTERN = re.compile(r"^(?P<age>\d{1,3})_(?P<gender>[01])_(?P<race>[0-4])_")
UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")
AGE_BANDS = ((0, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, None))
PRESETS = ("utkface",)


def _age_band(age: int) -> str:
    for lo, hi in AGE_BANDS:
        if hi is None or age <= hi:
            return f"{lo}+" if hi is None else f"{lo}-{hi}"
    raise AssertionError(age)  # pragma: no cover


@dataclass
class GroupRule:
    """How test images are assigned to groups (``evaluate.groups``)."""

    description: str
    attributes: list[str]
    orders: dict[str, list[str]] = field(default_factory=dict)
    pattern: re.Pattern | None = None
    table: dict[str, dict[str, str]] | None = None  # normalised absolute path -> attributes
    preset: str | None = None

    def assign(self, abs_paths: Sequence[str | os.PathLike]) -> dict[str, list[str]]:
        """``{attribute: [value per image]}``; ``metrics.UNKNOWN`` where the rule says nothing."""
        out = {a: [] for a in self.attributes}
        for path in abs_paths:
            values = self._values(Path(path))
            for a in self.attributes:
                value = values.get(a)
                out[a].append(metrics.UNKNOWN if value in (None, "") else str(value))
        return out

    def _values(self, path: Path) -> dict:
        if self.table is not None:
            return self.table.get(os.path.normpath(os.path.abspath(path)), {})
        match = self.pattern.search(path.name)
        if match is None:
            return {}
        if self.preset == "utkface":
            return {"age_band": _age_band(int(match["age"])), "race": UTKFACE_RACES[int(match["race"])]}
        return match.groupdict()


def group_rule(cfg) -> GroupRule | None:
    """Parse ``evaluate.groups``: ``utkface``, a CSV file (``*.csv``), or a regular expression.

    - ``utkface``: age band (0-9, 10-19, ..., 70+) and race from UTKFace's file names.
    - a CSV with a ``path`` column (relative to ``data.root``, or absolute) and one column per
      attribute; a relative CSV path is looked up beside the config file, then in the current folder.
    - otherwise a regular expression searched in each file name (not its folders); every named
      group ``(?P<name>...)`` is an attribute, its matched text the value.
    """
    spec = cfg.evaluate.groups
    if spec is None:
        return None
    spec = spec.strip()
    if spec.lower() == "utkface":
        race_order = list(UTKFACE_RACES)
        age_order = [f"{lo}+" if hi is None else f"{lo}-{hi}" for lo, hi in AGE_BANDS]
        return GroupRule("UTKFace file names: age band and race", ["age_band", "race"],
                         {"age_band": age_order, "race": race_order}, pattern=UTKFACE_PATTERN,
                         preset="utkface")
    if spec.lower().endswith(".csv"):
        return _csv_rule(cfg, spec)
    try:
        pattern = re.compile(spec)
    except re.error as exc:
        raise ConfigError(f"evaluate.groups: {spec!r} is not a valid regular expression ({exc}) "
                          f"and names no preset ({', '.join(PRESETS)}) or .csv file") from None
    if not pattern.groupindex:
        raise ConfigError(f"evaluate.groups: the regular expression {spec!r} has no named groups; "
                          "name each attribute, e.g. (?P<race>\\d)")
    return GroupRule(f"regex {spec}", list(pattern.groupindex), pattern=pattern)


def _csv_rule(cfg, spec: str) -> GroupRule:
    candidates = [Path(spec)] if os.path.isabs(spec) else (
        ([Path(cfg.source).parent / spec] if getattr(cfg, "source", None) else []) + [Path.cwd() / spec])
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConfigError(f"evaluate.groups: CSV file {spec} not found "
                          f"(looked in {', '.join(str(p.parent) for p in candidates)})")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            if "path" not in columns or len(columns) < 2:
                raise ConfigError(f"{path}: expected a header with a 'path' column and at least one "
                                  f"attribute column, got {columns}")
            attributes = [c for c in columns if c != "path"]
            table = {}
            root = Path(cfg.data.root)
            for row in reader:
                image = Path(row["path"] or "")
                key = os.path.normpath(os.path.abspath(image if image.is_absolute() else root / image))
                table[key] = {a: (row.get(a) or "").strip() for a in attributes}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: cannot read the groups CSV ({exc})") from None
    return GroupRule(f"CSV {path.name}", attributes, table=table)


# --------------------------------------------------------------------------- evaluation
def check_face_policy(work: WorkDir, info: dict) -> None:
    """Refuse a test set whose faces were found or cropped otherwise than the training set's:
    the classifier would be scored on inputs it was not trained on."""
    from .dataset import split_face_policy
    from .faces import FacePolicy

    made_with = split_face_policy(work.root) or FacePolicy()
    trained_with = FacePolicy.from_dict(info.get("faces") or {})
    if made_with != trained_with and (made_with.detect, trained_with.detect) != ("none", "none"):
        raise DataError(f"{work.split_summary}: the splits were made with faces {made_with.to_dict()}, the "
                        f"classifier was trained with faces {trained_with.to_dict()}; run `python "
                        f"{DATA_STAGE}` with the faces.* settings in {work.classifier_info.name}, or "
                        f"`python {TRAIN_STAGE}` again")


def evaluate(cfg, stream=None) -> dict:
    """Evaluate on the test manifest; write the reports; print the table; return metrics.json's dict."""
    stream = stream or sys.stdout
    work = WorkDir(cfg.work_dir)
    require_set(work.splits_record, DATA_STAGE, work.manifest("test"), "test manifest")
    # Everything that can be checked cheaply is checked before the slow model load.
    info = read_info(work)
    classes = [str(c) for c in info["classes"]]
    positive = cfg.evaluate.positive_class
    if positive not in classes:
        raise ConfigError(f"evaluate.positive_class: {positive!r} is not a class of the classifier {classes}")
    check_face_policy(work, info)
    manifest, entries = read_test_manifest(cfg, work, classes)
    lineage = check_lineage(cfg, work, info, manifest, entries)
    if lineage["splits_changed_since_training"]:
        print(f"note: the train/validation splits changed since the classifier was trained; the test "
              f"set shares no image with what it was trained on, so the evaluation stands", file=sys.stderr)
    abs_paths = [Path(e.path) for e in entries]
    sources = [Path(e.source) for e in entries]  # what the network sees: the face crop, if any
    labels = [e.label for e in entries]
    rule = group_rule(cfg)
    root = Path(cfg.data.root)
    rel_paths = [_relative(p, root) for p in abs_paths]

    classifier = load_classifier(work)
    _note_policy(cfg, classifier)

    y_true = np.array([classes.index(label) for label in labels], dtype=np.int64)
    probs = np.empty((len(abs_paths), len(classes)), dtype=np.float64)
    done = 0
    with Progress(len(abs_paths), "evaluating") as bar:
        for batch, errors in classifier.predict_batches(sources, cfg.evaluate.batch_size,
                                                        [e.source_sha256 for e in entries]):
            for error in errors:
                if error:  # every test image must count: a bad one stops the run, naming it
                    raise ImageError(f"{error} (listed in {manifest})")
            probs[done:done + len(batch)] = batch
            done += len(batch)
            bar.update(len(batch))
    if not np.all(np.isfinite(probs)):
        raise ModelFileError(f"{work.classifier}: the classifier produced NaN or infinite probabilities")

    report = metrics.classification_report(y_true, probs, classes, positive,
                                           n_bootstrap=cfg.evaluate.bootstrap, seed=cfg.seed)
    report["decision"] = "most probable class"
    report["manifest"] = str(manifest)
    report["model"] = str(work.classifier)
    report["policy"] = classifier.policy.to_dict()
    report["faces"] = classifier.faces.to_dict()
    report["precision"] = classifier.precision
    report["lineage"] = lineage | {"classifier_sha256": features.keras_model_sha256(work.classifier),
                                   "base_sha256": info["base_sha256"]}
    y_pred = probs.argmax(axis=1)
    if rule is not None:
        assigned = rule.assign(abs_paths)
        report["groups"] = {
            "rule": rule.description,
            "attributes": {a: metrics.group_breakdown(y_true, y_pred, assigned[a], classes,
                                                      rule.orders.get(a))
                           for a in rule.attributes},
        }
    _write_reports(work, report, rel_paths, sources, y_true, y_pred, probs, classifier)
    print(reports_text(report, work), file=stream)
    return report


def _write_reports(work: WorkDir, report: dict, rel_paths, abs_paths, y_true, y_pred, probs,
                   classifier: Classifier) -> None:
    """Write every report file to a temporary name, then rename them all: a failure (or Ctrl-C)
    leaves the previous run's report whole rather than half replaced."""
    from . import reports

    classes = classifier.classes
    out = work.reports
    names = ["predictions.csv", "roc_curve.png", "confusion_matrix.png", "errors.png", "metrics.json"]
    if report.get("groups"):
        names.append("groups.png")
    with atomic_paths({name: out / name for name in names}, work.reports_record, "predict.py") as tmp:
        with open(tmp["predictions.csv"], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["path", "label", "predicted", *(f"prob_{c}" for c in classes)])
            for rel, t, p, row in zip(rel_paths, y_true, y_pred, probs):
                writer.writerow([rel, classes[t], classes[p], *(_prob(v) for v in row)])

        positive = classes.index(report["positive_class"])
        reports.plot_roc_curve(y_true == positive, probs[:, positive], report, tmp["roc_curve.png"])
        reports.plot_confusion_matrix(report["confusion_matrix"], tmp["confusion_matrix.png"])
        wrong = np.flatnonzero(y_true != y_pred)
        # most confident first; ties keep manifest order (stable sort)
        wrong = wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:ERRORS_SHOWN]
        shown = [{"path": abs_paths[i], "label": classes[y_true[i]], "predicted": classes[y_pred[i]],
                  "probs": probs[i].tolist()} for i in wrong]
        reports.plot_errors(shown, classes, tmp["errors.png"], classifier.policy)
        if report.get("groups"):
            reports.plot_groups(report["groups"], classes, tmp["groups.png"])
        with open(tmp["metrics.json"], "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if not report.get("groups") and (out / "groups.png").exists():
        (out / "groups.png").unlink()  # a stale plot from an earlier run with groups would mislead


def reports_text(report: dict, work: WorkDir) -> str:
    from . import reports

    names = ["metrics.json", "predictions.csv", "roc_curve.png", "confusion_matrix.png", "errors.png"]
    if report.get("groups"):
        names.append("groups.png")
    return reports.format_report(report) + f"\n\nWrote {', '.join(names)} to {work.reports}"


def _prob(value: float) -> str:
    # 9 significant digits round-trip a float32 exactly
    return f"{value:.9g}"


# --------------------------------------------------------------------------- --images
def expand_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """Files to classify, and the folders in which no image file was found.

    A folder contributes its image files (by extension, recursively, hidden ones skipped,
    sorted); a file named explicitly is always tried, whatever its name, so that a mistake
    shows up as a row with its error rather than silently disappearing.
    """
    files, empty = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = find_images(path)
            files.extend(found)
            if not found:
                empty.append(path)
        else:
            files.append(path)
    return files, empty


def classify(cfg, inputs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
             stdout=None, stderr=None, classifier: Classifier | None = None,
             annotate: str | os.PathLike | None = None) -> dict:
    """Classify files and folders into a CSV (``out``, else stdout), streaming batch by batch.

    Columns: ``path, predicted, prob_<class>..., in_training, error`` (``in_training``: a file with
    the same bytes was a training or validation image of the classifier). Returns ``{"n", "failed", "out"}``.
    ``classifier``: an already loaded ``load_classifier(...)`` (a notebook classifying several
    folders loads the model once); by default the config's ``work_dir/model/classifier.keras``.
    A classifier trained with face detection writes one row per face instead (``classify_faces``).
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if classifier is None:
        work = WorkDir(cfg.work_dir)
        info = read_info(work)  # before the files are listed: a missing classifier is the first thing to say
        if annotate is not None and (info.get("faces") or {}).get("detect", "none") == "none":
            raise PipelineError(_NO_DETECTION_TO_DRAW.format(work.classifier_info))
    files, empty = expand_inputs(inputs)
    if not files:
        raise PipelineError(f"no image files to classify in {', '.join(str(i) for i in inputs)} "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    for folder in empty:
        print(f"note: {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found", file=stderr)
    targets = annotation_targets(inputs, files, annotate) if annotate is not None else None
    if classifier is None:
        classifier = load_classifier(work)
        _note_policy(cfg, classifier)
    if classifier.faces.detect != "none":
        return classify_faces(classifier, files, out, stdout, stderr, targets)
    if annotate is not None:
        raise PipelineError(_NO_DETECTION_TO_DRAW.format(classifier.work_dir / "model" / "classifier.json"))
    classes = classifier.classes

    failed = 0
    sink = atomic_open(out) if out is not None else contextlib.nullcontext(stdout)
    # CSV rows on a terminal already show the progress; a bar drawn between them would garble both
    show_bar = not (out is None and _isatty(stdout) and _isatty(stderr))
    with sink as f, Progress(len(files), "classifying", stream=stderr, enabled=show_bar) as bar:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "predicted", *(f"prob_{c}" for c in classes), "in_training", "error"])
        start = 0
        for probs, errors in classifier.predict_batches(files, cfg.evaluate.batch_size):
            for path, row, error in zip(files[start:start + len(probs)], probs, errors):
                if error:
                    failed += 1
                    writer.writerow([str(path), "", *([""] * len(classes)), "", error])
                else:
                    seen = "true" if classifier.file_in_training(path) else "false"
                    writer.writerow([str(path), classes[int(row.argmax())], *(_prob(v) for v in row), seen, ""])
            start += len(probs)
            if out is None:
                f.flush()  # stream: a reader of the pipe sees each batch as it is done
            bar.update(len(probs))
    summary = f"classified {len(files) - failed} of {len(files)} files"
    if failed:
        summary += f"; {failed} could not be read (see the error column)"
    print(summary + (f" -> {out}" if out is not None else ""), file=stderr)
    return {"n": len(files), "failed": failed, "out": None if out is None else str(out)}


_NO_DETECTION_TO_DRAW = ("--annotate draws the faces found in whole photos; this classifier was trained "
                         "without face detection ({}: faces.detect is none)")
FACE_COLUMNS = ("face", "x", "y", "width", "height", "confidence")
NO_FACE = "no face found"


def classify_faces(classifier: Classifier, files: Sequence[Path], out, stdout, stderr,
                   targets: dict[Path, Path] | None = None) -> dict:
    """``--images`` with a classifier trained with face detection: one CSV row per face.

    Columns: ``path, face, x, y, width, height, confidence, predicted, prob_<class>...,
    in_training, note, error``; ``face`` is the index (0 = largest), the box is in pixels of the
    photo as the user sees it (after EXIF orientation). A photo without a face gets one row with
    an empty ``face`` and ``note`` = ``no face found``. Each photo runs through
    ``Classifier.find_faces`` and ``classify_faces``, as ``Classifier.predict_faces`` does.
    ``targets``: photo -> annotated copy to write (``--annotate``).
    """
    from .faces import draw_faces

    classes = classifier.classes
    failed = faceless = n_faces = 0
    sink = atomic_open(out) if out is not None else contextlib.nullcontext(stdout)
    show_bar = not (out is None and _isatty(stdout) and _isatty(stderr))
    empty_face = [""] * (len(FACE_COLUMNS) + 1 + len(classes))
    with sink as f, Progress(len(files), "finding faces", stream=stderr, enabled=show_bar) as bar:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", *FACE_COLUMNS, "predicted", *(f"prob_{c}" for c in classes),
                         "in_training", "note", "error"])
        for path in files:
            try:
                image, found = classifier.find_faces(path)
            except ImageError as exc:
                failed += 1
                writer.writerow([str(path), *empty_face, "", "", str(exc)])
                bar.update(1)
                continue
            predictions = classifier.classify_faces(image, found)
            seen = "true" if classifier.file_in_training(path) else "false"
            if not predictions:
                faceless += 1
                writer.writerow([str(path), *empty_face, seen, NO_FACE, ""])
            for k, p in enumerate(predictions):
                writer.writerow([str(path), k, *(f"{v:.2f}" for v in p.box), f"{p.confidence:.6f}",
                                 p.label, *(_prob(v) for v in p.probabilities), seen, "", ""])
            n_faces += len(predictions)
            if targets is not None:
                labels = [f"{k} {p.label} {p.probabilities.max():.2f}" for k, p in enumerate(predictions)]
                target = targets[path]
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(target) as tmp:
                        draw_faces(image, found, labels).save(tmp, format=_save_format(target))
                except (OSError, ValueError) as exc:
                    raise PipelineError(f"{target}: cannot write the annotated copy ({exc})") from None
            if out is None:
                f.flush()
            bar.update(1)
    summary = f"found {n_faces} faces in {len(files) - failed} of {len(files)} files"
    if faceless:
        summary += f"; {faceless} without a face"
    if failed:
        summary += f"; {failed} could not be read (see the error column)"
    print(summary + (f" -> {out}" if out is not None else ""), file=stderr)
    return {"n": len(files), "failed": failed, "faces": n_faces, "no_face": faceless,
            "out": None if out is None else str(out)}


def _save_format(path: Path) -> str:
    """Pillow's format for the file name (the temporary name's suffix would not tell it)."""
    from PIL import Image

    return Image.registered_extensions()[path.suffix.lower()]


def annotation_targets(inputs: Sequence[str | os.PathLike], files: Sequence[Path],
                       folder: str | os.PathLike) -> dict[Path, Path]:
    """Where ``--annotate`` writes each photo's annotated copy: ``folder/<path inside its input
    folder>`` (a file named directly: ``folder/<name>``), same format; a clash gets ``_2``, ``_3``...

    Refuses (one line) a folder that is an input folder or inside one (its copies would be
    classified next time) or that holds an input photo (a copy would overwrite it).
    """
    target_dir = Path(folder)
    if target_dir.exists() and not target_dir.is_dir():
        raise PipelineError(f"--annotate {folder}: is a file, not a folder")
    real = Path(os.path.realpath(target_dir))
    for item in inputs:
        item_real = Path(os.path.realpath(item))
        if Path(item).is_dir() and (real == item_real or item_real in real.parents):
            raise PipelineError(f"--annotate {folder}: is inside the input folder {item}; choose a "
                                f"folder outside it (the photos are never overwritten)")
    targets: dict[Path, Path] = {}
    used: set[Path] = set()
    folders = [Path(i) for i in inputs if Path(i).is_dir()]
    for path in files:
        if real in Path(os.path.realpath(path)).parents:
            raise PipelineError(f"--annotate {folder}: holds the input photo {path}; choose another "
                                f"folder (the photos are never overwritten)")
        inside = next((path.relative_to(d) for d in folders if d in path.parents), None)
        target = first = target_dir / (inside if inside is not None else path.name)
        if first.suffix.lower() not in IMAGE_EXTENSIONS:  # a photo named without a known extension
            target = first = first.with_name(first.name + ".png")
        n = 1
        while target in used:
            n += 1
            target = first.with_name(f"{first.stem}_{n}{first.suffix}")
        used.add(target)
        targets[path] = target
    return targets


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------- the stage
def run_stage(cfg, *, images: Sequence[str | os.PathLike] | None = None,
              out: str | os.PathLike | None = None, annotate: str | os.PathLike | None = None) -> int:
    """Entry point of ``predict.py``: evaluate, or classify ``images`` into ``out`` (else stdout),
    with ``annotate``: annotated copies of the photos into that folder."""
    for flag, value in (("--out", out), ("--annotate", annotate)):
        if value is not None and not images:
            raise PipelineError(f"{flag} is only used with --images (the evaluation writes to work_dir/reports)")
    if images:
        try:
            classify(cfg, images, out, annotate=annotate)
        except BrokenPipeError:  # e.g. `predict.py --images x | head`: the reader has all it wants
            # Point stdout at /dev/null so that Python's final flush does not fail again.
            with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    evaluate(cfg)
    return 0
