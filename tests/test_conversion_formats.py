"""What the reader accepts: both layouts, MAT v5 and v7.3 (written by hdf5storage, an
independent writer), legacy filters/biases, uint8 fields, momentum, opaque objects, names,
input-size and mean-image rules; and base.json / base.keras as later stages read them."""

import hashlib
import json
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest

import helpers_conversion as hc
from conftest import ROOT
from vggface_gender import conversion, matconvnet, synthetic
from vggface_gender.errors import ModelFileError



def convert(mat, out, input_size=None):
    info = conversion.convert(mat, out, input_size)
    return keras.saving.load_model(out / "base.keras"), info


def assert_same_model(model_a, info_a, model_b, info_b, image, last_names=None):
    """Same weights (bit for bit) and same outputs; only the last layer's name may differ."""
    names_a, names_b = info_a["layers"], info_b["layers"]
    if last_names:
        assert (names_a[-1], names_b[-1]) == last_names
        names_a, names_b = names_a[:-1], names_b[:-1]
    assert names_a == names_b
    for name in names_a:
        weights_a = model_a.get_layer(name).get_weights()
        weights_b = model_b.get_layer(name).get_weights()
        assert len(weights_a) == len(weights_b)
        for a, b in zip(weights_a, weights_b):
            assert a.shape == b.shape and np.array_equal(a, b), name
    out_a = np.asarray(model_a(image[None]))
    out_b = np.asarray(model_b(image[None]))
    assert np.array_equal(out_a, out_b)
    for key in ("classes", "input_size", "average_image", "interpolation", "dropped", "renamed"):
        assert info_a[key] == info_b[key], key


# --------------------------------------------------------------------------- layouts and formats
@pytest.fixture(scope="module")
def canonical(tmp_path_factory):
    folder = tmp_path_factory.mktemp("canonical")
    mat = synthetic.write_vggface_mat(folder / "vgg_face.mat", width=1 / 16, n_classes=12, seed=11)
    model, info = convert(mat, folder / "out")
    return model, info


@pytest.mark.parametrize("layout,fmt,momentum", [
    ("oxford", "v7.3", False), ("matconvnet", "v5", False), ("matconvnet", "v7.3", False),
    ("oxford", "v5", True),
])
def test_layouts_formats_and_momentum_give_the_same_model(tmp_path, canonical, layout, fmt, momentum):
    mat = synthetic.write_vggface_mat(tmp_path / "net.mat", width=1 / 16, n_classes=12, seed=11,
                                      layout=layout, fmt=fmt, momentum=momentum)
    model, info = convert(mat, tmp_path / "out")
    assert info["mat_format"] == fmt
    last = ("softmax", "prob") if layout == "matconvnet" else None
    assert_same_model(*canonical, model, info, hc.random_image((224, 224), seed=1), last_names=last)


@pytest.mark.parametrize("name", sorted(hc.SMALL_NETS))
def test_v73_files_give_the_same_model_as_v5(tmp_path, name):
    """uint8 fields, unnamed layers, full mean images, imageMean, bnorm, lrn ... through HDF5."""
    mat5, size = hc.write_small_net(tmp_path / "net5.mat", name, seed=4)
    mat73, _ = hc.write_small_net(tmp_path / "net73.mat", name, seed=4, fmt="v7.3")
    assert h5py.is_hdf5(mat73) and not h5py.is_hdf5(mat5)
    model5, info5 = convert(mat5, tmp_path / "out5")
    model73, info73 = convert(mat73, tmp_path / "out73")
    assert_same_model(model5, info5, model73, info73, hc.random_image(size, seed=2))


def twin_net(rng, *, legacy, uint8, bias_row, drop_singletons):
    return [
        hc.conv("c1", (3, 3, 3, 4), rng, pad=1, stride=1, legacy=legacy, uint8=uint8, bias_row=bias_row),
        hc.relu("r1"),
        hc.pool("p1", "max", [2, 2], stride=2, pad=0, uint8=uint8),
        hc.conv("c2", (3, 3, 4, 1), rng, pad=[1, 1, 1, 1], legacy=legacy, uint8=uint8,
                bias_row=bias_row, drop_singletons=drop_singletons),
        hc.conv("fc", (4, 4, 1, 1), rng, legacy=legacy, uint8=uint8, drop_singletons=drop_singletons),
    ]


def test_legacy_filters_uint8_fields_and_dropped_dimensions_give_the_same_model(tmp_path):
    paths = {}
    for variant, flags in {
        "canonical": dict(legacy=False, uint8=False, bias_row=False, drop_singletons=False),
        "matlab": dict(legacy=True, uint8=True, bias_row=True, drop_singletons=True),
    }.items():
        content = hc.net_content(twin_net(np.random.default_rng(5), **flags), image_size=[8, 8, 3])
        paths[variant] = synthetic.save_mat(tmp_path / f"{variant}.mat", content)
    raw = matconvnet.read_net(paths["matlab"])
    assert raw.layers[4].weights[0].shape == (4, 4, 1, 1)  # padded back from MATLAB's 4x4
    a = convert(paths["canonical"], tmp_path / "a")
    b = convert(paths["matlab"], tmp_path / "b")
    assert_same_model(*a, *b, hc.random_image((8, 8), seed=3))


def test_opaque_matlab_objects_are_skipped(tmp_path):
    """Real v7.3 files may hold a gpuArray (under #subsystem#) in a loss layer's field."""
    mat, size = hc.write_small_net(tmp_path / "net.mat", "pool_norm", fmt="v7.3")
    plain, _ = hc.write_small_net(tmp_path / "plain.mat", "pool_norm", fmt="v7.3")
    with h5py.File(mat, "a") as f:
        subsystem = f.create_group("#subsystem#")
        subsystem.create_dataset("MCOS", data=np.zeros((1, 8), np.uint8))
        loss_ref = f["layers"][()].ravel()[-1]
        loss = f[loss_ref]
        opaque = loss.create_dataset("class", data=np.array([[3707764736], [2], [1], [1], [1], [1]], np.uint32))
        opaque.attrs["MATLAB_class"] = np.bytes_("gpuArray")
        opaque.attrs["MATLAB_object_decode"] = np.int32(3)
        fields = list(loss.attrs["MATLAB_fields"]) + [np.array([b"c", b"l", b"a", b"s", b"s"], dtype="S1")]
        loss.attrs["MATLAB_fields"] = np.array(fields, dtype=h5py.vlen_dtype(np.dtype("S1")))
    with h5py.File(mat, "r") as f:  # the reader sees an opaque object, and does not choke on it
        loss = f[f["layers"][()].ravel()[-1]]
        assert isinstance(matconvnet._from_h5(f, loss["class"]), matconvnet.Opaque)
    net = matconvnet.read_net(mat)
    assert net.layers[-1].type == "softmax"
    assert_same_model(*convert(plain, tmp_path / "a"), *convert(mat, tmp_path / "b"),
                      hc.random_image(size, seed=6))


def test_dagnn_files_are_refused_clearly(tmp_path):
    block = {"type": "dagnn.Conv", "name": "conv1", "inputs": hc.cell("x0"), "outputs": hc.cell("x1"),
             "params": hc.cell("conv1f", "conv1b"), "block": {"size": np.array([[3, 3, 3, 8.0]])}}
    content = {"net": {"vars": {"name": "x0"}, "params": {"name": "conv1f"},
                       "layers": hc.cell(block), "meta": {}}}
    mat = synthetic.save_mat(tmp_path / "dag.mat", content)
    with pytest.raises(ModelFileError, match="DagNN format is not supported") as err:
        matconvnet.read_net(mat)
    assert str(mat) in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- sizes and means
def _tiny(rng, **content):
    layers = [hc.conv("c1", (3, 3, 3, 2), rng), hc.relu("r1")]
    return hc.net_content(layers, **content)


def test_input_size_comes_from_image_size_then_input_size_then_the_config(tmp_path):
    rng = np.random.default_rng(0)
    both = synthetic.save_mat(tmp_path / "both.mat", _tiny(rng, layout="matconvnet",
                                                           image_size=[9, 7, 3], input_size=[5, 5, 3]))
    assert conversion.convert(both, tmp_path / "o1", input_size=[20, 20])["input_size"] == [9, 7]
    meta = synthetic.save_mat(tmp_path / "meta.mat", _tiny(rng, layout="oxford-meta", input_size=[6, 8, 3]))
    assert conversion.convert(meta, tmp_path / "o2", input_size=[20, 20])["input_size"] == [6, 8]
    none = synthetic.save_mat(tmp_path / "none.mat", _tiny(rng, layout="legacy"))
    info = conversion.convert(none, tmp_path / "o3", input_size=[12, 10])
    assert info["input_size"] == [12, 10]
    assert keras.saving.load_model(tmp_path / "o3" / "base.keras").input_shape == (None, 12, 10, 3)
    with pytest.raises(ModelFileError, match="model.input_size"):
        conversion.convert(none, tmp_path / "o4")
    assert not (tmp_path / "o4").exists()


def test_uint8_image_size_does_not_overflow(tmp_path):
    content = _tiny(np.random.default_rng(0), image_size=[200, 100, 3])
    content["net"]["normalization"]["imageSize"] = np.array([[200, 100, 3]], np.uint8)
    content["net"]["normalization"]["border"] = np.array([[100, 100]], np.uint8)
    mat = synthetic.save_mat(tmp_path / "u8.mat", content)
    assert conversion.convert(mat, tmp_path / "out")["input_size"] == [200, 100]


@pytest.mark.parametrize("average,expected", [
    (np.array([[[10.0, 20.0, 30.0]]]), [10.0, 20.0, 30.0]),
    (np.array([[10.0], [20.0], [30.0]]), [10.0, 20.0, 30.0]),
    (np.array([[42.0]]), [42.0, 42.0, 42.0]),
])
def test_per_channel_and_scalar_average_images(tmp_path, average, expected):
    mat = synthetic.save_mat(tmp_path / "m.mat", _tiny(np.random.default_rng(0), image_size=[5, 5, 3],
                                                       average_image=average))
    model, info = convert(mat, tmp_path / "out")
    assert info["average_image"] == expected
    image = hc.random_image((5, 5), seed=1)
    mean_out = np.asarray(hc.layer_outputs(model, ["subtract_mean"], image)[0])
    np.testing.assert_array_equal(mean_out, image - np.float32(expected))


def test_full_average_image_must_have_the_input_size(tmp_path):
    rng = np.random.default_rng(0)
    good = synthetic.save_mat(tmp_path / "good.mat", _tiny(rng, image_size=[5, 4, 3],
                                                           average_image=rng.uniform(0, 255, (5, 4, 3))))
    model, info = convert(good, tmp_path / "out")
    assert info["average_image"] == "full"
    bad = synthetic.save_mat(tmp_path / "bad.mat", _tiny(rng, image_size=[5, 4, 3],
                                                         average_image=rng.uniform(0, 255, (6, 4, 3))))
    with pytest.raises(ModelFileError, match=r"averageImage of shape \[6, 4, 3\].*5x4"):
        conversion.convert(bad, tmp_path / "out2")


def test_no_average_image_means_no_subtraction(tmp_path):
    mat = synthetic.save_mat(tmp_path / "m.mat", _tiny(np.random.default_rng(0), image_size=[5, 5, 3]))
    model, info = convert(mat, tmp_path / "out")
    assert info["average_image"] is None and info["layers"][0] == "c1"


# --------------------------------------------------------------------------- names
def _named(names):
    layers = [matconvnet.Layer(i, n, "relu", "relu") for i, n in enumerate(names)]
    return matconvnet.Net(path=None, mat_format="v5", layout="oxford", layers=layers, dropped=[],
                          classes=None, average_image=None, image_size=None, input_channels=3,
                          interpolation=None)


def test_renaming_is_deterministic_and_documented():
    from vggface_gender.keras_model import keras_layer_names

    names, renamed = keras_layer_names(_named(["a", "a", "a_2", "x/y", "x_y", "a", "p/q/r"]))
    assert names == ["a", "a_3", "a_2", "x_y_2", "x_y", "a_4", "p_q_r"]
    assert renamed == {"a#2": "a_3", "x/y": "x_y_2", "a#3": "a_4", "p/q/r": "p_q_r"}
    assert keras_layer_names(_named(["conv1", "relu1"])) == (["conv1", "relu1"], {})


# --------------------------------------------------------------------------- base.json, base.keras
def test_base_json_describes_the_model_and_its_source(tmp_path, canonical):
    mat = synthetic.write_vggface_mat(tmp_path / "vgg_face.mat", width=1 / 16, n_classes=12, seed=11)
    info = conversion.convert(mat, tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "base.json").read_text())
    assert on_disk == info
    for key in ("format", "classes", "input_size", "average_image", "interpolation", "layers",
                "renamed", "dropped", "source", "keras_version"):
        assert key in info, key
    assert info["format"] == 1 and info["keras_version"] == keras.__version__
    assert info["source"] == {"path": str(mat.resolve()), "size_bytes": mat.stat().st_size,
                              "sha256": hashlib.sha256(mat.read_bytes()).hexdigest()}
    assert info["classes"] == synthetic.class_names(12) and info["interpolation"] == "bilinear"
    assert info["average_image"] == pytest.approx(list(synthetic.VGGFACE_AVERAGE_IMAGE), abs=1e-4)
    assert info["dropped"] == ["dropout6", "dropout7"]
    assert info["output_shapes"]["relu7"] == [256] and info["output_shapes"]["pool5"] == [7, 7, 32]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "base.json", "base.keras", "model_conversion.commit.json"]


def _load_in_fresh_python(builtin_model, custom_model, folder):
    """Load a built-in-only model with plain Keras, then one with custom layers after importing
    them (both in safe mode, the default); save each one's output for ``folder/image.npy``."""
    code = ("import keras, numpy as np\n"
            f"image = np.load({str(folder / 'image.npy')!r})\n"
            f"m = keras.saving.load_model({str(builtin_model)!r})\n"
            "print('LAYERS', ','.join(l.name for l in m.layers))\n"
            f"np.save({str(folder / 'builtin_out.npy')!r}, np.asarray(m(image[None, :m.input_shape[1], :m.input_shape[2]])))\n"
            "import vggface_gender.layers\n"
            f"m = keras.saving.load_model({str(custom_model)!r})\n"
            "print('LAYERS', ','.join(l.name for l in m.layers))\n"
            f"np.save({str(folder / 'custom_out.npy')!r}, np.asarray(m(image[None, :m.input_shape[1], :m.input_shape[2]])))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=120)


def test_saved_models_load_in_safe_mode_in_a_fresh_process_and_compute_the_same(tmp_path):
    from vggface_gender import keras_model

    vgg = synthetic.write_vggface_mat(tmp_path / "vgg.mat", width=1 / 16, n_classes=12)
    conversion.convert(vgg, tmp_path / "vgg")
    custom, size = hc.write_small_net(tmp_path / "custom.mat", "pool_norm")
    conversion.convert(custom, tmp_path / "custom")
    np.save(tmp_path / "image.npy", hc.random_image((224, 224), seed=3))
    done = _load_in_fresh_python(tmp_path / "vgg" / "base.keras", tmp_path / "custom" / "base.keras", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    vgg_line, custom_line = [line for line in done.stdout.splitlines() if line.startswith("LAYERS")]
    assert vgg_line.endswith("fc7,relu7,fc8,softmax")
    assert "pool1" in custom_line and "norm2" in custom_line
    # The saved files compute exactly what the models built in memory compute.
    image = np.load(tmp_path / "image.npy")
    for mat, input_size, name in ((vgg, (224, 224), "builtin"), (custom, size, "custom")):
        model, _ = keras_model.build_model(matconvnet.read_net(mat), input_size)
        x = image[: input_size[0], : input_size[1]][None]
        expected = np.asarray(model(x))
        assert np.array_equal(np.load(tmp_path / f"{name}_out.npy"), expected), name


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_layers_as_a_struct_array(tmp_path, fmt):
    """Some files hold ``layers`` as a 1xN struct array (all layers with the same fields)."""
    rng = np.random.default_rng(0)
    layers = np.zeros((1, 3), dtype=[("type", object), ("name", object), ("weights", object),
                                     ("pad", object)])
    layers[0, 0] = ("conv", "c1", hc.cell(rng.standard_normal((3, 3, 3, 4)).astype(np.float32),
                                          np.zeros((4, 1), np.float32)), np.array([[1.0]]))
    layers[0, 1] = ("relu", "r1", np.zeros((0, 0)), np.zeros((0, 0)))
    layers[0, 2] = ("conv", "c2", hc.cell(rng.standard_normal((3, 3, 4, 2)).astype(np.float32),
                                          np.zeros((2, 1), np.float32)), np.array([[0.0]]))
    mat = synthetic.save_mat(tmp_path / "sa.mat", {"layers": layers,
                                                   "meta": {"inputSize": np.array([[8.0, 8, 3]])}}, fmt=fmt)
    net = matconvnet.read_net(mat)
    assert [(layer.name, layer.type) for layer in net.layers] == [("c1", "conv"), ("r1", "relu"), ("c2", "conv")]
    assert net.layers[0].params["pad"] == (1, 1, 1, 1) and net.layers[2].weights[0].shape == (3, 3, 4, 2)
    assert net.image_size == (8, 8)
