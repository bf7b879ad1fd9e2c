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

Weight transfer is the expensive part of a conversion (580 MB for VGG-Face), so it avoids work:
kernels are never initialised randomly (each layer is built with an initializer that hands over
the converted array), MATLAB's column-major arrays are reordered once, in cache-friendly blocks,
straight into a 64-byte-aligned buffer that TensorFlow adopts without a copy (DLPack), and each
source array is released as soon as its layer holds it. Saving (``save_model``) avoids the same
copies on the way out.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import mmap
import os
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path

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
_ALIGN = 64  # TensorFlow asserts this alignment on buffers it adopts
TRANSFER_SECONDS = [0.0]  # time spent reordering weights, summed over conversions (for the bench)


def _aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(count * itemsize + _ALIGN, dtype=np.uint8)
    offset = (-raw.ctypes.data) % _ALIGN
    return raw[offset:offset + count * itemsize].view(dtype).reshape(shape)


def to_c_order(array: np.ndarray, shape=None) -> np.ndarray:
    """A float32, C-ordered, 64-byte-aligned copy of ``array`` (then reshaped in C order).

    MATLAB arrays arrive column-major (F order). numpy's generic transposing copy of a large
    4-D array thrashes the cache (~1.5 s for fc6 here); copying it in blocks of 64 output x 64
    input channels keeps each block in cache (~4x faster), and two threads share the blocks
    (numpy releases the GIL while copying).
    """
    start = time.perf_counter()
    out = _aligned_empty(array.shape)
    if array.ndim == 4 and array.flags.f_contiguous and not array.flags.c_contiguous \
            and array.nbytes > (1 << 22):
        cout, cin = array.shape[3], array.shape[2]

        def copy_blocks(first_out, last_out):
            for o in range(first_out, last_out, _BLOCK):
                source = array[..., o:o + _BLOCK]
                for i in range(0, cin, _BLOCK):
                    np.copyto(out[:, :, i:i + _BLOCK, o:o + _BLOCK], source[:, :, i:i + _BLOCK],
                              casting="same_kind")

        middle = (cout // 2 // _BLOCK) * _BLOCK
        if middle and _pool() is not None:
            other = _pool().submit(copy_blocks, middle, cout)
            copy_blocks(0, middle)
            other.result()
        else:
            copy_blocks(0, cout)
    else:
        np.copyto(out, array, casting="same_kind")
    TRANSFER_SECONDS[0] += time.perf_counter() - start
    return out if shape is None else out.reshape(shape)


_BLOCK = 64
_POOL = []


def _pool():
    """One helper thread for the weight copies (created on first use, when 2+ CPUs)."""
    if not _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL.append(ThreadPoolExecutor(1, thread_name_prefix="weights") if (os.cpu_count() or 1) > 1 else None)
    return _POOL[0]


def _as_backend_tensor(array: np.ndarray):
    """Hand an aligned C-ordered array to the backend without a copy where possible."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    return array


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


def _with_weights(layer, kernel: np.ndarray, bias: np.ndarray | None):
    layer.kernel_initializer = _Preset(_as_backend_tensor(kernel))
    if bias is not None:
        layer.bias_initializer = _Preset(_as_backend_tensor(bias))
    return layer


def _reset_initializers(layer) -> None:
    for attr in ("kernel_initializer", "bias_initializer"):
        if isinstance(getattr(layer, attr, None), _Preset):
            setattr(layer, attr, keras.initializers.Zeros())


# =========================================================================== the model
def build_model(net: Net, input_size, *, release: bool = True, progress=None):
    """Build the Keras model of ``net`` for ``(height, width)`` input.

    Returns ``(model, info)``; ``info`` holds ``layers`` (Keras layer names in order, input
    excluded), ``renamed``, ``average_image`` (``"per-channel"`` values, ``"full"`` or None) and
    ``output_shapes`` ({keras name: shape without batch}).

    ``release=True`` empties each ``net`` layer's ``weights`` once its Keras layer holds them,
    so peak memory stays near one copy of the weights. ``progress`` is called once per layer.
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
        if release:
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
    kernel, bias = layer.weights
    kh, kw, cin, cout = kernel.shape
    h, w, c = in_shape
    (sy, sx), (t, b, l, r), (dy, dx) = layer.params["stride"], layer.params["pad"], layer.params["dilate"]
    groups = c // cin
    use_bias = bias is not None
    bias_c = None if bias is None else to_c_order(bias)

    covers_map = (kh, kw) == (h, w) and (t, b, l, r) == (0, 0, 0, 0) and groups == 1 \
        and (kh == 1 or dy == 1) and (kw == 1 or dx == 1)
    if covers_map:
        # A fully connected layer: Dense on the C-order (h, w, c) flattening.
        if not flat:
            x = keras.layers.Flatten(name=helper(name + FLATTEN))(x)
        dense = keras.layers.Dense(cout, use_bias=use_bias, name=name)
        _with_weights(dense, to_c_order(kernel, (kh * kw * cin, cout)), bias_c)
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
    _with_weights(conv, to_c_order(kernel), bias_c)
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
# The entries of a .keras archive, in the order Keras writes them.
ARCHIVE_ENTRIES = ("metadata.json", "config.json", "model.weights.h5")
_COPY_CHUNK = 8 << 20  # bytes handed to zipfile at a time (its CRC, then the write)


def save_model(model, path) -> None:
    """Write ``model`` to the ``.keras`` file ``path``: the entries ``model.save(path)`` writes.

    Same entries with the same content, written by Keras itself (the tests compare them with
    ``model.save``'s, weight by weight), in about a third of the time for VGG-Face's 580 MB of
    weights. ``model.save`` copies each weight twice on its way to h5py (TensorFlow's ``.numpy()``,
    then ``np.array``) and assembles the .h5 in memory (or, for large weights without psutil, in a
    temporary file) before copying it into the zip. Here Keras writes its unzipped form
    (``zipped=False``: config.json, metadata.json, model.weights.h5) into a temporary folder,
    h5py reading each CPU variable's buffer in place (``_weights_as_views``), and the three files
    are then stored, uncompressed as Keras does, into the zip in Keras' order. The folder is in
    memory (``/dev/shm``) when it has room, else beside ``path`` (``_scratch_folder``); it is
    removed as soon as its files are open, and one left by a killed process is removed by the
    next save.

    Falls back to a plain ``model.save(path)`` when the Keras at hand has no ``zipped``
    argument, when a layer saves assets (lookup layers' vocabularies), or when the unzipped form
    holds any other file. One save at a time per process (a lock), as the view patch is global.
    """
    path = Path(path).resolve()
    if "zipped" not in inspect.signature(keras.saving.save_model).parameters \
            or any(hasattr(layer, "save_assets") for layer in _all_layers(model)):
        model.save(path)
        return
    with _SAVE_LOCK:
        scratch = _scratch_folder(sum(_nbytes(w) for w in model.weights), path.parent)
        folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", suffix=".tmp", dir=scratch))
        try:
            unzipped = folder / "model"
            with _weights_as_views():
                keras.saving.save_model(model, unzipped, zipped=False)
            files = sorted(p.relative_to(unzipped).as_posix() for p in unzipped.rglob("*") if not p.is_dir())
            if files != sorted(ARCHIVE_ENTRIES):  # Keras always leaves an empty assets/: no entry
                model.save(path)
                return
            with contextlib.ExitStack() as stack:
                sources = {name: stack.enter_context(open(unzipped / name, "rb")) for name in ARCHIVE_ENTRIES}
                # Open files outlive their folder: remove it now, so that from here on nothing
                # can be left behind in memory or on disk, whatever stops the process.
                shutil.rmtree(folder, ignore_errors=True)
                _store_in_zip(sources, path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


_SAVE_LOCK = threading.Lock()
MEMORY_SCRATCH = Path("/dev/shm")
SCRATCH_PREFIX = "vggface_gender-save-"  # + the process id: see _remove_stale_scratch


def _nbytes(variable) -> int:
    return int(np.prod(variable.shape, dtype=np.int64)) * np.dtype(keras.backend.standardize_dtype(variable.dtype)).itemsize


def _scratch_folder(needed: int, fallback: Path) -> Path:
    """Where the unzipped form goes: ``/dev/shm`` (memory) if it and the RAM have room for it
    twice over, else ``fallback``. Writing ~600 MB to a disk file that is read back at once and
    deleted costs 0.5-0.7 s more here than writing it to memory, for nothing."""
    try:
        if MEMORY_SCRATCH.is_dir() and os.access(MEMORY_SCRATCH, os.W_OK):
            _remove_stale_scratch(MEMORY_SCRATCH)
            stat = os.statvfs(MEMORY_SCRATCH)
            available = _memory_available()
            if stat.f_bavail * stat.f_frsize > 2 * needed + (64 << 20) and available is not None \
                    and available > 4 * needed:
                return MEMORY_SCRATCH
    except OSError:
        pass
    return fallback


def _remove_stale_scratch(scratch: Path) -> None:
    """Remove scratch folders of saves whose process no longer runs (killed while Keras wrote)."""
    for folder in scratch.glob(f"{SCRATCH_PREFIX}*"):
        pid = folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def _memory_available() -> int | None:
    """Bytes of memory this process may still use: MemAvailable from /proc/meminfo, or less if a
    (cgroup v2) container limit leaves less. None where neither can be read (not Linux)."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        return None
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used) if available is not None else int(limit) - used
    return available


def _all_layers(model):
    """``model`` and every layer nested in it (in sub-models and inside custom layers)."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        try:
            return list(flatten(include_self=True, recursive=True))
        except TypeError:  # pragma: no cover - another Keras signature
            pass
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        found.append(layer)
        stack.extend(getattr(layer, "layers", ()))
    return found


def _store_in_zip(sources: dict, path: Path) -> None:
    """Store each open file of ``sources`` ({entry name: file}) uncompressed in a new zip at ``path``."""
    stamp = time.localtime(time.time())[:6]
    with open(path, "wb") as out, zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, reader in sources.items():
            entry = zipfile.ZipInfo(name, date_time=stamp)
            entry.external_attr = 0o600 << 16  # what ZipFile.open(name, "w") gives Keras' entries
            entry.file_size = os.fstat(reader.fileno()).st_size  # lets zipfile pick zip64 for > 2 GB
            with archive.open(entry, "w") as writer:
                if entry.file_size:
                    # Straight from the page cache: zipfile's CRC and write read the mapped pages,
                    # with no copy into a buffer of ours first.
                    with mmap.mmap(reader.fileno(), 0, access=mmap.ACCESS_READ) as mapped, \
                            memoryview(mapped) as view:
                        for offset in range(0, entry.file_size, _COPY_CHUNK):
                            writer.write(view[offset:offset + _COPY_CHUNK])


@contextlib.contextmanager
def _weights_as_views():
    """While Keras saves (in this thread), give h5py a read-only view of each CPU variable's buffer.

    Keras' h5 store turns each variable into numpy with ``backend.convert_to_numpy``, which for
    TensorFlow is ``np.array(variable)``: a copy of a copy (~1 s for VGG-Face). A tensor read from
    a variable on the CPU shares its buffer, and ``np.asarray`` of it is a view; h5py only reads it.
    Everything else (other threads, GPU variables, scalars, non-variables) goes to Keras' own
    function. If Keras' internals differ, nothing is patched and the save is only slower.
    """
    try:
        from keras.src import backend as keras_backend

        original = keras_backend.convert_to_numpy
    except (ImportError, AttributeError):  # pragma: no cover - a Keras layout we do not know
        yield
        return
    if keras.backend.backend() != "tensorflow":
        yield
        return
    keras_backend.convert_to_numpy = functools.partial(_view_or_copy, original=original,
                                                       thread=threading.get_ident())
    try:
        yield
    finally:
        keras_backend.convert_to_numpy = original


def _view_or_copy(value, *, original, thread):
    if isinstance(value, keras.Variable) and threading.get_ident() == thread:
        import tensorflow as tf

        tensor = tf.convert_to_tensor(value)
        if tensor.shape.rank and "CPU" in tensor.device:
            return np.asarray(tensor)
    return original(value)
