"""Face detection wired through the pipeline: data_preprocess.py crops the faces of whole photos
into work_dir, train.py records the face policy, predict.py --images gives one row per face
(and --annotate draws them), Classifier.predict_faces agrees, evaluation uses the crops.

Photos are small (240x180) and composed from the shared UTKFace crops (tests/helpers_faces.py);
the network is VGG-Face's structure at 1/16 width with random weights (what is tested is the
wiring, not accuracy: bench/bench_faces_training.py measures that).
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import predict
from helpers_faces import backgrounds, face_files, gender, have_faces, iou, photo_with_face
from vggface_gender import Classifier, convert, evaluate, make_splits, synthetic, train
from vggface_gender import faces as F
from vggface_gender.dataset import FACE_MANIFEST_HEADER, read_manifest
from vggface_gender.errors import DataError, ImageError

pytestmark = [pytest.mark.real_faces,
              pytest.mark.skipif(not have_faces, reason="../shared/data/faces not present")]
PER_CLASS = 8  # one-face photos per class; 6 are needed, so misses are replaced
SPLIT = dict(sample_per_class=4, val_fraction=0.25, test_per_class=2)
FACES_SETTINGS = {"faces.detect": "mtcnn", "faces.multiple": "skip"}


def two_face_photo(files, background):
    canvas = background.convert("RGB").resize((320, 180), Image.Resampling.BILINEAR)
    for path, x in zip(files, (10, 170)):
        canvas.paste(Image.open(path).convert("RGB").resize((110, 110), Image.Resampling.BICUBIC), (x, 40))
    return canvas


def with_exif_orientation(photo: Image.Image, path: Path) -> Path:
    """Save ``photo`` as a phone would with orientation 6: the stored pixels are rotated, the
    EXIF tag tells viewers to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faces_pipeline")
    bgs = backgrounds()
    rng = random.Random(3)
    files = face_files(64, seed=5)
    by_class = {"male": [f for f in files if gender(f) == 0], "female": [f for f in files if gender(f) == 1]}
    data = tmp / "data"
    squares = {}
    for cls, pool in by_class.items():
        (data / cls).mkdir(parents=True)
        for k in range(PER_CLASS):
            photo, square = photo_with_face(pool[k], bgs[k % len(bgs)][1], rng=rng)
            name = f"{cls}/photo{k}.jpg"
            if k == 0:  # the box must come out in the orientation the user sees
                with_exif_orientation(photo, data / name)
            else:
                photo.save(data / name, quality=92)
            squares[name] = square
        bg = bgs[3 if cls == "male" else 4][1]  # distinct files: identical ones in both classes are dropped
        bg.resize((240, 180)).save(data / cls / "landscape.jpg", quality=92)  # no face
        two_face_photo(pool[-2:], bgs[5][1]).save(data / cls / "couple.jpg", quality=92)
    new = tmp / "new"  # photos to classify after training (faces not used in training)
    new.mkdir()
    male, female = by_class["male"][PER_CLASS:PER_CLASS + 3], by_class["female"][PER_CLASS:PER_CLASS + 3]
    two_face_photo([male[0], female[0]], bgs[7][1]).save(new / "a_couple.jpg", quality=92)
    photo_with_face(female[1], bgs[8][1], rng=rng)[0].save(new / "b_one.png")
    bgs[9][1].resize((240, 180)).save(new / "c_nobody.jpg", quality=92)
    upright, _ = photo_with_face(male[1], bgs[10][1], size=(240, 180), side=100, rng=rng)
    upright.save(new / "d_upright.png")
    with_exif_orientation(upright, new / "e_phone.jpg")
    (new / "f_broken.jpg").write_bytes(b"not a jpeg")

    work = tmp / "work"
    summary = make_splits(data, work, seed=0, quiet=True, settings=FACES_SETTINGS, **SPLIT)
    mat = synthetic.write_vggface_mat(tmp / "net.mat", width=1 / 16, n_classes=4, input_size=32, seed=0)
    convert(mat, work)
    train(work, data_root=data, hidden_units=[8], max_epochs=2, batch_size=4, precision="float32",
          settings=FACES_SETTINGS)
    return {"tmp": tmp, "data": data, "work": work, "new": new, "summary": summary, "squares": squares}


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_preprocessing_writes_crops_under_work_dir_and_boxes_in_the_manifest(project):
    data, work, summary = project["data"], project["work"], project["summary"]
    counts = summary["counts"]
    assert [counts[s]["total"] for s in ("train", "val", "test")] == [6, 2, 4]  # replacements kept the counts
    reasons = {(s["path"], s["reason"]) for s in summary["skipped"]}
    # the draw reaches every image only if it must; these two always fail wherever they fall
    drawn_bad = {p for p, _ in reasons}
    for cls in ("male", "female"):
        if f"{cls}/landscape.jpg" in drawn_bad:
            assert (f"{cls}/landscape.jpg", "no face found") in reasons
        if f"{cls}/couple.jpg" in drawn_bad:
            assert (f"{cls}/couple.jpg", "several faces") in reasons
    assert {"no face found", "several faces"} <= {r for _, r in reasons}, reasons
    assert summary["config"]["faces"]["detect"] == "mtcnn"
    assert len([p for p in data.rglob("*") if p.is_file()]) == 2 * (PER_CLASS + 2)  # nothing written there

    header = (work / "splits" / "train.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == FACE_MANIFEST_HEADER
    entries = read_manifest(work / "splits" / "train.csv", data)
    raw = rows(work / "splits" / "train.csv")
    for entry, row in zip(entries, raw):
        assert entry.image.parent == work / "faces" and entry.image.is_file()
        assert entry.image_sha256 == row["crop_sha256"] == entry.image.stem
        assert entry.source == entry.image and entry.source_sha256 == entry.image_sha256
        box = tuple(float(row[k]) for k in ("x", "y", "w", "h"))
        square = project["squares"][row["path"]]
        pasted_face = (square[0] + 0.1 * square[2], square[1], 0.8 * square[2], square[3])  # inside the crop
        assert iou(box, pasted_face) > 0.4, (row["path"], box, square)
        assert 0.85 <= float(row["confidence"]) <= 1.0
        crop = Image.open(entry.image)
        side = round((box[2] + box[3]) / 2 * 1.1)
        assert crop.size == (side, side) and crop.mode == "RGB"


def test_exif_rotated_training_photo_has_its_box_in_the_upright_pixels(project):
    manifest = {r["path"]: r for s in ("train", "val", "test") for r in rows(project["work"] / "splits" / f"{s}.csv")}
    phones = [p for p in ("male/photo0.jpg", "female/photo0.jpg") if p in manifest]
    if not phones:
        pytest.skip("the EXIF-rotated photos were not drawn with this seed")
    for name in phones:
        box = tuple(float(manifest[name][k]) for k in ("x", "y", "w", "h"))
        x, y, s, _ = project["squares"][name]  # where the face was pasted in the upright photo
        cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
        assert x < cx < x + s and y < cy < y + s, (name, box, project["squares"][name])


def test_manifest_without_detection_still_reads(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,sha256\na/b.jpg,male,abc\n")
    (entry,) = read_manifest(tmp_path / "m.csv", tmp_path)
    assert entry.image is None and entry.source == tmp_path / "a" / "b.jpg" and entry.source_sha256 == "abc"


def test_classifier_records_and_loads_the_face_policy(project):
    info = json.loads((project["work"] / "model" / "classifier.json").read_text())
    assert info["faces"]["detect"] == "mtcnn" and info["faces"]["multiple"] == "skip"
    clf = Classifier.load(project["work"])
    assert clf.faces == F.FacePolicy(detect="mtcnn", multiple="skip")


@pytest.fixture(scope="module")
def predicted(project, tmp_path_factory):
    out = tmp_path_factory.mktemp("predicted")
    config = project["tmp"] / "config.yaml"
    config.write_text(f"work_dir: {project['work']}\ndata:\n  root: {project['data']}\n")
    assert predict.main(["--config", str(config), "--images", str(project["new"]), "--out",
                         str(out / "faces.csv"), "--annotate", str(out / "annotated")]) == 0
    return {"rows": rows(out / "faces.csv"), "annotated": out / "annotated", "config": config}


def test_predict_images_gives_one_row_per_face(project, predicted):
    by_file = {}
    for r in predicted["rows"]:
        by_file.setdefault(Path(r["path"]).name, []).append(r)
    assert [r["face"] for r in by_file["a_couple.jpg"]] == ["0", "1"]
    assert [r["face"] for r in by_file["b_one.png"]] == ["0"]
    (nobody,) = by_file["c_nobody.jpg"]
    assert nobody["face"] == "" and nobody["note"] == "no face found" and nobody["predicted"] == ""
    (broken,) = by_file["f_broken.jpg"]
    assert broken["error"].startswith(str(project["new"] / "f_broken.jpg")) and broken["face"] == ""
    columns = list(predicted["rows"][0])
    assert columns == ["path", "face", "x", "y", "width", "height", "confidence", "predicted",
                       "prob_female", "prob_male", "in_training", "note", "error"]
    for r in by_file["a_couple.jpg"] + by_file["b_one.png"]:
        p = np.array([float(r["prob_female"]), float(r["prob_male"])])
        assert abs(p.sum() - 1) < 1e-5 and r["predicted"] == ("female", "male")[int(p.argmax())]
        assert float(r["confidence"]) >= 0.85 and float(r["width"]) > 40 and r["in_training"] == "false"
    left, right = (float(r["x"]) for r in by_file["a_couple.jpg"])
    assert {left < 160, right < 160} == {True, False}  # the two pasted faces, one each side


def test_exif_rotated_photo_gives_boxes_as_the_user_sees_them(predicted):
    by_file = {Path(r["path"]).name: r for r in predicted["rows"]}
    upright, phone = by_file["d_upright.png"], by_file["e_phone.jpg"]
    box = lambda r: tuple(float(r[k]) for k in ("x", "y", "width", "height"))  # noqa: E731
    assert iou(box(upright), box(phone)) > 0.8, (box(upright), box(phone))


def test_predict_faces_agrees_with_the_csv(project, predicted):
    clf = Classifier.load(project["work"])
    names = ["a_couple.jpg", "b_one.png", "c_nobody.jpg", "e_phone.jpg"]
    paths = [project["new"] / n for n in names]
    results = clf.predict_faces([paths[0], Image.open(paths[1]), str(paths[2]), paths[3]])
    assert [len(r) for r in results] == [2, 1, 0, 1]
    csv_rows = [r for r in predicted["rows"] if Path(r["path"]).name in names and r["face"] != ""]
    got = [p for r in results for p in r]
    assert len(csv_rows) == len(got)
    for r, p in zip(csv_rows, got):
        np.testing.assert_allclose(p.probabilities, [float(r["prob_female"]), float(r["prob_male"])], atol=1e-6)
        np.testing.assert_allclose(p.box, [float(r[k]) for k in ("x", "y", "width", "height")], atol=0.01)
        assert p.label == r["predicted"] and abs(p.confidence - float(r["confidence"])) < 1e-6


def test_annotate_writes_copies_and_never_into_the_input_folder(project, predicted, capsys):
    written = sorted(p.name for p in predicted["annotated"].iterdir())
    assert written == ["a_couple.jpg", "b_one.png", "c_nobody.jpg", "d_upright.png", "e_phone.jpg"]
    original = Image.open(project["new"] / "b_one.png").convert("RGB")
    drawn = Image.open(predicted["annotated"] / "b_one.png").convert("RGB")
    assert drawn.size == original.size
    diff = np.abs(np.asarray(drawn, np.int16) - np.asarray(original, np.int16)).max(axis=2)
    assert (np.asarray(drawn)[diff > 0] == (255, 0, 0)).all(axis=1).mean() > 0.5  # red box pixels
    before = sorted(project["new"].iterdir())
    code = predict.main(["--config", str(predicted["config"]), "--images", str(project["new"]),
                         "--annotate", str(project["new"] / "out")])
    assert code == 1 and "inside the input folder" in capsys.readouterr().err
    code = predict.main(["--config", str(predicted["config"]), "--images", str(project["new"]),
                         "--annotate", str(predicted["config"])])
    err = capsys.readouterr().err
    assert code == 1 and "is a file, not a folder" in err and err.count("\n") == 1
    assert sorted(project["new"].iterdir()) == before


def test_evaluation_uses_the_manifest_crops(project):
    report = evaluate(project["work"], data_root=project["data"], bootstrap=10)
    assert report["n_test"] == 4 and report["faces"]["detect"] == "mtcnn"
    predictions = rows(project["work"] / "reports" / "predictions.csv")
    test = rows(project["work"] / "splits" / "test.csv")
    assert [r["path"] for r in predictions] == [r["path"] for r in test]  # the user's paths, not crops
    clf = Classifier.load(project["work"])
    crops = [project["work"] / r["crop"] for r in test]
    np.testing.assert_allclose(clf.predict_proba(crops),
                               [[float(r["prob_female"]), float(r["prob_male"])] for r in predictions], atol=1e-6)


def test_a_damaged_crop_stops_evaluation_and_the_next_split_writes_it_again(project, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(project["work"], work)
    crop = work / rows(work / "splits" / "test.csv")[0]["crop"]
    good = crop.read_bytes()
    Image.new("RGB", (8, 8)).save(crop, "PNG")  # a valid image, not the crop the manifest lists
    with pytest.raises(ImageError, match="changed since the split was made"):
        evaluate(work, data_root=project["data"], bootstrap=10)
    make_splits(project["data"], work, seed=0, quiet=True, settings=FACES_SETTINGS, **SPLIT)
    assert crop.read_bytes() == good
    assert evaluate(work, data_root=project["data"], bootstrap=10)["n_test"] == 4


def test_test_splits_made_with_other_face_settings_are_refused(project, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(project["work"], work)
    make_splits(project["data"], work, seed=0, quiet=True, **SPLIT)  # faces.detect: none (the default)
    assert not list((work / "faces").iterdir())  # the crops no manifest lists any more are gone
    with pytest.raises(DataError, match="faces") as info:
        evaluate(work, data_root=project["data"], bootstrap=10)
    assert "\n" not in str(info.value) and "data_preprocess.py" in str(info.value)

