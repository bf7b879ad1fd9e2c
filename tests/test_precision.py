"""model.precision: the choice per hardware (mocked each way), the fallback lines, the reduced-
precision model (same layers, float32 ends, the original untouched), its error on VGG-Face's
structure, and accuracy/AUC on real faces with a really-trained network."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from conftest import FACES, SHARED
from vggface_gender import precision
from vggface_gender.precision import GPU, Hardware, resolve_precision

AMX = frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})
AVX512_BF16 = frozenset({"avx512f", "avx512_bf16"})
PLAIN = frozenset({"avx2", "fma"})
DEV_BASE = SHARED / "data" / "models" / "dev_face_base.mat"

# relu7 relative L2 difference (||reduced - float32|| / ||float32|| over a batch) allowed on
# VGG-Face's structure. bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per
# value); through 15 layers the errors add up to 0.7% here and 0.9% on the full-size network
# (issue). float16 (11 bits) gives 0.09%. The He-scaled random weights keep every layer's
# activations at the same scale (about half of relu7 positive), so relative error behaves as with
# trained weights; smooth images (not pixel noise) keep the conv inputs image-like.
TOLERANCE = {"bfloat16": 0.02, "float16": 0.02}


# --------------------------------------------------------------------------- the choice
@pytest.mark.parametrize("hardware, expected, says", [
    (Hardware(AMX, onednn=True), "bfloat16", "AMX"),
    (Hardware(AVX512_BF16, onednn=True), "float32", "no AMX"),
    (Hardware(PLAIN, onednn=True), "float32", "no AMX"),
    (Hardware(AMX, onednn=False), "float32", "oneDNN off"),
    (Hardware(AMX, onednn=True, gpus=(GPU("Tesla T4", (7, 5)),)), "float16", "tensor cores"),
    (Hardware(PLAIN, onednn=True, gpus=(GPU("NVIDIA A100", (8, 0)),)), "float16", "tensor cores"),
    (Hardware(AMX, onednn=True, gpus=(GPU("Tesla K80", (3, 7)),)), "float32", "no tensor cores"),
    (Hardware(PLAIN, onednn=True, gpus=(GPU("Tesla P100", (6, 0)),)), "float32", "no tensor cores"),
    (Hardware(PLAIN, onednn=True, gpus=(GPU("some GPU", None),)), "float32", "unknown"),
])
def test_auto_resolves_by_hardware(hardware, expected, says):
    resolved = resolve_precision("auto", hardware=hardware)
    assert resolved.name == expected
    assert resolved.requested == "auto" and not resolved.fell_back
    assert says in resolved.reason and resolved.reason.startswith(f"auto: {expected}")


@pytest.mark.parametrize("requested, hardware, expected, line", [
    ("bfloat16", Hardware(AMX, onednn=True), "bfloat16", None),
    ("bfloat16", Hardware(AVX512_BF16, onednn=True), "float32",
     "bfloat16 is slow on this CPU (no AMX) (avx512_bf16 alone measured 0.6x float32): using float32"),
    ("bfloat16", Hardware(PLAIN, onednn=True), "float32", "bfloat16 is slow on this CPU (no AMX): using float32"),
    ("bfloat16", Hardware(AMX, onednn=False), "float32",
     "bfloat16 is slow with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0), AMX unused: using float32"),
    ("bfloat16", Hardware(PLAIN, gpus=(GPU("NVIDIA A100", (8, 0)),)), "bfloat16", None),
    ("bfloat16", Hardware(AMX, onednn=True, gpus=(GPU("Tesla T4", (7, 5)),)), "float32",
     "bfloat16 is slow or unsupported on Tesla T4 (compute capability 7.5, needs 8.0): using float32"),
    ("float16", Hardware(AMX, onednn=True), "float32",
     "float16 is slow on this CPU (no GPU with tensor cores): using float32"),
    ("float16", Hardware(PLAIN, gpus=(GPU("Tesla T4", (7, 5)),)), "float16", None),
    ("float16", Hardware(PLAIN, gpus=(GPU("Tesla P100", (6, 0)),)), "float32",
     "float16 is slow on Tesla P100 (compute capability 6.0, no tensor cores below 7.0): using float32"),
    ("float32", Hardware(AMX, onednn=True, gpus=(GPU("NVIDIA A100", (8, 0)),)), "float32", None),
])
def test_requested_precision_is_kept_or_falls_back_with_a_line(requested, hardware, expected, line):
    resolved = resolve_precision(requested, hardware=hardware)
    assert resolved.name == expected
    assert resolved.fell_back == (line is not None)
    if line is not None:
        assert resolved.reason == line
    assert resolved.to_dict() == {"precision": expected, "requested": requested, "reason": resolved.reason}


@pytest.mark.parametrize("requested, hardware, expected, says", [
    ("bfloat16", Hardware(AVX512_BF16, onednn=True), "bfloat16", "slow on this CPU (no AMX)"),
    ("float16", Hardware(AMX, onednn=True), "float16", "slow on this CPU"),
    ("float16", Hardware(PLAIN, gpus=(GPU("Tesla P100", (6, 0)),)), "float16", "slow on Tesla P100"),
    ("bfloat16", Hardware(PLAIN, gpus=(GPU("Tesla T4", (7, 5)),)), "float32", "using float32"),
    ("bfloat16", Hardware(AMX, onednn=True), "bfloat16", "AMX"),
])
def test_keep_slow_keeps_the_trained_precision_where_it_runs(requested, hardware, expected, says):
    """Prediction with a head trained on reduced-precision features keeps that precision where
    it only runs slowly; a precision that cannot run here still falls back to float32."""
    resolved = resolve_precision(requested, hardware=hardware, keep_slow=True)
    assert resolved.name == expected and says in resolved.reason
    if expected == requested and "slow" in says:
        assert resolved.reason.endswith("kept, to match the features the head was trained on")


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        resolve_precision("int8", hardware=Hardware())


def test_detect_hardware_reads_this_machine(monkeypatch):
    hw = precision.detect_hardware()
    assert isinstance(hw.cpu_flags, frozenset) and isinstance(hw.gpus, tuple)
    assert "oneDNN" in hw.describe() and "amx_bf16=" in hw.describe()
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert precision.onednn_enabled() is False
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "False")
    assert precision.onednn_enabled() is False


def test_config_key(tmp_path):
    from vggface_gender.config import load_config
    from vggface_gender.errors import ConfigError

    assert load_config(None, cwd=tmp_path).model.precision == "auto"
    assert load_config(None, [("model.precision", "bfloat16")], cwd=tmp_path).model.precision == "bfloat16"
    with pytest.raises(ConfigError, match=r"model.precision: expected one of auto, float32, bfloat16, float16"):
        load_config(None, [("model.precision", "half")], cwd=tmp_path)


# --------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def vgg_base(tmp_path_factory):
    """VGG-Face's 39-layer structure at 1/8 width, 224x224, converted as stage 2 does."""
    from vggface_gender import synthetic
    from vggface_gender.conversion import convert

    folder = tmp_path_factory.mktemp("vgg")
    synthetic.write_vggface_mat(folder / "vgg.mat", width=1 / 8, n_classes=16, input_size=224)
    convert(folder / "vgg.mat", folder / "model")
    return folder / "model" / "base.keras"


def _load(path):
    import keras

    import vggface_gender.layers  # noqa: F401

    return keras.saving.load_model(path)


def _smooth_images(n, size=224, seed=0):
    """Image-like inputs in 0-255: coarse random blocks (16x16 pixels) plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, size // 16, size // 16, 3)).astype(np.float32)
    images = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)
    return np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.float32)


def _relative_l2(value, reference):
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_relu7_within_tolerance_on_the_vggface_structure(vgg_base, name):
    import keras

    before = hashlib.sha256(vgg_base.read_bytes()).hexdigest()
    base = _load(vgg_base)
    cut = keras.Model(base.inputs, base.get_layer("relu7").output)
    images = _smooth_images(6)
    reference = cut.predict_on_batch(images)
    assert (reference > 0).mean() > 0.3  # informative features, not a dead network

    reduced = precision.with_precision(cut, name)
    values = reduced.predict_on_batch(images)
    assert values.dtype == np.float32
    error = _relative_l2(values, reference)
    print(f"{name}: relu7 relative L2 {error:.5f}")
    assert 0 < error < TOLERANCE[name]  # > 0: the reduced precision really ran
    # The original is untouched: still float32, same outputs; base.keras unchanged on disk.
    assert {layer.dtype_policy.name for layer in cut.layers} == {"float32"}
    np.testing.assert_array_equal(cut.predict_on_batch(images), reference)
    assert hashlib.sha256(vgg_base.read_bytes()).hexdigest() == before


def test_reduced_model_layout(vgg_base):
    """Mean subtraction and what follows the last conv/dense stay float32, the conv/dense layers
    compute in bfloat16 with float32 variables, a head after ``upto`` stays float32."""
    import keras

    base = _load(vgg_base)
    cut = keras.Model(base.inputs, base.get_layer("relu7").output)
    reduced = precision.with_precision(cut, "bfloat16")
    policies = {layer.name: layer.dtype_policy.name for layer in reduced.layers}
    assert policies["subtract_mean"] == "float32" and policies["relu7"] == "float32"
    assert policies["conv1_1"] == policies["pool5"] == policies["fc7"] == "mixed_bfloat16"
    assert all(v.dtype == "float32" for v in reduced.weights)
    assert [layer.name for layer in reduced.layers] == [layer.name for layer in cut.layers]
    assert reduced.get_layer("subtract_mean") is cut.get_layer("subtract_mean")  # shared, float32
    np.testing.assert_array_equal(reduced.get_layer("fc7").get_weights()[0], cut.get_layer("fc7").get_weights()[0])
    assert precision.with_precision(cut, "float32") is cut

    # The frozen model extraction runs (features.frozen_model: layers shared with the base).
    from vggface_gender import features

    frozen = features.frozen_model(features.cut_base(base, "relu7"))
    reduced_frozen = precision.with_precision(frozen, "bfloat16")
    assert reduced_frozen.output.dtype == "float32"
    assert not any(layer.trainable for layer in reduced_frozen.layers[1:])
    assert {layer.dtype_policy.name for layer in frozen.layers} == {"float32"}

    # Output straight from a dense layer: a float32 cast is appended.
    to_fc7 = precision.with_precision(keras.Model(base.inputs, base.get_layer("fc7").output), "float16")
    assert to_fc7.layers[-1].name == "fc7_float32" and to_fc7.output.dtype == "float32"

    # A classifier (base + head): only the base up to the embedding layer is reduced.
    hidden = keras.layers.Dense(8, activation="relu", name="head_dense")(cut.output)
    probs = keras.layers.Dense(2, activation="softmax", name="head_out")(hidden)
    classifier = keras.Model(cut.inputs, probs)
    reduced = precision.with_precision(classifier, "bfloat16", upto="relu7")
    assert reduced.get_layer("head_dense").dtype_policy.name == "float32"
    assert reduced.get_layer("fc6").dtype_policy.name == "mixed_bfloat16"
    images = _smooth_images(2)
    out = reduced.predict_on_batch(images)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------- real faces
@pytest.mark.real_faces
def test_bfloat16_features_give_the_same_accuracy_on_real_faces(tmp_path):
    """dev_face_base (a small network really trained on these faces, for age x race), relu7 in
    float32 and bfloat16 for 1000 + 1000 faces; logistic regression on 1500, held-out 500: the
    bfloat16 accuracy within 1 point and AUC within 0.005 of float32."""
    if not (DEV_BASE.exists() and (FACES / "male").is_dir() and (FACES / "female").is_dir()):
        pytest.skip("../shared/data/models/dev_face_base.mat or ../shared/data/faces absent")
    import keras
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from vggface_gender.conversion import convert
    from vggface_gender.images import ImagePolicy, find_images, load_image

    info = convert(DEV_BASE, tmp_path / "model")
    base = _load(tmp_path / "model" / "base.keras")
    cut = keras.Model(base.inputs, base.get_layer("relu7").output)
    policy = ImagePolicy(tuple(info["input_size"]), "stretch", info.get("interpolation") or "bilinear")

    rng = np.random.default_rng(0)
    paths, labels = [], []
    for label, name in enumerate(("female", "male")):
        found = sorted(find_images(FACES / name))
        for i in rng.choice(len(found), 1000, replace=False):
            paths.append(found[i])
            labels.append(label)
    labels = np.asarray(labels)
    images = np.stack([load_image(p, policy) for p in paths]).astype(np.float32)

    def features(model):
        return np.concatenate([model.predict_on_batch(images[i:i + 250]) for i in range(0, len(images), 250)])

    f32 = features(cut)
    bf16 = features(precision.with_precision(cut, "bfloat16"))
    error = _relative_l2(bf16, f32)
    order = rng.permutation(len(labels))
    train, test = order[:1500], order[1500:]

    def score(feats):
        scaler = StandardScaler().fit(feats[train])
        head = LogisticRegression(max_iter=2000, C=0.1).fit(scaler.transform(feats[train]), labels[train])
        p = head.predict_proba(scaler.transform(feats[test]))[:, 1]
        return float(((p > 0.5) == labels[test]).mean()), float(roc_auc_score(labels[test], p))

    (acc32, auc32), (acc16, auc16) = score(f32), score(bf16)
    print(f"relu7 relative L2 {error:.5f}; float32 accuracy {acc32:.4f} AUC {auc32:.4f}; "
          f"bfloat16 accuracy {acc16:.4f} AUC {auc16:.4f}")
    assert acc32 > 0.65 and auc32 > 0.7  # the features carry gender: a meaningful comparison
    assert abs(acc16 - acc32) <= 0.01
    assert abs(auc16 - auc32) <= 0.005
