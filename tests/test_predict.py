"""predict.py: the evaluation report and --images, on a tiny hand-made classifier.

The classifier here is built directly in Keras (average colour -> softmax) and saved in train.py's
format (``classifier.keras`` + ``classifier.json``), so these tests do not depend on training.
"""

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import predict
from vggface_gender import evaluation, images, metrics, reports, synthetic
from vggface_gender.workdir import WorkDir, commit_set, sha256_file

CLASSES = ["female", "male"]
SIZE = (16, 20)  # (height, width): not square, so a swapped axis would show
POLICY = images.ImagePolicy(SIZE, "stretch", "bilinear")
PER_CLASS = 10
SWAPPED = ["female/female_00002.jpg", "male/male_00007.jpg"]  # labelled wrong on purpose: errors exist


def build_classifier(work: Path, policy=POLICY, classes=CLASSES, training_hashes=()) -> Path:
    """Average colour -> Dense softmax: reddish images are 'female', bluish 'male' (synthetic's).

    Saved as train.py saves: a base (``base.keras``: scaling, then the average colour as 'relu7')
    and the head alone (``classifier.keras``), with ``classifier.json`` naming the base by content.
    """
    import keras

    from vggface_gender.features import keras_model_sha256

    inputs = keras.Input((*policy.size, 3))
    x = keras.layers.Rescaling(1 / 255, name="scale")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="relu7")(x)
    base = keras.Model(inputs, keras.layers.Dense(4, name="fc8")(x))
    features = keras.Input((3,))
    head = keras.Model(features, keras.layers.Dense(2, activation="softmax", name="head_output")(features))
    kernel = np.array([[4.0, -4.0], [0.5, -0.5], [-4.0, 4.0]], np.float32)
    head.layers[-1].set_weights([kernel, np.array([0.1, -0.1], np.float32)])
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    base.save(model_dir / "base.keras")
    head.save(model_dir / "classifier.keras")
    info = {"format": 2, "classes": list(classes), "input_size": list(policy.size),
            "policy": policy.to_dict(), "precision": {"precision": "float32"},
            "embedding_layer": "relu7", "trainable_from": None, "feature_layer": "relu7",
            "feature_shape": [3], "base_sha256": keras_model_sha256(model_dir / "base.keras"),
            "lineage": {"manifests": {}, "images_sha256": sorted(training_hashes)}}
    (model_dir / "classifier.json").write_text(json.dumps(info))
    # the commit records model_conversion.py and train.py write after their outputs
    wd = WorkDir(work)
    commit_set(wd.base_record, [wd.base_model], "model_conversion.py")
    commit_set(wd.classifier_record, [wd.classifier, wd.classifier_info], "train.py")
    return model_dir / "classifier.keras"


def write_manifest(path: Path, rows, data: Path) -> Path:
    """A test manifest of ``(path relative to data, label)`` rows, with each file's real hash
    (evaluation checks the bytes it decodes against it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "sha256"])
        for rel, label in rows:
            writer.writerow([rel, label, sha256_file(data / rel) if (data / rel).is_file() else "0" * 64])
    commit_set(path.parent / WorkDir(".").splits_record.name, [path], "data_preprocess.py")
    return path


def write_config(tmp: Path, data: Path, work: Path, **evaluate) -> Path:
    cfg = {"work_dir": str(work), "seed": 3, "data": {"root": str(data)},
           "evaluate": {"bootstrap": 200, "batch_size": 4, **evaluate}}
    path = tmp / f"config_{len(list(tmp.glob('config_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Generated images, a test manifest, a saved classifier and a config."""
    tmp = tmp_path_factory.mktemp("predict")
    data = synthetic.write_image_folders(tmp / "data", PER_CLASS, size=24, seed=1)
    work = tmp / "work"
    rows = []
    for name in CLASSES:
        for file in sorted((data / name).iterdir()):
            rel = f"{name}/{file.name}"
            wrong = CLASSES[1 - CLASSES.index(name)]
            rows.append((rel, wrong if rel in SWAPPED else name))
    write_manifest(work / "splits" / "test.csv", rows, data)
    build_classifier(work)
    config = write_config(tmp, data, work)
    return {"tmp": tmp, "data": data, "work": work, "rows": rows, "config": config}


@pytest.fixture(scope="module")
def evaluated(project, tmp_path_factory):
    """One evaluation run, with the figures it drew kept for inspection."""
    drawn = {}
    original = reports.save_figure

    def keep(fig, path):
        # reports are drawn to temporary names (.roc_curve.<random>.tmp.png) and renamed at the end
        drawn[re.sub(r"^\.(.+)\.[^.]+\.tmp(\.\w+)$", r"\1\2", Path(path).name)] = fig
        return original(fig, path)

    reports.save_figure = keep
    try:
        out = io.StringIO()
        from vggface_gender.config import load_config
        report = evaluation.evaluate(load_config(project["config"]), stream=out)
    finally:
        reports.save_figure = original
    return {"report": report, "console": out.getvalue(), "figures": drawn,
            "reports": project["work"] / "reports"}


def read_csv(path_or_text):
    text = Path(path_or_text).read_text() if isinstance(path_or_text, Path) else path_or_text
    return list(csv.DictReader(io.StringIO(text)))


def model_probs(project, paths):
    """Probabilities straight from the model on the loader's arrays (an independent path)."""
    from vggface_gender import Classifier

    model = Classifier.load(project["work"]).model
    batch = np.stack([images.load_image(p, POLICY) for p in paths]).astype(np.float32)
    return model.predict(batch, verbose=0)


# --------------------------------------------------------------------------- evaluation
def test_metrics_json_holds_the_report(evaluated, project):
    saved = json.loads((evaluated["reports"] / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(evaluated["report"]))
    for key in ("accuracy", "roc_auc", "per_class", "confusion_matrix", "n_test", "accuracy_ci95",
                "roc_auc_ci95", "positive_class"):
        assert saved[key] is not None, key
    assert saved["n_test"] == 2 * PER_CLASS
    assert saved["positive_class"] == "female"
    assert saved["confusion_matrix"]["order"] == CLASSES
    assert saved["policy"] == POLICY.to_dict()
    assert saved["bootstrap"] == {"resamples": 200, "valid": 200, "seed": 3}
    assert "groups" not in saved


def test_predictions_csv_and_metrics_agree_with_the_model(evaluated, project):
    rows = read_csv(evaluated["reports"] / "predictions.csv")
    assert [(r["path"], r["label"]) for r in rows] == project["rows"]
    probs = np.array([[float(r["prob_female"]), float(r["prob_male"])] for r in rows])
    expected = model_probs(project, [project["data"] / r["path"] for r in rows])
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert [r["predicted"] for r in rows] == [CLASSES[i] for i in expected.argmax(axis=1)]

    # the swapped labels are the only errors: the model itself gets every image right
    wrong = [r["path"] for r in rows if r["label"] != r["predicted"]]
    assert sorted(wrong) == sorted(SWAPPED)
    report = evaluated["report"]
    y_true = np.array([CLASSES.index(r["label"]) for r in rows])
    assert report["accuracy"] == pytest.approx((len(rows) - 2) / len(rows))
    assert report == {**report, **metrics.classification_report(y_true, probs, CLASSES, "female", 200, 3)}


def test_console_table_shows_the_numbers(evaluated):
    text = evaluated["console"]
    report = evaluated["report"]
    assert f"{report['accuracy']:.3f}" in text and f"{report['roc_auc']:.3f}" in text
    assert "positive class: female" in text
    assert "rows: true label, columns: predicted label" in text
    for name in CLASSES:
        row = report["per_class"][name]
        assert f"{row['precision']:.3f}" in text and f"{row['recall']:.3f}" in text
    assert "metrics.json" in text


def test_plots_exist_and_show_what_they_claim(evaluated, project):
    out, figures = evaluated["reports"], evaluated["figures"]
    for name in ("roc_curve.png", "confusion_matrix.png", "errors.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 100, name
    rows = read_csv(out / "predictions.csv")
    probs = np.array([[float(r["prob_female"]), float(r["prob_male"])] for r in rows])
    is_female = np.array([r["label"] == "female" for r in rows])

    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(is_female, probs[:, 0])
    curve = figures["roc_curve.png"].axes[0].lines[0].get_xydata()
    np.testing.assert_allclose(curve, np.column_stack([fpr, tpr]))

    texts = [t.get_text() for t in figures["confusion_matrix.png"].axes[0].texts]
    counts = evaluated["report"]["confusion_matrix"]["counts"]
    assert [t.split("\n")[0] for t in texts] == [str(c) for row in counts for c in row]

    # errors.png: every misclassified image, the most confident first, with its probabilities
    panels = [ax for ax in figures["errors.png"].axes if ax.images]
    wrong = sorted((i for i, r in enumerate(rows) if r["label"] != r["predicted"]),
                   key=lambda i: -probs[i].max())
    assert len(panels) == len(wrong) == 2
    for ax, i in zip(panels, wrong):
        title = ax.get_title()
        assert Path(rows[i]["path"]).name[:24] in title
        assert f"true {rows[i]['label']}, predicted {rows[i]['predicted']}" in title
        assert f"female {probs[i, 0]:.3f}" in title
        shown = ax.images[0].get_array()
        np.testing.assert_array_equal(shown, images.load_image(project["data"] / rows[i]["path"], POLICY))


def test_errors_grid_without_errors_says_so(tmp_path):
    path = reports.plot_errors([], CLASSES, tmp_path / "errors.png")
    with Image.open(path) as img:
        assert img.format == "PNG"


# --------------------------------------------------------------------------- groups
@pytest.fixture(scope="module")
def utkface_like(project):
    """The same images under UTKFace-style names (AGE_GENDER_RACE_DATE.jpg.chip.jpg)."""
    tmp = project["tmp"] / "utk"
    data = tmp / "data"
    rows, ages, races = [], [3, 15, 27, 45, 71], [0, 1, 2, 3, 4]
    for k, (rel, label) in enumerate(project["rows"]):
        age, race = ages[k % 5], races[(k // 2) % 5]
        gender = 1 if rel.startswith("female") else 0
        name = f"{age}_{gender}_{race}_2017010{k:02d}.jpg.chip.jpg"
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(project["data"] / rel, data / Path(rel).parent / name)
        rows.append((f"{Path(rel).parent}/{name}", label))
    work = tmp / "work"
    write_manifest(work / "splits" / "test.csv", rows, data)
    shutil.copytree(project["work"] / "model", work / "model")
    return {"data": data, "work": work, "rows": rows, "tmp": tmp}


def test_group_report_with_the_utkface_preset(utkface_like, capsys):
    config = write_config(utkface_like["tmp"], utkface_like["data"], utkface_like["work"], groups="utkface")
    assert predict.main(["--config", str(config)]) == 0
    console = capsys.readouterr().out
    out = utkface_like["work"] / "reports"
    saved = json.loads((out / "metrics.json").read_text())
    groups = saved["groups"]
    assert list(groups["attributes"]) == ["age_band", "race"]

    rows = read_csv(out / "predictions.csv")
    bands = {"3": "0-9", "15": "10-19", "27": "20-29", "45": "40-49", "71": "70+"}
    races = ["White", "Black", "Asian", "Indian", "Others"]
    for attribute, value_of in (("age_band", lambda n: bands[n.split("_")[0]]),
                                ("race", lambda n: races[int(n.split("_")[2])])):
        table = groups["attributes"][attribute]
        for value, entry in table.items():
            members = [r for r in rows if value_of(Path(r["path"]).name) == value]
            assert entry["n"] == len(members) > 0
            assert entry["accuracy"] == pytest.approx(
                np.mean([r["label"] == r["predicted"] for r in members]))
            for name in CLASSES:
                of_class = [r for r in members if r["label"] == name]
                assert entry["support"][name] == len(of_class)
                if of_class:
                    assert entry["recall"][name] == pytest.approx(
                        np.mean([r["predicted"] == name for r in of_class]))
        assert sum(e["n"] for e in table.values()) == len(rows)
        assert f"  {attribute}" in console
    assert list(groups["attributes"]["age_band"]) == ["0-9", "10-19", "20-29", "40-49", "70+"]
    assert "groups (UTKFace file names: age band and race)" in console
    with Image.open(out / "groups.png") as img:
        assert img.format == "PNG"


def test_group_plot_bars_hold_the_numbers(tmp_path):
    y_true = np.array([0, 0, 1, 1, 1, 0])
    y_pred = np.array([0, 1, 1, 1, 0, 0])
    table = metrics.group_breakdown(y_true, y_pred, ["a", "a", "a", "b", "b", "b"], CLASSES)
    groups = {"rule": "test", "attributes": {"letter": table}}
    drawn = []
    original = reports.save_figure
    try:
        reports.save_figure = lambda fig, path: (drawn.append(fig), original(fig, path))[1]
        reports.plot_groups(groups, CLASSES, tmp_path / "groups.png")
    finally:
        reports.save_figure = original
    ax = drawn[0].axes[0]
    widths = [p.get_width() for p in ax.patches]
    # bars: accuracy (a, b), recall female (a, b), recall male (a, b)
    assert widths == pytest.approx([2 / 3, 2 / 3, 1 / 2, 1.0, 1.0, 1 / 2])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a (n=3)", "b (n=3)"]


# --------------------------------------------------------------------------- --images
@pytest.fixture(scope="module")
def messy_folder(project):
    """Nested folders, a corrupt JPEG, text named .jpg, a non-image file, a hidden file."""
    root = project["tmp"] / "messy"
    (root / "a" / "b").mkdir(parents=True)
    shutil.copyfile(project["data"] / "female" / "female_00000.jpg", root / "top.jpg")
    shutil.copyfile(project["data"] / "male" / "male_00001.jpg", root / "a" / "b" / "deep.JPG")
    Image.open(project["data"] / "male" / "male_00003.jpg").save(root / "a" / "as.png")
    good = (project["data"] / "female" / "female_00004.jpg").read_bytes()
    (root / "a" / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (root / "a" / "b" / "notes.jpg").write_text("not an image at all")
    (root / "readme.txt").write_text("skipped: not an image extension")
    (root / ".hidden.jpg").write_bytes(good)
    return root


def run_images(project, args, capsys):
    code = predict.main(["--config", str(project["config"]), "--images", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_images_on_a_messy_folder(project, messy_folder, capsys):
    missing = messy_folder / "gone.jpg"
    code, out, err = run_images(project, [messy_folder, missing], capsys)
    assert code == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "predicted", "prob_female", "prob_male", "in_training", "error"]
    by_name = {Path(r["path"]).name: r for r in rows}
    # found recursively, sorted, hidden and non-image files skipped; the missing file still has a row
    assert [Path(r["path"]).relative_to(messy_folder).as_posix() for r in rows] == \
        ["a/as.png", "a/b/deep.JPG", "a/b/notes.jpg", "a/corrupt.jpg", "top.jpg", "gone.jpg"]
    for bad in ("notes.jpg", "corrupt.jpg", "gone.jpg"):
        assert bad in by_name[bad]["error"] and by_name[bad]["predicted"] == ""
        assert "\n" not in by_name[bad]["error"]
    assert "not found" in by_name["gone.jpg"]["error"]
    assert by_name["top.jpg"]["predicted"] == "female"
    assert by_name["deep.JPG"]["predicted"] == "male" and by_name["as.png"]["predicted"] == "male"
    expected = model_probs(project, [messy_folder / "top.jpg", messy_folder / "a" / "b" / "deep.JPG"])
    got = np.array([[float(by_name[n]["prob_female"]), float(by_name[n]["prob_male"])]
                    for n in ("top.jpg", "deep.JPG")])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert "3 could not be read" in err
    assert "classifying" in err  # the progress bar went to stderr, the CSV alone to stdout


def test_images_to_a_file_and_evaluation_agree(project, evaluated, tmp_path, capsys):
    # The whole data folder, in other batches than the evaluation's (another order, another size).
    out = tmp_path / "new.csv"
    code = predict.main(["--config", str(project["config"]), "--set", "evaluate.batch_size=3",
                         "--images", str(project["data"] / "male"), str(project["data"] / "female"),
                         "--out", str(out)])
    assert code == 0
    assert capsys.readouterr().out == ""
    new = {Path(r["path"]).relative_to(project["data"]).as_posix(): r for r in read_csv(out)}
    evaluated_rows = read_csv(evaluated["reports"] / "predictions.csv")
    assert set(new) == {r["path"] for r in evaluated_rows}
    for r in evaluated_rows:
        for name in CLASSES:
            assert abs(float(new[r["path"]][f"prob_{name}"]) - float(r[f"prob_{name}"])) <= 1e-6
        assert new[r["path"]]["predicted"] == r["predicted"]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary file left behind


def test_images_with_nothing_to_classify(project, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = run_images(project, [tmp_path / "empty"], capsys)
    assert code == 1 and out == ""
    assert err.startswith("error: no image files to classify") and err.count("\n") == 1


# --------------------------------------------------------------------------- missing or bad inputs
def _main(args, capsys):
    code = predict.main(args)
    return code, capsys.readouterr().err


def test_missing_model_or_manifest_names_the_stage_to_run(project, tmp_path, capsys):
    work = tmp_path / "work"
    config = write_config(tmp_path, project["data"], work)
    code, err = _main(["--config", str(config)], capsys)
    assert code == 1 and "data_preprocess.py" in err and err.count("\n") == 1
    shutil.copytree(project["work"] / "splits", work / "splits")
    code, err = _main(["--config", str(config)], capsys)
    assert code == 1 and "train.py" in err and "classifier.keras" in err and err.count("\n") == 1
    code, err = _main(["--config", str(config), "--images", str(project["data"])], capsys)
    assert code == 1 and "train.py" in err and err.count("\n") == 1
    assert not (work / "reports").exists()


def test_out_needs_images(project, tmp_path, capsys):
    code, err = _main(["--config", str(project["config"]), "--out", str(tmp_path / "x.csv")], capsys)
    assert code == 1 and "--out is only used with --images" in err
    assert not (tmp_path / "x.csv").exists()


def test_a_broken_test_image_stops_evaluation_naming_it(project, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(project["data"], data)
    (data / "male" / "male_00005.jpg").write_bytes(b"\xff\xd8\xff broken")
    work = tmp_path / "work"
    write_manifest(work / "splits" / "test.csv", project["rows"], data)  # listed broken: a decode error
    shutil.copytree(project["work"] / "model", work / "model")
    code, err = _main(["--config", str(write_config(tmp_path, data, work))], capsys)
    error = err.splitlines()[-1]  # after the progress bar's last line
    assert code == 1 and error.startswith("error: ") and "male_00005.jpg" in error and "test.csv" in error
    assert not (work / "reports" / "metrics.json").exists()


def test_a_test_image_changed_since_the_split_stops_evaluation_naming_it(project, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(project["data"], data)
    work = tmp_path / "work"
    write_manifest(work / "splits" / "test.csv", project["rows"], data)
    shutil.copytree(project["work"] / "model", work / "model")
    changed, other = (data / rel for rel, _ in project["rows"][:2])
    changed.write_bytes(other.read_bytes())  # still a good image: only its bytes tell
    code, err = _main(["--config", str(write_config(tmp_path, data, work))], capsys)
    error = err.splitlines()[-1]
    assert code == 1 and error.startswith("error: ") and "changed since the split was made" in error
    assert changed.name in error and "test.csv" in error
    assert not (work / "reports" / "metrics.json").exists()


def test_manifest_labels_must_be_classes_of_the_model(project, tmp_path, capsys):
    work = tmp_path / "work"
    write_manifest(work / "splits" / "test.csv", [("female/female_00000.jpg", "woman")], project["data"])
    shutil.copytree(project["work"] / "model", work / "model")
    code, err = _main(["--config", str(write_config(tmp_path, project["data"], work))], capsys)
    assert code == 1 and "woman" in err and err.count("\n") == 1


def test_a_damaged_model_file_is_a_one_line_error(project, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(project["work"], work, ignore=shutil.ignore_patterns("reports"))
    (work / "model" / "classifier.keras").write_bytes(b"PK\x03\x04 not really a zip")
    code, err = _main(["--config", str(write_config(tmp_path, project["data"], work))], capsys)
    assert code == 1 and "classifier.keras" in err and "train.py" in err and err.count("\n") == 1


def test_a_failure_while_writing_leaves_the_previous_report_whole(project, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(project["work"], work, ignore=shutil.ignore_patterns("reports"))
    config = write_config(tmp_path, project["data"], work)
    assert predict.main(["--config", str(config)]) == 0
    before = {p.name: p.read_bytes() for p in (work / "reports").iterdir()}

    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the plots are drawn

    monkeypatch.setattr(reports, "plot_errors", broken)
    assert predict.main(["--config", str(config), "--set", "seed=9"]) == 130
    assert {p.name: p.read_bytes() for p in (work / "reports").iterdir()} == before
