"""The feature cache: correct values, reused while nothing changed, rebuilt when anything did."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import helpers_train as H
from vggface_gender import features


@pytest.fixture
def base_dir(tmp_path_factory):
    return H.base_once(tmp_path_factory)


@pytest.fixture
def project(tmp_path, base_dir):
    return H.Project(tmp_path, base_dir, per_class=12, n_val=4)


def _load_base(project):
    import keras
    import vggface_gender.layers  # noqa: F401

    return keras.saving.load_model(project.work / "model" / "base.keras")


def test_cut_base_splits_at_the_embedding_and_trainable_layers(project):
    from vggface_gender import features
    from vggface_gender.errors import PipelineError

    base = _load_base(project)
    cut = features.cut_base(base, "relu7")
    assert cut.feature_layer == "relu7" and cut.trainable == []
    assert [layer.name for layer in cut.frozen][-3:] == ["relu6", "fc7", "relu7"]
    assert all(not layer.trainable for layer in cut.frozen)

    cut = features.cut_base(base, "relu7", "fc6")
    assert [layer.name for layer in cut.trainable] == ["fc6", "relu6", "fc7", "relu7"]
    assert cut.feature_layer == cut.frozen[-1].name  # just below fc6 (the flattened pool5)
    assert all(layer.trainable for layer in cut.trainable)

    cut = features.cut_base(base, "pool5")
    assert cut.feature_shape() == tuple(int(d) for d in base.get_layer("pool5").output.shape[1:])

    with pytest.raises(PipelineError, match=r"model.embedding_layer: no layer named 'fc9'.*conv1_1.*relu7"):
        features.cut_base(base, "fc9")
    with pytest.raises(PipelineError, match=r"train.trainable_from: no layer named 'fc8' at or below"):
        features.cut_base(base, "relu7", "fc8")


def test_cached_features_are_the_frozen_bases_outputs(project):
    """Values in the cache = the base's own relu7 on the loader's images, in manifest order,
    also with a batch size that does not divide the number of images."""
    import keras

    from vggface_gender.images import ImagePolicy, load_image

    assert project.train("train.batch_size=5", "train.max_epochs=1") == 0
    entry = project.summary()["cache"]["folder"]
    base = _load_base(project)
    reference = keras.Model(base.inputs, base.get_layer("relu7").output)
    policy = ImagePolicy(tuple(base.inputs[0].shape[1:3]))
    for split in ("train", "val"):
        images = np.stack([load_image(p, policy) for p in project.data[f"{split}_files"]]).astype(np.float32)
        expected = reference.predict(images, verbose=0)
        cached = np.load(f"{entry}/{split}.npy")
        assert cached.dtype == np.float32 and cached.shape == expected.shape
        np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _status(project, *sets):
    assert project.train("train.max_epochs=1", *sets) == 0
    return project.summary()["cache"]


@pytest.mark.slow
def test_a_cache_is_reused_and_rebuilt_when_an_input_changes(tmp_path_factory, project):
    first = _status(project)
    assert first["status"] == "built"
    assert _status(project, "train.hidden_units=[16]", "train.dropout=0.1")["status"] == "reused"  # another head

    # the manifest: one row fewer
    manifest = project.work / "splits" / "train.csv"
    original = manifest.read_bytes()
    manifest.write_bytes(b"".join(original.splitlines(keepends=True)[:-1]))
    H.commit_splits(project.work)
    changed = _status(project)
    assert changed["status"] == "built" and changed["folder"] != first["folder"]
    manifest.write_bytes(original)
    H.commit_splits(project.work)
    assert _status(project) == first | {"status": "reused"}

    # the resize policy
    assert _status(project, "images.resize=crop")["status"] == "built"
    # the key is the images' content, not their dates (an edited image: test_crash_safety.py)
    image = project.data["train_files"][0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert _status(project) == first | {"status": "reused"}
    # the model: another conversion (other weights)
    H.install_base(H.base_once(tmp_path_factory, seed=1), project.work)
    assert _status(project)["status"] == "built"

    # at most three entries are kept; no temporaries are left behind
    entries = list((project.work / "features").iterdir())
    assert len(entries) == 3 and not [e for e in entries if e.name.startswith(".")]


def test_a_damaged_cache_entry_is_rebuilt(project):
    first = _status(project)
    with open(f"{first['folder']}/train.npy", "r+b") as f:
        f.truncate(100)
    again = _status(project)
    assert again["status"] == "built" and again["folder"] == first["folder"]
    assert np.load(f"{again['folder']}/train.npy").shape[0] == len(project.data["train_files"])


def test_a_failed_extraction_leaves_no_committed_entry_and_resumes(project, capsys):
    bad = project.data["val_files"][-1]
    saved = bad.read_bytes()
    bad.write_bytes(b"not an image at all")
    assert project.train() == 1
    assert str(bad) in capsys.readouterr().err
    [entry] = list((project.work / "features").iterdir())
    assert not (entry / "meta.json").exists()  # no commit record: never served
    bad.write_bytes(saved)
    resumed = _status(project)  # the training features, complete before the failure, are kept
    assert resumed["status"] == "resumed" and resumed["folder"] == str(entry)
    assert "features of 'relu7' resumed" in capsys.readouterr().out
    assert (entry / "meta.json").exists() and not (entry / "progress.json").exists()


def test_the_base_models_hash_ignores_its_save_date_but_not_its_weights(tmp_path):
    """Re-running the conversion rewrites base.keras with a new save date in its metadata: the
    cache must still be reused; another network must not share the hash."""
    import time

    from vggface_gender import conversion, synthetic
    from vggface_gender.features import keras_model_sha256, sha256_file

    mat = synthetic.write_vggface_mat(tmp_path / "a.mat", width=1 / 16, n_classes=3, input_size=32)
    other = synthetic.write_vggface_mat(tmp_path / "b.mat", width=1 / 16, n_classes=3, input_size=32, seed=1)
    conversion.convert(mat, tmp_path / "first")
    time.sleep(1.1)  # the save date has one-second resolution
    conversion.convert(mat, tmp_path / "again")
    conversion.convert(other, tmp_path / "other")
    first, again = tmp_path / "first" / "base.keras", tmp_path / "again" / "base.keras"
    assert sha256_file(first) != sha256_file(again)  # the files' bytes differ (save date)
    assert keras_model_sha256(first) == keras_model_sha256(again)
    assert keras_model_sha256(first) != keras_model_sha256(tmp_path / "other" / "base.keras")


def test_runs_in_one_cache_take_turns(tmp_path):
    """A second run (a notebook beside a script) waits for the first before it reads or prunes."""
    order = []

    def first():
        with features._cache_lock(tmp_path):
            order.append("first in")
            time.sleep(0.5)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    while not order:
        time.sleep(0.01)
    with features._cache_lock(tmp_path):
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]
