"""The conversion stage: MatConvNet ``.mat`` -> ``base.keras`` + ``base.json``.

``convert(mat_path, out_dir)`` is the whole job and works without the CLI (the tests and the demo
call it on generated files); ``run_stage`` is what ``model_conversion.py`` runs. ``--verify
IMAGE...`` reloads the saved model the way later stages will and prints each image's top-5
classes, so a user holding the real ``vgg_face.mat`` can check the conversion on a photo.

base.json (``format`` 1):

- ``classes``: names from ``classes.description`` (or ``classes.name``), else null
- ``input_size``: [height, width]; ``input_channels``
- ``average_image``: the per-channel values subtracted inside the model, ``"full"`` for a full
  mean image, or null (no subtraction)
- ``interpolation``: from the file's normalization, or null
- ``layers``: Keras layer names in order (input excluded); ``output_shapes``: their output
  shapes without the batch axis (fc layers and what follows them are 2-D: ``[units]``)
- ``renamed``: ``{original: keras name}`` (see ``keras_model.keras_layer_names``)
- ``dropped``: MatConvNet layers left out (dropout: an identity at inference; a loss layer after
  a softmax)
- ``source``: ``{path, size_bytes, sha256}`` of the .mat file; ``mat_format``, ``layout``
- ``keras_version``
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import matconvnet
from .errors import ImageError, ModelFileError
from .workdir import WorkDir, atomic_paths, sha256_file

FORMAT = 1
STAGE_SCRIPT = "model_conversion.py"
# base.keras, base.json, model_conversion.commit.json
MODEL_FILE, INFO_FILE, RECORD_FILE = (WorkDir(".").base_model.name, WorkDir(".").base_info.name,
                                      WorkDir(".").base_record.name)


def convert(mat_path, out_dir, input_size=None, *, verbose: bool = False,
            timings: dict | None = None) -> dict:
    """Convert ``mat_path`` into ``out_dir/base.keras`` and ``out_dir/base.json``.

    ``input_size`` ([height, width]) is used only when the file names none
    (``normalization.imageSize``, then ``meta.inputSize``). Returns the base.json content.
    Both files are written atomically, after everything else succeeded: a bad file raises
    ``ModelFileError`` (one line naming it) and leaves nothing behind.
    ``timings``, if given, receives seconds spent per step (load, build, save, checksum).
    """
    mat_path = Path(mat_path)
    out_dir = Path(out_dir)
    timings = {} if timings is None else timings

    if not mat_path.is_file():
        raise ModelFileError(f"{mat_path}: model file not found (set model.mat_path)"
                             if not mat_path.exists() else f"{mat_path}: not a file")
    source_stat = mat_path.stat()
    # The checksum reads the whole file a second time. Hashing releases the GIL, and the two reads
    # share the page cache, so it runs in a thread beside loading, building and saving instead of
    # adding its time (~1 s per GB) after them. A failed conversion waits for it: seconds at most.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sha256") as pool:
        checksum = pool.submit(sha256_file, mat_path)
        return _convert(mat_path, out_dir, source_stat, input_size, checksum, timings, verbose)


def _convert(mat_path: Path, out_dir: Path, source_stat: os.stat_result, input_size, checksum,
             timings: dict, verbose: bool) -> dict:
    say = _say if verbose else (lambda *a: None)
    start = time.perf_counter()
    say(f"reading {mat_path} ({_size_text(source_stat.st_size)})")
    net = matconvnet.read_net(mat_path)
    timings["load"] = time.perf_counter() - start
    size = _input_size(net, input_size)

    from . import keras_model  # TensorFlow: imported only once the file is known to be good
    import keras

    start = time.perf_counter()
    with tqdm(total=len(net.layers), desc="building layers", file=sys.stderr, disable=not verbose) as bar:
        model, built = keras_model.build_model(net, size, progress=bar.update)
    timings["build"] = time.perf_counter() - start

    info = {
        "format": FORMAT,
        "classes": net.classes,
        "input_size": list(size),
        "input_channels": net.input_channels,
        "average_image": built["average_image"],
        "interpolation": net.interpolation,
        "layers": built["layers"],
        "output_shapes": built["output_shapes"],
        "renamed": built["renamed"],
        "dropped": list(net.dropped),
        "source": {"path": str(mat_path.resolve()), "size_bytes": None, "sha256": None},  # below
        "mat_format": net.mat_format,
        "layout": net.layout,
        "keras_version": keras.__version__,
    }
    del net
    start = time.perf_counter()
    model_path, info_path = out_dir / MODEL_FILE, out_dir / INFO_FILE
    say(f"saving {model_path}")
    # one set: the commit record, written last, vouches for base.keras and base.json together
    with atomic_paths({"model": model_path, "info": info_path}, out_dir / RECORD_FILE, STAGE_SCRIPT) as tmp:
        keras_model.save_model(model, tmp["model"])
        timings["save"] = time.perf_counter() - start
        start = time.perf_counter()
        try:
            digest = checksum.result()
        except OSError as exc:
            raise ModelFileError(f"{mat_path}: cannot read for its checksum ({exc})") from None
        timings["checksum"] = time.perf_counter() - start  # what is left of it: the wait
        if _changed(mat_path, source_stat):
            raise ModelFileError(f"{mat_path}: the file changed while it was being converted; "
                                 f"convert it again")
        info["source"].update(size_bytes=source_stat.st_size, sha256=digest)
        tmp["info"].write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _changed(path: Path, before: os.stat_result) -> bool:
    """True if ``path`` no longer looks like the file that was read (size, mtime or inode)."""
    try:
        after = path.stat()
    except OSError:
        return True
    return (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino)


def _input_size(net, fallback) -> tuple[int, int]:
    if net.image_size is not None:
        return net.image_size
    if fallback is not None:
        fallback = list(fallback)
        if len(fallback) != 2 or min(int(v) for v in fallback) < 1:
            raise ModelFileError(f"model.input_size: expected [height, width], got {fallback}")
        return int(fallback[0]), int(fallback[1])
    raise ModelFileError(f"{net.path}: the file names no input size (normalization.imageSize or "
                         f"meta.inputSize): set model.input_size to [height, width]")


def _size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# =========================================================================== the stage
def run_stage(cfg, *, verify_images=()) -> int:
    """``model_conversion.py``: convert ``model.mat_path``; with ``verify_images``, show top-5 classes."""
    images = [Path(p) for p in verify_images]
    for image in images:  # validate before the long conversion
        if not image.is_file():
            raise ImageError(f"{image}: image file not found")
    work = WorkDir(cfg.work_dir)
    info = convert(cfg.model.mat_path, work.model_dir, cfg.model.input_size, verbose=True)
    n_classes = len(info["classes"]) if info["classes"] else 0
    print(f"wrote {work.base_model} and {work.base_info.name}: {len(info['layers'])} layers, "
          f"input {info['input_size'][0]}x{info['input_size'][1]}, "
          f"{n_classes or 'no'} class names, dropped {', '.join(info['dropped']) or 'nothing'}")
    if images:
        verify(cfg, work.base_model, info, images)
    return 0


def verify(cfg, model_path, info: dict, images, top: int = 5, stream=None) -> list[list[tuple[str, float]]]:
    """Print (and return) the ``top`` classes of each image under the saved model."""
    import keras

    from .images import load_image, resolve_policy
    from .keras_model import load_saved_model

    stream = stream or sys.stdout
    model = load_saved_model(model_path, "converted model", STAGE_SCRIPT)
    policy = resolve_policy(cfg, info)
    classes = info.get("classes")
    last = model.layers[-1]
    probabilities = isinstance(last, keras.layers.Softmax)
    results = []
    for path in images:
        image = load_image(path, policy).astype(np.float32)
        scores = np.asarray(model(image[None], training=False)).reshape(-1)
        order = np.argsort(-scores, kind="stable")[:top]
        label = (lambda i: classes[i]) if classes and len(classes) == scores.size else (lambda i: f"class {i}")
        ranked = [(label(int(i)), float(scores[i])) for i in order]
        results.append(ranked)
        print(f"{path}:", file=stream)
        for rank, (name, score) in enumerate(ranked, start=1):
            value = f"{score:.4f}" if probabilities else f"{score:.4g} (score)"
            print(f"  {rank}. {name:<32} {value}", file=stream)
    return results
