"""The demo end to end on a reduced demo config, twice: the second run reuses what it can and
reports the same numbers. (The Colab notebook runs the same stages: tests/test_notebook.py.)"""

import json
from pathlib import Path

import pytest
import yaml

from vggface_gender import demo
from vggface_gender.cli import PROJECT_ROOT

pytestmark = pytest.mark.slow


def small_demo_config(tmp_path: Path) -> Path:
    """The shipped demo config with fewer images and epochs, writing under tmp_path."""
    cfg = yaml.safe_load((PROJECT_ROOT / "demo" / "config.yaml").read_text())
    cfg["work_dir"] = str(tmp_path / "work")
    cfg["data"]["root"] = str(tmp_path / "inputs" / "images")
    cfg["data"]["sample_per_class"] = 40
    cfg["data"]["test_per_class"] = 20
    cfg["model"]["mat_path"] = str(tmp_path / "inputs" / "vggface_demo.mat")
    cfg["train"]["max_epochs"] = 8
    cfg["evaluate"]["bootstrap"] = 100
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_demo_runs_twice_with_the_same_numbers(tmp_path):
    config_path = small_demo_config(tmp_path)
    assert demo.run(config_path) == 0
    reports = tmp_path / "work" / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    for key in ("accuracy", "roc_auc", "per_class", "confusion_matrix", "n_test"):
        assert key in metrics
    assert metrics["n_test"] == 40
    for name in ("training_curves.png", "roc_curve.png", "confusion_matrix.png", "errors.png",
                 "predictions.csv", "history.csv"):
        assert (reports / name).stat().st_size > 0, name

    summary = json.loads((reports / "train_summary.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "inputs").rglob("*") if p.is_file()}
    assert demo.run(config_path) == 0
    assert json.loads((reports / "metrics.json").read_text()) == metrics
    second = json.loads((reports / "train_summary.json").read_text())
    assert second["best_epoch"] == summary["best_epoch"]
    assert (summary["cache"]["status"], second["cache"]["status"]) == ("built", "reused")
    # generated inputs were reused, not rewritten
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
