"""The few Keras layers with no built-in equivalent, registered for safe-mode loading.

Import ``vggface_gender.layers`` (importing ``vggface_gender.keras_model`` does it) before
``keras.saving.load_model`` on a model that uses them. VGG-Face itself needs none of them:
they appear only in converted networks with padded pooling or LRN.

- ``MatConvNetPooling2D``: pooling with explicit [top bottom left right] padding as MatConvNet
  computes it. Max: a padded position never wins (−inf padding). Avg: the sum over the window
  divided by the number of window positions inside the image (not by the window size). Keras'
  ``ZeroPadding2D`` + pooling gets both wrong, and ``padding='same'`` only matches TF's own split.
- ``LocalResponseNormalization``: MatConvNet's ``vl_nnnormalize``:
  ``y = x * (kappa + alpha * sum(x^2 over the window)) ** -beta``, the window over channels
  ``k - floor((N-1)/2) .. k + ceil((N-1)/2)``, alpha NOT divided by N (Caffe divides it).
  Works on any rank (channels last).
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="vggface_gender")
class MatConvNetPooling2D(keras.layers.Layer):
    """Max or average pooling with MatConvNet's padding rules (channels last)."""

    def __init__(self, pool_size, strides, padding, method="max", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = tuple(int(v) for v in pool_size)
        self.strides = tuple(int(v) for v in strides)
        self.padding = tuple(int(v) for v in padding)  # (top, bottom, left, right)
        if method not in ("max", "avg"):
            raise ValueError(f"method must be 'max' or 'avg', got {method!r}")
        self.method = method
        t, b, l, r = self.padding
        if min(self.padding) < 0 or t >= self.pool_size[0] or b >= self.pool_size[0] \
                or l >= self.pool_size[1] or r >= self.pool_size[1]:
            raise ValueError(f"padding {self.padding} must be >= 0 and smaller than the window {self.pool_size}")

    def _pad(self, x, value):
        t, b, l, r = self.padding
        return ops.pad(x, [[0, 0], [t, b], [l, r], [0, 0]], constant_values=value)

    def call(self, inputs):
        if self.method == "max":
            padded = self._pad(inputs, float("-inf"))
            return ops.max_pool(padded, self.pool_size, self.strides, padding="valid")
        # Sum over the window / number of window positions inside the image.
        window = float(self.pool_size[0] * self.pool_size[1])
        sums = ops.average_pool(self._pad(inputs, 0.0), self.pool_size, self.strides, padding="valid")
        inside = self._pad(ops.ones_like(inputs[..., :1]), 0.0)
        counts = ops.average_pool(inside, self.pool_size, self.strides, padding="valid")
        return sums / counts if window == 1.0 else (sums * window) / ops.round(counts * window)

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        t, b, l, r = self.padding

        def size(s, lo, hi, k, st):
            return None if s is None else (s + lo + hi - k) // st + 1

        return (n, size(h, t, b, self.pool_size[0], self.strides[0]),
                size(w, l, r, self.pool_size[1], self.strides[1]), c)

    def get_config(self):
        config = super().get_config()
        config.update(pool_size=list(self.pool_size), strides=list(self.strides),
                      padding=list(self.padding), method=self.method)
        return config


@keras.saving.register_keras_serializable(package="vggface_gender")
class LocalResponseNormalization(keras.layers.Layer):
    """Cross-channel LRN with MatConvNet's window and alpha (see the module docstring)."""

    def __init__(self, depth, kappa, alpha, beta, **kwargs):
        super().__init__(**kwargs)
        self.depth = int(depth)
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.kappa = float(kappa)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, inputs):
        squares = ops.square(inputs)
        before = (self.depth - 1) // 2
        after = self.depth - 1 - before  # ceil((N-1)/2): asymmetric for even N
        pad = [[0, 0]] * (len(inputs.shape) - 1) + [[before, after]]
        padded = ops.pad(squares, pad)
        channels = inputs.shape[-1]
        total = padded[..., 0:channels]
        for k in range(1, self.depth):
            total = total + padded[..., k:k + channels]
        return inputs * ops.power(self.kappa + self.alpha * total, -self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(depth=self.depth, kappa=self.kappa, alpha=self.alpha, beta=self.beta)
        return config
