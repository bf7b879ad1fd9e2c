"""Finding and cropping faces in whole photos (vggface_gender/faces.py).

The detection tests compose whole photos from the shared UTKFace crops (never copied into the
project), pasted at known places and scales on face-free backgrounds (scikit-image's sample
photos and noise), and check recall, false positives and that the classifier sees the same crop.
The one real photograph that ships with the tests is scikit-image's astronaut (NASA, public
domain) as tests/data/astronaut.jpg.
"""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FACES, ROOT
from helpers_faces import backgrounds, compose, face_files, gender, iou, match
from vggface_gender import faces as F
from vggface_gender.config import load_config
from vggface_gender.errors import ConfigError

ASTRONAUT = ROOT / "tests" / "data" / "astronaut.jpg"
DEV_NET = ROOT.parent / "shared" / "data" / "models" / "dev_face_base.mat"
MTCNN = F.FacePolicy(detect="mtcnn")
have_faces = (FACES / "male").is_dir() and (FACES / "female").is_dir()
needs_faces = pytest.mark.skipif(not have_faces, reason="../shared/data/faces not present")


# --------------------------------------------------------------------------- no detector needed
def test_policy_round_trip_and_config(tmp_path):
    cfg = load_config(None, ["faces.detect=mtcnn", "faces.margin=1.3", "faces.multiple=skip"], cwd=tmp_path)
    pol = F.FacePolicy.from_config(cfg)
    assert (pol.detect, pol.margin, pol.multiple, pol.align) == ("mtcnn", 1.3, "skip", False)
    assert F.FacePolicy.from_dict(pol.to_dict()) == pol
    assert F.FacePolicy.from_config(load_config(None, [], cwd=tmp_path)) == F.FacePolicy()  # defaults agree
    bad = tmp_path / "c.yaml"
    bad.write_text("faces:\n  detect: dlib\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: faces\.detect: expected one of none, mtcnn"):
        load_config(bad)
    bad.write_text("faces:\n  margin: 0.5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: faces\.margin: must be >= 1"):
        load_config(bad)
    with pytest.raises(ConfigError, match="did you mean 'faces.min_size'"):
        load_config(None, ["faces.minsize=3"], cwd=tmp_path)


def test_detect_none_is_the_whole_image_unchanged():
    img = Image.new("RGB", (120, 80), (10, 20, 30))
    (face,) = F.detect_faces(img, F.FacePolicy())
    assert face.box == (0, 0, 120, 80) and face.confidence == 1.0
    assert F.crop_face(img, face, F.FacePolicy()) is img


def test_crop_square_margin_and_black_padding():
    img = Image.new("RGB", (100, 100), (200, 200, 200))
    face = F.Face(x=-10.0, y=50.0, w=40.0, h=60.0, confidence=1.0)
    crop = F.crop_face(img, face, F.FacePolicy(detect="mtcnn", margin=1.1))
    assert crop.size == (55, 55)  # mean(40, 60) * 1.1, centred on (10, 80)
    arr = np.asarray(crop)
    # centre (10, 80), side 55 -> x from -17 (17 columns outside, black), y from 53 to 108 (8 rows out)
    assert (arr[:, :17] == 0).all() and (arr[:47, 17:] == 200).all() and (arr[47:, :] == 0).all()


def test_align_levels_the_eyes():
    img = Image.new("RGB", (200, 200), (0, 0, 0))
    from PIL import ImageDraw
    d = ImageDraw.Draw(img)
    # two "eyes" on a line tilted by 15 degrees about the centre (100, 100)
    a = math.radians(15)
    eyes = [(100 - 30 * math.cos(a), 100 - 30 * math.sin(a)), (100 + 30 * math.cos(a), 100 + 30 * math.sin(a))]
    for ex, ey in eyes:
        d.ellipse((ex - 4, ey - 4, ex + 4, ey + 4), fill=(255, 255, 255))
    face = F.Face(60.0, 60.0, 80.0, 80.0, 1.0, {"left_eye": eyes[0], "right_eye": eyes[1]})
    crop = np.asarray(F.crop_face(img, face, F.FacePolicy(detect="mtcnn", align=True)).convert("L"))
    ys, xs = np.nonzero(crop > 128)
    left, right = ys[xs < crop.shape[1] / 2].mean(), ys[xs >= crop.shape[1] / 2].mean()
    assert abs(left - right) < 1.5  # level after alignment (15 degrees would be ~15 px)
    plain = np.asarray(F.crop_face(img, face, F.FacePolicy(detect="mtcnn")).convert("L"))
    ys, xs = np.nonzero(plain > 128)
    assert ys[xs >= plain.shape[1] / 2].mean() - ys[xs < plain.shape[1] / 2].mean() > 10


def test_select_faces_and_draw():
    big, small = F.Face(0, 0, 50, 50, 0.99), F.Face(60, 60, 20, 20, 0.95)
    assert F.select_faces([big, small], F.FacePolicy(multiple="largest")) == [big]
    assert F.select_faces([big, small], F.FacePolicy(multiple="skip")) == []
    assert F.select_faces([small], F.FacePolicy(multiple="skip")) == [small]
    assert F.select_faces([], F.FacePolicy()) == []
    img = Image.new("RGB", (100, 100))
    out = F.draw_faces(img, [big, small], ["male 0.93", "female 0.71"])
    assert out.size == img.size and out is not img and np.asarray(img).max() == 0
    assert tuple(np.asarray(out)[0, 25]) == (255, 0, 0)  # the box's top edge


def test_weights_come_from_the_installed_package():
    import importlib.util
    paths = F.mtcnn_weight_paths()
    pkg = Path(importlib.util.find_spec("mtcnn").submodule_search_locations[0]).resolve()
    for p in paths.values():
        assert p.is_absolute() and p.is_file() and pkg in p.parents


# --------------------------------------------------------------------------- the detector
class _Planted:
    """Unpickling this writes a marker file: proof that a pickle was loaded as code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "loaded"))


def test_planted_weight_files_in_cwd_are_never_loaded(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    for name in F.WEIGHT_FILES.values():
        (tmp_path / name).write_bytes(pickle.dumps(_Planted(marker)))
    monkeypatch.chdir(tmp_path)
    # The trap is real: mtcnn's own loader, given the bare name, unpickles the planted file.
    from mtcnn.utils.tensorflow import load_weights
    load_weights("pnet.lz4")
    assert marker.read_text() == "loaded"
    marker.unlink()
    # Ours builds a fresh detector in that folder and never touches the planted files.
    saved = F._detector
    monkeypatch.setattr(F, "_detector", None)
    try:
        det = F.get_detector()
        assert det is not None and not marker.exists()
        faces = F.detect_faces(Image.open(ASTRONAUT).convert("RGB"), MTCNN)
        assert len(faces) == 1 and not marker.exists()
    finally:
        F._detector = saved


def _astronaut_box():
    return F.detect_faces(Image.open(ASTRONAUT).convert("RGB"), MTCNN)


def test_real_photograph_astronaut():
    faces = _astronaut_box()
    assert len(faces) == 1, faces
    f = faces[0]
    assert f.confidence > 0.95
    # Eileen Collins's face: roughly x 165-265, y 55-185 in the 512x512 photo
    cx, cy = f.x + f.w / 2, f.y + f.h / 2
    assert 180 < cx < 250 and 90 < cy < 160 and 60 < f.w < 130 and 80 < f.h < 160
    assert set(f.landmarks) == {"left_eye", "right_eye", "nose", "mouth_left", "mouth_right"}
    # a downscaled detection maps back to full-resolution pixels
    big = Image.open(ASTRONAUT).convert("RGB").resize((1536, 1536), Image.Resampling.BICUBIC)
    (g,) = F.detect_faces(big, F.FacePolicy(detect="mtcnn", detect_size=512))
    assert iou((g.x / 3, g.y / 3, g.w / 3, g.h / 3), f.box) > 0.8
    assert F.detect_faces(Image.open(ASTRONAUT).convert("RGB"), F.FacePolicy(detect="mtcnn", min_size=400)) == []


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_photo_gives_boxes_as_the_user_sees_it(tmp_path, orientation):
    upright = Image.open(ASTRONAUT).convert("RGB")
    # the stored pixels are what the camera wrote; the viewer applies the EXIF orientation
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone_{orientation}.jpg"
    stored.save(path, quality=95, exif=exif)
    image, faces = F.faces_in_file(path, MTCNN)
    assert image.size == upright.size
    (ref,) = _astronaut_box()
    assert len(faces) == 1 and iou(faces[0].box, ref.box) > 0.85


# --------------------------------------------------------------------------- composed photos
@pytest.fixture(scope="module")
def composed():
    bgs = backgrounds()
    photos = compose(bgs, face_files(120), n_photos=24)
    results = []
    for photo, placed in photos:
        found = F.detect_faces(photo, MTCNN)
        results.append((photo, placed, found))
    return bgs, results


@pytest.mark.real_faces
@needs_faces
def test_recall_on_composed_photos(composed):
    _, results = composed
    n_faces = hits = 0
    extra = 0
    misses = []
    for photo, placed, found in results:
        used = set()
        for square, path, *_ in placed:
            n_faces += 1
            f, overlap = match(square, found, MTCNN.margin)
            if overlap >= 0.5:
                hits += 1
                used.add(id(f))
            else:
                misses.append((square[2], round(overlap, 2), path.name))
        extra += sum(1 for f in found if id(f) not in used)
    recall = hits / n_faces
    print(f"\nrecall {hits}/{n_faces} = {recall:.3f} at IoU >= 0.5 (crop square vs pasted square); "
          f"misses (size, IoU, file): {misses}; detections matching no pasted face: {extra}")
    assert n_faces >= 80
    assert recall >= 0.95, misses


@pytest.mark.real_faces
@needs_faces
def test_face_freebackgrounds(composed):
    backgrounds, _ = composed
    flagged = [(name, [round(f.confidence, 3) for f in found])
               for name, img in backgrounds if (found := F.detect_faces(img, MTCNN))]
    print(f"\nface-free backgrounds with a detection: {len(flagged)}/{len(backgrounds)} {flagged}")
    assert len(flagged) / len(backgrounds) <= 0.02, flagged


@pytest.fixture(scope="module")
def same_face_probs(composed):
    """P(female) from a gender head on the dev network's relu7 features, for 36 faces pasted
    unaltered (not blurred or rotated) at 96-200 px, each seen three ways:

    - ``ref``: the detector's crop of the face un-pasted (the 200x200 UTKFace file itself);
    - ``ctx``: the same box mapped into the composed photo (only the surroundings differ);
    - ``det``: the crop of the box detected in the composed photo (what prediction will use).

    The head is a logistic regression (C=0.001) trained here on 600 other UTKFace crops (plain
    resize), standing in for the trained head the lead will wire in.
    """
    from sklearn.linear_model import LogisticRegression

    import keras
    from vggface_gender.keras_model import build_model
    from vggface_gender.matconvnet import read_net
    base, _ = build_model(read_net(DEV_NET), (64, 64))
    relu7 = keras.Model(base.inputs, base.get_layer("relu7").output)

    def features(imgs):
        x = np.stack([np.asarray(i.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), np.float32)
                      for i in imgs])
        return np.asarray(relu7.predict_on_batch(x)).reshape(len(imgs), -1)

    backgrounds, results = composed
    used = {path for _, placed, _ in results for _, path, *_ in placed}
    rng = random.Random(7)
    pool = [p for p in sorted((FACES / "male").glob("*.jpg")) + sorted((FACES / "female").glob("*.jpg"))
            if p not in used]
    picked = rng.sample(pool, 636)
    train, faces = picked[:600], picked[600:]
    head = LogisticRegression(C=0.001, max_iter=3000)
    head.fit(features([Image.open(p) for p in train]), [gender(p) for p in train])

    rows = []
    for k, path in enumerate(faces):
        original = Image.open(path).convert("RGB")
        alone = F.detect_faces(original, MTCNN)
        if not alone:
            continue
        s, (x, y) = 96 + (k * 13) % 105, (40 + k * 7 % 100, 30 + k * 11 % 90)
        photo = backgrounds[k % len(backgrounds)][1].resize((560, 420), Image.Resampling.BILINEAR)
        photo.paste(original.resize((s, s), Image.Resampling.BICUBIC), (x, y))
        f, overlap = match((x, y, s, s), F.detect_faces(photo, MTCNN), MTCNN.margin)
        if overlap < 0.5:
            continue
        g, r = alone[0], s / 200
        mapped = F.Face(x + g.x * r, y + g.y * r, g.w * r, g.h * r, g.confidence)
        p = head.predict_proba(features([F.crop_face(original, g, MTCNN), F.crop_face(photo, mapped, MTCNN),
                                         F.crop_face(photo, f, MTCNN)]))[:, 1]
        rows.append(p)
    return np.array(rows)


@pytest.mark.real_faces
@needs_faces
@pytest.mark.skipif(not DEV_NET.is_file(), reason="../shared/data/models/dev_face_base.mat not present")
def test_crop_of_a_pasted_face_classifies_as_the_face_alone(same_face_probs):
    """Same box, pasted vs un-pasted: |dP| <= 0.05 for >= 90% of faces (cropping and padding
    add nothing of their own)."""
    d = np.abs(same_face_probs[:, 1] - same_face_probs[:, 0])
    print(f"\nsame box: {len(d)} faces, |dP| <= 0.05 for {(d <= 0.05).mean():.3f} (median {np.median(d):.4f})")
    assert len(d) >= 30 and (d <= 0.05).mean() >= 0.90, d.round(3)


@pytest.mark.real_faces
@needs_faces
@pytest.mark.skipif(not DEV_NET.is_file(), reason="../shared/data/models/dev_face_base.mat not present")
def test_detected_crop_of_a_pasted_face_classifies_as_the_face_alone(same_face_probs):
    """The issue's check: detected crop in the photo vs the detector's crop of the face un-pasted.

    At the edge with the 64x64 dev network: 33/36 = 0.917 (32/36 with another draw of
    backgrounds). The box MTCNN finds on a tight 200x200 UTKFace crop differs by a few pixels from
    the one it finds on the pasted face, and this small network is sensitive to such shifts.
    """
    d = np.abs(same_face_probs[:, 2] - same_face_probs[:, 0])
    print(f"\ndetected boxes: {len(d)} faces, |dP| <= 0.05 for {(d <= 0.05).mean():.3f} "
          f"(median {np.median(d):.4f})")
    assert len(d) >= 30 and (d <= 0.05).mean() >= 0.90, d.round(3)
