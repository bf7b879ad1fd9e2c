"""Build a Keras model from a parsed MatConvNet network (``matconvnet.Net``).

The model takes float32 ``(H, W, C)`` RGB images in 0-255. Layer by layer:

- ``subtract_mean``: built-in ``Normalization`` with unit variance (``averageImage`` per channel,
  or a full mean image); absent when the file has no average image.
- one Keras layer per MatConvNet layer, named like it (see ``keras_layer_names`` for the few
  renamings). Dropout layers are left out: an identity at inference, and a Keras Dropout in a
  frozen base would still fire during ``fit``.
- conv: ``Conv2D`` with the kernel copied unchanged (HWIO: MatConvNet's conv is a
  cross-correlation, like TF's). Symmetric "same" padding at stride 1 uses ``padding='same'``;
  any other padding a ``ZeroPadding2D`` named ``<name>_pad``. Grouped filters use ``groups``.
  Dilation with stride > 1 (refused by Keras) is a stride-1 dilated ``Conv2D`` named
  ``<name>_dilated`` followed by an exact subsampling (``MaxPooling2D(1, stride)``) named ``<name>``.
- a conv whose kernel covers its whole unpadded input map (VGG-Face's fc6 on the 7x7 map, and
  the 1x1 fc7/fc8 after it) is a ``Dense`` layer; a ``Flatten`` named ``<name>_flatten`` goes
  before the first one. The kernel is reshaped in C order (h, w, c), which is what ``Flatten``
  does to NHWC maps, so fc6..fc8, relu6, relu7 and the softmax output 2-D ``(batch, units)``.
- relu: ``ReLU(negative_slope=leak)``; pool with pad 0: ``MaxPooling2D``/``AveragePooling2D``
  ('valid', exact); padded pool: ``layers.MatConvNetPooling2D``; softmax: ``Softmax``; bnorm:
  ``BatchNormalization(epsilon=0)`` with variance = sigma^2; lrn: ``layers.LocalResponseNormalization``.

Kernels are never initialised randomly: each layer is built with an initializer that hands over
the converted array, reordered from MATLAB's column-major layout by the backend's transpose, and
each source array is released as soon as its layer holds it, so peak memory stays near one copy
of the weights.
"""

from __future__ import annotations

import contextlib

import numpy as np

import keras

from . import layers as custom_layers  # noqa: F401  (registers the custom classes)
from .errors import ModelFileError
from .matconvnet import Net, mean_image, output_shapes

INPUT_NAME = "input"
MEAN_NAME = "subtract_mean"
# Suffixes of helper layers derived from a MatConvNet layer's name.
PAD, FLATTEN, RESHAPE, DILATED = "_pad", "_flatten", "_reshape", "_dilated"


# =========================================================================== names
def keras_layer_names(net: Net) -> tuple[list[str], dict[str, str]]:
    """The Keras name of each layer of ``net``, and ``{original: keras_name}`` for renamed ones.

    Rules, applied in layer order (deterministic):
    1. unnamed layers already carry MatConvNet's ``layer<i>`` (1-based position);
    2. ``/`` (the one character Keras rejects in a layer name) becomes ``_``;
    3. a name already taken by an earlier layer (or, after rule 2, another layer's own name) gets
       the smallest free suffix ``_2``, ``_3``, ... that is no layer's own name;
       the first occurrence keeps the plain name. In ``renamed`` the k-th occurrence (k >= 2) of a
       repeated name is keyed ``"<name>#<k>"``.
    """
    names: list[str] = []
    renamed: dict[str, str] = {}
    taken: set[str] = set()
    originals = {layer.name for layer in net.layers}
    seen: dict[str, int] = {}
    for layer in net.layers:
        original = layer.name
        seen[original] = seen.get(original, 0) + 1
        candidate = original.replace("/", "_")
        if candidate in taken or (candidate != original and candidate in originals):
            base, k = candidate, 2
            while f"{base}_{k}" in taken or f"{base}_{k}" in originals:
                k += 1
            candidate = f"{base}_{k}"
        taken.add(candidate)
        names.append(candidate)
        if candidate != original:
            key = original if seen[original] == 1 else f"{original}#{seen[original]}"
            renamed[key] = candidate
    return names, renamed


class _Names:
    """Hands out helper-layer names that never collide with the network's own names."""

    def __init__(self, reserved):
        self.taken = set(reserved)

    def __call__(self, wanted: str) -> str:
        name, k = wanted, 2
        while name in self.taken:
            name = f"{wanted}_{k}"
            k += 1
        self.taken.add(name)
        return name


# =========================================================================== weights
def take_c_order(weights: list, index: int, shape=None):
    """``weights[index]`` as a float32 backend tensor in C order (then reshaped in C order).

    The list's reference is dropped as soon as the backend holds a copy, so that (with no other
    reference left) the source array is freed before the reordered copy is made. MATLAB arrays
    arrive column-major (F order): their ``.T`` is a C-ordered view with the axes reversed, and
    the backend's transpose (multi-threaded and cache-blocked in TensorFlow) puts the axes back
    ~5x faster than numpy's copy of a large 4-D array.
    """
    axes = tuple(reversed(range(weights[index].ndim)))
    tensor = keras.ops.convert_to_tensor(np.asarray(weights[index].T, dtype=np.float32))
    weights[index] = None
    tensor = keras.ops.transpose(tensor, axes)
    return tensor if shape is None else keras.ops.reshape(tensor, shape)


class _Preset(keras.initializers.Initializer):
    """An initializer that returns a prepared value: no random numbers for weights that
    would be overwritten at once. Replaced by 'zeros' after building so the saved config
    holds only built-in initializers."""

    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        if tuple(shape) != tuple(self.value.shape):
            raise ValueError(f"prepared weight of shape {tuple(self.value.shape)} for a variable of "
                             f"shape {tuple(shape)}")
        value, self.value = self.value, None  # hand over: no second reference
        return value


def _with_weights(layer, kernel, bias):
    layer.kernel_initializer = _Preset(kernel)
    if bias is not None:
        layer.bias_initializer = _Preset(bias)
    return layer


def _reset_initializers(layer) -> None:
    for attr in ("kernel_initializer", "bias_initializer"):
        if isinstance(getattr(layer, attr, None), _Preset):
            setattr(layer, attr, keras.initializers.Zeros())


# =========================================================================== the model
def build_model(net: Net, input_size, *, progress=None):
    """Build the Keras model of ``net`` for ``(height, width)`` input.

    Returns ``(model, info)``; ``info`` holds ``layers`` (Keras layer names in order, input
    excluded), ``renamed``, ``average_image`` (``"per-channel"`` values, ``"full"`` or None) and
    ``output_shapes`` ({keras name: shape without batch}).

    Consumes ``net``'s weights: each layer's ``weights`` is emptied once its Keras layer holds
    them, so peak memory stays near one copy of the weights. ``progress`` is called once per layer.
    """
    input_size = (int(input_size[0]), int(input_size[1]))
    shapes = output_shapes(net, input_size)  # validates the chain before building anything
    mean_kind, mean_value = mean_image(net, input_size)
    names, renamed = keras_layer_names(net)
    helper = _Names(names)

    h, w = input_size
    c = net.input_channels
    inputs = keras.Input((h, w, c), dtype="float32", name=helper(INPUT_NAME))
    x = inputs
    if mean_kind is not None:
        axis = -1 if mean_kind == "per-channel" else (1, 2, 3)
        x = keras.layers.Normalization(axis=axis, mean=mean_value, variance=np.ones_like(mean_value),
                                       name=helper(MEAN_NAME))(x)

    flat = False  # True once the tensor is (batch, units)
    in_shape = (h, w, c)
    for layer, name, out_shape in zip(net.layers, names, shapes):
        kind = layer.type
        if kind == "conv":
            x, flat = _add_conv(x, layer, name, in_shape, flat, helper)
        elif kind == "pool":
            if flat:
                x = keras.layers.Reshape((1, 1, in_shape[2]), name=helper(name + RESHAPE))(x)
                flat = False
            x = _pool_layer(layer, name)(x)
        elif kind == "relu":
            x = keras.layers.ReLU(negative_slope=layer.params["leak"], name=name)(x)
        elif kind == "softmax":
            x = keras.layers.Softmax(axis=-1, name=name)(x)
        elif kind == "bnorm":
            mult, bias, mean, sigma = layer.weights
            bn = keras.layers.BatchNormalization(axis=-1, epsilon=0.0, name=name)
            x = bn(x)
            # MatConvNet stores sigma = sqrt(var + eps) with eps folded in: variance = sigma^2, eps 0.
            variance = np.square(sigma.astype(np.float64))
            bn.set_weights([np.asarray(a, np.float32) for a in (mult, bias, mean, variance)])
        elif kind == "lrn":
            p = layer.params
            x = custom_layers.LocalResponseNormalization(p["depth"], p["kappa"], p["alpha"], p["beta"],
                                                         name=name)(x)
        else:  # pragma: no cover - matconvnet.py only produces the types above
            raise AssertionError(kind)
        layer.weights = []
        in_shape = out_shape
        if progress is not None:
            progress()

    model = keras.Model(inputs, x, name="matconvnet")
    for keras_layer in model.layers:
        _reset_initializers(keras_layer)
    info = {
        "layers": [layer.name for layer in model.layers[1:]],
        "renamed": renamed,
        "average_image": (mean_value.tolist() if mean_kind == "per-channel" else mean_kind),
        "output_shapes": {layer.name: list(layer.output.shape[1:]) for layer in model.layers[1:]},
    }
    return model, info


def _add_conv(x, layer, name, in_shape, flat, helper):
    kh, kw, cin, cout = layer.weights[0].shape
    h, w, c = in_shape
    (sy, sx), (t, b, l, r), (dy, dx) = layer.params["stride"], layer.params["pad"], layer.params["dilate"]
    groups = c // cin
    use_bias = layer.weights[1] is not None
    bias = take_c_order(layer.weights, 1) if use_bias else None

    covers_map = (kh, kw) == (h, w) and (t, b, l, r) == (0, 0, 0, 0) and groups == 1 \
        and (kh == 1 or dy == 1) and (kw == 1 or dx == 1)
    if covers_map:
        # A fully connected layer: Dense on the C-order (h, w, c) flattening.
        if not flat:
            x = keras.layers.Flatten(name=helper(name + FLATTEN))(x)
        dense = keras.layers.Dense(cout, use_bias=use_bias, name=name)
        _with_weights(dense, take_c_order(layer.weights, 0, (kh * kw * cin, cout)), bias)
        return dense(x), True

    if flat:
        x = keras.layers.Reshape((1, 1, c), name=helper(name + RESHAPE))(x)
    eff_h, eff_w = (kh - 1) * dy + 1, (kw - 1) * dx + 1
    same = (sy, sx) == (1, 1) and t == b and l == r and 2 * t == eff_h - 1 and 2 * l == eff_w - 1
    padding = "same" if same and (t or l) else "valid"
    if padding == "valid" and (t, b, l, r) != (0, 0, 0, 0):
        x = keras.layers.ZeroPadding2D(((t, b), (l, r)), name=helper(name + PAD))(x)
    dilated_stride = (dy, dx) != (1, 1) and (sy, sx) != (1, 1)
    conv = keras.layers.Conv2D(
        cout, (kh, kw), strides=(1, 1) if dilated_stride else (sy, sx), padding=padding,
        dilation_rate=(dy, dx), groups=groups, use_bias=use_bias,
        name=helper(name + DILATED) if dilated_stride else name)
    _with_weights(conv, take_c_order(layer.weights, 0), bias)
    x = conv(x)
    if dilated_stride:
        # Keras refuses stride > 1 with dilation > 1: a dilated conv at stride 1, then keep every
        # stride-th position (a 1x1 max pool is an exact subsampling), is the same computation.
        x = keras.layers.MaxPooling2D((1, 1), strides=(sy, sx), padding="valid", name=name)(x)
    return x, False


def _pool_layer(layer, name):
    p = layer.params
    if p["pad"] == (0, 0, 0, 0):
        cls = keras.layers.MaxPooling2D if p["method"] == "max" else keras.layers.AveragePooling2D
        return cls(pool_size=p["pool"], strides=p["stride"], padding="valid", name=name)
    return custom_layers.MatConvNetPooling2D(p["pool"], p["stride"], p["pad"], p["method"], name=name)


# =========================================================================== loading
def load_saved_model(path, what: str, stage_script: str, *, scope=None, compile: bool = True):
    """``keras.saving.load_model(path)`` (safe mode) of a model this project saved.

    This module registers the custom layers on import, so they are known before deserialising.
    ``scope``: a context to load in (a distribution strategy's scope). A damaged or foreign file
    is a one-line ``ModelFileError`` that names the ``stage_script`` to run again.
    """
    try:
        with scope if scope is not None else contextlib.nullcontext():
            return keras.saving.load_model(path, compile=compile)
    except Exception as exc:  # Keras raises many kinds for a damaged or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelFileError(f"{path}: cannot load the {what} ({type(exc).__name__}: {first[:200]}); "
                             f"run `python {stage_script}` again") from None


# =========================================================================== saving
def save_model(model, path) -> None:
    """Write ``model`` to the ``.keras`` file ``path`` (Keras' own ``model.save``)."""
    model.save(path)
