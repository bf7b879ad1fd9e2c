"""data_preprocess.py on generated class folders: counts, leakage, determinism, broken files, errors.

Folders hold tiny distinct PNGs (8x8, a few hundred bytes), so each run takes milliseconds.
"""

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_preprocess
from conftest import FACES, ROOT
from vggface_gender import dataset
from vggface_gender.config import load_config
from vggface_gender.errors import DataError, MissingInputError

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- helpers
def write_image(path, index, ext="png", size=8):
    """A tiny image whose content is unique to ``index``."""
    rng = np.random.default_rng(index)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    arr[0, 0] = (index % 256, (index // 256) % 256, 7)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95) if ext in ("jpg", "jpeg") else Image.fromarray(arr).save(path)
    return path


def make_folders(root, counts, start=0):
    """``counts``: {folder: n}; images ``<folder>/img_XXXX.png`` with globally unique contents."""
    index = start
    for folder, n in counts.items():
        for i in range(n):
            write_image(root / folder / f"img_{i:04d}.png", index)
            index += 1
    return root


def write_config(tmp_path, **data):
    lines = ["data:"] + [f"  {k}: {v}" for k, v in data.items()]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(tmp_path, *sets, config=None, work="work"):
    """Run the script in-process; return (exit code, {split: rows}, summary or None)."""
    argv = ["--quiet", "--config", str(config or tmp_path / "config.yaml"),
            "--set", f"work_dir={tmp_path / work}"]
    for s in sets:
        argv += ["--set", s]
    code = data_preprocess.main(argv)
    splits = tmp_path / work / "splits"
    rows = {s: read_rows(splits / f"{s}.csv") for s in SPLITS if (splits / f"{s}.csv").exists()}
    summary = json.loads((splits / "summary.json").read_text()) if (splits / "summary.json").exists() else None
    return code, rows, summary


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        assert next(reader) == ["path", "label", "sha256"]
        return [tuple(r) for r in reader]


def per_class(rows, label):
    return [r for r in rows if r[1] == label]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(root):
    """Every entry under ``root``: size, mode (type included), mtime and content hash (link target)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            content = (os.readlink(p) if p.is_symlink() else None if p.is_dir() else sha256(p))
            state[p.relative_to(root).as_posix()] = (st.st_size, st.st_mode, st.st_mtime_ns, content)
    return state


@pytest.fixture
def data30(tmp_path):
    make_folders(tmp_path / "data", {"female": 30, "male": 30})
    write_config(tmp_path, sample_per_class=10, test_per_class=5, val_fraction=0.2)
    return tmp_path


# --------------------------------------------------------------------------- counts, splits
def test_exact_counts_disjoint_and_stratified(data30):
    code, rows, summary = run(data30)
    assert code == 0
    for label in ("female", "male"):
        assert [len(per_class(rows[s], label)) for s in SPLITS] == [8, 2, 5]
        for s in SPLITS:
            assert all(r[0].startswith(f"{label}/") for r in per_class(rows[s], label))
    paths = [r[0] for s in SPLITS for r in rows[s]]
    hashes = [r[2] for s in SPLITS for r in rows[s]]
    assert len(set(paths)) == len(paths) == 30 and len(set(hashes)) == 30
    root = data30 / "data"
    assert all(sha256(root / p) == h for p, _, h in (r for s in SPLITS for r in rows[s]))
    assert summary["counts"]["train"] == {"female": 8, "male": 8, "total": 16}
    assert summary["counts"]["test"] == {"female": 5, "male": 5, "total": 10}
    assert summary["config"]["data"]["sample_per_class"] == 10 and summary["config"]["seed"] == 0
    for s in SPLITS:  # rows sorted by label order, then path
        assert rows[s] == sorted(rows[s], key=lambda r: (["female", "male"].index(r[1]), r[0]))
        assert summary["manifests"][s]["sha256"] == sha256(data30 / "work" / "splits" / f"{s}.csv")


def test_default_counts_800_200_250(tmp_path):
    make_folders(tmp_path / "data", {"female": 1260, "male": 1251})
    (tmp_path / "config.yaml").write_text("")
    code, rows, summary = run(tmp_path)
    assert code == 0
    for label in ("female", "male"):
        assert [len(per_class(rows[s], label)) for s in SPLITS] == [800, 200, 250]
    # data.dedup: near decodes every candidate once (for its perceptual hash) ...
    assert summary["pool"]["female"]["unused_not_verified"] == 0
    assert summary["pool"]["male"]["decode_verified"] == 1251
    # ... 'exact' decodes only the drawn images
    code, rows, summary = run(tmp_path, "data.dedup=exact", work="exact")
    assert code == 0
    assert summary["pool"]["female"]["unused_not_verified"] == 10
    assert summary["pool"]["male"]["decode_verified"] == 1250


@pytest.mark.parametrize("sample,fraction,expected_val", [(7, 0.2, 1), (8, 0.2, 2), (10, 0.25, 3),
                                                          (10, 0.0, 0), (10, 0.5, 5)])
def test_validation_share_rounds_per_class(tmp_path, sample, fraction, expected_val):
    make_folders(tmp_path / "data", {"female": 12, "male": 12})
    write_config(tmp_path, sample_per_class=sample, test_per_class=2, val_fraction=fraction)
    code, rows, _ = run(tmp_path)
    assert code == 0
    for label in ("female", "male"):
        assert len(per_class(rows["val"], label)) == expected_val
        assert len(per_class(rows["train"], label)) == sample - expected_val


def test_all_as_a_count(tmp_path):
    make_folders(tmp_path / "data", {"female": 20, "male": 17})
    write_config(tmp_path, sample_per_class=10, test_per_class="all")
    code, rows, _ = run(tmp_path)
    assert code == 0
    assert [len(per_class(rows["test"], c)) for c in ("female", "male")] == [10, 7]
    assert len(rows["train"]) + len(rows["val"]) == 20

    code, rows, _ = run(tmp_path, "data.sample_per_class=all", "data.test_per_class=4")
    assert code == 0
    assert [len(per_class(rows["test"], c)) for c in ("female", "male")] == [4, 4]
    assert [len(per_class(rows["train"] + rows["val"], c)) for c in ("female", "male")] == [16, 13]


def test_both_all_is_a_config_error(tmp_path, capsys):
    make_folders(tmp_path / "data", {"female": 3, "male": 3})
    write_config(tmp_path, sample_per_class="all", test_per_class="all")
    code, _, _ = run(tmp_path)
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and "'all'" in err and "\n" not in err


def test_test_set_is_drawn_first(tmp_path):
    # The same seed and pool: growing the sample must not change the test set.
    make_folders(tmp_path / "data", {"female": 40, "male": 40})
    write_config(tmp_path, sample_per_class=5, test_per_class=6)
    _, small, _ = run(tmp_path, work="w1")
    _, large, _ = run(tmp_path, "data.sample_per_class=30", work="w2")
    assert small["test"] == large["test"]


# --------------------------------------------------------------------------- determinism
def test_same_inputs_and_seed_give_byte_identical_files(data30):
    assert run(data30, work="a")[0] == 0
    assert run(data30, work="b")[0] == 0
    assert run(data30, "seed=0", work="c")[0] == 0  # the default, spelled out
    for name in ("train.csv", "val.csv", "test.csv", "summary.json"):
        a = (data30 / "a" / "splits" / name).read_bytes()
        assert a == (data30 / "b" / "splits" / name).read_bytes() == (data30 / "c" / "splits" / name).read_bytes()
    _, rows, _ = run(data30, "seed=1", work="d")
    _, rows0, _ = run(data30, work="e")
    assert rows["train"] != rows0["train"]


def test_thread_count_does_not_change_the_result(data30):
    config = str(data30 / "config.yaml")
    for workers, work in (("1", "one"), ("7", "seven")):
        assert data_preprocess.main(["--quiet", "--workers", workers, "--config", config,
                                     "--set", f"work_dir={data30 / work}"]) == 0
    for name in ("train.csv", "val.csv", "test.csv", "summary.json"):
        assert (data30 / "one" / "splits" / name).read_bytes() == (data30 / "seven" / "splits" / name).read_bytes()


def test_selection_depends_on_content_not_on_names_or_listing_order(tmp_path):
    make_folders(tmp_path / "d1", {"female": 25, "male": 25})
    # The same images under other names, written in reverse order.
    for folder in ("female", "male"):
        for p in sorted((tmp_path / "d1" / folder).iterdir(), reverse=True):
            target = tmp_path / "d2" / folder / f"renamed_{999 - int(p.stem[4:]):04d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
    write_config(tmp_path, sample_per_class=8, test_per_class=4)
    _, rows1, _ = run(tmp_path, f"data.root={tmp_path / 'd1'}", work="w1")
    _, rows2, _ = run(tmp_path, f"data.root={tmp_path / 'd2'}", work="w2")
    for s in SPLITS:
        assert sorted((r[1], r[2]) for r in rows1[s]) == sorted((r[1], r[2]) for r in rows2[s])


# --------------------------------------------------------------------------- duplicates
def test_duplicates_within_a_class_keep_one_copy(data30):
    root = data30 / "data"
    shutil.copyfile(root / "male" / "img_0003.png", root / "male" / "zz_copy.png")
    (root / "male" / "sub").mkdir()
    shutil.copyfile(root / "male" / "img_0003.png", root / "male" / "sub" / "again.png")
    code, rows, summary = run(data30, "data.sample_per_class=all", "data.test_per_class=0")
    assert code == 0
    used = [r for s in SPLITS for r in rows[s]]
    assert len(per_class(used, "male")) == 30  # 32 files, 30 distinct contents
    target = sha256(root / "male" / "img_0003.png")
    assert [r[0] for r in used if r[2] == target] == ["male/img_0003.png"]  # first path kept
    dups = [s for s in summary["skipped"] if s["reason"] == "duplicate"]
    assert sorted(s["path"] for s in dups) == ["male/sub/again.png", "male/zz_copy.png"]
    assert all("male/img_0003.png" in s["detail"] for s in dups)
    assert summary["pool"]["male"]["duplicates_dropped"] == 2


def test_duplicates_never_land_in_two_splits(tmp_path):
    # Every image has three copies; without content dedup, copies would scatter across splits.
    root = tmp_path / "data"
    make_folders(root, {"female": 20, "male": 20})
    for folder in ("female", "male"):
        for p in sorted((root / folder).glob("*.png")):
            shutil.copyfile(p, p.with_name(p.stem + "_b.png"))
            shutil.copyfile(p, root / folder / f"a_{p.name}")
    write_config(tmp_path, sample_per_class=12, test_per_class="all")
    code, rows, summary = run(tmp_path)
    assert code == 0
    hashes = [r[2] for s in SPLITS for r in rows[s]]
    assert len(hashes) == len(set(hashes)) == 40
    assert summary["skipped_counts"]["duplicate"] == 80


def test_identical_files_in_both_classes_are_dropped(data30):
    root = data30 / "data"
    shutil.copyfile(root / "female" / "img_0002.png", root / "male" / "looks_female.png")
    code, rows, summary = run(data30, "data.sample_per_class=all", "data.test_per_class=0")
    assert code == 0
    used = {r[0] for s in SPLITS for r in rows[s]}
    assert "female/img_0002.png" not in used and "male/looks_female.png" not in used
    both = {s["path"]: s for s in summary["skipped"] if s["reason"] == "in more than one class"}
    assert set(both) == {"female/img_0002.png", "male/looks_female.png"}
    assert "male/looks_female.png" in both["female/img_0002.png"]["detail"]
    assert summary["counts"]["train"]["female"] + summary["counts"]["val"]["female"] == 29


def test_dedup_compares_full_digests_when_prefixes_collide():
    # Files 0-3 share their first 8 digest bytes; only 0 and 2 are identical. 4 and 5 are
    # identical across classes.
    rows = np.zeros((7, 32), np.uint8)
    rows[:4, :8] = 9
    rows[0, 31] = rows[2, 31] = 1
    rows[1, 31], rows[3, 31] = 2, 3
    rows[4:6, :] = 5
    rows[6, 0] = 7
    paths = [f"f/{i}.png" for i in range(4)] + ["f/4.png", "m/5.png", "m/6.png"]
    labels = bytearray([0, 0, 0, 0, 0, 1, 1])
    skipped = []
    reports = {c: dataset._ClassReport(folder=c) for c in ("female", "male")}
    unique = dataset._deduplicate(paths, labels, rows, np.ones(7, bool), ["female", "male"], skipped, reports)
    assert unique[0].tolist() == [0, 1, 3] and unique[1].tolist() == [6]
    reasons = {s.path: (s.reason, s.detail) for s in skipped}
    assert reasons["f/2.png"] == ("duplicate", "same content as f/0.png (kept)")
    assert reasons["f/4.png"][0] == reasons["m/5.png"][0] == "in more than one class"
    assert len(skipped) == 3


# --------------------------------------------------------------------------- broken files
def _jpeg(index, cut=None):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(index).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    return data if cut is None else data[:cut(len(data))]


BROKEN = {
    "empty.jpg": (b"", "empty file", ""),
    "text.jpg": (b"hello, I am not a picture\n", "undecodable", "not an image"),
    "truncated.jpg": (_jpeg(1, lambda n: n // 2), "undecodable", "truncated"),
    "truncated_tail.jpg": (_jpeg(2, lambda n: n - 100), "undecodable", "truncated"),
    "header_only.jpg": (_jpeg(3, lambda n: 30), "undecodable", "truncated"),
    "icon.png": (b"\x00\x00\x01\x00" + b"\x00" * 40, "undecodable", "not an image"),
}


def _add_broken(folder):
    for name, (content, _, _) in BROKEN.items():
        (folder / name).write_bytes(content)
    (folder / "dangling.jpg").symlink_to(folder / "does-not-exist.jpg")


def test_every_broken_kind_is_reported(data30):
    _add_broken(data30 / "data" / "female")
    code, rows, summary = run(data30, "data.sample_per_class=all", "data.test_per_class=0")
    assert code == 0
    reported = {s["path"]: s for s in summary["skipped"]}
    for name, (_, reason, text) in BROKEN.items():
        entry = reported[f"female/{name}"]
        assert entry["reason"] == reason and text in entry["detail"], entry
        assert "\n" not in entry["detail"]
    used = {r[0] for s in SPLITS for r in rows[s]}
    assert not any(name in p for p in used for name in BROKEN)
    assert summary["pool"]["female"]["undecodable"] == len(BROKEN) - 1
    assert reported["female/dangling.jpg"]["reason"] == "unreadable"
    assert "No such file" in reported["female/dangling.jpg"]["detail"]


def test_broken_files_are_replaced_so_counts_hold(tmp_path):
    root = make_folders(tmp_path / "data", {"female": 14, "male": 14})
    for folder in ("female", "male"):
        _add_broken(root / folder)
    # 14 good images per class, 14 requested: every broken file drawn must be replaced.
    write_config(tmp_path, sample_per_class=10, test_per_class=4)
    for seed in range(4):
        code, rows, summary = run(tmp_path, f"seed={seed}", work=f"w{seed}")
        assert code == 0
        for label in ("female", "male"):
            assert [len(per_class(rows[s], label)) for s in SPLITS] == [8, 2, 4]
        verified = summary["pool"]["female"]["decode_verified"]
        assert verified == 14 + summary["pool"]["female"]["undecodable"]


def test_found_images_skip_hidden_and_report_other_names(data30):
    female = data30 / "data" / "female"
    write_image(female / "deep" / "er" / "UPPER.JPG", 500, "jpg")
    write_image(female / "mixed.Jpeg", 501, "jpg")
    for i, ext in enumerate(("bmp", "gif", "webp", "tif", "tiff")):
        write_image(female / f"other.{ext}", 510 + i, ext)
    write_image(female / ".hidden.png", 520)
    write_image(female / ".cache" / "inside.png", 521)
    (female / "notes.txt").write_text("not an image")
    (female / "Thumbs.db").write_bytes(b"\x00" * 10)
    code, rows, summary = run(data30, "data.sample_per_class=all", "data.test_per_class=0")
    assert code == 0
    used = {r[0] for s in SPLITS for r in rows[s]}
    for rel in ("female/deep/er/UPPER.JPG", "female/mixed.Jpeg", "female/other.bmp", "female/other.gif",
                "female/other.webp", "female/other.tif", "female/other.tiff"):
        assert rel in used
    assert not any(".hidden" in p or ".cache" in p for p in used)
    reasons = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert reasons["female/.hidden.png"] == "hidden" and reasons["female/.cache"] == "hidden"
    assert reasons["female/notes.txt"] == reasons["female/Thumbs.db"] == "not an image file name"
    assert "female/.cache/inside.png" not in reasons  # a hidden folder is not searched


# --------------------------------------------------------------------------- folders and errors
def test_class_folders_named_differently(tmp_path):
    make_folders(tmp_path / "data", {"woman": 12, "man": 12})
    write_config(tmp_path, sample_per_class=5, test_per_class=3)
    code, rows, summary = run(tmp_path, "data.class_dirs.male=man", "data.class_dirs.female=woman")
    assert code == 0
    assert {r[1] for s in SPLITS for r in rows[s]} == {"female", "male"}
    assert all(r[0].startswith("man/") for s in SPLITS for r in per_class(rows[s], "male"))
    assert all(r[0].startswith("woman/") for s in SPLITS for r in per_class(rows[s], "female"))
    assert summary["config"]["data"]["class_dirs"] == {"female": "woman", "male": "man"}


def test_nested_class_folders(tmp_path):
    make_folders(tmp_path / "data", {"people/f": 8, "people/m": 8})
    write_config(tmp_path, sample_per_class=4, test_per_class=2)
    code, rows, _ = run(tmp_path, "data.class_dirs.male=people/m", "data.class_dirs.female=people/f")
    assert code == 0 and all(r[0].startswith("people/m/") for r in per_class(rows["train"], "male"))


def error_of(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_too_few_images_error_gives_counts(tmp_path, capsys):
    make_folders(tmp_path / "data", {"female": 30, "male": 12})
    (tmp_path / "data" / "male" / "broken.jpg").write_bytes(b"nope")
    write_config(tmp_path, sample_per_class=10, test_per_class=5)
    code, rows, summary = run(tmp_path)
    err = error_of(capsys)
    assert code == 1 and rows == {} and summary is None
    assert "male" in err and "found 12" in err and "need 15" in err and "allow_fewer" in err

    # Enough candidates by hash, too few once decoding is checked: still an error with counts.
    for i in range(3):
        (tmp_path / "data" / "male" / f"broken{i}.jpg").write_bytes(b"not an image %d" % i)
    code, _, _ = run(tmp_path)
    err = error_of(capsys)
    assert code == 1 and "found 12" in err and "need 15" in err and "undecodable" in err


def test_allow_fewer_accepts_and_warns(tmp_path):
    make_folders(tmp_path / "data", {"female": 30, "male": 12})
    write_config(tmp_path, sample_per_class=10, test_per_class=5, allow_fewer="true")
    code, rows, summary = run(tmp_path)
    assert code == 0
    assert len(per_class(rows["test"], "male")) == 5                       # test drawn first
    assert len(per_class(rows["train"] + rows["val"], "male")) == 7
    assert len(per_class(rows["train"] + rows["val"], "female")) == 10
    assert any("male" in w and "7 sample" in w for w in summary["warnings"])


def test_missing_root_missing_folder_empty_folder(tmp_path, capsys):
    write_config(tmp_path, sample_per_class=2, test_per_class=1)
    assert run(tmp_path)[0] == 1
    assert "data folder not found" in error_of(capsys)

    make_folders(tmp_path / "data", {"female": 5, "man": 5, "other": 1})
    assert run(tmp_path)[0] == 1
    err = error_of(capsys)
    assert str(tmp_path / "data" / "male") in err and "not found" in err
    assert "female, man, other" in err and "data.class_dirs.male" in err

    (tmp_path / "data" / "male" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "male" / "readme.txt").write_text("x")
    assert run(tmp_path)[0] == 1
    err = error_of(capsys)
    assert "no image files for class 'male'" in err

    shutil.rmtree(tmp_path / "data" / "male")
    (tmp_path / "data" / "male").write_text("a file, not a folder")
    assert run(tmp_path)[0] == 1
    assert "is not a folder" in error_of(capsys)
    assert not (tmp_path / "work").exists()


def test_class_folders_must_be_distinct_and_inside_root(tmp_path, capsys):
    make_folders(tmp_path / "data", {"female": 5, "female/sub": 5, "male": 5})
    write_config(tmp_path, sample_per_class=2, test_per_class=1)
    assert run(tmp_path, "data.class_dirs.male=female/sub")[0] == 1
    assert "overlap" in error_of(capsys)
    assert run(tmp_path, "data.class_dirs.male=../data/male")[0] == 1
    assert "inside data.root" in error_of(capsys)


def test_work_dir_inside_data_root_is_refused(tmp_path, capsys):
    make_folders(tmp_path / "data", {"female": 5, "male": 5})
    write_config(tmp_path, sample_per_class=2, test_per_class=1)
    before = snapshot(tmp_path / "data")
    assert run(tmp_path, work="data/work")[0] == 1
    assert "inside data.root" in error_of(capsys)
    assert snapshot(tmp_path / "data") == before


def test_failed_run_keeps_previous_outputs_and_leaves_no_temp_files(data30, capsys):
    assert run(data30)[0] == 0
    splits = data30 / "work" / "splits"
    before = {p.name: p.read_bytes() for p in splits.iterdir()}
    assert run(data30, "data.sample_per_class=100")[0] == 1
    error_of(capsys)
    assert {p.name: p.read_bytes() for p in splits.iterdir()} == before


def test_data_root_is_untouched(data30):
    root = data30 / "data"
    _add_broken(root / "male")
    shutil.copyfile(root / "male" / "img_0001.png", root / "female" / "cross.png")
    shutil.copyfile(root / "female" / "img_0001.png", root / "female" / "dup.png")
    write_image(root / "female" / ".hidden.png", 900)
    os.utime(root / "female" / "img_0004.png", ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(root)
    assert run(data30, "data.sample_per_class=all", "data.test_per_class=3")[0] == 0
    assert snapshot(root) == before


def test_stage_imports_neither_tensorflow_nor_matplotlib(data30):
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import data_preprocess; "
        "rc = data_preprocess.main(sys.argv[2:]); "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'matplotlib', 'torch'}); "
        "print(json.dumps([rc, heavy]))")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), "--quiet",
                          "--config", str(data30 / "config.yaml"), "--set", f"work_dir={data30 / 'sub'}"],
                         capture_output=True, text=True, env=env, cwd=data30, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [0, []], out.stderr
    assert (data30 / "sub" / "splits" / "train.csv").exists()


def test_progress_and_report_when_not_quiet(data30, capsys):
    assert data_preprocess.main(["--config", str(data30 / "config.yaml"),
                                 "--set", f"work_dir={data30 / 'work'}"]) == 0
    out, err = capsys.readouterr()
    assert "train" in out and "16" in out and "verifying male" in err
    # not a terminal: whole lines (no carriage returns), the last one with the final count
    assert "\r" not in err and [line for line in err.splitlines() if line.startswith("hashing:")][-1].count("60/60")


def test_hashing_in_worker_processes_gives_the_same_splits(data30, monkeypatch):
    """Large folders are perceptually hashed in worker processes: same hashes, same splits."""
    code, rows, summary = run(data30, work="in_process")
    assert code == 0 and summary["near_duplicates"]["hashed"] == 60
    monkeypatch.setattr(dataset, "_PROCESS_HASHING_FROM", 1)
    code, rows_pool, summary_pool = run(data30, "data.dedup=near", work="in_pool")
    assert code == 0 and rows_pool == rows
    assert summary_pool["near_duplicates"] == summary["near_duplicates"]


# --------------------------------------------------------------------------- reading manifests
def test_read_manifest_round_trip_and_errors(data30):
    assert run(data30)[0] == 0
    cfg = load_config(data30 / "config.yaml", [f"work_dir={data30 / 'work'}"])
    train = dataset.read_manifest(cfg.work_dir / "splits" / "train.csv", cfg.data.root, cfg.classes)
    assert len(train) == 16 and all(e.path.is_absolute() and e.path.is_file() for e in train)
    assert {e.label for e in train} == {"female", "male"}
    rows = read_rows(data30 / "work" / "splits" / "train.csv")
    assert [e.path for e in train] == [data30 / "data" / r[0] for r in rows]

    with pytest.raises(MissingInputError, match="data_preprocess.py"):
        dataset.read_manifest(data30 / "nowhere.csv", data30 / "data")
    bad = data30 / "bad.csv"
    bad.write_text("path,label,sha256\nfemale/img_0000.png,female,ab\nmale/img_0001.png,cat,cd\n")
    with pytest.raises(DataError) as info:
        dataset.read_manifest(bad, data30 / "data", ["female", "male"])
    assert "line 3" in str(info.value) and "'cat'" in str(info.value) and "\n" not in str(info.value)
    assert len(dataset.read_manifest(bad, data30 / "data")) == 2  # no class check without classes
    bad.write_text("file,class\nx,y\n")
    with pytest.raises(DataError, match="not a split manifest"):
        dataset.read_manifest(bad, data30 / "data")
    bad.write_text("path,label,sha256\nonly-a-path\n")
    with pytest.raises(DataError, match="line 2"):
        dataset.read_manifest(bad, data30 / "data")


def test_cli_help_and_bad_flags(capsys):
    assert data_preprocess.main(["--help"]) == 0
    assert "--workers" in capsys.readouterr().out
    assert data_preprocess.main(["--workers", "0"]) == 2


# --------------------------------------------------------------------------- the real faces
@pytest.mark.real_faces
@pytest.mark.skipif(not (FACES / "male").is_dir() or not (FACES / "female").is_dir(),
                    reason="../shared/data/faces not present")
def test_real_faces(tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in sorted((FACES / "male").iterdir())[:50]}
    (tmp_path / "config.yaml").write_text("")
    code, rows, summary = run(tmp_path, f"data.root={FACES}")
    assert code == 0
    for label in ("female", "male"):
        assert [len(per_class(rows[s], label)) for s in SPLITS] == [800, 200, 250]
    hashes = [r[2] for s in SPLITS for r in rows[s]]
    assert len(hashes) == len(set(hashes)) == 2500
    # Exact duplicates exist in this sample (data README): found and reported, not used twice.
    assert summary["skipped_counts"].get("duplicate", 0) > 0
    assert all(s["reason"] in ("duplicate", "in more than one class", "near-duplicate")
               for s in summary["skipped"])
    assert {p.name: p.stat().st_mtime_ns for p in sorted((FACES / "male").iterdir())[:50]} == before
    assert not any(tmp_path.rglob("*.jpg"))  # nothing copied


# --------------------------------------------------------------------------- near-duplicates
def pattern_image(index, size=96):
    """A smooth random colour pattern unique to ``index`` (a perceptual hash tells them apart)."""
    rng = np.random.default_rng(10_000 + index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((size, size, 3))
    for _ in range(6):
        fx, fy = rng.uniform(-5, 5, 2)
        out += np.sin(2 * np.pi * (fx * xx + fy * yy)[..., None] + rng.uniform(0, 2 * np.pi, 3))
    out = (out - out.min()) / (out.max() - out.min()) * 220 + 15
    return Image.fromarray(out.astype(np.uint8))


def altered(img, rng):
    """Re-encoded (JPEG 60-95), resized 0.6-1.5x, maybe mirrored, brightness +-10%: JPEG bytes."""
    from PIL import ImageEnhance
    w, h = img.size
    scale = rng.uniform(0.6, 1.5)
    out = img.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.9, 1.1))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(60, 96)))
    return buf.getvalue()


def make_patterns(root, counts, copies=0, seed=0):
    """Distinct patterns per folder, plus altered copies of the first ``copies`` of each folder.

    Returns ``[(original, copy), ...]`` as paths relative to ``root``.
    """
    rng = np.random.default_rng(seed)
    index, planted = 0, []
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = pattern_image(index)
            img.save(root / folder / f"p_{i:04d}.png")
            if i < copies:
                (root / folder / f"z_copy_{i:04d}.jpg").write_bytes(altered(img, rng))
                planted.append((f"{folder}/p_{i:04d}.png", f"{folder}/z_copy_{i:04d}.jpg"))
            index += 1
    return planted


def split_of(rows):
    return {r[0]: s for s in SPLITS for r in rows[s]}


def check_pairs_kept_together(planted, rows, summary):
    """Every planted pair is one near-duplicate group and never in two splits (nor twice in test)."""
    where = split_of(rows)
    group_of = {p: k for k, g in enumerate(summary["near_duplicates"]["groups"]) for p in g}
    for original, copy in planted:
        assert original in group_of and group_of[original] == group_of.get(copy), (original, copy)
        splits = {where.get(original), where.get(copy)} - {None}
        assert len(splits) <= 1, (original, copy, splits)
        assert not (where.get(original) == where.get(copy) == "test")


def test_near_duplicates_stay_together_and_test_keeps_one(tmp_path):
    planted = make_patterns(tmp_path / "data", {"female": 60, "male": 60}, copies=20)
    write_config(tmp_path, sample_per_class=40, test_per_class=20)
    code, rows, summary = run(tmp_path)
    assert code == 0
    check_pairs_kept_together(planted, rows, summary)
    near = summary["near_duplicates"]
    assert near["groups_count"] == 40 and near["images_in_groups"] == 80 and not near["links_refused"]
    assert all(d <= near["threshold"] for _, _, d in near["pairs"])
    for label in ("female", "male"):  # whole pairs in train/val; counts exact where groups allow
        assert len(per_class(rows["test"], label)) == 20
        assert len(per_class(rows["train"] + rows["val"], label)) == 40
    in_test = {r[0] for r in rows["test"]}
    unused = [s for s in summary["skipped"] if s["reason"] == "near-duplicate"]
    assert unused and all(s["detail"].split(" ")[2] in in_test for s in unused)
    assert summary["config"]["data"]["dedup"] == "near"


def test_dedup_exact_behaves_as_before(tmp_path):
    # Planted copies are different files: 'exact' treats them as distinct images, as before.
    planted = make_patterns(tmp_path / "data", {"female": 30, "male": 30}, copies=10)
    write_config(tmp_path, sample_per_class=20, test_per_class=10)
    code, rows, summary = run(tmp_path, "data.dedup=exact")
    assert code == 0 and summary["near_duplicates"] is None and summary["groups"] is None
    assert "near-duplicate" not in summary["skipped_counts"]
    assert sum(len(rows[s]) for s in SPLITS) == 60
    where = split_of(rows)
    assert any(where.get(a) != where.get(b) for a, b in planted)  # not grouped: they scatter
    # Without any near-duplicates, 'exact' and 'near' give the same manifests, and both give the
    # plain seeded order: the test set is the first 10 images of each class by content key.
    for folder in ("female", "male"):
        for p in (tmp_path / "data" / folder).glob("z_copy_*"):
            p.unlink()
    assert run(tmp_path, "data.dedup=exact", "data.test_per_class=5", work="e")[0] == 0
    assert run(tmp_path, "data.test_per_class=5", work="n")[0] == 0
    for name in ("train.csv", "val.csv", "test.csv"):
        assert (tmp_path / "e" / "splits" / name).read_bytes() == (tmp_path / "n" / "splits" / name).read_bytes()


def test_near_duplicates_across_classes_are_dropped(tmp_path):
    make_patterns(tmp_path / "data", {"female": 12, "male": 12})
    img = Image.open(tmp_path / "data" / "female" / "p_0003.png").convert("RGB")
    (tmp_path / "data" / "male" / "looks_female.jpg").write_bytes(altered(img, np.random.default_rng(1)))
    write_config(tmp_path, sample_per_class="all", test_per_class=0)
    code, rows, summary = run(tmp_path)
    assert code == 0
    used = set(split_of(rows))
    assert "female/p_0003.png" not in used and "male/looks_female.jpg" not in used
    both = {s["path"] for s in summary["skipped"] if s["reason"] == "in more than one class"}
    assert both == {"female/p_0003.png", "male/looks_female.jpg"}
    assert summary["near_duplicates"]["groups_in_both_classes_dropped"] == [
        ["female/p_0003.png", "male/looks_female.jpg"]]


def test_a_loose_threshold_cannot_chain_hundreds_of_images():
    from vggface_gender import grouping
    h = np.random.default_rng(3).integers(0, 256, (300, 2 * grouping.HASH_BYTES), dtype=np.uint8)
    uf, pairs, refused, counts = grouping.link_near(h, 256)  # every pair "matches"
    sizes = np.bincount(uf.roots())
    assert counts[0] == 300 * 299 // 2 and counts[1] >= len(refused) > 0
    assert sizes.max() == grouping.MAX_NEAR_GROUP and sizes.sum() == 300


def test_near_group_linking_unit():
    from vggface_gender import grouping
    rng = np.random.default_rng(0)
    h = rng.integers(0, 256, (60, 2 * grouping.HASH_BYTES), dtype=np.uint8)
    h[7] = h[3]
    h[11] = h[2]
    h[11, 0] ^= 0b111                                         # 3 bits from 2
    h[20, :grouping.HASH_BYTES] = h[5, grouping.HASH_BYTES:]  # 20 is 5's mirror image
    h[20, grouping.HASH_BYTES:] = h[5, :grouping.HASH_BYTES]
    uf, pairs, refused, counts = grouping.link_near(h, 4)
    assert counts == [3, 0]
    assert sorted((a, b) for a, b, _ in pairs) == [(2, 11), (3, 7), (5, 20)] and not refused
    roots = uf.roots()
    assert roots[7] == roots[3] == 3 and roots[11] == 2 and roots[20] == 5
    assert len(set(roots.tolist())) == 57
    # a block size that splits the rows differently finds the same pairs
    small = [tuple(x) for i, j, d in grouping.near_pairs(h, 4, block_elements=64) for x in zip(i, j, d)]
    big = [tuple(x) for i, j, d in grouping.near_pairs(h, 4) for x in zip(i, j, d)]
    assert small == big


# --------------------------------------------------------------------------- data.groups
def make_people(root, per_class_people, images_each):
    """``<class>/<person>/img_k.png``; every image distinct (noise) so only the rule groups them."""
    index = 0
    for folder in ("female", "male"):
        for person in range(per_class_people):
            for k in range(images_each[person % len(images_each)]):
                write_image(root / folder / f"person{person:03d}" / f"img_{k}.png", index)
                index += 1


def check_groups_in_one_split(rows, key):
    seen = {}
    for s in SPLITS:
        for r in rows[s]:
            assert seen.setdefault(key(r[0]), s) == s, (r[0], s, seen[key(r[0])])


@pytest.mark.parametrize("form", ["regex", "csv"])
def test_groups_never_cross_splits_and_counts_hold(tmp_path, form):
    make_people(tmp_path / "data", 30, [1, 2, 3, 4, 5])  # 90 images per class, groups of 1-5
    write_config(tmp_path, sample_per_class=40, test_per_class=15, dedup="exact")
    if form == "regex":
        spec = "'^(?P<person>[^/]+)/'"
    else:
        lines = ["path,group"] + [f"{p.relative_to(tmp_path / 'data').as_posix()},{p.parent.name}"
                                  for p in sorted((tmp_path / "data").rglob("*.png"))]
        (tmp_path / "people.csv").write_text("\n".join(lines) + "\n")
        spec = "people.csv"  # beside the config file
    with open(tmp_path / "config.yaml", "a") as f:
        f.write(f"  groups: {spec}\n")
    for seed in range(3):
        code, rows, summary = run(tmp_path, f"seed={seed}", work=f"w{seed}")
        assert code == 0
        check_groups_in_one_split(rows, lambda p: tuple(p.split("/")[:2]))
        for label in ("female", "male"):
            counts = {s: len(per_class(rows[s], label)) for s in SPLITS}
            assert 15 - 4 <= counts["test"] <= 15            # within one group's size (5)
            assert 40 - 4 <= counts["train"] + counts["val"] <= 40
            assert abs(counts["val"] - 0.2 * (counts["train"] + counts["val"])) <= 5
        info = summary["groups"]["per_class"]["male"]
        assert info["groups"] == 30 and info["images_not_matched"] == 0 and info["largest_group"] == 5


def test_groups_unmatched_images_are_their_own_group(tmp_path):
    make_people(tmp_path / "data", 6, [3])
    make_folders(tmp_path / "data", {"female": 8, "male": 8}, start=500)  # img_XXXX.png, no folder
    write_config(tmp_path, sample_per_class=10, test_per_class=4, dedup="exact")
    code, rows, summary = run(tmp_path, "data.groups=^(?P<person>person\\d+)/")
    assert code == 0
    check_groups_in_one_split(rows, lambda p: tuple(p.split("/")[:2]) if "person" in p else p)
    assert summary["groups"]["per_class"]["female"]["images_not_matched"] == 8


def test_too_few_groups_is_one_clear_line(tmp_path, capsys):
    make_people(tmp_path / "data", 2, [20])  # 2 people per class, 40 images each
    write_config(tmp_path, sample_per_class=10, test_per_class=5, dedup="exact")
    code, rows, _ = run(tmp_path, "data.groups=^(?P<person>[^/]+)/")
    err = error_of(capsys)
    assert code == 1 and rows == {}
    assert "too few groups for class 'female'" in err and "2 group(s)" in err and "need at least 3" in err


def test_bad_group_rules_and_dedup_values_are_config_errors(data30, capsys):
    assert run(data30, "data.groups=no_named_group")[0] == 1
    assert "data.groups" in error_of(capsys)
    assert run(data30, "data.groups=(?P<x>[")[0] == 1
    assert "not a valid regular expression" in error_of(capsys)
    assert run(data30, "data.groups=missing.csv")[0] == 1
    assert "missing.csv not found" in error_of(capsys)
    (data30 / "bad.csv").write_text("file,person\nx,y\n")
    assert run(data30, f"data.groups={data30 / 'bad.csv'}")[0] == 1
    assert "'path' and 'group'" in error_of(capsys)
    assert run(data30, "data.dedup=fuzzy")[0] == 1
    err = error_of(capsys)
    assert "data.dedup" in err and "exact, near" in err
    (data30 / "config.yaml").write_text("data:\n  near_threshold: -1\n")
    assert run(data30)[0] == 1
    err = error_of(capsys)
    assert "data.near_threshold" in err and "config.yaml" in err


def test_hash_file_matches_hashlib_and_reports_problems(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * (1 << 20) + 17))
    assert dataset._hash_file(str(big)) == hashlib.sha256(big.read_bytes()).digest()
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert dataset._hash_file(str(tmp_path / "empty.jpg")) == dataset.EMPTY
    assert dataset._hash_file(str(tmp_path / "nope.jpg")).startswith("cannot read (")


# --------------------------------------------------------------------------- near-duplicates, real faces
def _faces_present():
    return (FACES / "male").is_dir() and (FACES / "female").is_dir()


@pytest.mark.real_faces
@pytest.mark.skipif(not _faces_present(), reason="../shared/data/faces not present")
def test_real_faces_altered_copies_stay_with_their_originals(tmp_path):
    """240 UTKFace crops get an altered copy each (JPEG 60-95, 0.6-1.5x, mirror or not, +-10%
    brightness), among all 6000 originals (linked, not copied). Every copy is grouped with its
    original and never in another split; the pairs flagged among the originals are counted."""
    rng = np.random.default_rng(12)
    root = tmp_path / "data"
    planted = []
    try:
        for cls in ("female", "male"):
            originals = sorted((FACES / cls).glob("*.jpg"))
            (root / cls).mkdir(parents=True)
            for p in originals:
                (root / cls / p.name).symlink_to(p)
            for k in rng.choice(len(originals), 120, replace=False).tolist():
                src = originals[k]
                copy = root / cls / f"zz_altered_{k:04d}.jpg"
                copy.write_bytes(altered(Image.open(src).convert("RGB"), rng))
                planted.append((f"{cls}/{src.name}", f"{cls}/{copy.name}"))
        write_config(tmp_path, sample_per_class="all", test_per_class=250)
        code, rows, summary = run(tmp_path)
        assert code == 0
        near = summary["near_duplicates"]
        exact = {s["path"] for s in summary["skipped"] if s["reason"] in ("duplicate", "in more than one class")}
        copies = {b for _, b in planted}
        planted = [(a, b) for a, b in planted if a not in exact]  # an original dropped as an exact copy
        assert len(planted) >= 200
        check_pairs_kept_together(planted, rows, summary)
        flagged = [(a, b, d) for a, b, d in near["pairs"] if a not in copies and b not in copies]
        print(f"\nnear-duplicate pairs among the originals: {len(flagged)} "
              f"(threshold {near['threshold']}); groups {near['groups_count']}")
        # 37 at threshold 36, all of them the same photo twice (README); distinct faces are far apart
        assert len(flagged) <= 60
        for label in ("female", "male"):
            assert len(per_class(rows["test"], label)) == 250
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the altered copies are derived from the faces


def test_perceptual_hash_is_imagehash_phash_of_the_grey_image_and_its_mirror(tmp_path):
    import imagehash
    from vggface_gender import grouping, images
    img = pattern_image(5, size=200)
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "a.jpg", quality=90)
    grey = images.open_grey(tmp_path / "a.png", grouping.HASH_DECODE)
    assert np.array_equal(np.asarray(grey), np.asarray(images.open_rgb(tmp_path / "a.png").convert("L")))
    h = grouping.perceptual_hash(tmp_path / "a.png")
    plain = np.packbits(imagehash.phash(grey, hash_size=16).hash).tobytes()
    mirror = np.packbits(imagehash.phash(grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), hash_size=16).hash).tobytes()
    assert h == plain + mirror
    jpeg = images.open_grey(tmp_path / "a.jpg", grouping.HASH_DECODE)
    assert jpeg.mode == "L" and min(jpeg.size) >= 64  # drafted, never below 64 px a side
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    assert "not an image" in grouping.perceptual_hash(tmp_path / "bad.jpg")
