"""The config schema: defaults, validation errors, path resolution, --set overrides."""

import subprocess
import sys
from pathlib import Path

import pytest

from vggface_gender.cli import PROJECT_ROOT
from vggface_gender.config import describe_schema, load_config, parse_override
from vggface_gender.errors import ConfigError


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_config_equals_schema_defaults(tmp_path):
    shipped = load_config(PROJECT_ROOT / "config.yaml")
    defaults = load_config(write(tmp_path, ""))
    a, b = shipped.to_dict(), defaults.to_dict()
    for cfg in (a, b):  # paths differ only by the folder they resolve against
        cfg["work_dir"] = Path(cfg["work_dir"]).name
        cfg["data"]["root"] = Path(cfg["data"]["root"]).name
        cfg["model"]["mat_path"] = Path(cfg["model"]["mat_path"]).name
    assert a == b


def test_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.data.sample_per_class == 1000
    assert cfg.data.test_per_class == 250
    assert cfg.data.val_fraction == 0.2
    assert cfg.train.learning_rate == 0.001
    assert cfg.model.embedding_layer == "relu7"
    assert cfg.classes == ["female", "male"]
    assert cfg.work_dir == tmp_path / "work"


def test_exponents_without_a_dot_are_numbers_in_files_and_overrides(tmp_path):
    """PyYAML (YAML 1.1) alone reads ``1e-4`` as a string; people mean a number."""
    cfg = load_config(write(tmp_path, "train:\n  learning_rate: 1e-4\n"))
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    cfg = load_config(write(tmp_path, ""), ["train.learning_rate=2E-3"])
    assert cfg.train.learning_rate == 2e-3
    assert parse_override("model.embedding_layer=1e") == ("model.embedding_layer", "1e")  # not a number
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(write(tmp_path, "train:\n  learning_rate: 1e-4x\n"))


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    sub = tmp_path / "proj"
    sub.mkdir()
    path = write(sub, "data:\n  root: ../faces\nwork_dir: out\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert cfg.data.root == tmp_path / "faces"
    assert cfg.work_dir == sub / "out"


def test_set_paths_resolve_against_the_current_folder(tmp_path, monkeypatch):
    sub = tmp_path / "proj"
    sub.mkdir()
    path = write(sub, "")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["data.root=mine", "model.mat_path=/abs/vgg.mat"])
    assert cfg.data.root == tmp_path / "mine"
    assert cfg.model.mat_path == Path("/abs/vgg.mat")


def test_set_nested_mapping_entry(tmp_path):
    cfg = load_config(write(tmp_path, ""), ["data.class_dirs.male=man", "data.class_dirs.female=woman"])
    assert cfg.data.class_dirs == {"female": "woman", "male": "man"}
    assert cfg.classes == ["female", "male"]


def test_set_parses_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, ""), [
        "train.hidden_units=[256, 64]", "train.cache=false", "data.test_per_class=all",
        "train.trainable_from=fc6", "model.input_size=[32, 14]", "seed=7"])
    assert cfg.train.hidden_units == [256, 64]
    assert cfg.train.cache is False
    assert cfg.data.test_per_class == "all"
    assert cfg.train.trainable_from == "fc6"
    assert cfg.model.input_size == [32, 14]
    assert cfg.seed == 7


@pytest.mark.parametrize("text, needle", [
    ("data:\n  sampel_per_class: 10\n", "unknown key 'data.sampel_per_class' (did you mean 'data.sample_per_class'?)"),
    ("trian:\n  max_epochs: 3\n", "unknown key 'trian'"),
    ("data:\n  val_fraction: 1.5\n", "data.val_fraction: must be < 1.0"),
    ("data:\n  sample_per_class: many\n", "data.sample_per_class: expected a whole number >= 0 or 'all'"),
    ("train:\n  batch_size: 3.5\n", "train.batch_size: expected an integer"),
    ("train:\n  cache: yes please\n", "train.cache: expected true or false"),
    ("images:\n  resize: squash\n", "images.resize: expected one of stretch, crop, pad"),
    ("work_dir: null\n", "work_dir: a value is required"),
    ("data:\n  class_dirs: {a: a, b: b, c: c}\n", "data.class_dirs: expected exactly two classes"),
    ("evaluate:\n  positive_class: woman\n", "evaluate.positive_class: 'woman' is not one of the classes"),
    ("data: [1, 2]\n", "data: expected a mapping"),
    ("data:\n  root: [unclosed\n", "not valid YAML"),
])
def test_errors_name_the_file_and_the_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert needle in message
    assert str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize("override, needle", [
    ("data.sample_per_clas=5", "unknown key 'data.sample_per_clas'"),
    ("train.max_epochs=zero", "train.max_epochs: expected an integer"),
    ("data=5", "'data' is a section"),
    ("no-equals-sign", "expected dotted.key=value"),
])
def test_bad_overrides(tmp_path, override, needle):
    with pytest.raises(ConfigError, match="--set") as info:
        load_config(write(tmp_path, ""), [override])
    assert needle in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_parse_override():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=x=y") == ("a", "x=y")


def test_describe_schema_lists_every_key():
    keys = [row[0] for row in describe_schema()]
    assert "data.class_dirs" in keys and "train.strategy" in keys and "work_dir" in keys


SCRIPTS = ["data_preprocess.py", "model_conversion.py", "train.py", "predict.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_help_and_config_error_from_a_shell(tmp_path, script):
    run = lambda *a: subprocess.run([sys.executable, str(PROJECT_ROOT / script), *a],
                                    capture_output=True, text=True, cwd=tmp_path, timeout=120)
    shown = run("--help")
    assert shown.returncode == 0
    assert "--config" in shown.stdout and "--set" in shown.stdout
    bad = write(tmp_path, "data:\n  sampel_per_class: 1\n", "bad.yaml")
    failed = run("--config", str(bad))
    assert failed.returncode == 1
    assert failed.stderr.strip().count("\n") == 0, failed.stderr
    assert "unknown key 'data.sampel_per_class'" in failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_main_returns_codes_in_process(tmp_path, script, capsys):
    import runpy
    module = runpy.run_path(str(PROJECT_ROOT / script), run_name="not_main")  # importing runs nothing
    assert module["main"](["--help"]) == 0
    assert module["main"](["--config", str(tmp_path / "missing.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err
