"""keras_model.save_model writes the archive model.save writes, only faster (issue 2's time target).

The fast path has Keras write its unzipped form with h5py reading the variables in place, then
stores the three files in a zip. These tests hold it against Keras' own ``model.save`` entry by
entry and value by value, and check its fallbacks.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

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
        return ([(i.filename, i.compress_type, i.external_attr, i.flag_bits) for i in infos],
                {i.filename: archive.read(i.filename) for i in infos})


def _spy_on_fast_path(monkeypatch) -> list:
    """Record the targets that ``save_model`` writes through its fast path."""
    calls, store = [], keras_model._store_in_zip

    def spy(sources, path):
        calls.append(path)
        return store(sources, path)

    monkeypatch.setattr(keras_model, "_store_in_zip", spy)
    return calls


def _assert_saved_by_keras_own_save(model, path, monkeypatch) -> None:
    """``save_model`` took its fallback (``model.save``), and the file holds the model."""
    import keras

    stored = _spy_on_fast_path(monkeypatch)
    keras_model.save_model(model, path)
    assert stored == []
    names, _ = _entries(path)
    assert [entry[0] for entry in names] == list(keras_model.ARCHIVE_ENTRIES)
    assert len(keras.saving.load_model(path).weights) == len(model.weights)


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _spy_on_views(monkeypatch) -> list:
    """For each value Keras converts while saving: True if it got a view of the variable's memory."""
    seen, convert = [], keras_model._view_or_copy

    def spy(value, **kwargs):
        result = convert(value, **kwargs)
        seen.append(isinstance(result, np.ndarray) and not result.flags.owndata)
        return result

    monkeypatch.setattr(keras_model, "_view_or_copy", spy)
    return seen


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
    views = _spy_on_views(monkeypatch)
    keras_model.save_model(model, tmp_path / "first.keras")
    keras_model.save_model(model, ours)
    assert stored == [tmp_path / "first.keras", ours]  # the fast path, not the fallback, both times
    if not _gpu_visible():  # (GPU variables are copied to the host: no view possible)
        assert views == [True] * 2 * len(model.weights)  # every weight went to h5py as a view, no copy
    model.save(keras_own)

    our_list, our_files = _entries(ours)
    their_list, their_files = _entries(keras_own)
    assert our_list == their_list  # same names, order, storage (uncompressed), flags and permissions
    assert [entry[0] for entry in our_list] == list(keras_model.ARCHIVE_ENTRIES)
    assert our_files["config.json"] == their_files["config.json"]  # byte for byte
    # (the .h5 files differ by a few hundred bytes of HDF5 free space: one is written to disk,
    # the other through a file object; their groups, attributes and weights are compared below)
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
    import keras
    from keras.src import backend as keras_backend

    original = keras_backend.convert_to_numpy
    memory = tmp_path / "shm"
    memory.mkdir()
    monkeypatch.setattr(keras_model, "MEMORY_SCRATCH", memory)
    monkeypatch.setattr(keras_model, "_memory_available", lambda: 1 << 40)
    model = _built(tmp_path, "vgg")
    keras_model.save_model(model, tmp_path / "ok.keras")
    assert keras_backend.convert_to_numpy is original

    def failing_save(model, filepath, overwrite=True, zipped=None):
        assert keras_backend.convert_to_numpy is not original  # patched while Keras saves
        raise OSError("disk full")

    monkeypatch.setattr(keras.saving, "save_model", failing_save)
    with pytest.raises(OSError, match="disk full"):
        keras_model.save_model(model, tmp_path / "broken.keras")
    assert keras_backend.convert_to_numpy is original
    # no temporary folder is left, in memory or beside the target
    assert list(memory.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.keras", "shm", "vgg.mat"]


def test_other_threads_get_keras_own_conversion_during_a_save(tmp_path):
    import keras
    import threading

    model = _built(tmp_path, "vgg")
    kernel = model.get_layer("conv1_1").kernel
    from_other_thread = []
    with keras_model._weights_as_views():
        from keras.src import backend as keras_backend

        assert not keras_backend.convert_to_numpy(kernel).flags.owndata  # this thread: a view
        worker = threading.Thread(target=lambda: from_other_thread.append(keras_backend.convert_to_numpy(kernel)))
        worker.start()
        worker.join()
    assert from_other_thread[0].flags.owndata and from_other_thread[0].flags.writeable  # a copy
    np.testing.assert_array_equal(from_other_thread[0], keras.ops.convert_to_numpy(kernel))


def test_a_trained_compiled_model_saves_like_model_save(tmp_path, monkeypatch):
    """What train.py saves can hold optimizer, metric and seed-generator state: scalars too."""
    import io

    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    model.fit(x, np.eye(2, dtype=np.float32)[np.arange(16) % 2], epochs=1, verbose=0)
    ours, keras_own = tmp_path / "ours.keras", tmp_path / "keras.keras"
    stored = _spy_on_fast_path(monkeypatch)
    keras_model.save_model(model, ours)
    assert stored == [ours]
    model.save(keras_own)
    (_, our_files), (_, their_files) = _entries(ours), _entries(keras_own)
    ours_tree = _h5_tree(io.BytesIO(our_files["model.weights.h5"]))
    assert ours_tree == _h5_tree(io.BytesIO(their_files["model.weights.h5"]))
    assert any(v[0] == "dataset" and v[3] == () for v in ours_tree.values())  # scalar state included
    loaded = keras.saving.load_model(ours)
    assert loaded.optimizer.iterations.numpy() == model.optimizer.iterations.numpy() == 1
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_unexpected_files_in_the_unzipped_form_fall_back_to_model_save(tmp_path, monkeypatch):
    import keras

    model = _built(tmp_path, "vgg")
    original = keras.saving.save_model

    def save_with_extra_file(model, filepath, overwrite=True, zipped=None):
        original(model, filepath, zipped=zipped)
        (Path(filepath) / "assets" / "vocabulary.txt").write_text("kiwi\n")

    monkeypatch.setattr(keras.saving, "save_model", save_with_extra_file)
    _assert_saved_by_keras_own_save(model, tmp_path / "fallback.keras", monkeypatch)


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
    _assert_saved_by_keras_own_save(model, tmp_path / "old.keras", monkeypatch)


def test_the_unzipped_form_goes_to_memory_when_it_has_room_else_beside_the_target(tmp_path, monkeypatch):
    model = _built(tmp_path, "vgg")
    memory = tmp_path / "shm"
    memory.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    monkeypatch.setattr(keras_model, "MEMORY_SCRATCH", memory)
    chosen, choose = [], keras_model._scratch_folder

    def spy(needed, fallback):
        chosen.append(choose(needed, fallback))
        return chosen[-1]

    monkeypatch.setattr(keras_model, "_scratch_folder", spy)
    monkeypatch.setattr(keras_model, "_memory_available", lambda: 1 << 40)
    keras_model.save_model(model, target / "a.keras")
    monkeypatch.setattr(keras_model, "_memory_available", lambda: 1 << 20)  # too little RAM
    keras_model.save_model(model, target / "b.keras")
    monkeypatch.setattr(keras_model, "_memory_available", lambda: None)  # unknown (not Linux)
    keras_model.save_model(model, target / "c.keras")
    assert chosen == [memory, target.resolve(), target.resolve()]
    assert list(memory.iterdir()) == [] and sorted(p.name for p in target.iterdir()) == ["a.keras", "b.keras", "c.keras"]


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="process ids are looked up in /proc")
def test_scratch_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    import os

    memory = tmp_path / "shm"
    memory.mkdir()
    dead = memory / f"{keras_model.SCRATCH_PREFIX}999999999-abc.tmp"  # above Linux's pid_max
    alive = memory / f"{keras_model.SCRATCH_PREFIX}{os.getppid()}-abc.tmp"  # our parent runs
    other = memory / "someone-elses-folder"
    for folder in (dead, alive, other):
        (folder / "model").mkdir(parents=True)
    monkeypatch.setattr(keras_model, "MEMORY_SCRATCH", memory)
    monkeypatch.setattr(keras_model, "_memory_available", lambda: 1 << 40)
    keras_model.save_model(_built(tmp_path, "vgg"), tmp_path / "m.keras")
    assert sorted(p.name for p in memory.iterdir()) == sorted([alive.name, other.name])
