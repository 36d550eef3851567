"""F1-max and AUPR against scikit-learn; thresholds (no F1 collapse on normal-only data);
normalised scores; the held-out split; the report's extra columns."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from wdam_jax import metrics, reporting, thresholds
from wdam_jax.data import sources


def _sklearn_f1_max(labels, scores):
    precision, recall, cuts = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    # sklearn appends (P=1, R=0) without a threshold; F1 there is 0.
    best = np.flatnonzero(f1[:-1] == f1[:-1].max())
    return f1[:-1].max(), cuts[best].max()  # ties: the highest threshold


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_f1_max_and_aupr_match_sklearn_with_ties(seed, dtype):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    if dtype is np.int64:  # few distinct values: ties within and across classes
        scores = rng.integers(0, 9, 300) + labels * rng.integers(0, 4, 300)
    else:
        scores = (rng.normal(size=300) + 1.2 * labels).astype(dtype)
        scores[::7] = scores[0]  # ties
    f1, cut = metrics.f1_max(scores, labels)
    ref_f1, ref_cut = _sklearn_f1_max(labels, scores)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert cut == pytest.approx(float(ref_cut), abs=0)
    # The F1 at the returned threshold, recomputed from the decisions.
    pred = scores >= cut
    tp = np.sum(pred & labels)
    assert f1 == pytest.approx(2 * tp / (pred.sum() + labels.sum()), abs=1e-12)
    assert metrics.aupr(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


def test_pixel_metrics_match_sklearn_on_flattened_pixels():
    rng = np.random.default_rng(3)
    masks = rng.random((4, 12, 12)) < 0.15
    maps = (rng.random((4, 12, 12)) + 0.5 * masks).astype(np.float32)
    maps[:, :2] = -0.0  # negative zero and ties
    maps[:, 2:3] = 0.0
    flat_m, flat_s = masks.reshape(-1), maps.reshape(-1)
    f1, cut = metrics.pixel_f1_max(list(maps), list(masks))
    ref_f1, ref_cut = _sklearn_f1_max(flat_m, flat_s)
    assert (f1, cut) == (pytest.approx(ref_f1, abs=1e-12), pytest.approx(float(ref_cut), abs=0))
    assert metrics.pixel_aupr(maps, masks) == pytest.approx(
        average_precision_score(flat_m, flat_s), abs=1e-12
    )


def test_f1_is_undefined_without_anomalies_and_never_the_minimum():
    """anomalib #2433: an F1 threshold on a normal-only set collapses to the minimum score and
    then flags every image. Here F1 refuses, and the normal-only rule stays high."""
    rng = np.random.default_rng(0)
    normal = rng.normal(10.0, 2.0, 40)
    with pytest.raises(ValueError, match="at least one anomalous"):
        metrics.f1_max(normal, np.zeros(40))
    maps = rng.normal(1.0, 0.1, (40, 8, 8)).astype(np.float32)
    cal = thresholds.calibrate(
        normal_scores=normal, normal_maps=maps, normal_source="holdout", fpr=0.05
    )
    image = cal["image"]
    assert image.rule == "normal_fpr" and set(cal["candidates"]["image"]) == {"normal_fpr"}
    assert image.value == pytest.approx(np.quantile(normal, 0.95))
    assert image.value > np.sort(normal)[-4]  # above 90% of the normal scores, not the minimum
    assert np.mean(image.decide(normal)) <= 0.05 + 1 / 40  # few normal images flagged
    assert cal["pixel"].value == pytest.approx(np.quantile(maps, 0.95), rel=1e-6)
    with pytest.raises(ValueError, match="needs labelled anomalies"):
        thresholds.calibrate(
            normal_scores=normal, normal_maps=maps, normal_source="h", rule="f1_max"
        )


def test_calibrate_with_labels_records_both_rules():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(30, int), np.ones(20, int)]
    scores = rng.normal(size=50) + 2.0 * labels
    masks = [rng.random((6, 6)) < 0.2 * lab for lab in labels]
    maps = [m + rng.random((6, 6)) for m in masks]
    labelled = {"scores": scores, "labels": labels, "maps": maps, "masks": masks,
                "has_pixel_labels": True, "source": "test split"}  # fmt: skip
    cal = thresholds.calibrate(
        normal_scores=scores[:30],
        normal_maps=np.stack(maps[:30]),
        normal_source="test normals",
        labelled=labelled,
        rule="f1_max",
    )
    f1, cut = metrics.f1_max(scores, labels)
    assert cal["image"].rule == "f1_max" and cal["image"].value == cut
    assert cal["image"].details["f1"] == f1
    assert cal["pixel"].value == metrics.pixel_f1_max(maps, masks)[1]
    document = thresholds.to_json(cal, step=7, method="m")
    assert document["image"]["rule"] == "f1_max"
    assert set(document["candidates"]["image"]) == {"normal_fpr", "f1_max"}


def test_normalisation_puts_the_threshold_at_one_half_and_is_monotone():
    t = thresholds.Threshold(value=3.0, scale=0.5, rule="normal_fpr")
    scores = np.array([-1e6, 1.0, 2.9, 3.0, 3.1, 5.0, 1e6])
    norm = t.normalise(scores)
    assert norm[3] == 0.5
    assert np.all(np.diff(norm) >= 0) and norm[0] == 0.0 and norm[-1] == 1.0
    assert np.all((norm >= 0.5) == t.decide(scores))
    assert norm[4] == pytest.approx(1 / (1 + np.exp(-0.2)))


def test_robust_scale_is_the_iqr_spread_and_never_zero():
    x = np.random.default_rng(0).normal(0, 3.0, 20000)
    assert thresholds.robust_scale(x) == pytest.approx(3.0, rel=0.03)
    assert thresholds.robust_scale(np.ones(10)) > 0


def test_holdout_split_is_seeded_disjoint_and_left_out_of_train(demo_data_root):
    from configs import cutpaste

    config = cutpaste.get_config("demo")
    config.data.root, config.data.image_size = str(demo_data_root), 32
    everything = sources.load_split(config.data, split="train")
    config.data.holdout_fraction = 0.2
    train = sources.load_split(config.data, split="train")
    held = sources.load_split(config.data, split="holdout")
    assert len(held) == round(0.2 * len(everything)) and len(train) + len(held) == len(everything)
    assert not set(train.paths) & set(held.paths)
    assert sources.load_split(config.data, split="holdout").paths == held.paths
    config.data.holdout_seed = 1
    assert sources.load_split(config.data, split="holdout").paths != held.paths


def test_report_shows_decision_metrics_after_the_paper_metrics(tmp_path):
    results = {"washer": {"i_auroc": 0.9, "p_auroc": 0.8, "pro": 0.7, "i_f1_max": 0.5,
                          "i_aupr": 0.6, "p_f1_max": 0.4, "p_aupr": 0.3}}  # fmt: skip
    header = reporting.markdown_table(results).splitlines()[0]
    assert header == "| Category | I-AUROC | P-AUROC | PRO | I-F1max | I-AUPR | P-F1max | P-AUPR |"
    back = reporting.read_metrics_json(reporting.write_metrics(results, tmp_path)["json"])
    assert back["washer"] == results["washer"]


def test_a_rule_the_held_out_images_cannot_support_is_flagged():
    """10 normal images cannot resolve a 1 % false-positive rate (a short demo run recorded
    observed_fpr 0.1 for target 0.01): the threshold says so; 100 can."""
    rng = np.random.default_rng(0)
    for n, supported in ((10, False), (99, False), (100, True)):
        scores, maps = rng.normal(size=n), rng.normal(size=(n, 4, 4))
        cal = thresholds.calibrate(
            normal_scores=scores, normal_maps=maps, normal_source="holdout split", fpr=0.01
        )
        image = cal["image"].as_json()
        assert image["rule_supported"] is supported, n
        assert ("unsupported_because" in image) is not supported
        assert cal["pixel"].as_json()["rule_supported"] is (n * 16 >= 100)
        chosen = {level: cal[level] for level in thresholds.LEVELS}
        warnings = thresholds.deployment_warnings(chosen, "runs/x")
        assert len(warnings) == (0 if supported else 1)
        if not supported:
            assert "holdout_fraction" in warnings[0] and f"{n} held-out" in warnings[0]
    assert thresholds.rule_supported(10, 0.1) and not thresholds.rule_supported(9, 0.1)


def test_a_threshold_from_the_test_split_warns_and_names_the_fix():
    rng = np.random.default_rng(1)
    cal = thresholds.calibrate(
        normal_scores=rng.normal(size=200),
        normal_maps=rng.normal(size=(200, 2, 2)),
        normal_source="test split, normal images (the run has no holdout split)",
    )
    chosen = {level: cal[level] for level in thresholds.LEVELS}
    warnings = thresholds.deployment_warnings(chosen, "runs/x")
    assert len(warnings) == 2  # image and pixel
    assert all("TEST SPLIT" in w and "--config.data.holdout_fraction" in w for w in warnings)
    manual = {"image": thresholds.manual(1.0, cal["image"]), "pixel": None}
    assert thresholds.deployment_warnings(manual, "runs/x") == []
