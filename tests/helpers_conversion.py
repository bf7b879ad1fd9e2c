"""Test helpers for the conversion stage: run a converted model layer by layer and compare it
with the independent reference (tests/reference_forward.py)."""

from __future__ import annotations

import numpy as np

import reference_forward
from vggface_gender import synthetic


def relative_error(actual, expected) -> float:
    """max|actual - expected| / max|expected| (the issue's per-layer error)."""
    actual = np.asarray(actual, np.float64).ravel()
    expected = np.asarray(expected, np.float64).ravel()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.max(np.abs(expected))
    return float(np.max(np.abs(actual - expected)) / (scale if scale > 0 else 1.0))


def keras_name_map(reference_names, info) -> dict:
    """Reference (file) layer name and occurrence -> Keras layer name, from base.json."""
    seen, out = {}, []
    for name in reference_names:
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}#{seen[name]}"
        out.append(info["renamed"].get(key, name))
    return out


def layer_outputs(model, names, image):
    """Outputs of the named layers of ``model`` for one image (batch axis removed)."""
    import keras

    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    outputs = probe([np.asarray(image, np.float32)[None]], training=False)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return [np.asarray(o)[0] for o in outputs]


def compare(mat_path, model, info, image, layers=None) -> dict:
    """{keras layer name: relative error} of ``model`` against the reference on ``image``.

    ``layers``: reference layer names to compare (default: every layer kept in the model).
    """
    reference = reference_forward.forward(mat_path, np.asarray(image, np.float64))
    names = keras_name_map([name for name, _, _ in reference], info)
    wanted = []
    for (ref_name, _kind, output), keras_name in zip(reference, names):
        if keras_name not in info["layers"]:
            continue  # dropped: dropout, a loss after a softmax
        if layers is not None and ref_name not in layers:
            continue
        wanted.append((keras_name, output))
    outputs = layer_outputs(model, [n for n, _ in wanted], image)
    return {name: relative_error(actual, expected) for (name, expected), actual in zip(wanted, outputs)}


def random_image(size, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, size=(size[0], size[1], channels)).astype(np.float32)


# --------------------------------------------------------------------------- small test networks
# Layer structs as MATLAB holds them (dicts become structs, object arrays cells), for
# synthetic.save_mat. Weights are He-scaled so activations stay informative.
def cell(*items):
    out = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        out[0, i] = item
    return out


def _num(values, uint8=False):
    arr = np.asarray(values, dtype=np.uint8 if uint8 else np.float64)
    return arr.reshape(1, -1)


def conv(name, shape, rng, *, stride=None, pad=None, dilate=None, bias=True, legacy=False,
         bias_row=False, uint8=False, drop_singletons=False):
    kh, kw, cin, cout = shape
    w = (rng.standard_normal(shape) * np.sqrt(2.0 / (kh * kw * cin))).astype(np.float32)
    b = (rng.standard_normal((cout, 1)) * 0.1).astype(np.float32) if bias else np.zeros((0, 0), np.float32)
    if bias and bias_row:
        b = b.reshape(1, cout)
    if drop_singletons:  # as MATLAB stores a 3x3x4x1 filter: 3x3x4
        while w.ndim > 2 and w.shape[-1] == 1:
            w = w.reshape(w.shape[:-1])
    layer = {"type": "conv"}
    if name is not None:
        layer["name"] = name
    if legacy:
        layer["filters"], layer["biases"] = w, b
    else:
        layer["weights"] = cell(w, b)
    for key, value in (("stride", stride), ("pad", pad), ("dilate", dilate)):
        if value is not None:
            layer[key] = _num(value, uint8)
    return layer


def pool(name, method, window, *, stride=None, pad=None, uint8=False):
    layer = {"type": "pool", "method": method, "pool": _num(window, uint8),
             "weights": np.empty((0, 0), dtype=object)}
    if name is not None:
        layer["name"] = name
    if stride is not None:
        layer["stride"] = _num(stride, uint8)
    if pad is not None:
        layer["pad"] = _num(pad, uint8)
    return layer


def relu(name, leak=None):
    layer = {"type": "relu", "name": "" if name is None else name}  # '' as tidied unnamed layers
    if leak is not None:
        layer["leak"] = np.float64(leak)
    return layer


def bnorm(name, channels, rng):
    mult = rng.uniform(0.5, 1.5, (channels, 1)).astype(np.float32)
    bias = rng.standard_normal((channels, 1)).astype(np.float32)
    # Small sigmas on purpose: reading sigma as a variance, or adding an epsilon, shows at once.
    moments = np.concatenate([rng.standard_normal((channels, 1)) * 10,
                              rng.uniform(1e-3, 5.0, (channels, 1))], axis=1).astype(np.float32)
    return {"type": "bnorm", "name": name, "weights": cell(mult, bias, moments),
            "epsilon": np.float64(1e-4)}


def lrn(name, depth, kappa, alpha, beta, kind="lrn"):
    return {"type": kind, "name": name, "param": _num([depth, kappa, alpha, beta])}


def simple(kind, name=None, **fields):
    layer = {"type": kind}
    if name is not None:
        layer["name"] = name
    layer.update(fields)
    return layer


def net_content(layers, *, layout="oxford", average_image=None, image_size=None, input_size=None,
                classes=None, extra_top=None):
    """MATLAB variables of a SimpleNN file in one of the published layouts.

    ``image_size`` goes to ``normalization.imageSize``, ``input_size`` to ``meta.inputSize``.
    """
    normalization = {}
    if average_image is not None:
        normalization["averageImage"] = np.asarray(average_image, np.float32)
    if image_size is not None:
        normalization["imageSize"] = _num(image_size)
    layers_cell = cell(*layers)
    meta = {}
    if normalization:
        meta["normalization"] = normalization
    if input_size is not None:
        meta["inputSize"] = _num(input_size)
    if classes is not None:
        names = np.empty((len(classes), 1), dtype=object)
        for i, c in enumerate(classes):
            names[i, 0] = c
        meta["classes"] = {"name": names.copy(), "description": names}
    if layout == "oxford":
        net = {"layers": layers_cell}
        net.update({k: v for k, v in meta.items() if k != "inputSize"})
        if "inputSize" in meta:
            net["meta"] = {"inputSize": meta["inputSize"]}
        content = {"net": net}
    elif layout == "oxford-meta":  # net.layers + net.meta (e.g. the shared MATLAB files)
        content = {"net": {"layers": layers_cell, "meta": meta}}
    elif layout == "matconvnet":
        content = {"layers": layers_cell, "meta": meta}
    elif layout == "legacy":
        content = {"layers": layers_cell}
        content.update(meta)
    else:
        raise ValueError(layout)
    content.update(extra_top or {})
    return content


# --------------------------------------------------------------------------- the small test networks
def conv_forms_net(rng):
    """Every conv form: pad of 1 and 4 elements (asymmetric), stride of 1 and 2 elements,
    dilation (also with stride 2), grouped, no bias, non-square kernel, a filter whose trailing
    singleton dimension MATLAB dropped, biases 1xC, leaky relu, a trailing loss layer."""
    return [
        conv("conv/1", (3, 3, 3, 8), rng, pad=1, stride=1),
        relu("leaky", leak=0.1),
        conv("asym", (3, 2, 8, 8), rng, pad=[0, 1, 2, 1], stride=[2, 1], bias_row=True),
        relu("relu_a"),
        conv("dilated", (3, 3, 8, 6), rng, pad=2, dilate=2),
        conv("dilated_strided", (3, 2, 6, 6), rng, pad=[1, 1, 0, 1], dilate=[2, 1], stride=2),
        conv("grouped", (3, 3, 3, 6), rng, pad=1, bias=False),  # 6 channels in: 2 groups
        relu("relu_b"),
        conv("single_filter", (3, 3, 6, 1), rng, pad=[1, 0, 0, 1], drop_singletons=True),
        conv("widen", (1, 1, 1, 5), rng),
        simple("loss", "objective"),
    ]


def pool_norm_net(rng):
    """bnorm (sigma), LRN with odd and even windows (and the old 'normalize' name), padded max
    and avg pooling with asymmetric pads, unpadded pooling, uint8 fields, unnamed layers, a
    repeated name, dropout, fc layers as Dense, a trailing softmaxloss."""
    return [
        conv("conv1", (3, 3, 3, 8), rng, pad=1),
        bnorm("bn1", 8, rng),
        relu(None),
        lrn("norm1", 5, 2.0, 1e-3, 0.75),
        pool("pool1", "max", [3, 3], stride=2, pad=[0, 1, 1, 2], uint8=True),
        lrn("norm2", 4, 1.0, 2e-3, 0.6, kind="normalize"),
        pool("pool2", "avg", [3, 2], stride=[2, 1], pad=[1, 2, 1, 0], uint8=True),
        conv("conv2", (2, 2, 8, 8), rng, uint8=True, stride=1, pad=0),
        relu("relu"),
        pool("pool3", "avg", [2, 2], stride=1, pad=0),
        pool(None, "max", [2, 1], stride=1, pad=0),
        relu("relu"),
        conv("fc1", (2, 5, 8, 16), rng),
        relu("relu_fc1"),
        simple("dropout", "drop", rate=np.float64(0.5)),
        conv("fc2", (1, 1, 16, 4), rng),
        simple("softmaxloss", "loss"),
    ]


def flat_tail_net(rng):
    """After an fc layer the tensor is 2-D: bnorm and LRN on it, an fc after it, a padded conv
    that needs the map back (Reshape), pooling, softmax, then a loss after the softmax."""
    return [
        conv("fc_a", (6, 5, 3, 16), rng),
        relu("relu_a"),
        bnorm("bn_a", 16, rng),
        lrn("lrn_a", 3, 1.0, 1e-2, 0.5),
        conv("fc_b", (1, 1, 16, 8), rng),
        conv("spatial", (1, 1, 8, 8), rng, pad=1),
        pool("pool_s", "max", [3, 3], stride=1),
        simple("softmax", "prob"),
        simple("softmaxloss", "objective"),
    ]


SMALL_NETS = {
    # name: (layers builder, input size, net_content keywords)
    "conv_forms": (conv_forms_net, (17, 15), dict(layout="oxford", image_size=[17, 15, 3],
                                                  average_image=[[[120.5, 110.25, 99.75]]])),
    "pool_norm": (pool_norm_net, (16, 13), dict(layout="matconvnet", input_size=[16, 13, 3],
                                                average_image="full", classes=["a", "b", "c", "d"])),
    "flat_tail": (flat_tail_net, (6, 5), dict(layout="legacy", image_size=[6, 5, 3],
                                              extra_top={"imageMean": np.float64(117.0)})),
}


def write_small_net(path, name, seed=0, fmt="v5"):
    builder, size, options = SMALL_NETS[name]
    rng = np.random.default_rng(seed)
    options = dict(options)
    if isinstance(options.get("average_image"), str):  # a full mean image of the input size
        options["average_image"] = rng.uniform(60, 200, (size[0], size[1], 3))
    return synthetic.save_mat(path, net_content(builder(rng), **options), fmt=fmt), size
