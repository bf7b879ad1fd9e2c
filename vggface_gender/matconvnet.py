"""Read MatConvNet SimpleNN ``.mat`` files into a plain, layout-independent description.

``read_net(path)`` accepts both published VGG-Face layouts (the Oxford file's ``net`` wrapper,
the MatConvNet page's ``layers`` + ``meta``, and older files with ``classes``/``normalization``
at top level), MAT Level 5 files (through scipy) and v7.3 / HDF5 files (through h5py). It returns
a ``Net``: its layers with their parameters and weights as numpy arrays, the normalization, the
class names and the input size. It imports neither TensorFlow nor Keras.

What real files contain, and how it is read (see docs/matconvnet-format.md in the shared docs):

- fields are read by name, never by position; extra training fields (``momentum``,
  ``learningRate``, ...) are ignored and released with the raw file content before the caller
  builds anything (``momentum`` is as large as the weights);
- small integers stored as uint8 are cast with ``int()`` before any arithmetic;
- conv filters that MATLAB saved with trailing singleton dimensions dropped are padded back to
  4-D (never squeezed); biases may be C x 1 or 1 x C;
- layers without a name get MatConvNet's own ``layer<i>`` name (1-based position);
- a trailing ``softmaxloss`` (or ``loss`` with the default softmax-log loss) becomes a softmax,
  unless the net already ends in a softmax; other loss layers are dropped;
- DagNN files are recognised and refused with a clear message;
- opaque MATLAB objects (``#subsystem#`` in v7.3 files, e.g. a saved gpuArray) are skipped.

Every problem is a ``ModelFileError`` with one line that names the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ModelFileError

# Types the converter understands (after aliases: 'normalize' is the pre-beta name of 'lrn').
LAYER_TYPES = ("conv", "relu", "pool", "dropout", "softmax", "bnorm", "lrn")
_ALIASES = {"normalize": "lrn"}
_LOSS_TYPES = ("softmaxloss", "loss")


@dataclass
class Layer:
    """One MatConvNet layer.

    ``type`` is one of ``LAYER_TYPES``; ``source_type`` is the type as written in the file.
    ``params`` by type (all plain Python numbers):

    - conv: ``stride`` (sy, sx), ``pad`` (top, bottom, left, right), ``dilate`` (dy, dx)
    - pool: ``method`` ('max' | 'avg'), ``pool`` (ph, pw), ``stride``, ``pad``
    - relu: ``leak``;  lrn: ``depth``, ``kappa``, ``alpha``, ``beta``
    - dropout, softmax, bnorm: none

    ``weights`` (numpy arrays as stored, not copied):

    - conv: ``[W, b]``, W of shape (kh, kw, cin, cout), b of shape (cout,) or None
    - bnorm: ``[multipliers (C,), biases (C,), mean (C,), sigma (C,)]``
    """

    index: int
    name: str
    type: str
    source_type: str
    params: dict = field(default_factory=dict)
    weights: list = field(default_factory=list)
    named: bool = True  # False: the file gave no name (``name`` was generated)


@dataclass
class Net:
    """A SimpleNN network as read from a file, without any framework attached."""

    path: Path
    mat_format: str  # 'v5' or 'v7.3'
    layout: str  # 'oxford' (net wrapper), 'matconvnet' (layers + meta), 'legacy' (top-level)
    layers: list[Layer]
    dropped: list[str]  # layers with no effect at inference (dropout, trailing loss after softmax)
    classes: list[str] | None
    average_image: np.ndarray | None  # float32 as stored (per channel, scalar or a full image)
    image_size: tuple[int, int] | None  # (height, width) named by the file, if any
    input_channels: int
    interpolation: str | None


class Opaque:
    """A MATLAB object the reader cannot interpret (gpuArray, function handle, class instance)."""

    def __init__(self, class_name: str):
        self.class_name = class_name

    def __repr__(self):
        return f"Opaque({self.class_name!r})"


# =========================================================================== reading files
def read_net(path: str | os.PathLike) -> Net:
    """Read a MatConvNet SimpleNN file (MAT v5 or v7.3) into a ``Net``.

    Raises ``ModelFileError`` (one line naming the file) for a missing, unreadable or
    truncated file, a file holding no SimpleNN network, a DagNN network or an unsupported layer.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: model file not found (set model.mat_path)")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            header = f.read(128)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror})") from None
    if _is_hdf5(path, header):
        return _read_v73(path)
    return _read_v5(path, header)


def _is_hdf5(path: Path, header: bytes) -> bool:
    if header.startswith(b"MATLAB 7.3"):
        return True
    if header.startswith(b"MATLAB 5.0"):  # Level 5 (also what MATLAB's -v7 writes)
        return False
    import h5py

    try:
        return bool(h5py.is_hdf5(str(path)))
    except Exception:
        return False


def _read_v5(path: Path, header: bytes) -> Net:
    if len(header) < 128 or not header.startswith(b"MATLAB"):
        raise ModelFileError(f"{path}: not a MAT-file (no 'MATLAB' header)")
    from scipy.io import loadmat

    try:
        # mat_dtype=False keeps stored types (uint8 stays uint8, single stays float32): faster,
        # and half the memory of converting everything to double.
        raw = loadmat(str(path), squeeze_me=False, struct_as_record=True, mat_dtype=False)
    except MemoryError:
        raise ModelFileError(f"{path}: not enough memory to read the file") from None
    except Exception as exc:  # scipy raises many types for broken or truncated files
        raise ModelFileError(f"{path}: cannot read MAT-file, is it truncated or corrupt? "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
    top = {k: _from_scipy(v) for k, v in raw.items() if not k.startswith("__")}
    del raw
    return _parse(top, path, "v5")


def _read_v73(path: Path) -> Net:
    import h5py

    try:
        f = h5py.File(str(path), "r")
    except Exception as exc:
        raise ModelFileError(f"{path}: cannot read HDF5 (MAT v7.3) file, is it truncated or corrupt? "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        top = _H5Struct(f, f, top_level=True)
        return _parse(top, path, "v7.3")
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: cannot read MAT v7.3 content, is it truncated or corrupt? "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
    finally:
        f.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else "no details"


# --------------------------------------------------------------------------- scipy (v5) values
def _from_scipy(value):
    """scipy.io.loadmat value -> plain tree: dict (struct), list (cell / struct array), str,
    numpy array (numbers, as stored), Opaque. Arrays are referenced, never copied."""
    from scipy.io.matlab import MatlabFunction, MatlabObject, MatlabOpaque

    if isinstance(value, (MatlabOpaque, MatlabFunction)):
        return Opaque(type(value).__name__)
    if isinstance(value, MatlabObject):
        return Opaque(str(getattr(value, "classname", "object")))
    if not isinstance(value, np.ndarray):
        return value
    if value.dtype.names:  # struct (array)
        items = [{name: _from_scipy(element[name]) for name in value.dtype.names}
                 for element in value.ravel(order="F")]
        return items[0] if value.size == 1 else items
    if value.dtype == object:  # cell
        return [_from_scipy(element) for element in value.ravel(order="F")]
    if value.dtype.kind == "U":  # char: scipy gives one string per row
        rows = [str(s) for s in value.ravel()]
        return rows[0] if len(rows) == 1 else ("" if not rows else rows)
    return value


# --------------------------------------------------------------------------- h5py (v7.3) values
_H5_NUMERIC = {"double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32",
               "int64", "uint64", "logical"}


class _H5Struct(Mapping):
    """A MATLAB struct in an HDF5 file, read lazily field by field (so ``momentum`` is never
    read at all)."""

    def __init__(self, f, group, top_level: bool = False):
        self._f = f
        self._group = group
        if top_level:
            self._fields = [k for k in group.keys() if not k.startswith("#")]
        else:
            names = group.attrs.get("MATLAB_fields")
            if names is not None:
                self._fields = [_h5_field_name(n) for n in names]
                self._fields = [n for n in self._fields if n in group]
            else:
                self._fields = list(group.keys())

    def __getitem__(self, key):
        if key not in self._fields:
            raise KeyError(key)
        return _from_h5(self._f, self._group[key])

    def __iter__(self):
        return iter(self._fields)

    def __len__(self):
        return len(self._fields)


def _h5_field_name(name) -> str:
    if isinstance(name, bytes):
        return name.decode("ascii", "replace")
    if isinstance(name, np.ndarray):
        return b"".join(bytes(x) for x in name.ravel()).decode("ascii", "replace")
    return str(name)


def _attr_str(node, key) -> str | None:
    value = node.attrs.get(key)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind == "S":
        return b"".join(value.ravel()).decode("ascii", "replace")
    return str(value)


def _from_h5(f, node):
    import h5py

    cls = _attr_str(node, "MATLAB_class")
    if isinstance(node, h5py.Group):
        if cls in (None, "struct"):
            return _H5Struct(f, node)
        return Opaque(cls)
    if "MATLAB_object_decode" in node.attrs or (cls is not None and cls not in _H5_NUMERIC
                                                 and cls not in ("char", "cell", "struct")):
        return Opaque(cls or "object")
    if int(np.asarray(node.attrs.get("MATLAB_empty", 0)).ravel()[0]):
        # Stored as its dimension vector: an empty value of that (MATLAB) shape.
        if cls == "char":
            return ""
        if cls in ("cell",):
            return []
        dims = tuple(int(d) for d in np.asarray(node[()]).ravel())
        return np.zeros(dims if dims else (0, 0), dtype=np.float64)
    if node.dtype == h5py.ref_dtype or cls == "cell":
        refs = node[()]
        return [_from_h5(f, f[ref]) for ref in np.asarray(refs).ravel()]
    data = node[()]
    if cls == "char":
        codes = np.asarray(data).T  # MATLAB (rows, cols)
        rows = ["".join(map(chr, row)) for row in np.atleast_2d(codes)]
        return rows[0] if len(rows) == 1 else rows
    # HDF5 holds the MATLAB array with its axes reversed: .T is a free view in MATLAB order.
    return np.asarray(data).T


# =========================================================================== parsing
def _is_mapping(v) -> bool:
    return isinstance(v, Mapping)


def _unwrap(v):
    """A 1x1 cell or 1-element struct array -> its element."""
    while isinstance(v, list) and len(v) == 1:
        v = v[0]
    return v


def _get(container, key):
    if container is None or not _is_mapping(container) or key not in container:
        return None
    return _unwrap(container[key])


def _text(v) -> str | None:
    v = _unwrap(v)
    if isinstance(v, str):
        return v
    if isinstance(v, np.ndarray) and v.size == 0:
        return None
    if isinstance(v, np.ndarray) and v.dtype.kind in "U":
        return str(v.ravel()[0])
    return None


def _numbers(v) -> np.ndarray | None:
    v = _unwrap(v)
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        return v.ravel(order="F")
    if isinstance(v, (int, float, np.number)):
        return np.asarray([v])
    return None


def _find_network(top: Mapping, path: Path):
    """-> (container holding 'layers', layout name, meta mapping or None)."""
    net = _get(top, "net")
    if _is_mapping(net):
        _refuse_dagnn(net, path)
        if "layers" in net:
            return net, "oxford" if "meta" not in net else "matconvnet", _get(net, "meta")
    if "layers" in top:
        _refuse_dagnn(top, path)
        meta = _get(top, "meta")
        return top, "matconvnet" if _is_mapping(meta) else "legacy", meta if _is_mapping(meta) else None
    # Any other single struct variable that holds a SimpleNN network.
    for name, value in top.items():
        value = _unwrap(value)
        if _is_mapping(value):
            _refuse_dagnn(value, path)
            if "layers" in value:
                return value, "oxford", _get(value, "meta")
    names = ", ".join(sorted(top)) or "none"
    raise ModelFileError(f"{path}: no MatConvNet network in this MAT-file "
                         f"(no 'net' or 'layers' variable; variables: {names})")


def _refuse_dagnn(container: Mapping, path: Path) -> None:
    dag = "vars" in container and "params" in container
    layers = _get(container, "layers") if "layers" in container else None
    if isinstance(layers, list) and layers and _is_mapping(layers[0]) and "block" in layers[0]:
        dag = True
    if _is_mapping(layers) and "block" in layers:
        dag = True
    if dag:
        raise ModelFileError(f"{path}: DagNN format is not supported (this converter reads "
                             f"SimpleNN networks; convert with dagnn.DagNN.loadobj/saveobj to SimpleNN)")


def _first_mapping(owners, name: str):
    """The first struct field ``name`` found among ``owners``, or None."""
    for owner in owners:
        candidate = _get(owner, name)
        if _is_mapping(candidate):
            return candidate
    return None


def _parse(top: Mapping, path: Path, mat_format: str) -> Net:
    container, layout, meta = _find_network(top, path)
    # Each layout keeps these in a different place: the net, its meta, or the top level.
    normalization = _first_mapping((container, meta, top), "normalization")
    classes = _first_mapping((container, meta, top), "classes")

    raw_layers = container["layers"]
    if _is_mapping(raw_layers):  # a struct array instead of a cell
        raw_layers = _struct_array_elements(raw_layers)
    if not isinstance(raw_layers, list) or not raw_layers:
        raise ModelFileError(f"{path}: 'layers' holds no layers")

    layers, dropped = _parse_layers(raw_layers, path)

    image_size = None
    input_channels = None
    for size in (_numbers(_get(normalization, "imageSize")), _numbers(_get(meta, "inputSize"))):
        if size is not None and size.size >= 2:
            image_size = (int(size[0]), int(size[1]))
            if size.size >= 3:
                input_channels = int(size[2])
            break
    if image_size is not None and min(image_size) < 1:
        raise ModelFileError(f"{path}: invalid input size {list(image_size)} in the file")
    if input_channels is None:
        first_conv = next((layer for layer in layers if layer.type == "conv"), None)
        input_channels = int(first_conv.weights[0].shape[2]) if first_conv is not None else 3

    average = _get(normalization, "averageImage")
    if not (isinstance(average, np.ndarray) and average.dtype.kind in "biuf" and average.size):
        average = None
        image_mean = _numbers(_get(top, "imageMean"))  # old files: one scalar at top level
        if image_mean is not None and image_mean.size:
            average = np.asarray(image_mean, dtype=np.float32)

    return Net(
        path=path, mat_format=mat_format, layout=layout, layers=layers, dropped=dropped,
        classes=_class_names(classes),
        average_image=None if average is None else np.asarray(average, dtype=np.float32),
        image_size=image_size, input_channels=input_channels,
        interpolation=_text(_get(normalization, "interpolation")),
    )


def _struct_array_elements(struct: Mapping) -> list:
    """A 1xN struct array -> N structs. (scipy already splits them; in HDF5 each field of a
    struct array holds one reference per element, which the reader turns into lists.)"""
    fields = {key: struct[key] for key in struct}
    lengths = {len(v) for v in fields.values() if isinstance(v, list)}
    if len(lengths) == 1 and all(isinstance(v, list) for v in fields.values()):
        n = lengths.pop()
        if n > 1 or ("type" in fields and not isinstance(_unwrap(fields["type"]), list)):
            return [{key: value[i] for key, value in fields.items()} for i in range(n)]
    return [struct]


def _class_names(classes) -> list[str] | None:
    if classes is None:
        return None
    for key in ("description", "name"):
        if key not in classes:
            continue
        value = classes[key]
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            names = [_text(v) for v in value]
            if all(n is not None for n in names) and names:
                return [n.rstrip() for n in names]
        if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.size:
            return [str(s).rstrip() for s in value.ravel()]
    return None


def _parse_layers(raw_layers: list, path: Path) -> tuple[list[Layer], list[str]]:
    layers: list[Layer] = []
    dropped: list[str] = []
    for index, raw in enumerate(raw_layers):
        raw = _unwrap(raw)
        if not _is_mapping(raw):
            raise ModelFileError(f"{path}: layer {index} is not a struct")
        name = _text(_get(raw, "name"))
        named = bool(name)
        if not named:
            name = f"layer{index + 1}"  # MatConvNet's own rule (vl_simplenn_tidy)
        source_type = _text(_get(raw, "type"))
        if source_type is None:
            raise ModelFileError(f"{path}: layer {index} '{name}' has no type")
        kind = _ALIASES.get(source_type, source_type)
        where = f"{path}: layer {index} '{name}' ({source_type})"

        if kind in _LOSS_TYPES:
            if any(_text(_get(r, "type")) not in _LOSS_TYPES for r in raw_layers[index + 1:]):
                raise ModelFileError(f"{where}: a loss layer is only supported at the end of the network")
            loss = _text(_get(raw, "loss")) or "softmaxlog"
            already_softmax = bool(layers) and layers[-1].type == "softmax"
            if kind == "softmaxloss" or loss == "softmaxlog":
                if not already_softmax:
                    layers.append(Layer(index, name, "softmax", source_type, named=named))
                    continue
            dropped.append(name)  # the net already ends in probabilities, or in logits
            continue
        if kind not in LAYER_TYPES:
            raise ModelFileError(f"{where}: unsupported layer type '{source_type}' "
                                 f"(supported: {', '.join(LAYER_TYPES)}, softmaxloss)")
        layer = Layer(index, name, kind, source_type, named=named)
        if kind == "conv":
            _parse_conv(raw, layer, where)
        elif kind == "pool":
            _parse_pool(raw, layer, where)
        elif kind == "relu":
            leak = _numbers(_get(raw, "leak"))
            layer.params["leak"] = float(leak[0]) if leak is not None and leak.size else 0.0
        elif kind == "bnorm":
            _parse_bnorm(raw, layer, where)
        elif kind == "lrn":
            param = _numbers(_get(raw, "param"))
            if param is None or param.size != 4:
                raise ModelFileError(f"{where}: 'param' must hold [N kappa alpha beta]")
            depth = int(param[0])
            if depth < 1 or depth != float(param[0]):
                raise ModelFileError(f"{where}: window size N must be a positive integer, got {param[0]}")
            layer.params.update(depth=depth, kappa=float(param[1]), alpha=float(param[2]),
                                beta=float(param[3]))
        elif kind == "dropout":
            dropped.append(name)
            continue
        layers.append(layer)
    if not layers:
        raise ModelFileError(f"{path}: the network has no layers that compute anything")
    return layers, dropped


def _weights_cell(raw) -> list:
    if "weights" in raw:
        weights = raw["weights"]
        if isinstance(weights, np.ndarray):  # an empty numeric [] instead of {}
            return [] if weights.size == 0 else [weights]
        if isinstance(weights, list):
            return weights
    if "filters" in raw:  # before MatConvNet beta11
        filters = _unwrap(raw["filters"])
        biases = _unwrap(raw["biases"]) if "biases" in raw else None
        return [filters] + ([] if biases is None else [biases])
    return []


def _int_tuple(raw, key, sizes, default, where, minimum=0) -> tuple:
    values = _numbers(_get(raw, key))
    if values is None or values.size == 0:
        return tuple(default)
    if values.size not in sizes:
        raise ModelFileError(f"{where}: '{key}' must have {' or '.join(map(str, sizes))} elements, "
                             f"got {values.size}")
    ints = [int(v) for v in values]  # int() first: uint8 arithmetic overflows
    if any(float(v) != i for v, i in zip(values.tolist(), ints)) or min(ints) < minimum:
        raise ModelFileError(f"{where}: '{key}' must hold integers >= {minimum}, got {values.tolist()}")
    n = len(default)
    if len(ints) == 1:
        ints = ints * n
    return tuple(ints)


def _parse_conv(raw, layer: Layer, where: str) -> None:
    weights = _weights_cell(raw)
    if not weights or not isinstance(weights[0], np.ndarray) or weights[0].size == 0:
        raise ModelFileError(f"{where}: conv layer has no filters")
    kernel = weights[0]
    if kernel.dtype.kind not in "fiu" or kernel.ndim > 4:
        raise ModelFileError(f"{where}: filters must be a numeric array of up to 4 dimensions, "
                             f"got {kernel.dtype} {kernel.shape}")
    if kernel.ndim < 4:  # MATLAB drops trailing singleton dimensions: put them back, in F order
        kernel = kernel.reshape(kernel.shape + (1,) * (4 - kernel.ndim), order="F")
    bias = weights[1] if len(weights) > 1 else None
    if isinstance(bias, np.ndarray) and bias.size == 0:
        bias = None
    if bias is not None:
        if not isinstance(bias, np.ndarray) or bias.dtype.kind not in "fiu":
            raise ModelFileError(f"{where}: biases must be numeric")
        bias = bias.ravel(order="F")
        if bias.size != kernel.shape[3]:
            raise ModelFileError(f"{where}: {bias.size} biases for {kernel.shape[3]} filters")
    layer.weights = [kernel, bias]
    layer.params["stride"] = _int_tuple(raw, "stride", (1, 2), (1, 1), where, minimum=1)
    layer.params["pad"] = _int_tuple(raw, "pad", (1, 4), (0, 0, 0, 0), where)
    layer.params["dilate"] = _int_tuple(raw, "dilate", (1, 2), (1, 1), where, minimum=1)


def _parse_pool(raw, layer: Layer, where: str) -> None:
    method = (_text(_get(raw, "method")) or "max").lower()
    if method not in ("max", "avg"):
        raise ModelFileError(f"{where}: pooling method must be 'max' or 'avg', got {method!r}")
    window = _int_tuple(raw, "pool", (1, 2), (0, 0), where, minimum=1)
    if window == (0, 0):
        raise ModelFileError(f"{where}: pool layer has no 'pool' window size")
    stride = _int_tuple(raw, "stride", (1, 2), (1, 1), where, minimum=1)
    pad = _int_tuple(raw, "pad", (1, 4), (0, 0, 0, 0), where)
    if pad[0] >= window[0] or pad[1] >= window[0] or pad[2] >= window[1] or pad[3] >= window[1]:
        # MatConvNet refuses this too: a window could then lie entirely in the padding.
        raise ModelFileError(f"{where}: padding {list(pad)} must be smaller than the window {list(window)}")
    layer.params.update(method=method, pool=window, stride=stride, pad=pad)


def _parse_bnorm(raw, layer: Layer, where: str) -> None:
    weights = _weights_cell(raw)
    if len(weights) < 3 or any(not isinstance(w, np.ndarray) or w.size == 0 for w in weights[:3]):
        raise ModelFileError(f"{where}: bnorm needs weights {{multipliers, biases, moments}}")
    mult, bias, moments = (np.asarray(w) for w in weights[:3])
    channels = mult.size
    if bias.size != channels or moments.size != 2 * channels:
        raise ModelFileError(f"{where}: bnorm weights disagree: {mult.size} multipliers, {bias.size} "
                             f"biases, moments of shape {moments.shape} (expected {channels}x2)")
    moments = moments.reshape(channels, 2, order="F") if moments.shape != (channels, 2) else moments
    sigma = moments[:, 1]
    if np.any(sigma <= 0):
        raise ModelFileError(f"{where}: bnorm moments hold a sigma <= 0")
    layer.weights = [mult.ravel(order="F"), bias.ravel(order="F"), moments[:, 0], sigma]


# =========================================================================== shapes
def output_shapes(net: Net, input_size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(height, width, channels) after each layer of ``net`` for ``input_size``; checks that
    the shapes chain (filters' Cin divides the incoming channels, maps do not shrink below 1).
    """
    h, w = (int(s) for s in input_size)
    c = int(net.input_channels)
    shapes = []
    for layer in net.layers:
        where = f"{net.path}: layer {layer.index} '{layer.name}' ({layer.source_type})"
        if layer.type == "conv":
            kh, kw, cin, cout = layer.weights[0].shape
            if c % cin:
                raise ModelFileError(f"{where}: filters expect {cin} input channels, which does not "
                                     f"divide the {c} incoming channels")
            groups = c // cin
            if cout % groups:
                raise ModelFileError(f"{where}: {cout} filters cannot be split into {groups} groups")
            (sy, sx), (t, b, l, r), (dy, dx) = layer.params["stride"], layer.params["pad"], layer.params["dilate"]
            h = _out_size(h + t + b, (kh - 1) * dy + 1, sy, where)
            w = _out_size(w + l + r, (kw - 1) * dx + 1, sx, where)
            c = cout
        elif layer.type == "pool":
            (ph, pw), (sy, sx), (t, b, l, r) = layer.params["pool"], layer.params["stride"], layer.params["pad"]
            h = _out_size(h + t + b, ph, sy, where)
            w = _out_size(w + l + r, pw, sx, where)
        elif layer.type == "bnorm":
            if layer.weights[0].size != c:
                raise ModelFileError(f"{where}: {layer.weights[0].size} bnorm channels for {c} "
                                     f"incoming channels")
        shapes.append((h, w, c))
    return shapes


def _out_size(padded: int, window: int, stride: int, where: str) -> int:
    if padded < window:
        raise ModelFileError(f"{where}: the input map ({padded} with padding) is smaller than "
                             f"the window ({window}); is the input size right?")
    return (padded - window) // stride + 1


def mean_image(net: Net, input_size: tuple[int, int]) -> tuple[str | None, np.ndarray | None]:
    """The mean to subtract: ``("per-channel", (C,))``, ``("full", (H, W, C))`` or ``(None, None)``.

    A scalar applies to every channel; a full mean image must have the input size.
    """
    avg = net.average_image
    if avg is None or avg.size == 0:
        return None, None
    c = net.input_channels
    if avg.size == 1:
        return "per-channel", np.full(c, float(avg.ravel()[0]), np.float32)
    if avg.size == c and (avg.ndim <= 2 or avg.shape[:2] == (1, 1)):
        return "per-channel", avg.ravel(order="F").astype(np.float32)
    h, w = input_size
    if avg.ndim >= 2 and tuple(avg.shape[:2]) == (h, w) and avg.size in (h * w, h * w * c):
        full = avg.reshape(h, w, -1, order="F") if avg.ndim == 2 else avg
        if full.shape[2] == 1:
            full = np.repeat(full, c, axis=2)
        return "full", np.ascontiguousarray(full, dtype=np.float32)
    raise ModelFileError(f"{net.path}: averageImage of shape {list(avg.shape)} does not match the "
                         f"input size {h}x{w}x{c}")
