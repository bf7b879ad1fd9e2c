"""Fidelity: converted Keras models against the independent numpy reference (MatConvNet semantics).

Error = max|keras - reference| / max|reference| per compared layer: <= 1e-5 for small random
networks covering every layer type and parameter form, <= 1e-4 at fc7/relu7/softmax for a
full-size VGG-Face-structured file. Negative controls show the check catches BGR input, kernels
with H and W swapped, and fc6 flattened in Fortran order.
"""

import shutil

import keras
import numpy as np
import pytest

import helpers_conversion as hc
import reference_forward
from conftest import ROOT
from vggface_gender import conversion, synthetic


SMALL_TOL = 1e-5
VGG_TOL = 1e-4
# Copies of ../shared/data/matconvnet (BSD-2-Clause, licence alongside), so CI runs them too.
MATLAB_FILES = sorted((ROOT / "tests" / "data" / "matconvnet").glob("*.mat"))


# --------------------------------------------------------------------------- small networks
SMALL_NETS = hc.SMALL_NETS
write_small_net = hc.write_small_net


def convert_and_load(mat_path, out_dir, input_size=None):
    info = conversion.convert(mat_path, out_dir, input_size)
    model = keras.saving.load_model(out_dir / "base.keras")
    return model, info


@pytest.mark.parametrize("name", sorted(SMALL_NETS))
def test_small_networks_match_reference(tmp_path, name):
    mat, size = write_small_net(tmp_path / f"{name}.mat", name)
    model, info = convert_and_load(mat, tmp_path / "out")
    errors = hc.compare(mat, model, info, hc.random_image(size, seed=1))
    n_reference = len(reference_forward.forward(mat, hc.random_image(size, seed=1)))
    assert len(errors) == n_reference - len(info["dropped"]), "every kept layer is compared"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= SMALL_TOL, f"{worst}: {errors[worst]:.2e} ({errors})"


def test_small_networks_use_the_expected_keras_layers(tmp_path):
    mat, _ = write_small_net(tmp_path / "conv.mat", "conv_forms")
    model, info = convert_and_load(mat, tmp_path / "out")
    kinds = {layer.name: type(layer).__name__ for layer in model.layers}
    assert kinds["conv_1"] == "Conv2D" and model.get_layer("conv_1").padding == "same"
    assert info["renamed"] == {"conv/1": "conv_1"}
    assert kinds["asym_pad"] == "ZeroPadding2D"
    assert kinds["dilated_strided_dilated"] == "Conv2D" and kinds["dilated_strided"] == "MaxPooling2D"
    assert model.get_layer("grouped").groups == 2 and not model.get_layer("grouped").use_bias
    assert kinds["leaky"] == "ReLU" and model.get_layer("leaky").negative_slope == pytest.approx(0.1)
    assert kinds["objective"] == "Softmax"  # the trailing loss layer is a softmax at inference

    mat, _ = write_small_net(tmp_path / "pool.mat", "pool_norm")
    model, info = convert_and_load(mat, tmp_path / "out2")
    kinds = {layer.name: type(layer).__name__ for layer in model.layers}
    assert kinds["pool1"] == kinds["pool2"] == "MatConvNetPooling2D"
    assert kinds["pool3"] == "AveragePooling2D" and kinds["layer11"] == "MaxPooling2D"
    assert kinds["layer3"] == "ReLU"  # unnamed: MatConvNet's layer<i> (1-based)
    assert kinds["relu"] == kinds["relu_2"] == "ReLU" and info["renamed"] == {"relu#2": "relu_2"}
    assert kinds["norm1"] == kinds["norm2"] == "LocalResponseNormalization"
    assert kinds["bn1"] == "BatchNormalization" and model.get_layer("bn1").epsilon == 0
    assert kinds["fc1_flatten"] == "Flatten" and kinds["fc1"] == kinds["fc2"] == "Dense"
    assert "drop" not in kinds and info["dropped"] == ["drop"]
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    assert info["average_image"] == "full" and kinds["subtract_mean"] == "Normalization"

    mat, _ = write_small_net(tmp_path / "flat.mat", "flat_tail")
    model, info = convert_and_load(mat, tmp_path / "out3")
    assert info["dropped"] == ["objective"] and info["layers"][-1] == "prob"
    assert info["average_image"] == [117.0, 117.0, 117.0]
    assert type(model.get_layer("spatial_reshape")).__name__ == "Reshape"


def test_bnorm_reads_sigma_not_variance(tmp_path):
    """Reading moments' second column as a variance (or adding Keras' default epsilon) must
    show in the error: the test would catch it."""
    mat, size = write_small_net(tmp_path / "pool.mat", "pool_norm")
    model, info = convert_and_load(mat, tmp_path / "out")
    image = hc.random_image(size, seed=2)
    bn = model.get_layer("bn1")
    gamma, beta, mean, variance = bn.get_weights()
    bn.set_weights([gamma, beta, mean, np.sqrt(variance)])  # sigma used as a variance
    errors = hc.compare(mat, model, info, image, layers=["bn1"])
    assert errors["bn1"] > 1e-2


# --------------------------------------------------------------------------- real MATLAB files
@pytest.mark.parametrize("mat_path", MATLAB_FILES, ids=[p.stem for p in MATLAB_FILES])
def test_matlab_written_files_match_reference(tmp_path, mat_path):
    local = tmp_path / mat_path.name
    shutil.copyfile(mat_path, local)
    before = local.read_bytes()
    model, info = convert_and_load(local, tmp_path / "out")
    assert info["input_size"] == [32, 14] and info["classes"] is None
    assert info["average_image"] is None
    errors = hc.compare(local, model, info, hc.random_image((32, 14), seed=3))
    assert len(errors) >= 7
    assert max(errors.values()) <= SMALL_TOL, errors
    assert type(model.layers[-1]).__name__ == "Softmax"  # softmaxloss at inference
    assert local.read_bytes() == before


def test_the_matlab_files_are_present():
    assert len(MATLAB_FILES) == 2 and (MATLAB_FILES[0].parent / "LICENSE-player_detection.txt").is_file()


# --------------------------------------------------------------------------- VGG-Face structure
def _perturbed_errors(mat, model, info, image, reference_layers=("fc7", "relu7", "softmax")):
    return hc.compare(mat, model, info, image, layers=list(reference_layers))


@pytest.fixture(scope="module")
def narrow_vgg(tmp_path_factory):
    """VGG-Face's 39 layers at 1/8 width, 224x224 input (fc6 is still a 7x7 kernel)."""
    folder = tmp_path_factory.mktemp("narrow_vgg")
    mat = synthetic.write_vggface_mat(folder / "vgg.mat", width=1 / 8, n_classes=32, seed=3,
                                      fc8_scale=0.02)
    model, info = convert_and_load(mat, folder / "out")
    return mat, model, info


def test_narrow_vgg_matches_reference_at_every_layer(narrow_vgg):
    mat, model, info = narrow_vgg
    errors = hc.compare(mat, model, info, hc.random_image((224, 224), seed=4))
    assert len(errors) == 37  # 39 layers minus two dropouts
    assert max(errors.values()) <= SMALL_TOL, errors


def test_negative_controls_fail_the_check(narrow_vgg):
    """Each classic conversion bug makes the fidelity check fail."""
    mat, model, info = narrow_vgg
    image = hc.random_image((224, 224), seed=5)
    assert max(_perturbed_errors(mat, model, info, image).values()) <= SMALL_TOL

    # 1. BGR input (Caffe's VGG-Face convention, not this file's).
    reference = {name: out for name, _, out in reference_forward.forward(mat, image.astype(np.float64))}
    bgr_outputs = hc.layer_outputs(model, ["fc7", "softmax"], image[..., ::-1])
    assert hc.relative_error(bgr_outputs[0], reference["fc7"]) > 10 * VGG_TOL

    # 2. Kernels with H and W swapped (a MATLAB-to-TF transpose bug).
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    saved = [layer.get_weights() for layer in convs]
    try:
        for layer, (kernel, bias) in zip(convs, saved):
            layer.set_weights([kernel.transpose(1, 0, 2, 3), bias])
        assert _perturbed_errors(mat, model, info, image)["fc7"] > 10 * VGG_TOL
    finally:
        for layer, weights in zip(convs, saved):
            layer.set_weights(weights)

    # 3. fc6 flattened in Fortran order instead of C order (h, w, c).
    fc6 = model.get_layer("fc6")
    kernel, bias = fc6.get_weights()
    hwio = kernel.reshape(7, 7, -1, kernel.shape[1])
    try:
        fc6.set_weights([hwio.reshape(-1, kernel.shape[1], order="F"), bias])
        assert _perturbed_errors(mat, model, info, image)["fc7"] > 10 * VGG_TOL
    finally:
        fc6.set_weights([kernel, bias])
    assert max(_perturbed_errors(mat, model, info, image).values()) <= SMALL_TOL


@pytest.fixture(scope="module")
def full_vgg(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full_vgg")
    mat = synthetic.write_vggface_mat(folder / "vgg_face.mat", width=1.0, seed=7, fc8_scale=0.02)
    model, info = convert_and_load(mat, folder / "out")
    return mat, model, info


@pytest.mark.slow
def test_full_vgg_face_structure_matches_reference(full_vgg):
    mat, model, info = full_vgg
    # subtract_mean + 39 MatConvNet layers - 2 dropouts + fc6_flatten
    assert len(info["layers"]) == 39 and info["layers"][0] == "subtract_mean"
    assert info["layers"][-1] == "softmax" and "fc6_flatten" in info["layers"]
    assert model.count_params() == 145_002_878
    assert info["classes"][0] == "A.J._Buckley" and len(info["classes"]) == 2622
    assert info["output_shapes"]["relu7"] == [4096]
    image = hc.random_image((224, 224), seed=8)
    errors = _perturbed_errors(mat, model, info, image)
    assert errors["fc7"] <= VGG_TOL and errors["relu7"] <= VGG_TOL and errors["softmax"] <= VGG_TOL, errors
    probabilities = hc.layer_outputs(model, ["softmax"], image)[0]
    # The softmax must not be saturated, or comparing it would prove little.
    assert 0.001 < probabilities.max() < 0.99
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)
