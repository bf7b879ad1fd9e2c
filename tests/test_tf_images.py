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
    for _ in tf_images.image_dataset(files, policy, 4):
        pass
    assert seen and threading.get_native_id() not in seen  # decoding ran on the pipeline's threads
    wanted = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + tf_images.DECODE_NICENESS)
    assert set(seen.values()) == {wanted}  # lowered once, not again on every image
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == here  # the caller is untouched
