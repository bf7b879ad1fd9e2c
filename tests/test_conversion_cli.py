"""model_conversion.py from the outside: bad input gives one line naming the file, exit 1 and no
output; good input writes base.keras + base.json; --verify prints the top-5 classes."""

import numpy as np
import pytest

import helpers_conversion as hc
import model_conversion
import reference_forward
from vggface_gender import synthetic
from vggface_gender.images import ImagePolicy, load_image


def run(capsys, tmp_path, mat_path, *extra):
    code = model_conversion.main(["--set", f"model.mat_path={mat_path}",
                                  "--set", f"work_dir={tmp_path / 'work'}", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _layers_net(layers, **content):
    return hc.net_content(layers, image_size=[8, 8, 3], **content)


def _bad_files(tmp_path):
    rng = np.random.default_rng(0)
    good = synthetic.save_mat(tmp_path / "good.mat", _layers_net([hc.conv("c1", (3, 3, 3, 4), rng)]))
    data = good.read_bytes()
    text = tmp_path / "notes.mat"
    text.write_text("these are not the weights you are looking for\n" * 10)
    truncated = tmp_path / "truncated.mat"
    truncated.write_bytes(data[: len(data) // 2])
    truncated73 = tmp_path / "truncated73.mat"
    full73 = synthetic.save_mat(tmp_path / "full73.mat", _layers_net([hc.conv("c1", (3, 3, 3, 4), rng)]),
                                fmt="v7.3")
    truncated73.write_bytes(full73.read_bytes()[:3000])
    no_net = synthetic.save_mat(tmp_path / "no_net.mat", {"weights": np.ones((3, 3)), "labels": "abc"})
    unsupported = synthetic.save_mat(tmp_path / "unsupported.mat", _layers_net(
        [hc.conv("c1", (3, 3, 3, 4), rng), hc.simple("custom", "mystery", forward="f")]))
    no_chain = synthetic.save_mat(tmp_path / "no_chain.mat", _layers_net(
        [hc.conv("c1", (3, 3, 3, 4), rng), hc.conv("c2", (3, 3, 3, 4), rng)]))  # Cin 3 vs 4 channels
    dagnn = synthetic.save_mat(tmp_path / "dagnn.mat", {"net": {
        "vars": {"name": "x"}, "params": {"name": "p"},
        "layers": hc.cell({"name": "conv1", "type": "dagnn.Conv", "block": {"size": np.ones((1, 4))}})}})
    return {
        "missing file": (tmp_path / "nowhere.mat", "not found"),
        "not a MAT-file": (text, "not a MAT-file"),
        "truncated": (truncated, "truncated"),
        "truncated v7.3": (truncated73, "truncated"),
        "no network": (no_net, "no MatConvNet network"),
        "unsupported layer": (unsupported, "layer 1 'mystery' (custom): unsupported layer type 'custom'"),
        "shapes do not chain": (no_chain, "layer 1 'c2' (conv): filters expect 3 input channels, which "
                                          "does not divide the 4 incoming channels"),
        "DagNN": (dagnn, "DagNN format is not supported"),
    }


def test_bad_input_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, capsys):
    for case, (path, message) in _bad_files(tmp_path).items():
        before = path.read_bytes() if path.exists() else None
        code, out, err = run(capsys, tmp_path, path)
        assert code == 1, case
        lines = err.strip().splitlines()  # progress notes may precede the error line
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], (case, err)
        assert str(path) in errors[0] and message in errors[0], (case, errors[0])
        assert "Traceback" not in err
        work = tmp_path / "work"
        assert not work.exists() or not any(work.rglob("*")), (case, list(work.rglob("*")))
        if before is not None:
            assert path.read_bytes() == before  # the input is never modified


def test_converts_and_verifies_images(tmp_path, capsys):
    mat = synthetic.write_vggface_mat(tmp_path / "vgg_face.mat", width=1 / 16, n_classes=12,
                                      input_size=64, seed=2, fc8_scale=0.05)
    faces = synthetic.write_image_folders(tmp_path / "faces", per_class=1, size=80)
    images = sorted(faces.rglob("*.jpg"))
    code, out, err = run(capsys, tmp_path, mat, "--verify", *map(str, images))
    assert code == 0, err
    assert (tmp_path / "work" / "model" / "base.keras").is_file()
    assert (tmp_path / "work" / "model" / "base.json").is_file()
    assert "36 layers" in out or "layers" in out
    names = synthetic.class_names(12)
    policy = ImagePolicy((64, 64), "stretch", "bilinear")
    for image in images:
        block = out.split(f"{image}:")[1].splitlines()[1:6]
        assert [line.split()[0] for line in block] == ["1.", "2.", "3.", "4.", "5."]
        shown = [(line.split()[1], float(line.split()[2])) for line in block]
        # The top class and its probability agree with the reference on the same pixels.
        probabilities = reference_forward.forward(mat, load_image(image, policy).astype(np.float64))[-1][2]
        best = int(np.argmax(probabilities))
        assert shown[0][0] == names[best]
        assert shown[0][1] == pytest.approx(float(probabilities.ravel()[best]), abs=1e-4)
        assert [p for _, p in shown] == sorted((p for _, p in shown), reverse=True)


def test_verify_checks_images_before_converting(tmp_path, capsys):
    mat = synthetic.write_vggface_mat(tmp_path / "vgg_face.mat", width=1 / 16, n_classes=12, input_size=64)
    code, out, err = run(capsys, tmp_path, mat, "--verify", str(tmp_path / "no_such.jpg"))
    assert code == 1 and err.strip().splitlines() == [f"error: {tmp_path / 'no_such.jpg'}: image file not found"]
    assert not (tmp_path / "work").exists()


def test_help_mentions_verify(capsys):
    assert model_conversion.main(["--help"]) == 0
    assert "--verify" in capsys.readouterr().out
