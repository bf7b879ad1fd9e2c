"""predict.py on the real chain: data_preprocess -> model_conversion -> train -> predict.

A generated VGG-Face-structured .mat file (1/16 width, 32x32 input) and generated image folders go
through the four scripts, as a user runs them. This checks the contract with train.py's outputs
(classifier.keras loads with plain Keras, classifier.json's policy) rather than a hand-made model.
"""

import csv
import json
from pathlib import Path

import numpy as np
import yaml

import data_preprocess
import model_conversion
import predict
import train
from vggface_gender import conversion, images, synthetic


def test_four_stages_then_predict_agrees_with_images(tmp_path, capsys):
    data = synthetic.write_image_folders(tmp_path / "data", 20, size=40, seed=4)
    mat = synthetic.write_vggface_mat(tmp_path / "net.mat", width=1 / 16, n_classes=4, input_size=32)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "work_dir": str(tmp_path / "work"), "seed": 1,
        "data": {"root": str(data), "sample_per_class": 12, "val_fraction": 0.25, "test_per_class": 8},
        "model": {"mat_path": str(mat), "precision": "float32"},
        "train": {"hidden_units": [16], "max_epochs": 4, "batch_size": 8},
        "evaluate": {"bootstrap": 50, "batch_size": 5, "groups": r"^(?P<kind>[a-z]+)_"},
    }))
    args = ["--config", str(config)]
    for stage in (data_preprocess, model_conversion, train):
        assert stage.main(args) == 0, stage.__name__
    assert predict.main(args) == 0
    reports = tmp_path / "work" / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["n_test"] == 16
    assert metrics["classes"] == ["female", "male"]
    info = json.loads((tmp_path / "work" / "model" / "classifier.json").read_text())
    assert metrics["policy"] == info["policy"]
    # the regex names the class folder's prefix: each group value is one class
    kinds = metrics["groups"]["attributes"]["kind"]
    assert {k: v["n"] for k, v in kinds.items()} == {"female": 8, "male": 8}
    with open(reports / "predictions.csv", newline="") as f:
        evaluated = {row["path"]: row for row in csv.DictReader(f)}

    # --images on the whole data folder: the test images get the same probabilities
    out = tmp_path / "all.csv"
    capsys.readouterr()
    assert predict.main(args + ["--images", str(data), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        classified = {Path(row["path"]).relative_to(data).as_posix(): row for row in csv.DictReader(f)}
    assert len(classified) == 40 and not any(row["error"] for row in classified.values())
    for path, row in evaluated.items():
        for name in ("female", "male"):
            assert abs(float(classified[path][f"prob_{name}"]) - float(row[f"prob_{name}"])) <= 1e-6

    # and plain Keras on the loader's arrays gives them too (no package code between): the base
    # cut at the recorded feature layer, then the head saved alone
    import keras

    base = keras.saving.load_model(tmp_path / "work" / "model" / "base.keras")
    cut = keras.Model(base.inputs, base.get_layer(info["feature_layer"]).output)
    head = keras.saving.load_model(tmp_path / "work" / "model" / "classifier.keras")
    policy = images.ImagePolicy(tuple(info["policy"]["size"]), info["policy"]["resize"],
                                info["policy"]["interpolation"])
    some = sorted(evaluated)[:6]
    pixels = np.stack([images.load_image(data / p, policy) for p in some]).astype(np.float32)
    probs = head.predict(cut.predict(pixels, verbose=0), verbose=0)
    expected = np.array([[float(evaluated[p]["prob_female"]), float(evaluated[p]["prob_male"])] for p in some])
    np.testing.assert_allclose(probs, expected, atol=1e-6)
