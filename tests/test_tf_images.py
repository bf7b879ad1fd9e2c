"""The tf.data image pipeline: the one loader, in order, with decoding yielding to the model."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from vggface_gender import images, synthetic, tf_images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tf_images")
    synthetic.write_image_folders(folder, 6, size=48, seed=1)
    return images.find_images(folder)


def test_batches_hold_the_loaders_images_in_order(files):
    policy = images.ImagePolicy((32, 32), "stretch", "bilinear")
    batches = list(tf_images.image_dataset(files, policy, 5))
    got = np.concatenate([np.asarray(b[0]) for b in batches])
    expected = np.stack([images.load_image(f, policy) for f in files]).astype(np.float32)
    np.testing.assert_array_equal(got, expected)
    assert [len(b[0]) for b in batches] == [5, 5, 2]
    assert all(e == b"" for b in batches for e in np.asarray(b[1]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
@pytest.mark.skipif(sys.platform.startswith("linux") and os.getpriority(os.PRIO_PROCESS, 0) > 19 - tf_images.DECODE_NICENESS,
                    reason="the process already runs at the lowest priorities")
def test_decoding_threads_run_at_a_lower_priority_than_the_rest(files, monkeypatch):
    policy = images.ImagePolicy((32, 32), "stretch", "bilinear")
    seen = {}
    lower = tf_images._yield_to_the_model

    def spy():
        lower()
        thread = threading.get_native_id()
        seen[thread] = os.getpriority(os.PRIO_PROCESS, thread)

    monkeypatch.setattr(tf_images, "_yield_to_the_model", spy)
    here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    iterator = iter(tf_images.image_dataset(files, policy, 4))
    for _ in iterator:
        pass
    assert seen and threading.get_native_id() not in seen  # decoding ran on the pipeline's threads
    wanted = os.getpriority(os.PRIO_PROCESS, os.getpid()) + tf_images.DECODE_NICENESS
    assert set(seen.values()) == {wanted}  # lowered once, not again on every image
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == here  # the caller is untouched
    del iterator
    import gc
    import time

    gc.collect()
    deadline = time.monotonic() + 10
    while set(seen) & _live_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(seen) & _live_threads()  # the lowered threads were the pipeline's own: gone with it


def _live_threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}
