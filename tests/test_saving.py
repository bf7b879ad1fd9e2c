"""keras_model.save_model writes the archive model.save writes, only faster (issue 2's time target).

The fast path has Keras write its unzipped form with h5py reading the variables in place, then
stores the three files in a zip. These tests hold it against Keras' own ``model.save`` entry by
entry and value by value, and check its fallbacks.
"""

from __future__ import annotations

import json
import zipfile

import h5py
import numpy as np
import pytest

import helpers_conversion as hc
from vggface_gender import keras_model, matconvnet, synthetic


def _h5_tree(path_or_file) -> dict:
    """{h5 path: (kind, attrs, dtype, shape, bytes)} of every group and dataset."""
    tree = {}
    with h5py.File(path_or_file, "r") as f:
        def visit(name, item):
            attrs = {k: np.asarray(v).tolist() for k, v in item.attrs.items()}
            if isinstance(item, h5py.Dataset):
                value = item[()]
                tree[name] = ("dataset", attrs, str(value.dtype), value.shape, np.asarray(value).tobytes())
            else:
                tree[name] = ("group", attrs)
        f.visititems(visit)
        tree["/"] = ("root", {k: np.asarray(v).tolist() for k, v in f.attrs.items()})
    return tree


def _entries(path):
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every CRC checks out
        infos = archive.infolist()
        return ([(i.filename, i.compress_type, i.external_attr) for i in infos],
                {i.filename: archive.read(i.filename) for i in infos})


def _spy_on_fast_path(monkeypatch) -> list:
    """Record the targets that ``save_model`` writes through its fast path."""
    calls, store = [], keras_model._store_in_zip

    def spy(folder, names, path):
        calls.append(path)
        return store(folder, names, path)

    monkeypatch.setattr(keras_model, "_store_in_zip", spy)
    return calls


def _built(tmp_path, kind):
    if kind == "vgg":
        mat = synthetic.write_vggface_mat(tmp_path / "vgg.mat", width=1 / 16, n_classes=12, momentum=True)
        size = (224, 224)
    else:  # pool_norm: BatchNormalization and the registered custom layers; conv_forms: padding,
        mat, size = hc.write_small_net(tmp_path / f"{kind}.mat", kind)  # groups, dilation
    model, _ = keras_model.build_model(matconvnet.read_net(mat), size)
    return model


@pytest.mark.parametrize("kind", ["vgg", "pool_norm", "conv_forms"])
def test_save_model_writes_what_model_save_writes(tmp_path, kind, monkeypatch):
    model = _built(tmp_path, kind)
    ours, keras_own = tmp_path / "ours.keras", tmp_path / "keras.keras"
    stored = _spy_on_fast_path(monkeypatch)
    keras_model.save_model(model, tmp_path / "first.keras")  # Keras leaves an empty assets/ after this
    keras_model.save_model(model, ours)
    assert stored == [tmp_path / "first.keras", ours]  # the fast path, not the fallback, both times
    model.save(keras_own)

    our_list, our_files = _entries(ours)
    their_list, their_files = _entries(keras_own)
    assert our_list == their_list  # same names, order, storage (uncompressed) and permissions
    assert [name for name, _, _ in our_list] == list(keras_model.ARCHIVE_ENTRIES)
    assert json.loads(our_files["config.json"]) == json.loads(their_files["config.json"])
    our_meta, their_meta = (json.loads(f["metadata.json"]) for f in (our_files, their_files))
    assert our_meta.keys() == their_meta.keys() and our_meta["keras_version"] == their_meta["keras_version"]
    import io

    ours_tree = _h5_tree(io.BytesIO(our_files["model.weights.h5"]))
    theirs_tree = _h5_tree(io.BytesIO(their_files["model.weights.h5"]))
    assert ours_tree.keys() == theirs_tree.keys()
    assert ours_tree == theirs_tree  # every group, attribute and weight, bit for bit
    assert sum(1 for v in ours_tree.values() if v[0] == "dataset") == len(model.weights) > 0


def test_saved_weights_are_the_models_weights_after_loading(tmp_path):
    import keras

    model = _built(tmp_path, "pool_norm")
    path = tmp_path / "m.keras"
    keras_model.save_model(model, path)
    loaded = keras.saving.load_model(path)  # safe mode; the custom layers are registered by the import
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    for saved, original in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(original))
    image = hc.random_image(model.input_shape[1:3], seed=3)
    np.testing.assert_array_equal(np.asarray(loaded(image[None])), np.asarray(model(image[None])))


def test_keras_conversion_function_is_restored_after_saving(tmp_path, monkeypatch):
    from keras.src import backend as keras_backend

    original = keras_backend.convert_to_numpy
    model = _built(tmp_path, "vgg")
    keras_model.save_model(model, tmp_path / "ok.keras")
    assert keras_backend.convert_to_numpy is original

    def broken_store(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(keras_model, "_store_in_zip", broken_store)
    with pytest.raises(OSError, match="disk full"):
        keras_model.save_model(model, tmp_path / "broken.keras")
    assert keras_backend.convert_to_numpy is original
    # no temporary folder is left beside the target
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_layers_with_assets_fall_back_to_keras_own_save(tmp_path, monkeypatch):
    import keras

    lookup = keras.Sequential([keras.Input((1,), dtype="string"),
                               keras.layers.StringLookup(vocabulary=["kiwi", "fig", "plum"])])
    path = tmp_path / "lookup.keras"
    stored = _spy_on_fast_path(monkeypatch)
    keras_model.save_model(lookup, path)
    assert stored == []
    loaded = keras.saving.load_model(path)
    assert loaded.layers[-1].get_vocabulary() == ["[UNK]", "kiwi", "fig", "plum"]
    assert np.asarray(loaded(np.array([["plum"], ["pear"]]))).ravel().tolist() == [3, 0]


def test_a_keras_without_unzipped_saving_falls_back_to_model_save(tmp_path, monkeypatch):
    import keras

    model = _built(tmp_path, "vgg")
    original = keras.saving.save_model
    monkeypatch.setattr(keras.saving, "save_model", lambda model, filepath, overwrite=True: original(model, filepath))
    path = tmp_path / "old.keras"
    stored = _spy_on_fast_path(monkeypatch)
    keras_model.save_model(model, path)
    assert stored == []
    names, _ = _entries(path)
    assert [n for n, _, _ in names] == list(keras_model.ARCHIVE_ENTRIES)
    assert len(keras.saving.load_model(path).weights) == len(model.weights)
