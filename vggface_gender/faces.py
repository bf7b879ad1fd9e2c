"""Finding and cropping faces in whole photos (one concern: faces; no classification here).

VGG-Face was trained on tight face crops. This module finds faces with MTCNN (the ``mtcnn``
package, MIT licence, weights shipped inside its wheel) and cuts the square crop that the
classifier's loader then resizes to the network's input size.

Interface (what preprocessing and prediction call):

- ``FacePolicy``: frozen dataclass of the ``faces.*`` config keys; ``to_dict``/``from_dict``
  (recorded in ``classifier.json`` with the image policy), ``from_config(cfg)``.
- ``Face``: one detection, box ``(x, y, w, h)`` in pixels of the *oriented* full-resolution image
  (as the user sees it, after EXIF orientation), ``confidence``, ``landmarks`` (name -> (x, y)).
  A face cut by the photo's edge keeps the box the detector estimated, which may reach beyond
  the edge (negative x or y, or past the width/height): boxes are not clipped, so the crop stays
  centred on the face (``crop_face`` pads the outside with black).
- ``detect_faces(image, policy) -> list[Face]``: largest area first (ties: higher confidence).
- ``crop_face(image, face, policy) -> PIL.Image``: the square crop with margin, padded with
  black where it leaves the image, eyes levelled when ``policy.align``.
- ``faces_in_file(path, policy) -> (image, faces)``: the project's loader (EXIF orientation,
  any mode to RGB), then ``detect_faces``.
- ``select_faces(faces, policy)``: the training rule ``faces.multiple`` (largest | skip).
- ``draw_faces(image, faces, labels) -> PIL.Image``: a copy with boxes and labels drawn.

Safety: mtcnn 1.0.0 loads its weights with ``joblib.load`` (a pickle) and, given a bare file
name, tries ``os.path.abspath(name)`` (the *current folder*) before its own assets. We always
pass the absolute path of the file inside the installed package, resolved from the package's
location without consulting the current folder, so a planted ``pnet.lz4`` there is never read.
The detector (and TensorFlow) is created lazily, once per process.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import images

DETECTORS = ("none", "mtcnn")
MULTIPLE = ("largest", "skip")
WEIGHT_FILES = {"pnet": "pnet.lz4", "rnet": "rnet.lz4", "onet": "onet.lz4"}
# MTCNN's smallest face: its pyramid starts at 12 px windows; min_face_size above 20 loses faces
# (see README), so we keep 20 and filter by faces.min_size afterwards, in full-resolution pixels.
MTCNN_MIN_FACE = 20


@dataclass(frozen=True)
class FacePolicy:
    """How faces are found and cropped (the ``faces.*`` config keys).

    ``margin``: the crop is a square of side ``mean(w, h) * margin`` centred on the box
    (VGG-Face's own demo: 1.1). ``min_size``: faces whose ``max(w, h)`` in full-resolution pixels
    is below it are dropped after detection. ``detect_size``: photos whose longer side exceeds it
    are detected on a copy downscaled to that longer side (crops still come from the full image).
    """

    detect: str = "none"
    margin: float = 1.1
    align: bool = False
    min_size: int = 0
    min_confidence: float = 0.85
    multiple: str = "largest"
    detect_size: int = 1024

    def __post_init__(self):
        if self.detect not in DETECTORS:
            raise ValueError(f"detect must be one of {DETECTORS}, got {self.detect!r}")
        if self.multiple not in MULTIPLE:
            raise ValueError(f"multiple must be one of {MULTIPLE}, got {self.multiple!r}")
        if not (self.margin >= 1.0 and math.isfinite(self.margin)):
            raise ValueError(f"margin must be >= 1, got {self.margin!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence!r}")
        if int(self.min_size) < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size!r}")
        if int(self.detect_size) < 64:
            raise ValueError(f"detect_size must be >= 64, got {self.detect_size!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FacePolicy":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def from_config(cls, cfg) -> "FacePolicy":
        f = cfg["faces"]
        return cls(detect=f["detect"], margin=float(f["margin"]), align=bool(f["align"]),
                   min_size=int(f["min_size"]), min_confidence=float(f["min_confidence"]),
                   multiple=f["multiple"], detect_size=int(f["detect_size"]))


@dataclass(frozen=True)
class Face:
    """One face: box in pixels of the oriented full-resolution image, confidence, landmarks."""

    x: float
    y: float
    w: float
    h: float
    confidence: float
    landmarks: dict = field(default_factory=dict)  # left_eye, right_eye, nose, mouth_left, mouth_right

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.w, self.h)

    def square(self, margin: float) -> tuple[float, float, float]:
        """``(centre_x, centre_y, side)`` of the crop square: side = mean(w, h) * margin."""
        return (self.x + self.w / 2, self.y + self.h / 2, (self.w + self.h) / 2 * margin)

    def to_dict(self) -> dict:
        return {"box": [round(v, 1) for v in self.box], "confidence": round(self.confidence, 4),
                "landmarks": {k: [round(v[0], 1), round(v[1], 1)] for k, v in self.landmarks.items()}}


# --------------------------------------------------------------------------- the detector
_detector = None
_detector_lock = threading.Lock()


def mtcnn_weight_paths() -> dict[str, Path]:
    """Absolute paths of mtcnn's weight files inside the installed package.

    Found from the package's import location (``importlib.util.find_spec``), never from the
    current folder: a relative ``submodule_search_locations`` entry (``''`` on ``sys.path``) is
    refused.
    """
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'mtcnn' package is not installed (pip install 'mtcnn>=1.0.0')")
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not pkg.is_absolute():
        raise ImportError(f"'mtcnn' resolved to a relative location {pkg}; refusing to load its weights")
    pkg = pkg.resolve()
    paths = {name: pkg / "assets" / "weights" / fname for name, fname in WEIGHT_FILES.items()}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(f"{p}: mtcnn weight file missing; reinstall mtcnn")
    return paths


def get_detector():
    """The process's one MTCNN detector, created on first use (imports TensorFlow then)."""
    global _detector
    with _detector_lock:
        if _detector is None:
            paths = mtcnn_weight_paths()
            from mtcnn import MTCNN
            from mtcnn.stages import StageONet, StagePNet, StageRNet

            # Absolute paths: mtcnn's load_weights tries os.path.abspath(name) first, which for an
            # absolute path is the path itself, so the current folder is never consulted.
            stages = [StagePNet(weights=str(paths["pnet"])), StageRNet(weights=str(paths["rnet"])),
                      StageONet(weights=str(paths["onet"]))]
            _detector = MTCNN(stages=stages, device="CPU:0" if not _has_gpu() else "GPU:0")
        return _detector


def _has_gpu() -> bool:
    import tensorflow as tf
    return bool(tf.config.list_logical_devices("GPU"))


def detect_faces(image: Image.Image, policy: FacePolicy) -> list[Face]:
    """Faces in an upright RGB image, largest area first (ties: higher confidence).

    ``policy.detect == 'none'``: the whole image is one face (confidence 1.0), as before.
    Larger photos are detected on a copy whose longer side is ``policy.detect_size``; boxes and
    landmarks are mapped back to the full-resolution pixels. Faces below ``min_confidence`` or
    ``min_size`` (full-resolution pixels, ``max(w, h)``) are dropped.
    """
    if image.mode != "RGB":
        image = images.to_rgb(image)
    width, height = image.size
    if policy.detect == "none":
        return [Face(0.0, 0.0, float(width), float(height), 1.0, {})]
    scale = 1.0
    small = image
    longest = max(width, height)
    if longest > policy.detect_size:
        scale = longest / policy.detect_size
        small = image.resize((max(1, round(width / scale)), max(1, round(height / scale))),
                             Image.Resampling.BILINEAR, reducing_gap=3.0)
    arr = np.asarray(small, dtype=np.uint8)
    if min(arr.shape[:2]) < 12:  # smaller than MTCNN's smallest window
        return []
    raw = get_detector().detect_faces(arr, min_face_size=MTCNN_MIN_FACE, fit_to_image=False,
                                      threshold_onet=min(0.5, policy.min_confidence))
    # ONet runs with a low threshold (measured: fewer faces lost in MTCNN's final NMS); the
    # policy's min_confidence is applied here.
    faces = []
    for r in raw or []:
        x, y, w, h = (float(v) * scale for v in r["box"])
        conf = float(r["confidence"])
        if conf < policy.min_confidence or w <= 0 or h <= 0 or max(w, h) < policy.min_size:
            continue
        marks = {k: (float(v[0]) * scale, float(v[1]) * scale) for k, v in r.get("keypoints", {}).items()}
        faces.append(Face(x, y, w, h, conf, marks))
    faces.sort(key=lambda f: (-f.w * f.h, -f.confidence))
    return faces


def select_faces(faces: list[Face], policy: FacePolicy) -> list[Face]:
    """The training rule for one image: ``largest`` keeps the largest face, ``skip`` keeps the
    image's face only when there is exactly one; no face gives ``[]`` either way."""
    if policy.multiple == "skip" and len(faces) != 1:
        return []
    return faces[:1]


def faces_in_file(path: str | os.PathLike, policy: FacePolicy,
                  sha256: str | None = None) -> tuple[Image.Image, list[Face]]:
    """Decode ``path`` with the project's loader (EXIF orientation applied, RGB) and find faces.

    Raises ``ImageError`` for an unreadable file, or one whose bytes do not hash to ``sha256``.
    """
    image = images.open_rgb(path, sha256=sha256)
    return image, detect_faces(image, policy)


# --------------------------------------------------------------------------- cropping
def crop_face(image: Image.Image, face: Face, policy: FacePolicy) -> Image.Image:
    """The square crop around ``face`` from the full-resolution ``image``.

    Side ``mean(w, h) * policy.margin`` centred on the box. Where the square leaves the image it
    is padded with black (the colour ``images.resize: pad`` uses), so the face keeps its place
    and scale. With ``policy.align`` the square is rotated about its centre so that the eyes
    are level (bilinear). With ``detect: none`` the image is returned unchanged.
    """
    if policy.detect == "none" and face.box == (0.0, 0.0, float(image.width), float(image.height)):
        return image
    cx, cy, side = face.square(policy.margin)
    n = max(1, int(round(side)))
    angle = _eye_angle(face) if policy.align else 0.0
    if abs(angle) < 1e-3:
        left, top = math.floor(cx - n / 2 + 0.5), math.floor(cy - n / 2 + 0.5)
        # Image.crop pads outside the image with zeros (black) in RGB
        return image.crop((left, top, left + n, top + n))
    # Rotate about the face centre: take a region large enough for any rotation, rotate it,
    # then cut the centred square.
    big = int(math.ceil(n * math.sqrt(2))) + 2
    left, top = math.floor(cx - big / 2 + 0.5), math.floor(cy - big / 2 + 0.5)
    region = image.crop((left, top, left + big, top + big))
    centre = (cx - left, cy - top)
    rotated = region.rotate(angle, resample=Image.Resampling.BILINEAR, center=centre, fillcolor=(0, 0, 0))
    l2, t2 = math.floor(centre[0] - n / 2 + 0.5), math.floor(centre[1] - n / 2 + 0.5)
    return rotated.crop((l2, t2, l2 + n, t2 + n))


def _eye_angle(face: Face) -> float:
    """Degrees (counter-clockwise, Pillow's convention) that level the eyes; 0 without landmarks."""
    le, re_ = face.landmarks.get("left_eye"), face.landmarks.get("right_eye")
    if le is None or re_ is None:
        return 0.0
    # image y grows downwards: the eye line's angle below the horizontal, undone by rotate(+angle)
    return math.degrees(math.atan2(re_[1] - le[1], re_[0] - le[0]))


# --------------------------------------------------------------------------- annotation
def draw_faces(image: Image.Image, faces: list[Face], labels: list[str] | None = None) -> Image.Image:
    """A copy of ``image`` with each face's box and label (default: its index) drawn."""
    out = images.to_rgb(image).copy()
    draw = ImageDraw.Draw(out)
    thick = max(2, round(max(out.size) / 400))
    for i, face in enumerate(faces):
        label = labels[i] if labels is not None and i < len(labels) else str(i)
        x0, y0 = face.x, face.y
        draw.rectangle((x0, y0, x0 + face.w, y0 + face.h), outline=(255, 0, 0), width=thick)
        tb = draw.textbbox((0, 0), label)
        tw, th = tb[2] - tb[0] + 4, tb[3] - tb[1] + 4
        ty = y0 - th if y0 - th >= 0 else y0 + face.h
        draw.rectangle((x0, ty, x0 + tw, ty + th), fill=(255, 0, 0))
        draw.text((x0 + 2, ty + 1), label, fill=(255, 255, 255))
    return out
