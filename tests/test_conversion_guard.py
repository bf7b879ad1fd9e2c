"""The converter refuses its result when the .mat file changes while it is being converted."""

import os

import pytest

from vggface_gender import conversion, keras_model, synthetic
from vggface_gender.errors import ModelFileError


def test_a_file_changed_during_conversion_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    mat = synthetic.write_vggface_mat(tmp_path / "net.mat", width=1 / 16, n_classes=3, input_size=32)
    out = tmp_path / "model"

    save_model = keras_model.save_model

    def touch_during_save(model, path):
        save_model(model, path)
        stat = mat.stat()
        os.utime(mat, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as if re-saved meanwhile

    monkeypatch.setattr(keras_model, "save_model", touch_during_save)
    with pytest.raises(ModelFileError, match="changed while it was being converted"):
        conversion.convert(mat, out)
    assert not out.exists() or not any(out.iterdir())


def test_an_unchanged_file_converts(tmp_path):
    mat = synthetic.write_vggface_mat(tmp_path / "net.mat", width=1 / 16, n_classes=3, input_size=32)
    info = conversion.convert(mat, tmp_path / "model")
    assert info["source"]["size_bytes"] == mat.stat().st_size
    assert (tmp_path / "model" / "base.keras").exists() and (tmp_path / "model" / "base.json").exists()
