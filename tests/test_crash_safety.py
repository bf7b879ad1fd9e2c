"""Crash safety: a stage killed at any point leaves either the previous complete set of outputs or
one that the next stage refuses in one line; an extraction killed midway resumes to the same bits.

Kills are real ``SIGKILL``s of a stage run as a subprocess: at named points
(``VGGFACE_GENDER_KILL_AT``, read by ``workdir.kill_point``) and after seeded random delays. The
checks after each kill run in this process (TensorFlow is imported once). One small pipeline
(1/16-width VGG-Face structure, 32x32 input, generated images) is run once; each test works on a
copy of its work dir.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import data_preprocess
import model_conversion
import predict
import train
from vggface_gender import Classifier, synthetic
from vggface_gender.errors import MissingInputError
from vggface_gender.workdir import WorkDir, check_set, require_set

ROOT = Path(__file__).resolve().parent.parent
# 24 training images in batches of 2: 12 batches, so extraction has a chunk boundary (8 batches)
SETTINGS = {"data": {"sample_per_class": 16, "val_fraction": 0.25, "test_per_class": 4},
            "train": {"hidden_units": [8], "max_epochs": 2, "batch_size": 2},
            "evaluate": {"bootstrap": 10}, "seed": 1}


def write_config(tmp: Path, work: Path, data: Path, mat: Path) -> Path:
    path = tmp / "config.yaml"
    settings = json.loads(json.dumps(SETTINGS))
    settings["data"]["root"] = str(data)
    settings["model"] = {"mat_path": str(mat), "precision": "float32"}
    path.write_text(yaml.safe_dump({"work_dir": str(work), **settings}))
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The four stages run once, uninterrupted: the reference outputs."""
    tmp = tmp_path_factory.mktemp("crash")
    data = synthetic.write_image_folders(tmp / "data", 22, size=40, seed=3)
    mat = synthetic.write_vggface_mat(tmp / "net.mat", width=1 / 16, n_classes=4, input_size=32, seed=0)
    other_mat = synthetic.write_vggface_mat(tmp / "other.mat", width=1 / 16, n_classes=4, input_size=32, seed=1)
    config = write_config(tmp, tmp / "work", data, mat)
    for stage in (data_preprocess, model_conversion, train, predict):
        assert stage.main(["--config", str(config)]) == 0, stage.__name__
    [entry] = (tmp / "work" / "features").iterdir()
    features = {name: np.load(entry / f"{name}.npy") for name in ("train", "val")}
    return {"data": data, "mat": mat, "other_mat": other_mat, "work": tmp / "work", "features": features}


def copy_work(pipeline, tmp_path, features: bool = True, mat: str = "mat") -> tuple[Path, Path]:
    """A copy of the reference work dir (mtimes kept: its commit records hold) and its config."""
    work = tmp_path / "work"
    shutil.copytree(pipeline["work"], work, ignore=None if features else shutil.ignore_patterns("features"))
    return work, write_config(tmp_path, work, pipeline["data"], pipeline[mat])


def run_stage(script: str, config: Path, *sets: str, kill_at: str | None = None,
              kill_after: float | None = None) -> int:
    """Run a stage script in a subprocess, killed at a named point or after ``kill_after`` seconds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("VGGFACE_GENDER_KILL_AT", None)
    if kill_at:
        env["VGGFACE_GENDER_KILL_AT"] = kill_at
    args = [sys.executable, str(ROOT / script), "--config", str(config)]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_after is not None:
        try:
            return proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL
    return proc.wait(timeout=300)


def one_line_error(capsys, code: int, *needles: str) -> str:
    """Exit code 1 and one error line, the last on stderr (progress bars may precede it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and lines[-1] == errors[0], lines
    assert not any("Traceback" in line for line in lines), lines
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def files_of(record: Path) -> dict:
    """The bytes of every file a set's record lists."""
    names = json.loads(record.read_text())["files"]
    return {name: (record.parent / name).read_bytes() for name in names}


# --------------------------------------------------------------------------- named kill points
@pytest.mark.parametrize("point", ["wrote:summary.json", "wrote:train.csv", "commit:data_preprocess.commit.json"])
def test_splits_killed_while_written_are_refused_then_rewritten(pipeline, tmp_path, capsys, point):
    """data_preprocess.py renames summary.json first and train.csv last, then writes the record."""
    work, config = copy_work(pipeline, tmp_path)
    assert run_stage("data_preprocess.py", config, "seed=2", kill_at=point) == -signal.SIGKILL
    assert not WorkDir(work).splits_record.exists()
    capsys.readouterr()
    one_line_error(capsys, train.main(["--config", str(config)]), "splits", "run `python data_preprocess.py` again")
    assert data_preprocess.main(["--config", str(config), "--set", "seed=2", "--quiet"]) == 0
    record, problem = check_set(WorkDir(work).splits_record)
    assert record is not None and problem == "" and len(record["files"]) == 4


def test_a_base_killed_while_written_is_refused(pipeline, tmp_path, capsys):
    """base.json (converted from another file) is in place, base.keras still the old one."""
    work, config = copy_work(pipeline, tmp_path, mat="other_mat")
    old_keras = (work / "model" / "base.keras").read_bytes()
    assert run_stage("model_conversion.py", config, kill_at="wrote:base.json") == -signal.SIGKILL
    assert (work / "model" / "base.keras").read_bytes() == old_keras  # the mix exists on disk ...
    capsys.readouterr()
    one_line_error(capsys, train.main(["--config", str(config)]), "base.json",  # ... and is refused
                   "run `python model_conversion.py` again")
    with pytest.raises(MissingInputError, match="model_conversion.py"):
        Classifier.load(work)


@pytest.mark.parametrize("point", ["wrote:train_summary.json", "commit:train.commit.json"])
def test_a_classifier_killed_while_written_is_refused(pipeline, tmp_path, capsys, point):
    """train.py renames its reports first, classifier.keras last, then writes the record."""
    work, config = copy_work(pipeline, tmp_path)
    assert run_stage("train.py", config, "seed=2", kill_at=point) == -signal.SIGKILL
    capsys.readouterr()
    one_line_error(capsys, predict.main(["--config", str(config)]), "run `python train.py` again")
    one_line_error(capsys, predict.main(["--config", str(config), "--images", str(pipeline["data"] / "male")]),
                   "run `python train.py` again")


def test_an_extraction_killed_mid_chunk_resumes_to_the_same_features(pipeline, tmp_path, capsys):
    work, config = copy_work(pipeline, tmp_path, features=False)
    # batch 10 of 12: the first chunk (batches 0-7, 16 rows) is on disk, the second half done
    assert run_stage("train.py", config, kill_at="extract:train:10") == -signal.SIGKILL
    [entry] = (work / "features").iterdir()
    progress = json.loads((entry / "progress.json").read_text())
    assert progress["done"] == {"train": 16, "val": 0} and not (entry / "meta.json").exists()
    capsys.readouterr()
    assert train.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "resuming the train features at image 17 of 24" in out and "features of 'relu7' resumed" in out
    assert json.loads((work / "reports" / "train_summary.json").read_text())["cache"]["status"] == "resumed"
    for name, expected in pipeline["features"].items():
        assert np.array_equal(np.load(entry / f"{name}.npy"), expected), name
    assert not (entry / "progress.json").exists()


# --------------------------------------------------------------------------- seeded random kills
def test_data_preprocess_killed_at_random_times(pipeline, tmp_path, capsys):
    """Each kill leaves the old splits (seed 3), the new ones (seed 2) or a set train.py refuses."""
    rng = np.random.default_rng(12)
    work, config = copy_work(pipeline, tmp_path)
    record = WorkDir(work).splits_record
    start = time.perf_counter()
    assert run_stage("data_preprocess.py", config, "seed=3") == 0
    whole = time.perf_counter() - start  # kills spread over a run's own duration on this machine
    old = files_of(record)
    outcomes, states = [], []
    for delay in rng.uniform(0.2, 1.0, size=4) * whole:
        outcomes.append(run_stage("data_preprocess.py", config, "seed=2", kill_after=float(delay)))
        if record.exists():
            assert check_set(record)[0] is not None
            states.append(files_of(record))
        else:
            capsys.readouterr()
            one_line_error(capsys, train.main(["--config", str(config)]), "run `python data_preprocess.py` again")
    print(f"data_preprocess.py ({whole:.2f} s) killed at random times, exit codes: {outcomes}")
    assert set(outcomes) <= {0, -signal.SIGKILL}
    assert data_preprocess.main(["--config", str(config), "--set", "seed=2", "--quiet"]) == 0
    new = files_of(record)
    assert new != old and all(state in (old, new) for state in states)


def test_train_killed_at_random_times_then_rerun(pipeline, tmp_path, capsys):
    """After each kill predict.py works on a whole classifier (the old or the new one) or refuses
    it in one line; a re-run then completes, with the reference features."""
    rng = np.random.default_rng(7)
    work, config = copy_work(pipeline, tmp_path, features=False)
    wd = WorkDir(work)
    # two files of the set that another seed changes (classifier.json does not record the seed)
    old = {p: p.read_bytes() for p in (wd.classifier, wd.reports / "train_summary.json")}
    outcomes = []
    for delay in rng.uniform(3.0, 9.0, size=2):
        start = time.perf_counter()
        outcomes.append((round(float(delay), 2),
                         run_stage("train.py", config, "seed=2", kill_after=float(delay)),
                         round(time.perf_counter() - start, 1)))
        capsys.readouterr()
        code = predict.main(["--config", str(config)])
        if code == 0:
            same = [p.read_bytes() == data for p, data in old.items()]
            assert same in ([True, True], [False, False]), outcomes  # never a mix
            assert check_set(wd.classifier_record)[0] is not None
        else:
            one_line_error(capsys, code, "run `python train.py` again")
    print("train.py kills (delay s, exit code, s):", outcomes)
    assert train.main(["--config", str(config), "--set", "seed=2"]) == 0
    assert require_set(wd.classifier_record, "train.py", wd.classifier)
    [entry] = (work / "features").iterdir()
    for name, expected in pipeline["features"].items():
        assert np.array_equal(np.load(entry / f"{name}.npy"), expected), name


# --------------------------------------------------------------------------- changed inputs
def test_an_image_changed_since_the_split_is_named(pipeline, tmp_path, capsys):
    """Same size, same modification time (``cp -p`` of other bytes): the content hash catches it."""
    work, config = copy_work(pipeline, tmp_path, features=False)
    data = tmp_path / "data"
    shutil.copytree(pipeline["data"], data)
    config.write_text(config.read_text().replace(str(pipeline["data"]), str(data)))
    rel = (work / "splits" / "val.csv").read_text().splitlines()[3].split(",")[0]
    image = data / rel
    st = image.stat()
    content = bytearray(image.read_bytes())
    content[len(content) // 2] ^= 0x01
    image.write_bytes(bytes(content))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    capsys.readouterr()
    one_line_error(capsys, train.main(["--config", str(config)]), str(image),
                   "changed since the split was made", "data_preprocess.py")
