"""The Colab notebook, executed headless as a user would run it (nbclient + an IPython kernel).

It runs on the shipped demo, in a copy of the project (so its outputs land in the copy's
``work/``), exactly as written. Every cell must succeed, and the training cell must show the
feature extraction's progress while the extraction runs, not only when it ends.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from vggface_gender.cli import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "notebooks" / "colab_quickstart.ipynb"
pytestmark = pytest.mark.slow

# tqdm's text bar, as the notebook shows it without ipywidgets: "extracting train features:  40%|...| 192/480"
EXTRACTING = re.compile(r"extracting train features:[^\r\n]*?(\d+)/(\d+)")


class TimestampingClient(NotebookClient):
    """Records when each output message of each cell arrived."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrivals: list[tuple[float, int, dict]] = []

    def output(self, outs, msg, display_id, cell_index):
        self.arrivals.append((time.monotonic(), cell_index, msg.get("content", {})))
        return super().output(outs, msg, display_id, cell_index)


def _copy_project(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv*", "work", "__pycache__", ".pytest_cache", "bench")
    shutil.copytree(PROJECT_ROOT, dest, ignore=ignore)
    return dest


def _cell_index(nb, tag: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if tag in c.get("metadata", {}).get("tags", []))


def test_notebook_runs_headless_on_the_demo_and_shows_extraction_progress(tmp_path):
    project = _copy_project(tmp_path / "vggface-gender")
    nb = nbformat.read(project / "notebooks" / NOTEBOOK.name, as_version=4)
    client = TimestampingClient(nb, timeout=900, kernel_name="python3", allow_errors=False,
                                resources={"metadata": {"path": str(project / "notebooks")}})
    client.execute()  # raises CellExecutionError naming the cell when any cell fails

    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"], (i, cell.source)

    # Extraction progress arrived in pieces, with counts below the total before the final count.
    train_cell = _cell_index(nb, "train")
    seen = []  # (arrival time, images done, total)
    for when, index, content in client.arrivals:
        if index == train_cell and "text" in content:
            seen += [(when, int(d), int(t)) for d, t in EXTRACTING.findall(content["text"])]
    assert seen, "the training cell showed no extraction progress"
    total = seen[-1][2]
    finished = min(when for when, done, _ in seen if done == total)
    partial = [when for when, done, _ in seen if done < total]
    assert partial and min(partial) < finished, seen

    reports = project / "work" / "demo" / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["n_test"] == 200 and metrics["accuracy"] > 0.5
    # the report cell showed the plots inline
    report = nb.cells[_cell_index(nb, "report")]
    assert sum("image/png" in o.get("data", {}) for o in report.outputs) == 4
    # new images, not the training folder: classified by the script and by the Python API
    rows = (reports / "new_images.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 and "/new_images/" in rows[1].replace("\\", "/")
    api = "".join(o.get("text", "") for o in nb.cells[_cell_index(nb, "api")].outputs)
    assert "classes:" in api and api.count("female ") >= 1, api

