"""The trained classifier as one object: ``Classifier.load(work_dir)``, then classify images.

``train.py`` saves only what it trained: ``model/classifier.keras`` is the head (plus the base
layers it unfroze with ``train.trainable_from``), taking the frozen base's features in and giving
class probabilities out. ``classifier.json`` records, by content hash, the base it was trained on
(``base_sha256``: config and weights of ``base.keras``, not its save date) and the images it was
trained and validated on. Loading composes ``base.keras`` (cut where training cut it) with the
head, and refuses another base in one line.

    >>> from vggface_gender import Classifier
    >>> clf = Classifier.load("work")
    >>> clf.classes
    ['female', 'male']
    >>> clf.predict_proba(["a.jpg", PIL.Image.open("b.jpg"), uint8_array])  # (3, 2)

Every input goes through the project's one loader with the image policy training used, so a
path, the same file opened lazily with ``PIL.Image.open`` and ``predict.py`` give the same
probabilities. An already-decoded array (or a PIL image that is already loaded) is resized from
the pixels given: a large JPEG that the loader would have decoded at reduced size (Pillow's
``draft``, which needs the file) can then differ slightly.

A classifier trained with face detection (``faces.detect: mtcnn``) records its face policy;
``predict_faces`` finds the faces in whole photos with it and classifies each crop, as
``predict.py --images`` does (``predict_proba`` takes images that already are face crops).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import ImageError, ModelFileError, PipelineError
from .faces import Face, FacePolicy, crop_face, detect_faces
from .images import ImagePolicy, load_image, open_rgb, resize, to_rgb
from .workdir import WorkDir, read_json, require_set, sha256_file

TRAIN_STAGE = "train.py"
CONVERSION_STAGE = "model_conversion.py"
FORMAT = 2  # 1: classifier.keras held the whole network (base included)


def read_info(work: WorkDir) -> dict:
    """``classifier.json``, checked: format, classes, policy. One-line errors name train.py."""
    require_set(work.classifier_record, TRAIN_STAGE, work.classifier, "trained classifier")
    path = work.classifier_info
    try:
        info = read_json(path)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a valid classifier description ({exc}); "
                             f"run `python {TRAIN_STAGE}` again") from None
    found = info.get("format") if isinstance(info, dict) else None
    if found != FORMAT:
        raise ModelFileError(
            f"{path}: written by an earlier version of this project (classifier format {found}, "
            f"which saved the whole network; this version saves the trained head alone, format "
            f"{FORMAT}); run `python {TRAIN_STAGE}` again")
    try:
        classes = [str(c) for c in info["classes"]]
        spec = info["policy"]
        ImagePolicy((int(spec["size"][0]), int(spec["size"][1])), spec["resize"], spec["interpolation"])
        FacePolicy.from_dict(info.get("faces") or {})
        for key in ("base_sha256", "feature_layer", "embedding_layer", "lineage"):
            info[key]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelFileError(f"{path}: not a valid classifier description ({type(exc).__name__}: "
                             f"{exc}); run `python {TRAIN_STAGE}` again") from None
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ModelFileError(f"{path}: expected distinct class names, got {classes}")
    return info


def policy_of(info: dict) -> ImagePolicy:
    spec = info["policy"]
    return ImagePolicy((int(spec["size"][0]), int(spec["size"][1])), spec["resize"], spec["interpolation"])


@dataclass(frozen=True)
class FacePrediction:
    """One face in a photo and its class probabilities (``Classifier.predict_faces``).

    ``box``: ``(x, y, width, height)`` in pixels of the photo as the user sees it (after EXIF
    orientation), not clipped to the photo; ``confidence``: the detector's (1.0 for a classifier
    trained without detection, whose one "face" is the whole image); ``probabilities``: in
    ``Classifier.classes`` order; ``label``: the most probable class.
    """

    box: tuple[float, float, float, float]
    confidence: float
    probabilities: np.ndarray
    label: str
    landmarks: dict = field(default_factory=dict)


class Classifier:
    """The trained male/female classifier: the converted base and the trained head, composed.

    Use ``Classifier.load(work_dir)``. Attributes: ``classes`` (the order of the probability
    columns), ``policy`` (how images are resized, as in training), ``faces`` (how faces are found
    and cropped, as in training), ``precision`` (the precision the frozen base runs in: the one
    training used, where this machine can), ``info`` (``classifier.json``).
    """

    def __init__(self, model, info: dict, work_dir: str | os.PathLike, precision: str = "float32"):
        self.model = model
        self.info = info
        self.classes = [str(c) for c in info["classes"]]
        self.policy = policy_of(info)
        self.faces = FacePolicy.from_dict(info.get("faces") or {})  # classifiers from before: none
        self.precision = precision
        self.work_dir = Path(work_dir)
        self._training_images = frozenset(info["lineage"]["images_sha256"])

    def __repr__(self) -> str:
        return (f"Classifier(classes={self.classes}, input={list(self.policy.size)}, "
                f"resize={self.policy.resize!r}, precision={self.precision!r}, work_dir='{self.work_dir}')")

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, work_dir: str | os.PathLike = "work", *, precision: str | None = None,
             verbose: bool = True) -> "Classifier":
        """Load ``work_dir/model/classifier.keras`` on top of ``work_dir/model/base.keras``.

        Args:
            work_dir: the pipeline's work directory (``work_dir`` in ``config.yaml``).
            precision: the precision the frozen base runs in; ``None`` (default): the one the head
                was trained with (a different one changes the features slightly; a line says so).
            verbose: print a line when the precision differs from training's.

        Raises ``PipelineError`` subclasses with one-line messages: a missing file (naming the
        stage to run), a classifier from an earlier version, or a base it was not trained on.
        """
        from . import features
        from .keras_model import load_saved_model
        from .precision import resolve_precision, with_precision

        work = WorkDir(work_dir)
        info = read_info(work)
        require_set(work.base_record, CONVERSION_STAGE, work.base_model, "base model")
        base_sha256 = features.keras_model_sha256(work.base_model)
        if base_sha256 != info["base_sha256"]:
            raise ModelFileError(
                f"{work.base_model}: not the base this classifier was trained on (its weights or "
                f"structure differ: model_conversion.py ran again on another file); "
                f"re-run `python {TRAIN_STAGE}`")
        base = load_saved_model(work.base_model, "base model", CONVERSION_STAGE, compile=False)
        head = load_saved_model(work.classifier, "classifier", TRAIN_STAGE, compile=False)
        cut = features.cut_base(base, info["embedding_layer"], info.get("trainable_from"))
        if cut.feature_layer != info["feature_layer"] or tuple(head.input_shape[1:]) != cut.feature_shape():
            raise ModelFileError(
                f"{work.classifier}: takes {tuple(head.input_shape[1:])} features of "
                f"{info['feature_layer']!r}, but the base gives {cut.feature_shape()} at "
                f"{cut.feature_layer!r}; re-run `python {TRAIN_STAGE}`")
        if head.output_shape[-1] != len(info["classes"]):
            raise ModelFileError(f"{work.classifier}: gives {head.output_shape[-1]} outputs for classes "
                                 f"{info['classes']}; re-run `python {TRAIN_STAGE}`")
        trained = (info.get("precision") or {}).get("precision", "float32")
        resolved = resolve_precision(precision or trained, keep_slow=precision is None)
        if verbose and (resolved.name != trained or resolved.fell_back):
            why = f" ({resolved.reason})" if resolved.reason else ""
            print(f"note: the base runs in {resolved.name}, the head was trained on {trained} features"
                  f"{why}; probabilities can differ slightly from training's", file=sys.stderr)
        frozen = with_precision(features.frozen_model(cut), resolved)
        model = compose(frozen, head)
        return cls(model, info, work_dir, resolved.name)

    # ------------------------------------------------------------------ prediction
    def predict_proba(self, images: Iterable, *, batch_size: int = 32) -> np.ndarray:
        """Class probabilities, shape ``(n, len(classes))``, columns in ``classes`` order.

        ``images``: any mix of file paths (``str`` / ``os.PathLike``), ``PIL.Image.Image`` objects and
        ``(H, W, 3)`` uint8 RGB arrays. A file that cannot be read raises ``ImageError`` naming it.
        """
        items = list(images)
        out = np.empty((len(items), len(self.classes)), np.float64)
        for start in range(0, len(items), batch_size):
            batch = np.stack([self._pixels(item, start + i)
                              for i, item in enumerate(items[start:start + batch_size])])
            out[start:start + len(batch)] = self.model.predict_on_batch(batch.astype(np.float32))
        return out

    def predict_faces(self, images: Iterable) -> list[list[FacePrediction]]:
        """For each photo, its faces (largest first) with their class probabilities.

        Faces are found and cropped with the face policy training used (``faces``); a photo
        without a face gives ``[]``. Inputs as for ``predict_proba``; paths and lazily opened
        files are decoded at full resolution (crops come from it). ``predict.py --images`` runs
        the same code, so its rows agree with these to float precision.
        """
        return [self.classify_faces(*self.find_faces(item, i)) for i, item in enumerate(images)]

    def find_faces(self, item, index: int = 0) -> tuple:
        """``(photo, faces)``: one input decoded upright RGB at full resolution, and its faces."""
        image = self._photo(item, index)
        return image, detect_faces(image, self.faces)

    def classify_faces(self, image, faces: Sequence[Face]) -> list[FacePrediction]:
        """Crop each face from ``image`` as training's crops were made and classify them."""
        if not faces:
            return []
        # the crop as data_preprocess.py saved it (lossless PNG), resized as the loader resizes it
        batch = np.stack([np.asarray(resize(to_rgb(crop_face(image, f, self.faces)), self.policy), np.uint8)
                          for f in faces])
        probs = np.asarray(self.model.predict_on_batch(batch.astype(np.float32)), np.float64)
        return [FacePrediction(f.box, f.confidence, p, self.classes[int(p.argmax())], dict(f.landmarks))
                for f, p in zip(faces, probs)]

    def predict(self, images: Iterable, *, batch_size: int = 32) -> list[str]:
        """The most probable class of each image."""
        probs = self.predict_proba(images, batch_size=batch_size)
        return [self.classes[i] for i in probs.argmax(axis=1)]

    def in_training(self, images: Iterable) -> list[bool | None]:
        """For each image: was a file with the same bytes a training or validation image?

        Files (paths, and PIL images opened from a file) are hashed; an in-memory image or array
        has no file bytes to compare, so its answer is ``None``.
        """
        from PIL import Image

        answers = []
        for item in images:
            path = item if isinstance(item, (str, os.PathLike)) else (
                getattr(item, "filename", "") if isinstance(item, Image.Image) else "")
            answers.append(self.file_in_training(path) if path else None)
        return answers

    def file_in_training(self, path: str | os.PathLike) -> bool:
        """Whether the file's content hash is one of the training or validation images'."""
        try:
            return sha256_file(path) in self._training_images
        except OSError as exc:
            raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None

    def predict_batches(self, paths: Sequence[str | os.PathLike], batch_size: int,
                        hashes: Sequence[str] | None = None) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Yield ``(probabilities (b, n_classes), errors)`` per batch, in the order of ``paths``.

        Decoding runs in parallel ``tf.data`` threads ahead of the model. A file that cannot be
        read has a non-empty error and meaningless probabilities; the caller decides whether
        that stops the run (evaluation) or becomes a row with its error (``--images``).
        With ``hashes`` (the manifest's), a file whose bytes differ is such an error too.
        """
        from .tf_images import image_dataset

        for images, errors in image_dataset(paths, self.policy, batch_size, hashes=hashes):
            probs = np.asarray(self.model.predict_on_batch(images), dtype=np.float64)
            yield probs, [e.decode("utf-8", "replace") for e in errors.numpy()]

    def _pixels(self, item, index: int) -> np.ndarray:
        """One input as the ``(H, W, 3)`` uint8 array the model takes."""
        path = _file_of(item)
        if path is not None:
            # decoded exactly as a path is (reduced-size JPEG decoding included); a lazily opened
            # PIL image is left untouched
            return load_image(path, self.policy)
        return np.asarray(resize(_in_memory(item, index), self.policy), dtype=np.uint8)

    def _photo(self, item, index: int):
        """One input as the upright full-resolution RGB ``PIL.Image`` (faces are cropped from it)."""
        path = _file_of(item)
        return open_rgb(path) if path is not None else _in_memory(item, index)


def _file_of(item):
    """The file to decode for a path, or for a PIL image opened lazily and not decoded yet
    (``tile`` lists the undecoded data until ``load()``); None for in-memory pixels."""
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        return item
    if isinstance(item, Image.Image):
        filename = getattr(item, "filename", "")
        if filename and getattr(item, "tile", None) and os.path.isfile(filename):
            return filename
    return None


def _in_memory(item, index: int):
    """A decoded PIL image (EXIF orientation applied, on a copy) or an RGB array as RGB PIL."""
    from PIL import Image, ImageOps

    if isinstance(item, Image.Image):
        try:
            return to_rgb(ImageOps.exif_transpose(item))  # a copy: the caller's image is not changed
        except Exception as exc:
            raise ImageError(f"image {index} ({getattr(item, 'filename', '') or type(item).__name__}): "
                             f"cannot decode ({type(exc).__name__}: {exc})") from None
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise PipelineError(f"image {index}: expected an (H, W, 3) uint8 RGB array, got "
                                f"{item.dtype} of shape {item.shape}")
        return Image.fromarray(np.ascontiguousarray(item), "RGB")
    raise PipelineError(f"image {index}: expected a file path, a PIL image or an (H, W, 3) uint8 "
                        f"array, got {type(item).__name__}")


def compose(frozen, head):
    """Images -> frozen base -> head, one model (the two parts are shared, not copied)."""
    import keras

    images = keras.Input(tuple(frozen.inputs[0].shape[1:]), name="image")
    return keras.Model(images, head(frozen(images)), name="classifier")
