"""Paired accuracy comparison: a head trained with face detection on whole photos against one
trained on the face crops themselves, on the same faces.

Issue 14 asks that "a head trained with detection on whole photos built from the UTKFace crops
reaches the accuracy of one trained on the crops themselves (paired comparison on the same
faces, with an interval)". This script:

1. picks faces from ../shared/data/faces/{male,female} (UTKFace crops, 200x200, one of each set
   of byte-identical files; never copied: the crops arm links to them, the photos arm pastes
   them into new files in a temporary folder);
2. builds one whole photo per face: a face-free background (scikit-image's samples, other views
   of them, noise; tests/helpers_faces.py) at 400x300 with the face pasted at 80-160 px, at a
   random place, saved as JPEG under the face's own file name;
3. photos arm: ``make_splits`` with ``faces.detect: mtcnn`` (faces found, cropped into
   work_dir/faces) and ``data.dedup: exact`` (the photos share backgrounds, which the perceptual
   hash would take for near-duplicates: faces would be dropped as "in more than one class"),
   ``train``, ``evaluate``;
4. crops arm: the *same* splits (the photos arm's manifests, each photo replaced by the face it
   was made from), ``train``, ``evaluate``: same train/validation/test faces, same seed;
5. reports accuracy and ROC AUC of each arm, and the paired differences (photos - crops) with
   95% percentile bootstrap intervals (test faces resampled in pairs) and McNemar's exact test
   on the faces one arm gets right and the other wrong.

The network is ../shared/data/models/dev_face_base.mat (64x64 input, relu7 features; see its
README), converted once; the head is the default (train.hidden_units [512]), float32.

    python bench/bench_faces_training.py --test-faces 400 --train-faces 1000
    python bench/bench_faces_training.py --quick      # 40 test faces, 100 training faces
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from helpers_faces import FACES, backgrounds, have_faces, photo_with_face  # noqa: E402
from vggface_gender import convert, evaluate, make_splits, train  # noqa: E402
from vggface_gender.features import sha256_file  # noqa: E402

DEV_NET = ROOT.parent / "shared" / "data" / "models" / "dev_face_base.mat"
CLASSES = ("male", "female")
PHOTO_SIZE = (400, 300)


def build_photos(files_by_class: dict, crops_root: Path, photos_root: Path, seed: int,
                 face_px: tuple[int, int] = (80, 160)) -> None:
    """Per face: a link in ``crops_root`` and a whole photo in ``photos_root``, same relative name."""
    bgs = backgrounds()
    rng = random.Random(seed)
    for cls, files in files_by_class.items():
        (crops_root / cls).mkdir(parents=True)
        (photos_root / cls).mkdir(parents=True)
        for k, face in enumerate(files):
            os.symlink(face, crops_root / cls / face.name)
            bg = bgs[rng.randrange(len(bgs))][1]
            photo, _ = photo_with_face(face, bg, size=PHOTO_SIZE, side=rng.randint(*face_px), rng=rng)
            photo.save(photos_root / cls / face.name, format="JPEG", quality=92)


def crops_manifests(photos_work: Path, crops_root: Path, crops_work: Path) -> None:
    """The photos arm's splits with each photo replaced by the face crop it was made from."""
    (crops_work / "splits").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        with open(photos_work / "splits" / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        with open(crops_work / "splits" / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("path", "label", "sha256"))
            for r in rows:
                writer.writerow((r["path"], r["label"], sha256_file(crops_root / r["path"])))


def predictions(work: Path) -> dict:
    with open(work / "reports" / "predictions.csv", newline="", encoding="utf-8") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def paired_comparison(crops: dict, photos: dict, positive: str, n_boot: int, seed: int) -> dict:
    from scipy.stats import binomtest
    from sklearn.metrics import roc_auc_score

    paths = sorted(crops)
    assert sorted(photos) == paths, "the two arms' test sets differ"
    y = np.array([crops[p]["label"] == positive for p in paths])
    score_c = np.array([float(crops[p][f"prob_{positive}"]) for p in paths])
    score_p = np.array([float(photos[p][f"prob_{positive}"]) for p in paths])
    right_c = np.array([crops[p]["predicted"] == crops[p]["label"] for p in paths])
    right_p = np.array([photos[p]["predicted"] == photos[p]["label"] for p in paths])
    rng = np.random.default_rng(seed)
    d_acc, d_auc = [], []
    n = len(paths)
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        if y[i].all() or not y[i].any():
            continue
        d_acc.append(right_p[i].mean() - right_c[i].mean())
        d_auc.append(roc_auc_score(y[i], score_p[i]) - roc_auc_score(y[i], score_c[i]))
    only_c, only_p = int((right_c & ~right_p).sum()), int((right_p & ~right_c).sum())
    mcnemar = binomtest(only_p, only_c + only_p, 0.5).pvalue if only_c + only_p else 1.0

    def ci(values):
        return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])]

    return {
        "n_test": n,
        "crops": {"accuracy": round(float(right_c.mean()), 4), "roc_auc": round(float(roc_auc_score(y, score_c)), 4)},
        "photos": {"accuracy": round(float(right_p.mean()), 4), "roc_auc": round(float(roc_auc_score(y, score_p)), 4)},
        "accuracy_difference": round(float(right_p.mean() - right_c.mean()), 4),
        "accuracy_difference_ci95": ci(d_acc),
        "auc_difference": round(float(roc_auc_score(y, score_p) - roc_auc_score(y, score_c)), 4),
        "auc_difference_ci95": ci(d_auc),
        "right_only_with_crops": only_c,
        "right_only_with_photos": only_p,
        "mcnemar_exact_p": round(float(mcnemar), 4),
        "bootstrap_resamples": len(d_acc),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test-faces", type=int, default=400, help="test faces, half per class")
    parser.add_argument("--train-faces", type=int, default=1000,
                        help="training + validation faces, half per class (20%% validation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--face-px", type=int, nargs=2, default=(80, 160), metavar=("MIN", "MAX"),
                        help="side of the pasted face in the 400x300 photo (default 80 160)")
    parser.add_argument("--quick", action="store_true", help="40 test faces, 100 training faces")
    parser.add_argument("--keep", metavar="DIR", default=None, help="work here and keep the files")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.quick:
        args.test_faces, args.train_faces = 40, 100
    if not have_faces or not DEV_NET.is_file():
        print(f"needs {FACES} and {DEV_NET}", file=sys.stderr)
        return 2
    test_per_class, sample_per_class = args.test_faces // 2, args.train_faces // 2
    spare = max(10, (test_per_class + sample_per_class) // 10)  # for faces the detector misses
    rng = random.Random(args.seed)
    files_by_class = {}
    for cls in CLASSES:
        # UTKFace holds a few byte-identical crops under two names: pasted onto different
        # backgrounds they would become distinct photos, the same face in training and test
        by_content = {}
        for path in sorted((FACES / cls).glob("*.jpg")):
            by_content.setdefault(sha256_file(path), path)
        pool = sorted(by_content.values())
        files_by_class[cls] = rng.sample(pool, min(len(pool), test_per_class + sample_per_class + spare))

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_faces_training_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        crops_root, photos_root = folder / "crops", folder / "photos"
        build_photos(files_by_class, crops_root, photos_root, args.seed, tuple(args.face_px))
        t_build = time.perf_counter() - t0
        split = dict(sample_per_class=sample_per_class, test_per_class=test_per_class, val_fraction=0.2,
                     seed=args.seed, dedup="exact")
        detect = {"faces.detect": "mtcnn"}
        photos_work, crops_work = folder / "work_photos", folder / "work_crops"
        t0 = time.perf_counter()
        summary = make_splits(photos_root, photos_work, quiet=True, settings=detect, **split)
        t_detect = time.perf_counter() - t0
        convert(DEV_NET, photos_work)
        crops_manifests(photos_work, crops_root, crops_work)
        (crops_work / "model").mkdir(parents=True, exist_ok=True)
        for name in ("base.keras", "base.json"):
            shutil.copy2(photos_work / "model" / name, crops_work / "model" / name)
        fit = dict(precision="float32", seed=args.seed)
        train(photos_work, data_root=photos_root, settings=detect, **fit)
        train(crops_work, data_root=crops_root, **fit)
        evaluate(photos_work, data_root=photos_root, positive_class="female", bootstrap=200, settings=detect)
        evaluate(crops_work, data_root=crops_root, positive_class="female", bootstrap=200)
        result = paired_comparison(predictions(crops_work), predictions(photos_work), "female",
                                   args.bootstrap, args.seed)
        result["faces_without_detection"] = summary["skipped_counts"]
        result["photos"]["n_train_val"] = sum(summary["counts"][s]["total"] for s in ("train", "val"))
        result["seconds"] = {"build_photos": round(t_build, 1), "preprocess_with_detection": round(t_detect, 1)}
        result["command"] = "python bench/bench_faces_training.py " + " ".join(argv or sys.argv[1:])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
