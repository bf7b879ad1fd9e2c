"""The tf.data image pipeline: the one loader, in order."""

from __future__ import annotations

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
