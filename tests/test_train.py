"""train.py: the head on the frozen converted base, its outputs, and every bad input.

Bases are converted from generated VGG-Face-structured MatConvNet files at 1/16 width and
32x32 input (see helpers_train); images are generated two-class folders.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import helpers_train as H


@pytest.fixture
def base_dir(tmp_path_factory):
    return H.base_once(tmp_path_factory)


@pytest.fixture
def project(tmp_path, base_dir):
    return H.Project(tmp_path, base_dir)


def _val_images(project, policy):
    from vggface_gender.images import load_image

    x = np.stack([load_image(p, policy) for p in project.data["val_files"]]).astype(np.float32)
    y = np.array([H.CLASSES.index(label) for label in project.data["val_labels"]])
    return x, y


# --------------------------------------------------------------------------- what it learns
@pytest.mark.slow
def test_separable_data_reaches_high_validation_accuracy_and_writes_the_contract(tmp_path, base_dir):
    from vggface_gender.images import ImagePolicy

    # The random base's relu7 activations are ~20x larger than a trained network's (mean ~17),
    # which multiplies Adam's effective step on the logits: lr 1e-4 here is the analogue of the
    # recipe's 1e-3 on real features, and patience 5 rides out the noise of 10 steps an epoch.
    project = H.Project(tmp_path, base_dir, per_class=100, n_val=20)
    assert project.train("train.max_epochs=50", "train.batch_size=16", "train.learning_rate=1e-4",
                         "train.patience=5") == 0
    summary = project.summary()
    assert summary["best_val_accuracy"] >= 0.95 - 1e-6, summary

    # classifier.json: the contract predict.py reads
    info = json.loads((project.work / "model" / "classifier.json").read_text())
    base_info = json.loads((project.work / "model" / "base.json").read_text())
    assert info["format"] == 2 and info["classes"] == list(H.CLASSES)
    assert info["input_size"] == list(base_info["input_size"][:2])
    assert info["policy"]["size"] == info["input_size"] and info["policy"]["resize"] == "stretch"
    assert info["embedding_layer"] == "relu7" and info["trainable_from"] is None
    from vggface_gender.features import keras_model_sha256
    assert info["base_sha256"] == keras_model_sha256(project.work / "model" / "base.keras")

    assert info["feature_layer"] == "relu7" and info["precision"]["precision"] == "float32"
    # lineage: the content hashes of every training and validation image
    listed = {row["sha256"] for split in ("train", "val")
              for row in csv.DictReader(open(project.work / "splits" / f"{split}.csv", newline=""))}
    assert set(info["lineage"]["images_sha256"]) == listed and len(listed) == 200

    # classifier.keras holds the trained head alone: relu7 features in, probabilities out
    head = project.head()
    assert list(head.input_shape[1:]) == info["feature_shape"] and head.output_shape[-1] == 2
    assert not {"conv1_1", "fc6", "fc7", "relu7"} & {layer.name for layer in head.layers}
    assert getattr(head, "optimizer", None) is None  # no optimizer state in the file
    # the composed classifier: images 0-255 in, probabilities out; base up to relu7, then the head
    model = project.classifier()
    names = [layer.name for layer in H.flat_layers(model)]
    assert "relu7" in names and "fc8" not in names and not {"softmax", "prob"} & set(names)
    assert tuple(model.input_shape[1:]) == (*info["input_size"], 3)
    policy = ImagePolicy(tuple(info["policy"]["size"]), info["policy"]["resize"], info["policy"]["interpolation"])
    x, y = _val_images(project, policy)
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # the saved model reproduces the kept epoch's validation metrics
    assert np.mean(probs.argmax(axis=1) == y) == pytest.approx(summary["best_val_accuracy"])
    loss = -np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)))
    assert loss == pytest.approx(summary["best_val_loss"], rel=1e-3, abs=1e-5)

    # reports
    with open(project.work / "reports" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, summary["epochs_run"] + 1))
    assert set(rows[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    assert float(rows[summary["best_epoch"] - 1]["val_loss"]) == pytest.approx(summary["best_val_loss"])
    png = (project.work / "reports" / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert summary["extract_seconds"] > 0 and summary["train_seconds"] > 0
    assert summary["cache"]["status"] == "built"


def test_early_stopping_stops_and_restores_the_best_epoch(tmp_path, base_dir):
    # Shuffled labels: nothing to learn, so the head memorises and the validation loss rises.
    project = H.Project(tmp_path, base_dir, shuffle_labels=True, per_class=24, n_val=12)
    assert project.train("train.max_epochs=40", "train.patience=2", "train.learning_rate=1e-4",
                         "train.dropout=0.0", "train.hidden_units=[64]") == 0
    summary = project.summary()
    assert summary["stopped_early"] and summary["epochs_run"] < 40
    assert summary["epochs_run"] == summary["best_epoch"] + 2
    assert summary["weights_from_epoch"] == summary["best_epoch"]
    with open(project.work / "reports" / "history.csv", newline="") as f:
        val_loss = [float(r["val_loss"]) for r in csv.DictReader(f)]
    assert min(val_loss) == val_loss[summary["best_epoch"] - 1] < val_loss[-1]

    # The saved weights are the best epoch's: their validation loss is the best, not the last.
    info = json.loads((project.work / "model" / "classifier.json").read_text())
    from vggface_gender.images import ImagePolicy
    x, y = _val_images(project, ImagePolicy(tuple(info["policy"]["size"])))
    probs = project.classifier().predict(x, verbose=0)
    loss = -np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)))
    assert loss == pytest.approx(min(val_loss), rel=1e-3)
    assert abs(loss - val_loss[-1]) > 1e-3


def test_cached_and_end_to_end_training_end_with_the_same_weights(project):
    """Same head init, same seeded order, no dropout, fixed epochs: features from the cache or
    computed batch by batch through the frozen base give the same head."""
    sets = ("train.dropout=0.0", "train.max_epochs=3", "train.hidden_units=[32]", "train.learning_rate=0.001")
    assert project.train(*sets, "train.cache=true", early_stopping=False) == 0
    cached = H.weights_of(project.classifier())
    assert project.train(*sets, "train.cache=false", early_stopping=False) == 0
    assert project.summary()["cache"] == {"enabled": False}
    end_to_end = H.weights_of(project.classifier())
    head = ["head_dense1", "head_output"]
    print(f"cache vs end-to-end: max |diff| / max |weight| = {H.max_rel_diff(cached, end_to_end, head):.2e}")
    assert H.max_rel_diff(cached, end_to_end, head) <= 1e-4
    base = [n for n in cached if not n.startswith("head_")]
    assert H.max_rel_diff(cached, end_to_end, base) == 0.0  # the frozen base is untouched

    # Negative control: another seed (other initial weights and order) is far from it.
    assert project.train(*sets, "seed=1", early_stopping=False) == 0
    assert H.max_rel_diff(cached, H.weights_of(project.classifier()), head) > 1e-2


def test_a_run_is_reproducible_with_dropout(project):
    assert project.train("train.max_epochs=2", early_stopping=False) == 0
    first = H.weights_of(project.classifier())
    assert project.train("train.max_epochs=2", early_stopping=False) == 0
    assert project.summary()["cache"]["status"] == "reused"
    second = H.weights_of(project.classifier())
    for name in first:
        for a, b in zip(first[name], second[name]):
            np.testing.assert_array_equal(a, b)


def test_trainable_from_caches_below_it_and_trains_the_unfrozen_layers(project):
    import keras

    base = keras.saving.load_model(project.work / "model" / "base.keras")
    assert project.train("train.trainable_from=fc7", "train.dropout=0.0", early_stopping=False) == 0
    summary = project.summary()
    assert summary["cache"]["feature_layer"] == "relu6"
    assert summary["cache"]["shape"] == [int(d) for d in base.get_layer("relu6").output.shape[1:]]
    trained = project.classifier()
    weights = H.weights_of(trained)
    np.testing.assert_array_equal(weights["fc6"][0], base.get_layer("fc6").get_weights()[0])
    assert not np.allclose(weights["fc7"][0], base.get_layer("fc7").get_weights()[0])
    info = json.loads((project.work / "model" / "classifier.json").read_text())
    assert info["trainable_from"] == "fc7" and info["feature_layer"] == "relu6"
    # the trained fc7 is saved with the head; the frozen fc6 is not (it stays in base.keras)
    head_names = {layer.name for layer in project.head().layers}
    assert "fc7" in head_names and "fc6" not in head_names

    # the same head and fc7 through the cache and end to end
    cached = H.weights_of(trained)
    assert project.train("train.trainable_from=fc7", "train.dropout=0.0", "train.cache=false",
                         early_stopping=False) == 0
    assert H.max_rel_diff(cached, H.weights_of(project.classifier()), ["fc7", "head_dense1", "head_output"]) <= 1e-4


# --------------------------------------------------------------------------- bad input
def _assert_failed_cleanly(project, capsys, code, *needles):
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines may precede the error
    assert code == 1
    err = [line for line in lines if line.startswith("error: ")]
    assert len(err) == 1 and lines[-1] == err[0] and not any("Traceback" in line for line in lines), lines
    for needle in needles:
        assert needle in err[0], err[0]
    leftovers = [p for p in project.outputs() if p.parent.name != "features" and "features" not in p.parts]
    assert leftovers == [], leftovers
    assert not [p for p in project.outputs() if ".tmp" in p.name or ".tmp-" in str(p)]
    return err[0]


def test_missing_inputs_name_the_stage_to_run_first(project, capsys):
    (project.work / "splits" / "val.csv").unlink()
    _assert_failed_cleanly(project, capsys, project.train(), "val.csv", "data_preprocess.py")
    H.make_data(project.root, project.work)
    (project.work / "model" / "base.keras").unlink()
    _assert_failed_cleanly(project, capsys, project.train(), "base.keras", "model_conversion.py")


@pytest.mark.parametrize("damage, cache", [("vanished", True), ("vanished", False), ("corrupt", True),
                                           ("corrupt", False)])
def test_a_vanished_or_corrupt_image_stops_training_naming_the_file(project, capsys, cache, damage):
    bad = project.data["val_files"][3]
    if damage == "vanished":
        bad.unlink()
    else:
        bad.write_bytes(bad.read_bytes()[:200])
    line = _assert_failed_cleanly(project, capsys, project.train(f"train.cache={str(cache).lower()}"), str(bad))
    assert "val.csv" in line
    assert not list(project.work.glob("features/*/meta.json"))  # no committed cache entry


def test_a_label_that_is_not_a_configured_class(project, capsys):
    path = project.work / "splits" / "train.csv"
    path.write_text(path.read_text().replace(",male,", ",man,", 1))
    H.commit_splits(project.work)  # as if data_preprocess.py had written it
    _assert_failed_cleanly(project, capsys, project.train(), "train.csv", "'man'")


def test_an_unknown_embedding_layer_lists_the_valid_names(project, capsys):
    line = _assert_failed_cleanly(project, capsys, project.train("model.embedding_layer=fc9"),
                                  "model.embedding_layer", "'fc9'", "relu7", "conv1_1")
    line = _assert_failed_cleanly(project, capsys, project.train("train.trainable_from=fc8"),
                                  "train.trainable_from", "'fc8'", "fc6")
    assert line


def test_a_loss_that_becomes_nan_is_one_line_and_keeps_the_previous_outputs(project, capsys):
    assert project.train() == 0
    before = {p: p.read_bytes() for p in project.outputs() if "features" not in p.parts}
    capsys.readouterr()
    code = project.train("train.learning_rate=1e30")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ")
    assert "train.learning_rate" in err[0] and "NaN" in err[0]
    after = {p: p.read_bytes() for p in project.outputs() if "features" not in p.parts}
    assert after == before  # nothing half-written: the last complete run's outputs stand
    assert not [p for p in project.outputs() if ".tmp" in str(p)]

