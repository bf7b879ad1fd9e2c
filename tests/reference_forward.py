"""An independent reference forward pass of a MatConvNet SimpleNN file: numpy and scipy only.

It follows MatConvNet's semantics (vl_simplenn at test time, the CPU code of vl_nnconv,
vl_nnpool, vl_nnrelu, vl_nnsoftmax, vl_nnbnorm, vl_nnnormalize), in float64, and shares no code
with the converter: it reads the file itself (``loadmat`` with ``struct_as_record=False``, a
different access path from the converter's) and never imports TensorFlow or the package.
MAT v5 files only (the tests compare v7.3 conversions with their v5 twin).
"""

from __future__ import annotations

import numpy as np
from scipy.io import loadmat
from scipy.io.matlab import mat_struct


def _field(s, name, default=None):
    return getattr(s, name, default) if isinstance(s, mat_struct) else default


def _one(v):
    """Unwrap 1x1 object/struct arrays."""
    while isinstance(v, np.ndarray) and v.dtype == object and v.size == 1:
        v = v.ravel()[0]
    return v


def _string(v):
    v = _one(v)
    if isinstance(v, np.ndarray):
        return str(v.ravel()[0]) if v.size else ""
    return "" if v is None else str(v)


def _ints(v, n):
    values = [int(x) for x in np.asarray(v).ravel(order="F")] if v is not None and np.size(v) else []
    if not values:
        return None
    return values * n if len(values) == 1 else values


def load_simplenn(path):
    """-> (layers: list of mat_struct, normalization or None, top-level dict)."""
    top = loadmat(path, squeeze_me=False, struct_as_record=False)
    container = _one(top["net"]) if "net" in top else None
    if container is not None:
        layers = _field(container, "layers")
        meta = _one(_field(container, "meta"))
        norm = _one(_field(container, "normalization")) or _one(_field(meta, "normalization"))
    else:
        layers = top["layers"]
        meta = _one(top.get("meta"))
        norm = _one(top.get("normalization")) if "normalization" in top else _one(_field(meta, "normalization"))
    return [_one(layer) for layer in np.asarray(layers).ravel(order="F")], norm, top


def layer_names(layers):
    return [_string(_field(layer, "name")) or f"layer{i + 1}" for i, layer in enumerate(layers)]


def subtract_mean(image, norm, top):
    x = np.asarray(image, dtype=np.float64)
    avg = _field(norm, "averageImage")
    if avg is not None and np.size(avg):
        avg = np.asarray(avg, dtype=np.float64)
        if avg.size == 1:
            return x - avg.ravel()[0]
        if avg.size == x.shape[2]:
            return x - avg.ravel(order="F").reshape(1, 1, -1)
        if avg.ndim == 2:
            avg = avg[:, :, None]
        return x - avg
    if "imageMean" in top and np.size(top["imageMean"]):
        return x - float(np.asarray(top["imageMean"]).ravel()[0])
    return x


def conv(x, layer):
    weights = _field(layer, "weights")
    if weights is not None and np.size(weights):
        cell = np.asarray(weights, dtype=object).ravel(order="F")
        w = cell[0]
        b = cell[1] if cell.size > 1 else None
    else:
        w, b = _field(layer, "filters"), _field(layer, "biases")
    w = np.asarray(w, dtype=np.float64)
    w = w.reshape(w.shape + (1,) * (4 - w.ndim), order="F")
    kh, kw, cin, cout = w.shape
    t, bo, le, r = _ints(_field(layer, "pad"), 4) or [0, 0, 0, 0]
    sy, sx = _ints(_field(layer, "stride"), 2) or [1, 1]
    dy, dx = _ints(_field(layer, "dilate"), 2) or [1, 1]
    xp = np.pad(x, ((t, bo), (le, r), (0, 0)))
    hp, wp, c = xp.shape
    groups = c // cin
    assert groups * cin == c and cout % groups == 0
    per_group = cout // groups
    ho = (hp - ((kh - 1) * dy + 1)) // sy + 1
    wo = (wp - ((kw - 1) * dx + 1)) // sx + 1
    out = np.zeros((ho, wo, cout))
    for i in range(kh):
        for j in range(kw):
            patch = xp[i * dy: i * dy + sy * (ho - 1) + 1: sy, j * dx: j * dx + sx * (wo - 1) + 1: sx, :]
            for g in range(groups):
                out[..., g * per_group:(g + 1) * per_group] += (
                    patch[..., g * cin:(g + 1) * cin] @ w[i, j, :, g * per_group:(g + 1) * per_group])
    if b is not None and np.size(b):
        out += np.asarray(b, dtype=np.float64).ravel()
    return out


def pool(x, layer):
    ph, pw = _ints(_field(layer, "pool"), 2)
    sy, sx = _ints(_field(layer, "stride"), 2) or [1, 1]
    t, bo, le, r = _ints(_field(layer, "pad"), 4) or [0, 0, 0, 0]
    method = _string(_field(layer, "method")) or "max"
    h, w, c = x.shape
    ho = (h + t + bo - ph) // sy + 1
    wo = (w + le + r - pw) // sx + 1
    out = np.empty((ho, wo, c))
    # As pooling_cpu.cpp: clip each window to the image; max over it, or mean over its inside part.
    for oy in range(ho):
        y1 = oy * sy - t
        y2, y1 = min(y1 + ph, h), max(y1, 0)
        for ox in range(wo):
            x1 = ox * sx - le
            x2, x1 = min(x1 + pw, w), max(x1, 0)
            window = x[y1:y2, x1:x2, :]
            if method == "max":
                out[oy, ox] = window.max(axis=(0, 1))
            else:
                out[oy, ox] = window.sum(axis=(0, 1)) / ((y2 - y1) * (x2 - x1))
    return out


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def bnorm(x, layer):
    cell = np.asarray(_field(layer, "weights"), dtype=object).ravel(order="F")
    mult, bias = (np.asarray(a, np.float64).ravel() for a in cell[:2])
    moments = np.asarray(cell[2], np.float64)
    moments = moments.reshape(-1, 2, order="F")
    mu, sigma = moments[:, 0], moments[:, 1]  # sigma = sqrt(var + eps), as vl_nnbnorm stores it
    return mult * (x - mu) / sigma + bias


def lrn(x, layer):
    n, kappa, alpha, beta = np.asarray(_field(layer, "param"), np.float64).ravel()
    n = int(n)
    c = x.shape[-1]
    sq = x ** 2
    total = np.zeros_like(x)
    for k in range(c):
        lo = max(0, k - (n - 1) // 2)
        hi = min(c - 1, k + int(np.ceil((n - 1) / 2)))
        total[..., k] = sq[..., lo:hi + 1].sum(axis=-1)
    return x * (kappa + alpha * total) ** (-beta)


def forward(path, image):
    """Run the network in ``path`` on one ``(H, W, C)`` RGB image in 0-255.

    Returns ``[(name, type, output)]`` for every layer in file order (names as in the file, or
    MatConvNet's ``layer<i>``), outputs as float64 ``(H, W, C)`` arrays.
    """
    layers, norm, top = load_simplenn(path)
    names = layer_names(layers)
    x = subtract_mean(image, norm, top)
    results = []
    last_type = None
    for layer, name in zip(layers, names):
        kind = _string(_field(layer, "type"))
        if kind == "conv":
            x = conv(x, layer)
        elif kind == "pool":
            x = pool(x, layer)
        elif kind == "relu":
            leak = _field(layer, "leak")
            leak = float(np.asarray(leak).ravel()[0]) if leak is not None and np.size(leak) else 0.0
            x = np.where(x > 0, x, leak * x)
        elif kind in ("softmax",):
            x = softmax(x)
        elif kind in ("softmaxloss", "loss"):
            loss = _string(_field(layer, "loss")) or "softmaxlog"
            if last_type != "softmax" and (kind == "softmaxloss" or loss == "softmaxlog"):
                x = softmax(x)  # at test time: the class probabilities
            # any other loss: the network's output is the logits before it
        elif kind == "dropout":
            pass
        elif kind == "bnorm":
            x = bnorm(x, layer)
        elif kind in ("lrn", "normalize"):
            x = lrn(x, layer)
        else:
            raise ValueError(f"reference: unsupported layer type {kind}")
        last_type = "softmax" if kind in ("softmax", "softmaxloss", "loss") else kind
        results.append((name, kind, x))
    return results
