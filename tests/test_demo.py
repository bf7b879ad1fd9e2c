"""The demo and the Colab notebook, end to end on a reduced demo config.

The notebook's code cells run as they are (shell lines such as `!pip install` are skipped), in
this process, against the demo. Running it twice checks that the second run reuses what it can
and reports the same numbers.
"""

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from vggface_gender import demo
from vggface_gender.cli import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "notebooks" / "colab_quickstart.ipynb"
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


def notebook_code() -> list[str]:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    sources = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        # Shell and magic lines are Colab's business; everything else runs unchanged.
        sources.append("\n".join(line for line in lines if not line.lstrip().startswith(("!", "%"))))
    return sources


def run_notebook(monkeypatch, config_path: Path) -> dict:
    monkeypatch.setattr(demo, "DEMO_CONFIG", config_path)
    monkeypatch.chdir(PROJECT_ROOT)
    shown = []
    if "IPython" not in sys.modules:  # a bare venv has no IPython: stand in for its display
        try:
            import IPython.display  # noqa: F401
        except ImportError:
            fake = types.ModuleType("IPython.display")
            fake.Image = lambda filename: filename
            fake.display = shown.append
            package = types.ModuleType("IPython")
            package.version_info = (99, 0)  # matplotlib reads it when IPython is "imported"
            monkeypatch.setitem(sys.modules, "IPython", package)
            monkeypatch.setitem(sys.modules, "IPython.display", fake)
    namespace = {"__name__": "__main__"}
    for source in notebook_code():
        exec(compile(source, str(NOTEBOOK), "exec"), namespace)
    return namespace


def test_notebook_runs_the_demo_twice_with_the_same_numbers(tmp_path, monkeypatch):
    config_path = small_demo_config(tmp_path)
    first = run_notebook(monkeypatch, config_path)
    reports = tmp_path / "work" / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    for key in ("accuracy", "roc_auc", "per_class", "confusion_matrix", "n_test"):
        assert key in metrics
    assert metrics["n_test"] == 40
    for name in ("training_curves.png", "roc_curve.png", "confusion_matrix.png", "errors.png",
                 "predictions.csv", "history.csv"):
        assert (reports / name).stat().st_size > 0, name
    assert first["metrics"]["accuracy"] == metrics["accuracy"]
    assert (reports / "new_images.csv").read_text().count("\n") == 2 * 60 + 1

    summary = json.loads((reports / "train_summary.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "inputs").rglob("*") if p.is_file()}
    run_notebook(monkeypatch, config_path)
    again = json.loads((reports / "metrics.json").read_text())
    assert again == metrics
    second = json.loads((reports / "train_summary.json").read_text())
    assert second["best_epoch"] == summary["best_epoch"]
    assert (summary["cache"]["status"], second["cache"]["status"]) == ("built", "reused")
    # generated inputs were reused, not rewritten
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
