"""The precision the frozen base runs in (``model.precision``): which one, and the model that uses it.

Running VGG-Face over the images is the whole cost of the pipeline. CPUs with AMX (``lscpu`` lists
``amx_bf16``) multiply bfloat16 matrices several times faster than float32, when TensorFlow uses
oneDNN; GPUs with tensor cores (compute capability >= 7.0) do the same for float16. Elsewhere the
reduced precisions are slower than float32 (bfloat16 capped at AVX512-BF16 measured 0.6x, with no
bf16 hardware 0.2x), so ``auto`` keys on the hardware, never on ``avx512_bf16`` alone.

- ``detect_hardware()``: the facts the choice depends on (CPU flags, oneDNN on/off, visible GPUs
  and their compute capability), as a small dataclass that tests replace.
- ``resolve_precision(requested, hardware=...)``: ``auto | float32 | bfloat16 | float16`` ->
  ``Resolved(name, reason)``; a requested precision that is slow or unsupported here falls back
  to float32, and ``reason`` is the one line saying so.
- ``with_precision(model, name)``: a copy of ``model`` computing the same thing in that precision:
  conv/dense layers (and the cheap layers between them) compute in bfloat16/float16 with float32
  variables; the mean subtraction before the first of them, everything after the last of them
  (and any head after ``upto``) and the outputs stay float32. The given model (and so whatever
  file it came from) is not changed: a model saved later stays float32.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass, field

CHOICES = ("auto", "float32", "bfloat16", "float16")
REDUCED = ("bfloat16", "float16")
KERAS_POLICY = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
TENSOR_CORES = (7, 0)  # float16 tensor cores (Volta and later)
GPU_BFLOAT16 = (8, 0)  # bfloat16 tensor cores (Ampere and later)
CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "amx_fp16")  # the flags the choice reads or reports


# --------------------------------------------------------------------------- the hardware
@dataclass(frozen=True)
class GPU:
    name: str
    compute_capability: tuple | None  # (major, minor), None when TensorFlow does not say


@dataclass(frozen=True)
class Hardware:
    """What the choice of precision depends on. ``gpus``: the GPUs TensorFlow sees (the model
    runs on the first); ``onednn``: TensorFlow's oneDNN CPU kernels are on (``TF_ENABLE_ONEDNN_OPTS``
    not 0 and a build that has them); ``cpu_flags``: the CPU's feature flags (``/proc/cpuinfo``)."""

    cpu_flags: frozenset = field(default_factory=frozenset)
    onednn: bool = False
    gpus: tuple = ()

    @property
    def amx_bf16(self) -> bool:
        return "amx_bf16" in self.cpu_flags

    def describe(self) -> str:
        """One line: the relevant CPU flags, oneDNN, the GPUs."""
        flags = " ".join(f"{f}={'yes' if f in self.cpu_flags else 'no'}" for f in CPU_FLAGS)
        gpus = ", ".join(f"{g.name} (compute capability {_cc(g.compute_capability)})" for g in self.gpus)
        return f"CPU {flags}; oneDNN {'on' if self.onednn else 'off'}; GPU: {gpus or 'none'}"


def _cc(cc) -> str:
    return "unknown" if cc is None else f"{cc[0]}.{cc[1]}"


def cpu_flags() -> frozenset:
    """The CPU's feature flags: ``/proc/cpuinfo`` (Linux), else ``lscpu``; empty when neither says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if re.match(r"^(flags|Features)\s*:", line):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    for line in out.splitlines():
        if line.startswith("Flags:"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def onednn_enabled() -> bool:
    """Whether TensorFlow's oneDNN CPU kernels are on in this process.

    ``TF_ENABLE_ONEDNN_OPTS=0`` (or ``false``) turns them off; otherwise they are on where the
    build has them: TensorFlow's x86-64 builds do, by default, since 2.9. TensorFlow has no public
    query for it (only a private module, which this package does not import), so the build is
    judged by the platform.
    """
    import platform

    env = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower()
    if env in ("0", "false"):
        return False
    return env in ("1", "true") or platform.machine().lower() in ("x86_64", "amd64")


def visible_gpus() -> tuple:
    """The GPUs TensorFlow sees, with their compute capability (public ``tf.config`` APIs)."""
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(device)
        except Exception:  # noqa: BLE001 - details are optional
            details = {}
        cc = details.get("compute_capability")
        gpus.append(GPU(details.get("device_name", device.name), tuple(cc) if cc else None))
    return tuple(gpus)


@functools.lru_cache(maxsize=1)
def detect_hardware() -> Hardware:
    """The facts of this machine and process (cached: they do not change while it runs)."""
    return Hardware(cpu_flags=cpu_flags(), onednn=onednn_enabled(), gpus=visible_gpus())


# --------------------------------------------------------------------------- the choice
@dataclass(frozen=True)
class Resolved:
    """``name``: float32, bfloat16 or float16; ``requested``: what the config said; ``reason``:
    one line on why (the fallback line when ``name`` is not what was requested)."""

    name: str
    requested: str
    reason: str

    @property
    def fell_back(self) -> bool:
        return self.requested not in ("auto", self.name)

    @property
    def keras_policy(self) -> str:
        return KERAS_POLICY[self.name]

    def to_dict(self) -> dict:
        """For ``classifier.json`` / ``metrics.json``: what ran, what was asked, why."""
        return {"precision": self.name, "requested": self.requested, "reason": self.reason}


def _fast(name: str, hw: Hardware) -> tuple[bool, str]:
    """Whether ``name`` runs faster than float32 on ``hw``, and why (or why not)."""
    if hw.gpus:
        gpu = hw.gpus[0]
        cc = gpu.compute_capability
        if name == "float16":
            if cc is not None and cc >= TENSOR_CORES:
                return True, f"{gpu.name} has float16 tensor cores (compute capability {_cc(cc)})"
            return False, (f"float16 is slow on {gpu.name} (compute capability {_cc(cc)}, "
                           f"no tensor cores below {_cc(TENSOR_CORES)})")
        if cc is not None and cc >= GPU_BFLOAT16:
            return True, f"{gpu.name} has bfloat16 tensor cores (compute capability {_cc(cc)})"
        return False, (f"bfloat16 is slow or unsupported on {gpu.name} (compute capability "
                       f"{_cc(cc)}, needs {_cc(GPU_BFLOAT16)})")
    if name == "float16":
        return False, "float16 is slow on this CPU (no GPU with tensor cores)"
    if not hw.amx_bf16:
        extra = " (avx512_bf16 alone measured 0.6x float32)" if "avx512_bf16" in hw.cpu_flags else ""
        return False, f"bfloat16 is slow on this CPU (no AMX){extra}"
    if not hw.onednn:
        return False, "bfloat16 is slow with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0), AMX unused"
    return True, "this CPU has AMX (amx_bf16) and TensorFlow uses oneDNN"


def _supported(name: str, hw: Hardware) -> bool:
    """Whether ``name`` computes here at all (slowly or not): everywhere on a CPU (TensorFlow has
    bfloat16 and float16 CPU kernels); bfloat16 on a GPU needs compute capability >= 8.0."""
    if name == "bfloat16" and hw.gpus:
        cc = hw.gpus[0].compute_capability
        return cc is not None and cc >= GPU_BFLOAT16
    return True


def resolve_precision(requested: str, *, hardware: Hardware | None = None,
                      keep_slow: bool = False) -> Resolved:
    """The precision to run in for ``model.precision`` = ``requested``, on ``hardware``
    (default: ``detect_hardware()``).

    ``auto``: float16 on a GPU with tensor cores, bfloat16 on a CPU with AMX and oneDNN, float32
    otherwise. ``float32``: always. ``bfloat16``/``float16``: when fast here, else float32 with the
    reason as a line ("bfloat16 is slow on this CPU (no AMX): using float32").

    ``keep_slow=True`` (prediction with a classifier whose head was trained on features of this
    precision, recorded in ``classifier.json``): a precision that is only slow here is kept, with
    a line saying so; only one that cannot run here (bfloat16 on a GPU older than 8.0) falls back.
    """
    if requested not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested == "float32":
        return Resolved("float32", requested, "float32 requested")
    hw = detect_hardware() if hardware is None else hardware
    if requested == "auto":
        candidate = "float16" if hw.gpus else "bfloat16"
        fast, why = _fast(candidate, hw)
        if fast:
            return Resolved(candidate, requested, f"auto: {candidate}, {why}")
        return Resolved("float32", requested, f"auto: float32, {why}")
    fast, why = _fast(requested, hw)
    if fast:
        return Resolved(requested, requested, f"{requested} requested; {why}")
    if keep_slow and _supported(requested, hw):
        return Resolved(requested, requested, f"{why}: kept, to match the features the head was trained on")
    return Resolved("float32", requested, f"{why}: using float32")


# --------------------------------------------------------------------------- the model
def _computes(layer) -> bool:
    """Conv/dense layers: where the time goes and what reduced precision speeds up."""
    import keras

    return isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                              keras.layers.Dense, keras.layers.DepthwiseConv2D,
                              keras.layers.SeparableConv2D, keras.layers.Conv2DTranspose))


def reduced_layers(model, upto: str | None = None) -> list[str]:
    """Names of the layers ``with_precision`` runs in reduced precision: in ``model.layers`` order
    (topological), from the first conv/dense layer to the last one at or before ``upto`` (default:
    the last layer). Layers before (the mean subtraction) and after (relu7, a head) stay float32."""
    layers = list(model.layers)
    names = [layer.name for layer in layers]
    end = len(layers) if upto is None else names.index(upto) + 1
    heavy = [i for i in range(end) if _computes(layers[i])]
    if not heavy:
        return []
    return names[heavy[0]:heavy[-1] + 1]


def with_precision(model, name: str, *, upto: str | None = None):
    """``model`` computing in ``name`` (float32, bfloat16 or float16; a ``Resolved`` works too).

    float32 returns ``model`` itself. Otherwise a clone (public ``keras.models.clone_model``): the
    layers listed by ``reduced_layers(model, upto)`` are new layers with the mixed policy
    (compute in ``name``, variables float32, weights copied); every other layer (input, mean
    subtraction, the float32 layers after the last conv/dense, a head) is shared with ``model``
    and stays float32, so the outputs are float32 (a float32 layer casts its inputs). When the
    model's output comes straight from a reduced layer, an ``Activation('linear', dtype='float32')``
    named ``<layer>_float32`` is added after it. ``model`` and its layers are not changed.
    """
    import keras

    name = getattr(name, "name", name)
    if name not in KERAS_POLICY:
        raise ValueError(f"precision must be one of {', '.join(KERAS_POLICY)}, got {name!r}")
    if name == "float32":
        return model
    reduced = set(reduced_layers(model, upto))
    if not reduced:
        return model
    policy = KERAS_POLICY[name]
    pairs = []

    def clone(layer):
        if layer.name not in reduced:
            return layer  # shared, float32
        config = layer.get_config()
        config["dtype"] = policy
        new = layer.__class__.from_config(config)
        pairs.append((layer, new))
        return new

    clone_model = keras.models.clone_model(model, clone_function=clone)
    for old, new in pairs:
        weights = old.get_weights()
        if weights:
            new.set_weights(weights)
    outputs = list(clone_model.outputs)
    low = [i for i, t in enumerate(outputs) if keras.backend.standardize_dtype(t.dtype) != "float32"]
    if not low:
        return clone_model
    for i in low:
        label = clone_model.layers[-1].name if len(outputs) == 1 else f"output{i}"
        outputs[i] = keras.layers.Activation("linear", dtype="float32", name=f"{label}_float32")(outputs[i])
    return keras.Model(clone_model.inputs, outputs[0] if len(outputs) == 1 else outputs,
                       name=clone_model.name)
