"""The Python API and lineage: Classifier.load / predict_proba / in_training, the keyword stage
functions, the head-only classifier files, and predict.py refusing a test set the classifier
was trained on.

One small pipeline (VGG-Face structure at 1/16 width, 32x32 input, generated JPEGs) is run once
through the keyword stage functions; tests that change the work dir work on copies of it.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import predict
from vggface_gender import Classifier, convert, evaluate, make_splits, synthetic, train
from vggface_gender.errors import ConfigError, ModelFileError
from vggface_gender.workdir import WorkDir, commit_set

ROOT = Path(__file__).resolve().parent.parent
SPLIT = dict(sample_per_class=12, val_fraction=0.25, test_per_class=8)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    data = synthetic.write_image_folders(tmp / "data", 30, size=40, seed=4)
    mat = synthetic.write_vggface_mat(tmp / "net.mat", width=1 / 16, n_classes=4, input_size=32, seed=0)
    work = tmp / "work"
    make_splits(data, work, seed=1, quiet=True, **SPLIT)
    convert(mat, work)
    summary = train(work, data_root=data, hidden_units=[16], max_epochs=3, batch_size=8, precision="float32")
    report = evaluate(work, data_root=data, bootstrap=20)
    return {"tmp": tmp, "data": data, "mat": mat, "work": work, "summary": summary, "report": report}


def copy_of(pipeline, tmp_path) -> Path:
    """A copy of the pipeline's work dir (and config) to change without touching the original."""
    work = tmp_path / "work"
    shutil.copytree(pipeline["work"], work, ignore=shutil.ignore_patterns("features"))
    return work


def recommit(record: Path) -> None:
    """Commit the set ``record`` lists again, as it is now (as the stage that writes it would)."""
    files = json.loads(record.read_text())["files"]
    commit_set(record, [record.parent / name for name in files], "test")


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def config_file(pipeline, work: Path, **data) -> Path:
    import yaml

    path = work.parent / "config.yaml"
    path.write_text(yaml.safe_dump({"work_dir": str(work), "seed": 1,
                                    "data": {"root": str(pipeline["data"]), **SPLIT, **data},
                                    "evaluate": {"bootstrap": 20}}))
    return path


# --------------------------------------------------------------------------- the API
def test_paths_pil_images_and_arrays_give_the_evaluation_probabilities(pipeline):
    clf = Classifier.load(pipeline["work"])
    assert clf.classes == ["female", "male"] and clf.precision == "float32"
    evaluated = rows(pipeline["work"] / "reports" / "predictions.csv")[:10]
    paths = [pipeline["data"] / r["path"] for r in evaluated]
    expected = np.array([[float(r["prob_female"]), float(r["prob_male"])] for r in evaluated])

    np.testing.assert_allclose(clf.predict_proba(paths), expected, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba([str(p) for p in paths], batch_size=3), expected, atol=1e-6)
    lazy = [Image.open(p) for p in paths]  # opened, not decoded
    np.testing.assert_allclose(clf.predict_proba(lazy), expected, atol=1e-6)
    assert all(img.tile for img in lazy)  # the caller's objects were not decoded (or drafted) by us
    # any mix, order kept
    mixed = [paths[0], lazy[1], str(paths[2])]
    np.testing.assert_allclose(clf.predict_proba(mixed), expected[:3], atol=1e-6)
    assert clf.predict(paths[:3]) == [clf.classes[i] for i in expected[:3].argmax(axis=1)]


@pytest.mark.parametrize("shape", [(32, 32), (20, 28), (32, 17), (5, 5)])
def test_arrays_up_to_the_input_size_match_the_same_pixels_as_a_file(pipeline, tmp_path, shape):
    clf = Classifier.load(pipeline["work"], verbose=False)
    rng = np.random.default_rng(sum(shape))
    array = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    png = tmp_path / "same.png"  # lossless: the loader reads back exactly these pixels
    Image.fromarray(array).save(png)
    from_array = clf.predict_proba([array])
    np.testing.assert_allclose(from_array, clf.predict_proba([png]), atol=1e-6)
    np.testing.assert_allclose(from_array, clf.predict_proba([Image.fromarray(array)]), atol=1e-6)
    # predict.py --images on the file gives the same
    out = tmp_path / "out.csv"
    assert predict.main(["--config", str(config_file(pipeline, pipeline["work"])), "--images", str(png),
                         "--out", str(out)]) == 0
    row = rows(out)[0]
    np.testing.assert_allclose(from_array[0], [float(row["prob_female"]), float(row["prob_male"])], atol=1e-6)


def test_bad_inputs_are_one_line_errors(pipeline, tmp_path):
    from vggface_gender.errors import ImageError, PipelineError

    clf = Classifier.load(pipeline["work"], verbose=False)
    with pytest.raises(PipelineError, match=r"image 0: expected an \(H, W, 3\) uint8"):
        clf.predict_proba([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(PipelineError, match="image 1: expected a file path"):
        clf.predict_proba([np.zeros((8, 8, 3), np.uint8), 42])
    with pytest.raises(ImageError, match="gone.jpg: file not found"):
        clf.predict_proba([tmp_path / "gone.jpg"])


def test_in_training_is_right_for_training_validation_and_test_images(pipeline, tmp_path):
    clf = Classifier.load(pipeline["work"], verbose=False)
    splits = {name: [pipeline["data"] / r["path"] for r in rows(pipeline["work"] / "splits" / f"{name}.csv")]
              for name in ("train", "val", "test")}
    assert all(clf.in_training(splits["train"])) and all(clf.in_training(splits["val"]))
    assert not any(clf.in_training(splits["test"]))
    # by content: a copy under another name is still a training image; an array has no file to compare
    copy = tmp_path / "renamed.jpg"
    shutil.copyfile(splits["train"][0], copy)
    assert clf.in_training([copy, Image.open(splits["val"][0]), np.zeros((4, 4, 3), np.uint8)]) == [True, True, None]
    # the --images CSV says the same
    out = tmp_path / "all.csv"
    assert predict.main(["--config", str(config_file(pipeline, pipeline["work"])), "--images",
                         str(pipeline["data"]), str(copy), "--out", str(out)]) == 0
    flags = {Path(r["path"]).resolve(): r["in_training"] for r in rows(out)}
    for name, expected in (("train", "true"), ("val", "true"), ("test", "false")):
        assert {flags[p.resolve()] for p in splits[name]} == {expected}, name
    assert flags[copy.resolve()] == "true"
    unused = set(flags) - {p.resolve() for files in splits.values() for p in files} - {copy.resolve()}
    assert unused and {flags[p] for p in unused} == {"false"}


def test_keyword_stage_functions_validate_their_arguments(pipeline):
    with pytest.raises(ConfigError, match="train.dropout"):
        train(pipeline["work"], data_root=pipeline["data"], dropout=1.5)
    with pytest.raises(ConfigError, match="data.val_fraction"):
        make_splits(pipeline["data"], pipeline["work"], val_fraction="lots")
    assert pipeline["summary"]["precision"] == "float32" and pipeline["report"]["n_test"] == 16
    assert pipeline["report"]["precision"] == "float32"
    lineage = pipeline["report"]["lineage"]
    assert lineage["overlap_with_training"] == 0 and not lineage["splits_changed_since_training"]


def test_keyword_defaults_are_the_config_defaults():
    """A keyword left out means the config's value: no stage function hard-codes a default."""
    import inspect

    from vggface_gender import stages

    for fn in (stages.make_splits, stages.convert, stages.train, stages.evaluate):
        for name, param in inspect.signature(fn).parameters.items():
            if param.kind is param.KEYWORD_ONLY and name not in ("early_stopping", "quiet", "verify_images"):
                assert param.default is None, (fn.__name__, name, param.default)


# --------------------------------------------------------------------------- the saved files
def test_classifier_files_hold_the_trained_head_alone_and_load_in_safe_mode(pipeline):
    model_dir = pipeline["work"] / "model"
    head_size = (model_dir / "classifier.keras").stat().st_size + (model_dir / "classifier.json").stat().st_size
    assert head_size < 0.25 * (model_dir / "base.keras").stat().st_size
    code = ("import keras, json, sys\n"
            "m = keras.saving.load_model(sys.argv[1], safe_mode=True)\n"
            "print(json.dumps([list(m.input_shape[1:]), [l.name for l in m.layers]]))\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-c", code, str(model_dir / "classifier.keras")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    shape, names = json.loads(run.stdout.strip().splitlines()[-1])
    info = json.loads((model_dir / "classifier.json").read_text())
    assert shape == info["feature_shape"] and "head_output" in names and "conv1_1" not in names


def test_another_base_is_refused_and_the_same_base_converted_again_is_not(pipeline, tmp_path, capsys):
    work = copy_of(pipeline, tmp_path)
    before = Classifier.load(work).predict_proba([pipeline["data"] / "female" / "female_00000.jpg"])
    convert(pipeline["mat"], work)  # the same .mat again: new file bytes (save date), same content
    after = Classifier.load(work).predict_proba([pipeline["data"] / "female" / "female_00000.jpg"])
    np.testing.assert_array_equal(before, after)

    other = synthetic.write_vggface_mat(tmp_path / "other.mat", width=1 / 16, n_classes=4, input_size=32, seed=5)
    convert(other, work)
    with pytest.raises(ModelFileError, match=r"base.keras: not the base this classifier was trained on.*"
                                             r"re-run `python train.py`"):
        Classifier.load(work)
    capsys.readouterr()
    assert predict.main(["--config", str(config_file(pipeline, work))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not the base" in err[0]


def test_a_work_dir_from_the_previous_version_gets_one_line(pipeline, tmp_path, capsys):
    work = copy_of(pipeline, tmp_path)
    info_path = work / "model" / "classifier.json"
    info = json.loads(info_path.read_text())
    old = {k: info[k] for k in ("classes", "input_size", "policy", "embedding_layer", "base_sha256")}
    info_path.write_text(json.dumps({"format": 1, **old}))  # what the previous version wrote
    record = WorkDir(work).classifier_record
    recommit(record)  # the format itself is refused ...
    for remove_record in (False, True):  # ... and so is a set without a commit record (not written then)
        if remove_record:
            record.unlink()
        for args in ([], ["--images", str(pipeline["data"] / "male")]):
            capsys.readouterr()
            assert predict.main(["--config", str(config_file(pipeline, work)), *args]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "earlier version" in err[0] and "run `python train.py` again" in err[0], err
            assert ("commit record" in err[0]) == remove_record, err


# --------------------------------------------------------------------------- lineage
def test_a_resplit_that_leaks_training_images_into_the_test_set_is_refused(pipeline, tmp_path, capsys):
    import data_preprocess

    work = copy_of(pipeline, tmp_path)
    config = config_file(pipeline, work)
    assert data_preprocess.main(["--config", str(config), "--set", "seed=7", "--quiet"]) == 0
    trained_on = set(json.loads((work / "model" / "classifier.json").read_text())["lineage"]["images_sha256"])
    leaked = sum(r["sha256"] in trained_on for r in rows(work / "splits" / "test.csv"))
    assert leaked > 0  # the scenario: a new seed moves training images into the test set
    previous = (work / "reports" / "metrics.json").read_bytes()
    capsys.readouterr()
    assert predict.main(["--config", str(config), "--set", "seed=7"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (work / "reports" / "metrics.json").read_bytes() == previous, err
    assert f"{leaked} of the 16 test images were training or validation images" in err[0], err
    assert "re-run `python train.py`" in err[0]


def test_a_resplit_whose_test_set_stays_disjoint_runs(pipeline, tmp_path, capsys):
    import data_preprocess

    work = copy_of(pipeline, tmp_path)
    # the same seed and test size, a smaller sample: the test set (drawn first) is unchanged
    config = config_file(pipeline, work, sample_per_class=8)
    assert data_preprocess.main(["--config", str(config), "--quiet"]) == 0
    capsys.readouterr()
    assert predict.main(["--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert "splits changed since the classifier was trained" in captured.err
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    assert metrics["lineage"]["splits_changed_since_training"] is True
    assert metrics["lineage"]["overlap_with_training"] == 0


def test_a_test_manifest_edited_to_hold_a_training_image_names_data_preprocess(pipeline, tmp_path, capsys):
    work = copy_of(pipeline, tmp_path)
    test_csv = work / "splits" / "test.csv"
    train_row = rows(work / "splits" / "train.csv")[0]
    with open(test_csv, "a", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow([train_row["path"], train_row["label"], train_row["sha256"]])
    capsys.readouterr()
    assert predict.main(["--config", str(config_file(pipeline, work))]) == 1  # not data_preprocess.py's set
    assert "test.csv: size differs from its commit record" in capsys.readouterr().err
    recommit(WorkDir(work).splits_record)  # as if data_preprocess.py had written it
    assert predict.main(["--config", str(config_file(pipeline, work))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "1 of the 17 test images" in err[-1] and "re-run `python data_preprocess.py`" in err[-1], err


# --------------------------------------------------------------------------- precision
def test_precision_is_recorded_and_a_different_one_at_prediction_says_so(pipeline, tmp_path, monkeypatch, capsys):
    from vggface_gender import precision

    work = pipeline["work"]
    info = json.loads((work / "model" / "classifier.json").read_text())
    assert info["precision"]["precision"] == "float32"
    metas = [json.loads(p.read_text()) for p in (work / "features").glob("*/meta.json")]
    assert metas and all(m["key"]["precision"] == "float32" for m in metas)
    capsys.readouterr()
    Classifier.load(work, precision="bfloat16")  # AMX here or not: either kept or fallen back, said
    assert "note: the base runs in" in capsys.readouterr().err

    # auto on a machine with AMX and oneDNN (mocked): bfloat16 everywhere it matters
    amx = precision.Hardware(frozenset({"amx_bf16", "amx_tile", "avx512_bf16"}), onednn=True, gpus=())
    monkeypatch.setattr(precision, "detect_hardware", lambda: amx)
    other = copy_of(pipeline, tmp_path)
    summary = train(other, data_root=pipeline["data"], hidden_units=[16], max_epochs=2, batch_size=8,
                    precision="auto")
    assert summary["precision"] == "bfloat16"
    assert json.loads((other / "model" / "classifier.json").read_text())["precision"]["precision"] == "bfloat16"
    metas = [json.loads(p.read_text()) for p in (other / "features").glob("*/meta.json")]
    assert [m["key"]["precision"] for m in metas] == ["bfloat16"]
    clf = Classifier.load(other)
    assert clf.precision == "bfloat16"
    report = evaluate(other, data_root=pipeline["data"], bootstrap=20)
    assert report["precision"] == "bfloat16"
