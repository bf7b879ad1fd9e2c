"""Generated inputs: MatConvNet files with VGG-Face's structure, and labelled image folders.

The real ``vgg_face.mat`` and face datasets cannot ship with the project, so the tests, the
benchmarks and the demo build their own, deterministically from a seed:

- ``write_vggface_mat`` writes a SimpleNN file with VGG-Face's exact 39-layer structure, in either
  published layout, at full or reduced width, with He-scaled random weights (activations stay
  informative through 16 layers) and the real ``averageImage``. These weights are NOT a face model.
- ``write_image_folders`` writes a small two-class image set whose classes differ visibly.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

# The real file's per-channel mean, RGB (format doc).
VGGFACE_AVERAGE_IMAGE = (129.1863, 104.7624, 93.5940)

# (name, output channels) of VGG-Face's conv blocks; fc6/fc7 have 4096 units, fc8 one per class.
_BLOCKS = [
    [("conv1_1", 64), ("conv1_2", 64)],
    [("conv2_1", 128), ("conv2_2", 128)],
    [("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256)],
    [("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512)],
    [("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512)],
]


def vggface_layer_specs(width: float = 1.0, n_classes: int = 2622, input_size: int = 224,
                        softmax_name: str = "softmax") -> list[dict]:
    """VGG-Face's 39 layers as plain dicts (weights' shapes, no values).

    ``width`` scales every channel count (1.0 = the real network; 1/8 = a small, fast copy).
    fc6's kernel covers the whole last feature map (7x7 at 224x224 input).
    """
    def scaled(c):
        return max(1, int(round(c * width)))

    specs, cin, size = [], 3, input_size
    for b, block in enumerate(_BLOCKS, start=1):
        for name, cout in block:
            specs.append({"type": "conv", "name": name, "shape": (3, 3, cin, scaled(cout)),
                          "stride": 1, "pad": 1})
            specs.append({"type": "relu", "name": "relu" + name[4:]})
            cin = scaled(cout)
        specs.append({"type": "pool", "name": f"pool{b}", "method": "max", "pool": (2, 2),
                      "stride": 2, "pad": 0})
        size //= 2
    fc = scaled(4096)
    specs += [
        {"type": "conv", "name": "fc6", "shape": (size, size, cin, fc), "stride": 1, "pad": 0},
        {"type": "relu", "name": "relu6"},
        {"type": "dropout", "name": "dropout6", "rate": 0.5},
        {"type": "conv", "name": "fc7", "shape": (1, 1, fc, fc), "stride": 1, "pad": 0},
        {"type": "relu", "name": "relu7"},
        {"type": "dropout", "name": "dropout7", "rate": 0.5},
        {"type": "conv", "name": "fc8", "shape": (1, 1, fc, n_classes), "stride": 1, "pad": 0},
        {"type": "softmax", "name": softmax_name},
    ]
    return specs


def _cell(items) -> np.ndarray:
    """A MATLAB 1xN cell array (scipy writes object arrays as cells)."""
    cell = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        cell[0, i] = item
    return cell


def _row(values, dtype=np.float64) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(1, -1)


def make_layer_structs(specs: list[dict], rng: np.random.Generator, momentum: bool = False,
                       fc8_scale: float = 1.0) -> list[dict]:
    """MATLAB structs (dicts) for ``specs``, with He-scaled random weights.

    ``fc8_scale`` shrinks the last layer's weights so the softmax is not saturated.
    Fields follow the Oxford file: conv layers carry ``learningRate``, ``weightDecay`` and (with
    ``momentum``) a momentum cell shaped like the weights, as the real ~1 GB file does; it holds
    small non-zero values (a trained net's last update), so a compressed file stays realistic.
    """
    layers = []
    for spec in specs:
        kind = spec["type"]
        layer: dict = {"type": kind, "name": spec["name"]}
        if kind == "conv":
            kh, kw, cin, cout = spec["shape"]
            std = np.sqrt(2.0 / (kh * kw * cin))
            if spec["name"] == "fc8":
                std *= fc8_scale
            weights = (rng.standard_normal((kh, kw, cin, cout), dtype=np.float32) * np.float32(std))
            bias = (rng.standard_normal((cout, 1), dtype=np.float32) * np.float32(0.01))
            layer["weights"] = _cell([weights, bias])
            layer["stride"] = _row([spec["stride"]] * 2)
            layer["pad"] = _row([spec["pad"]] * 4)
            layer["learningRate"] = _row([1, 2])
            layer["weightDecay"] = _row([1, 0])
            if momentum:
                # A separate stream (seeded by the layer's name), so that the weights are the same
                # with or without ``momentum``.
                mom = np.random.default_rng(zlib.crc32(spec["name"].encode()))
                layer["momentum"] = _cell([
                    mom.standard_normal(weights.shape, dtype=np.float32) * np.float32(1e-4 * std),
                    mom.standard_normal(bias.shape, dtype=np.float32) * np.float32(1e-4)])
        elif kind == "pool":
            layer["method"] = spec["method"]
            layer["pool"] = _row(spec["pool"])
            layer["stride"] = _row([spec["stride"]] * 2)
            layer["pad"] = _row([spec["pad"]] * 4)
        elif kind == "dropout":
            layer["rate"] = spec["rate"]
        layers.append(layer)
    return layers


def class_names(n_classes: int) -> list[str]:
    if n_classes == 2622:
        # Only the first and last names of the real list are known to us (format doc).
        return ["A.J._Buckley"] + [f"identity_{i:04d}" for i in range(2, n_classes)] + ["Zuleyka_Silver"]
    return [f"class_{i:04d}" for i in range(n_classes)]


def write_vggface_mat(path: str | os.PathLike, *, width: float = 1.0, n_classes: int = 2622,
                      input_size: int = 224, seed: int = 0, layout: str = "oxford",
                      momentum: bool = False, compress: bool = False,
                      fc8_scale: float = 0.1, fmt: str = "v5") -> Path:
    """Write a MatConvNet SimpleNN file with VGG-Face's structure (random weights).

    ``layout``: ``"oxford"`` (one variable ``net`` with ``normalization``, ``layers``,
    ``classes``, as ``vgg_face.mat``) or ``"matconvnet"`` (variables ``layers`` and ``meta``, as
    ``vgg-face.mat``, whose last layer is named ``prob``). ``fmt``: ``"v5"`` (scipy, as the
    published files) or ``"v7.3"`` (HDF5, written by ``hdf5storage``: a test-only dependency).
    """
    if layout not in ("oxford", "matconvnet"):
        raise ValueError(f"layout must be 'oxford' or 'matconvnet', got {layout!r}")
    rng = np.random.default_rng(seed)
    specs = vggface_layer_specs(width, n_classes, input_size,
                                softmax_name="softmax" if layout == "oxford" else "prob")
    layers = _cell(make_layer_structs(specs, rng, momentum=momentum, fc8_scale=fc8_scale))
    normalization = {
        "averageImage": np.asarray(VGGFACE_AVERAGE_IMAGE, np.float32).reshape(1, 1, 3),
        "imageSize": _row([input_size, input_size, 3]),
        "border": _row([0, 0]),
        "interpolation": "bilinear",
        "keepAspect": np.uint8(1),
    }
    names = np.empty((n_classes, 1), dtype=object)
    for i, name in enumerate(class_names(n_classes)):
        names[i, 0] = name
    classes = {"name": names.copy(), "description": names}
    if layout == "oxford":
        content = {"net": {"normalization": normalization, "layers": layers, "classes": classes}}
    else:
        content = {"layers": layers, "meta": {"normalization": normalization, "classes": classes}}
    return save_mat(path, content, fmt=fmt, compress=compress)


def save_mat(path: str | os.PathLike, content: dict, *, fmt: str = "v5", compress: bool = False) -> Path:
    """Write MATLAB variables: dicts become structs, object arrays cells, str char arrays.

    ``fmt="v5"`` uses scipy (Level 5, as MATLAB's default ``save``); ``fmt="v7.3"`` uses
    ``hdf5storage`` (HDF5 in MATLAB's own v7.3 layout; an independent writer, tests only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "v5":
        from scipy.io import savemat

        savemat(path, content, do_compression=compress, oned_as="column")
    elif fmt == "v7.3":
        import hdf5storage

        hdf5storage.savemat(str(path), content, fmt="7.3", matlab_compatible=True,
                            store_python_metadata=False, truncate_existing=True)
    else:
        raise ValueError(f"fmt must be 'v5' or 'v7.3', got {fmt!r}")
    return path


def write_image_folders(root: str | os.PathLike, per_class: int, *, classes=("female", "male"),
                        size: int = 64, seed: int = 0, fmt: str = "jpg", overlap: float = 0.0) -> Path:
    """Write ``per_class`` images per class under ``root/<class>/``.

    The classes differ in colour balance and texture so that a frozen random network's features
    separate them; each image is distinct (content hashes differ). ``overlap`` > 0 makes the task
    imperfect, like a real one: each image's colour is a blend of the two class colours, drawn
    around its own class's with this standard deviation (0.3: about 5% of images look like the
    other class), and the stripes' direction no longer gives the class away.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            freq = 2 + 4 * c + rng.uniform(-0.5, 0.5)
            phase = rng.uniform(0, 2 * np.pi)
            vertical = (c == 0) if overlap <= 0 else bool(rng.integers(2))
            stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx if vertical else yy) + phase)
            colours = np.array([[200, 90, 60], [60, 110, 200]], np.float64)
            if overlap > 0:
                blend = np.clip(c + rng.normal(0.0, overlap), -0.5, 1.5)
                base = colours[0] + blend * (colours[1] - colours[0])
            else:
                base = colours[c]
            # Faint stripes: a stronger texture (random phase) spreads each class so far in a
            # random tiny-width base's feature space that some bases no longer separate them.
            img = base * (0.85 + 0.15 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{name}_{i:05d}.{fmt}")
    return root
