"""Metrics against values worked out by hand, intervals, group breakdowns and group rules.

No TensorFlow here: these run in a second or two.
"""

import math

import numpy as np
import pytest

from vggface_gender import evaluation, metrics
from vggface_gender.config import load_config
from vggface_gender.errors import ConfigError

CLASSES = ["female", "male"]
# Ten examples. Worked out by hand (argmax == "p_female > 0.5" here):
#   true      f    f    f    f    m    m    m    m    m     m
#   p_female .9   .8   .4   .6   .3   .2   .7   .1   .35   .55
#   predicted f    f    m    f    m    m    f    m    m     f
P_FEMALE = np.array([0.9, 0.8, 0.4, 0.6, 0.3, 0.2, 0.7, 0.1, 0.35, 0.55])
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
PROBS = np.column_stack([P_FEMALE, 1 - P_FEMALE])


def test_headline_metrics_match_hand_computed_values():
    report = metrics.classification_report(Y_TRUE, PROBS, CLASSES, "female", n_bootstrap=0)
    assert report["n_test"] == 10
    assert report["accuracy"] == pytest.approx(7 / 10)            # 3 of 4 female + 4 of 6 male
    # rows true (female, male), columns predicted (female, male)
    assert report["confusion_matrix"]["counts"] == [[3, 1], [2, 4]]
    assert report["confusion_matrix"]["order"] == CLASSES
    female, male = report["per_class"]["female"], report["per_class"]["male"]
    assert female["precision"] == pytest.approx(3 / 5)            # 5 predicted female, 3 right
    assert female["recall"] == pytest.approx(3 / 4)
    assert female["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert female["support"] == 4
    assert male["precision"] == pytest.approx(4 / 5)
    assert male["recall"] == pytest.approx(4 / 6)
    assert male["f1"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert male["support"] == 6
    # AUC = share of (female, male) pairs where the female scores higher:
    # .9 beats 6, .8 beats 6, .4 beats 4 (.3 .2 .1 .35), .6 beats 5 (all but .7) -> 21 / 24
    assert report["roc_auc"] == pytest.approx(21 / 24)
    assert report["positive_class"] == "female"


def test_positive_class_is_configurable_and_stated():
    as_female = metrics.classification_report(Y_TRUE, PROBS, CLASSES, "female", n_bootstrap=50, seed=3)
    as_male = metrics.classification_report(Y_TRUE, PROBS, CLASSES, "male", n_bootstrap=50, seed=3)
    assert as_male["positive_class"] == "male"
    # With two classes whose probabilities sum to one, the AUC does not depend on which is positive.
    assert as_male["roc_auc"] == pytest.approx(as_female["roc_auc"])
    assert as_male["roc_auc_ci95"] == pytest.approx(as_female["roc_auc_ci95"])
    with pytest.raises(ValueError, match="positive class"):
        metrics.classification_report(Y_TRUE, PROBS, CLASSES, "other")


def test_ties_count_half_in_the_auc():
    # one female (0.5) tied with one male (0.5), another female (0.8) above both males (0.5, 0.2)
    probs = np.array([[0.5, 0.5], [0.8, 0.2], [0.5, 0.5], [0.2, 0.8]])
    report = metrics.classification_report(np.array([0, 0, 1, 1]), probs, CLASSES, "female", n_bootstrap=0)
    assert report["roc_auc"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    # a tie predicts the first class in class order (argmax)
    assert report["confusion_matrix"]["counts"] == [[2, 0], [1, 1]]


def _wilson_by_quadratic(k, n, z=1.959963984540054):
    # The interval's ends are the p where |k/n - p| = z * sqrt(p (1 - p) / n): roots of
    # (1 + z^2/n) p^2 - (2 k/n + z^2/n) p + (k/n)^2 = 0.
    phat = k / n
    roots = np.roots([1 + z * z / n, -(2 * phat + z * z / n), phat * phat])
    return sorted(float(np.real(r)) for r in roots)


@pytest.mark.parametrize("k,n", [(7, 10), (8, 10), (477, 500), (1, 3), (50, 50), (0, 20)])
def test_wilson_interval_solves_the_score_equation(k, n):
    lo, hi = metrics.wilson_interval(k, n)
    assert [lo, hi] == pytest.approx(_wilson_by_quadratic(k, n), abs=1e-9)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_interval_published_value_and_edge_cases():
    # 8 successes of 10 is the textbook example: 0.490 to 0.943
    lo, hi = metrics.wilson_interval(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert metrics.wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        metrics.wilson_interval(11, 10)
    report = metrics.classification_report(Y_TRUE, PROBS, CLASSES, "female", n_bootstrap=0)
    assert report["accuracy_ci95"] == pytest.approx(list(metrics.wilson_interval(7, 10)))


def _auc_by_pairs(positive, scores):
    """Share of (positive, negative) pairs ranked right, a tie counting half."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)


def test_bootstrap_interval_is_seeded_and_matches_a_by_hand_resampling():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 60).astype(bool)
    scores = np.round(np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, 60), 0, 1), 2)  # with ties
    result = metrics.bootstrap_auc_interval(y, scores, 200, seed=5)
    assert result == metrics.bootstrap_auc_interval(y, scores, 200, seed=5)
    assert result["ci"] != metrics.bootstrap_auc_interval(y, scores, 200, seed=6)["ci"]

    # the same resamples, drawn and scored independently (pair counting, no scikit-learn)
    draw = np.random.default_rng(5)
    aucs = []
    for _ in range(200):
        idx = draw.integers(0, 60, 60)
        if y[idx].all() or not y[idx].any():
            continue
        aucs.append(_auc_by_pairs(y[idx], scores[idx]))
    assert result["valid"] == len(aucs)
    assert result["ci"] == pytest.approx([np.percentile(aucs, 2.5), np.percentile(aucs, 97.5)])
    assert result["ci"][0] < _auc_by_pairs(y, scores) < result["ci"][1]


def test_bootstrap_skips_one_class_resamples_and_handles_no_resamples():
    y = np.array([True] + [False] * 9)  # one positive: many resamples miss it
    scores = np.linspace(0, 1, 10)
    result = metrics.bootstrap_auc_interval(y, scores, 100, seed=0)
    assert 0 < result["valid"] < 100
    assert metrics.bootstrap_auc_interval(y, scores, 0, seed=0)["ci"] is None
    only_one = metrics.classification_report(np.zeros(4, int), np.full((4, 2), 0.5), CLASSES, "female")
    assert only_one["roc_auc"] is None and only_one["roc_auc_ci95"] is None
    assert only_one["per_class"]["male"]["recall"] is None  # no male example: undefined, not 0


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="shape"):
        metrics.classification_report(Y_TRUE, PROBS[:, :1], CLASSES, "female")
    with pytest.raises(ValueError, match="class indices"):
        metrics.classification_report(Y_TRUE + 1, PROBS, CLASSES, "female")
    with pytest.raises(ValueError, match="NaN"):
        metrics.classification_report(Y_TRUE, np.full((10, 2), np.nan), CLASSES, "female")


def test_group_breakdown_by_hand():
    y_pred = PROBS.argmax(axis=1)
    #           f  f  f  f  m  m  m  m  m  m   (true)
    #           f  f  m  f  m  m  f  m  m  f   (predicted)
    values = ["b", "a", "a", "b", "a", "b", "b", metrics.UNKNOWN, "a", "b"]
    table = metrics.group_breakdown(Y_TRUE, y_pred, values, CLASSES)
    assert list(table) == ["a", "b", metrics.UNKNOWN]
    a = table["a"]  # examples 1, 2, 4, 8: f->f, f->m, m->m, m->m
    assert (a["n"], a["accuracy"]) == (4, 3 / 4)
    assert a["recall"] == {"female": 1 / 2, "male": 2 / 2}
    assert a["support"] == {"female": 2, "male": 2}
    b = table["b"]  # examples 0, 3, 5, 6, 9: f->f, f->f, m->m, m->f, m->f
    assert (b["n"], b["accuracy"]) == (5, 3 / 5)
    assert b["recall"] == {"female": 2 / 2, "male": pytest.approx(1 / 3)}
    assert b["accuracy_ci95"] == pytest.approx(list(metrics.wilson_interval(3, 5)))
    unknown = table[metrics.UNKNOWN]  # example 7: m->m
    assert unknown["recall"] == {"female": None, "male": 1.0}
    assert sum(row["n"] for row in table.values()) == 10


def test_group_values_order():
    y = np.zeros(5, int)
    natural = metrics.group_breakdown(y, y, ["10", "9", metrics.UNKNOWN, "x2", "x10"], CLASSES)
    assert list(natural) == ["9", "10", "x2", "x10", metrics.UNKNOWN]
    given = metrics.group_breakdown(y, y, ["b", "a", "c", "a", "b"], CLASSES, order=["c", "b"])
    assert list(given) == ["c", "b", "a"]


# --------------------------------------------------------------------------- group rules
def _cfg(tmp_path, groups, **more):
    overrides = [("evaluate.groups", groups), ("data.root", str(tmp_path / "data"))]
    return load_config(None, overrides + list(more.items()), cwd=tmp_path)


def test_utkface_preset_gives_age_bands_and_race_names(tmp_path):
    rule = evaluation.group_rule(_cfg(tmp_path, "utkface"))
    names = ["25_1_0_20170116174525125.jpg.chip.jpg", "5_0_2_2017.jpg.chip.jpg",
             "70_0_4_x.jpg", "9_1_3_x.jpg", "10_0_1_x.jpg", "116_1_0_x.jpg",
             "39_1_20170116174525125.jpg.chip.jpg",  # a real UTKFace quirk: no race field
             "female_0001.jpg"]
    assigned = rule.assign([tmp_path / "data" / "female" / n for n in names])
    assert assigned["age_band"] == ["20-29", "0-9", "70+", "0-9", "10-19", "70+", metrics.UNKNOWN,
                                    metrics.UNKNOWN]
    assert assigned["race"] == ["White", "Asian", "Others", "Indian", "Black", "White", metrics.UNKNOWN,
                                metrics.UNKNOWN]
    assert rule.orders["age_band"][:2] == ["0-9", "10-19"] and rule.orders["age_band"][-1] == "70+"


def test_regex_rule_uses_named_groups_on_the_file_name(tmp_path):
    rule = evaluation.group_rule(_cfg(tmp_path, r"^(?P<camera>[a-z]+)-(?P<site>\d+)?"))
    assert rule.attributes == ["camera", "site"]
    assigned = rule.assign([tmp_path / "x-1" / "canon-3.jpg", tmp_path / "nikon-.jpg", tmp_path / "7.jpg"])
    assert assigned == {"camera": ["canon", "nikon", metrics.UNKNOWN],
                        "site": ["3", metrics.UNKNOWN, metrics.UNKNOWN]}


def test_bad_regex_rules_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no named groups"):
        evaluation.group_rule(_cfg(tmp_path, r"^(\d+)_"))
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        evaluation.group_rule(_cfg(tmp_path, r"^(?P<age>\d+"))
    with pytest.raises(ConfigError, match="not found"):
        evaluation.group_rule(_cfg(tmp_path, "missing.csv"))


def test_csv_rule_maps_manifest_paths_to_attributes(tmp_path, monkeypatch):
    # a relative CSV path in a config file is found beside that file, whatever the current folder
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "groups.csv").write_text(
        "path,skin,lighting\nfemale/a.jpg,dark,indoor\n"
        f"{tmp_path / 'data' / 'male' / 'b.jpg'},light,\nelsewhere/c.jpg,light,outdoor\n")
    (tmp_path / "conf" / "config.yaml").write_text(
        f"data:\n  root: {tmp_path / 'data'}\nevaluate:\n  groups: groups.csv\n")
    rule = evaluation.group_rule(load_config(tmp_path / "conf" / "config.yaml"))
    assert rule.attributes == ["skin", "lighting"]
    data = tmp_path / "data"
    assigned = rule.assign([data / "female" / "a.jpg", data / "male" / "b.jpg", data / "male" / "z.jpg"])
    assert assigned == {"skin": ["dark", "light", metrics.UNKNOWN],
                        "lighting": ["indoor", metrics.UNKNOWN, metrics.UNKNOWN]}
    (tmp_path / "bad.csv").write_text("file,skin\na.jpg,dark\n")  # found in the current folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="'path' column"):
        evaluation.group_rule(_cfg(tmp_path, "bad.csv"))


def test_no_rule_without_config(tmp_path):
    assert evaluation.group_rule(load_config(None, cwd=tmp_path)) is None


@pytest.mark.real_faces
def test_utkface_preset_reads_the_real_file_names(tmp_path):
    from conftest import FACES

    if not FACES.is_dir():
        pytest.skip(f"{FACES} not present")
    files = sorted(FACES.rglob("*.jpg"))
    assigned = evaluation.group_rule(_cfg(tmp_path, "utkface")).assign(files)
    known = [v for v in assigned["race"] if v != metrics.UNKNOWN]
    assert len(known) >= 0.99 * len(files)  # a handful of UTKFace names lack the race field
    assert set(known) == set(evaluation.UTKFACE_RACES)
    # the gender field agrees with the folder (0 male, 1 female) for the names that parse
    for path in files[:: max(1, len(files) // 500)]:
        match = evaluation.UTKFACE_PATTERN.search(path.name)
        if match:
            assert {"0": "male", "1": "female"}[match["gender"]] == path.parent.name
