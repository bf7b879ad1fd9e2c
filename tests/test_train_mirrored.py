"""train.strategy: mirrored, on two logical CPU devices, matches the default strategy.

TensorFlow's devices are fixed when it initialises, so the two-device run happens in a
subprocess that splits the CPU before anything else touches TensorFlow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import helpers_train as H

CHILD = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path[:0] = [sys.argv[1]]
    import train
    codes = [train.main(["--config", path, "--no-early-stopping", "--set", f"train.strategy={strategy}"])
             for path, strategy in zip(sys.argv[2::2], sys.argv[3::2])]
    print("CODES", json.dumps(codes))
""")


@pytest.mark.slow
def test_mirrored_on_two_cpu_devices_matches_the_default_strategy(tmp_path, tmp_path_factory):
    from vggface_gender.cli import PROJECT_ROOT

    # 32 training images, global batch 8: every step splits evenly over the two replicas.
    default = H.Project(tmp_path / "default", H.base_once(tmp_path_factory), per_class=24, n_val=8)
    assert len(default.data["train_files"]) % 8 == 0
    mirrored_dir = tmp_path / "mirrored"
    shutil.copytree(default.tmp, mirrored_dir, symlinks=True)
    mirrored = H.Project.__new__(H.Project)
    mirrored.__dict__.update(default.__dict__, tmp=mirrored_dir, work=mirrored_dir / "work",
                             root=mirrored_dir / "data", config_path=mirrored_dir / "config.yaml")
    for project in (default, mirrored):
        with open(project.config_path, "a", encoding="utf-8") as f:
            f.write("  dropout: 0.0\n  max_epochs: 3\n  hidden_units: [32]\n")

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-c", CHILD, str(PROJECT_ROOT),
                          str(mirrored.config_path), "mirrored", str(default.config_path), "default"],
                         capture_output=True, text=True, env=env, timeout=600)
    codes = [line for line in run.stdout.splitlines() if line.startswith("CODES")]
    assert codes and json.loads(codes[0][6:]) == [0, 0], run.stdout[-3000:] + run.stderr[-3000:]
    assert "MirroredStrategy over 2 devices" in run.stdout

    summaries = [p.summary() for p in (mirrored, default)]
    assert [s["replicas"] for s in summaries] == [2, 1]
    assert [s["epochs_run"] for s in summaries] == [3, 3]
    # features extracted over two replicas, gathered back in order
    cached = [np.load(f"{s['cache']['folder']}/train.npy") for s in summaries]
    np.testing.assert_allclose(cached[0], cached[1], rtol=1e-5, atol=1e-5 * np.abs(cached[1]).max())
    # the trained head
    weights = [H.weights_of(p.classifier()) for p in (mirrored, default)]
    head = ["head_dense1", "head_output"]
    print(f"mirrored vs default: max |diff| / max |weight| = {H.max_rel_diff(weights[1], weights[0], head):.2e}")
    assert H.max_rel_diff(weights[1], weights[0], head) <= 1e-4
    assert H.max_rel_diff(weights[1], H.weights_of(_initial_head(default)), head) > 1e-3  # it trained


def _initial_head(project):
    """The head's initial weights (seeded initialisers), for the 'it trained' check."""
    import keras

    from vggface_gender.training import build_head

    model = project.head()
    head = build_head([32], 0.0, 2, 0, flatten=False)
    x = keras.Input(model.get_layer("head_dense1").input.shape[1:])
    return keras.Model(x, _apply(x, head))


def _apply(x, layers):
    for layer in layers:
        x = layer(x)
    return x
