"""The one config schema: defaults, validation and ``--set`` overrides.

Every stage reads the same ``config.yaml``. ``load_config`` validates the whole file at
start-up, so a misspelt key or a wrong type is reported before any work is done, as one
line that names the file and the key.

Paths: a relative path written in a config file resolves against that file's folder (so a
notebook's working directory does not matter); a path given with ``--set`` resolves against
the current directory. ``None`` (YAML ``null``) stays ``None``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .errors import ConfigError

ALL = "all"  # a count that means "every usable image"


# --------------------------------------------------------------------------- kinds of value
@dataclass(frozen=True)
class Field:
    """One leaf of the schema.

    ``kind`` is one of: str, int, float, bool, path, count (int >= 0 or 'all'),
    int_list, str_map (name -> str), choice, any.
    """

    kind: str
    default: Any = None
    optional: bool = False  # None allowed
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_max: bool = False
    help: str = ""
    check: Callable[[Any], str | None] | None = None  # extra check: returns an error text


def _schema() -> dict:
    # The one place where every key, its type and its default are written down.
    return {
        "work_dir": Field("path", "work", help="where every stage writes its outputs"),
        "seed": Field("int", 0, minimum=0, help="random seed for sampling, initialisation and order"),
        "data": {
            "root": Field("path", "data", help="folder with one subfolder per class"),
            "class_dirs": Field(
                "str_map",
                {"female": "female", "male": "male"},
                help="class name -> folder name under data.root; order gives the label order",
            ),
            "sample_per_class": Field("count", 1000, help="training sample per class (split into train/val)"),
            "val_fraction": Field("float", 0.2, minimum=0.0, maximum=1.0, exclusive_max=True,
                                  help="validation share of each class's sample (stratified)"),
            "test_per_class": Field("count", 250, help="held-out test images per class"),
            "allow_fewer": Field("bool", False, help="accept fewer images than requested instead of failing"),
            "dedup": Field("choice", "near", choices=("exact", "near"),
                           help="exact: identical files only; near: also the same photo re-encoded, "
                                "resized, mirrored or recoloured (perceptual hash)"),
            "near_threshold": Field("int", 36, minimum=0, maximum=128,
                                    help="near: largest Hamming distance (of 256 bits) between two "
                                         "photos' perceptual hashes that makes them near-duplicates"),
            "groups": Field("str", None, optional=True,
                            help="keep groups in one split: a regex with a named group searched in "
                                 "each path below its class folder, or a CSV file (path,group)"),
        },
        "images": {
            "resize": Field("choice", "stretch", choices=("stretch", "crop", "pad"),
                            help="how images reach the input size: stretch, centre-crop, or pad"),
            "interpolation": Field("choice", None, optional=True,
                                   choices=("nearest", "bilinear", "bicubic", "lanczos"),
                                   help="null: the model file's, bilinear when it names none"),
        },
        "faces": {
            "detect": Field("choice", "none", choices=("none", "mtcnn"),
                            help="none: each image is one face crop; mtcnn: find faces in whole photos"),
            "margin": Field("float", 1.1, minimum=1.0, maximum=4.0,
                            help="crop square side = mean(box width, height) x margin (VGG-Face demo: 1.1)"),
            "align": Field("bool", False, help="rotate each crop so the eyes are level (landmarks)"),
            "min_size": Field("int", 0, minimum=0,
                              help="drop faces smaller than this (pixels, longer box side), after detection"),
            "min_confidence": Field("float", 0.85, minimum=0.0, maximum=1.0,
                                    help="drop detections below this detector confidence"),
            "multiple": Field("choice", "largest", choices=("largest", "skip"),
                              help="training images with several faces: keep the largest, or skip the image"),
            "detect_size": Field("int", 1024, minimum=64,
                                 help="photos with a longer side above this are detected downscaled to it; "
                                      "crops come from the full-resolution image"),
        },
        "model": {
            "mat_path": Field("path", "vgg_face.mat", help="MatConvNet .mat file with the VGG-Face weights"),
            "input_size": Field("int_list", None, optional=True,
                                help="[height, width], used only when the .mat file names none"),
            "embedding_layer": Field("str", "relu7", help="layer whose output feeds the classifier head"),
            "precision": Field("choice", "auto", choices=("auto", "float32", "bfloat16", "float16"),
                               help="precision of the frozen base: auto (bfloat16 on CPUs with AMX, "
                                    "float16 on GPUs with tensor cores, else float32)"),
        },
        "train": {
            "hidden_units": Field("int_list", [512], help="sizes of the head's hidden dense layers"),
            "dropout": Field("float", 0.5, minimum=0.0, maximum=1.0, exclusive_max=True,
                             help="dropout after each hidden layer of the head"),
            "learning_rate": Field("float", 0.001, minimum=0.0, help="Adam's learning rate"),
            "batch_size": Field("int", 32, minimum=1, help="global batch size"),
            "max_epochs": Field("int", 50, minimum=1, help="upper bound; early stopping usually ends sooner"),
            "patience": Field("int", 3, minimum=0, help="epochs without val_loss improvement before stopping"),
            "trainable_from": Field("str", None, optional=True,
                                    help="unfreeze the base from this layer on (null: frozen)"),
            "cache": Field("bool", True, help="cache the frozen base's features on disk"),
            "strategy": Field("choice", "default", choices=("default", "mirrored"),
                              help="mirrored: tf.distribute.MirroredStrategy over the visible devices"),
        },
        "evaluate": {
            "positive_class": Field("str", "female", help="positive class for ROC AUC"),
            "groups": Field("str", None, optional=True,
                            help="bias report: 'utkface', a regex with named groups on file names, "
                                 "or a CSV file (path, attributes...)"),
            "bootstrap": Field("int", 1000, minimum=0, help="bootstrap resamples for the AUC interval"),
            "batch_size": Field("int", 32, minimum=1, help="images per prediction batch"),
        },
    }


SCHEMA = _schema()


# --------------------------------------------------------------------------- the config object
class Config(Mapping):
    """A validated, read-only nested mapping with attribute access (``cfg.data.root``).

    ``source`` is the config file it came from (or None), for error messages.
    """

    def __init__(self, values: dict, source: Path | None = None, prefix: str = ""):
        self._values = values
        self.source = source
        self._prefix = prefix

    def __getitem__(self, key):
        value = self._values[key]
        if isinstance(value, dict) and isinstance(_lookup_schema(self._prefix + key), dict):
            return Config(value, self.source, self._prefix + key + ".")
        return value

    def __getattr__(self, key):
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key {self._prefix + key!r}") from None

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __repr__(self):
        return f"Config({self.to_dict()!r})"

    def get_path(self, dotted: str):
        node: Any = self
        for part in dotted.split("."):
            node = node[part]
        return node

    def to_dict(self) -> dict:
        """Plain nested dict with paths as strings (for JSON reports)."""
        def plain(v):
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v
        return plain(self._values)

    @property
    def classes(self) -> list[str]:
        """Class names in label order (the order of ``data.class_dirs``)."""
        return list(self.get_path("data.class_dirs").keys())


def _lookup_schema(dotted: str):
    node: Any = SCHEMA
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _defaults(schema: dict) -> dict:
    out = {}
    for key, node in schema.items():
        out[key] = _defaults(node) if isinstance(node, dict) else _copy(node.default)
    return out


def _copy(v):
    if isinstance(v, dict):
        return dict(v)
    if isinstance(v, list):
        return list(v)
    return v


# --------------------------------------------------------------------------- validation
class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as people write them: YAML 1.1 (PyYAML) takes
    ``1e-4`` without a dot for a string, YAML 1.2 and everyone else for a number."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+0123456789."))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _where(source: Path | str | None) -> str:
    return str(source) if source else "config"


def _unknown_key(dotted: str, siblings, where: str) -> ConfigError:
    name = dotted.rsplit(".", 1)[-1]
    parent = dotted.rsplit(".", 1)[0] + "." if "." in dotted else ""
    close = difflib.get_close_matches(name, list(siblings), n=1)
    hint = f" (did you mean '{parent}{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{dotted}'{hint}")


def _coerce(spec: Field, value: Any, key: str, where: str, base_dir: Path) -> Any:
    """Check one value against its Field; return the normalised value."""
    def bad(expected: str):
        return ConfigError(f"{where}: {key}: expected {expected}, got {value!r}")

    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{where}: {key}: a value is required (got null)")
    kind = spec.kind
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        out: Any = value
    elif kind == "path":
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise bad("a path")
        p = Path(os.path.expanduser(str(value)))
        out = p if p.is_absolute() else (base_dir / p)
        out = Path(os.path.normpath(out))
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        out = value
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        out = value
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a number")
        out = float(value)
    elif kind == "count":
        if value == ALL:
            return ALL
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("a whole number >= 0 or 'all'")
        out = value
    elif kind == "int_list":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value
        ):
            raise bad("a list of positive integers")
        out = list(value)
    elif kind == "str_map":
        if not isinstance(value, dict) or not value or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in value.items()
        ):
            raise bad("a mapping of names to folder names")
        out = dict(value)
    elif kind == "choice":
        if value not in spec.choices:
            raise ConfigError(f"{where}: {key}: expected one of {', '.join(spec.choices)}, got {value!r}")
        out = value
    else:  # pragma: no cover - schema bug
        raise AssertionError(kind)

    if spec.minimum is not None and out < spec.minimum:
        raise ConfigError(f"{where}: {key}: must be >= {spec.minimum}, got {value!r}")
    if spec.maximum is not None and (out >= spec.maximum if spec.exclusive_max else out > spec.maximum):
        op = "<" if spec.exclusive_max else "<="
        raise ConfigError(f"{where}: {key}: must be {op} {spec.maximum}, got {value!r}")
    if spec.check is not None:
        problem = spec.check(out)
        if problem:
            raise ConfigError(f"{where}: {key}: {problem}")
    return out


def _merge(target: dict, raw: Any, schema: dict, prefix: str, where: str, base_dir: Path) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {raw!r}")
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in schema:
            raise _unknown_key(dotted, schema.keys(), where)
        spec = schema[key]
        if isinstance(spec, dict):
            if value is None:
                continue  # an empty section keeps its defaults
            _merge(target[key], value, spec, dotted + ".", where, base_dir)
        else:
            target[key] = _coerce(spec, value, dotted, where, base_dir)


def _check_whole(values: dict, where: str) -> None:
    """Checks that involve more than one key."""
    classes = list(values["data"]["class_dirs"])
    if len(classes) != 2:
        raise ConfigError(f"{where}: data.class_dirs: expected exactly two classes, got {classes}")
    if values["evaluate"]["positive_class"] not in classes:
        raise ConfigError(
            f"{where}: evaluate.positive_class: {values['evaluate']['positive_class']!r} "
            f"is not one of the classes {classes}")
    size = values["model"]["input_size"]
    if size is not None and len(size) != 2:
        raise ConfigError(f"{where}: model.input_size: expected [height, width], got {size}")


# --------------------------------------------------------------------------- --set overrides
_SET_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)=(.*)$", re.S)


def parse_override(text: str) -> tuple[str, Any]:
    """``'data.class_dirs.male=man'`` -> ``('data.class_dirs.male', 'man')``.

    The value is parsed as YAML, so numbers, booleans, ``null`` and ``[1, 2]`` work.
    """
    m = _SET_RE.match(text.strip())
    if not m:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = m.group(1), m.group(2)
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict,)) and key.split(".")[-1] != "class_dirs":
        value = raw  # a stray '{' should not silently become a mapping
    return key, value


def _apply_override(values: dict, key: str, value: Any, cwd: Path) -> None:
    where = f"--set {key}"
    parts = key.split(".")
    node_schema: Any = SCHEMA
    node_values: Any = values
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if isinstance(node_schema, Field) and node_schema.kind == "str_map" and i == len(parts) - 1:
            # data.class_dirs.male=man: one entry of a mapping
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}: expected a folder name, got {value!r}")
            node_values[part] = value
            return
        if not isinstance(node_schema, dict) or part not in node_schema:
            siblings = node_schema.keys() if isinstance(node_schema, dict) else []
            raise _unknown_key(".".join(parts[: i + 1]), siblings, "--set")
        if i == len(parts) - 1:
            spec = node_schema[part]
            if isinstance(spec, dict):
                raise ConfigError(f"{where}: '{key}' is a section; set one of its keys")
            node_values[part] = _coerce(spec, value, key, "--set", cwd)
            return
        node_schema = node_schema[part]
        node_values = node_values[part]
        del prefix


# --------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | None = None, overrides=(), cwd: str | os.PathLike | None = None) -> Config:
    """Read, merge with defaults, apply ``--set`` overrides and validate.

    ``path=None`` uses the defaults alone (relative paths then resolve against ``cwd``).
    Raises ``ConfigError`` with a one-line message naming the file and key.
    """
    cwd = Path(cwd or os.getcwd())
    values = _defaults(SCHEMA)
    # Defaults' relative paths resolve like paths in the file (or the cwd without a file).
    source = Path(path).resolve() if path is not None else None
    base_dir = source.parent if source is not None else cwd
    where = _where(source)
    for key, spec in _iter_leaves(SCHEMA):
        if spec.kind == "path":
            _set_dotted(values, key, _coerce(spec, _get_dotted(values, key), key, where, base_dir))

    if source is not None:
        if not source.exists():
            raise ConfigError(f"{source}: config file not found")
        try:
            raw = _load_yaml(source.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{source}: not valid YAML ({first})") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config ({exc.strerror})") from None
        if raw is not None:
            _merge(values, raw, SCHEMA, "", where, base_dir)

    for text in overrides:
        key, value = parse_override(text) if isinstance(text, str) else text
        _apply_override(values, key, value, cwd)

    _check_whole(values, where)
    return Config(values, source)


def _iter_leaves(schema: dict, prefix: str = ""):
    for key, node in schema.items():
        if isinstance(node, dict):
            yield from _iter_leaves(node, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", node


def _get_dotted(values: dict, key: str):
    for part in key.split("."):
        values = values[part]
    return values


def _set_dotted(values: dict, key: str, value) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        values = values[part]
    values[parts[-1]] = value


def describe_schema() -> list[tuple[str, Any, str]]:
    """``(dotted key, default, help)`` rows, for the README and ``--help``."""
    return [(k, f.default, f.help) for k, f in _iter_leaves(SCHEMA)]
