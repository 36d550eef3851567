"""Metrics against scikit-learn, hand-computed PRO cases and an independent threshold sweep."""

import itertools

import numpy as np
import pytest
import scipy.ndimage
from PIL import Image
from sklearn.metrics import roc_auc_score

from wdam_jax import metrics

# ---------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 200
    labels = rng.random(n) < 0.3
    # Few distinct values: many ties, within and across classes.
    scores = rng.integers(0, 7, n) + labels * rng.integers(0, 3, n)
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_continuous_and_extremes():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(50), np.ones(30)].astype(int)
    scores = rng.normal(size=80).astype(np.float32) + labels
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.auroc(labels.astype(float), labels) == 1.0
    assert metrics.auroc(-labels.astype(float), labels) == 0.0
    assert metrics.auroc(np.zeros(80), labels) == 0.5


def test_auroc_keeps_float64_precision_and_integer_scores():
    labels = np.array([0, 1, 0, 1])
    scores = np.array([1.0, 1.0 + 1e-12, 2.0, 2.0])  # equal in float32, not in float64
    assert metrics.auroc(scores, labels) == roc_auc_score(labels, scores) == 0.625
    ints = np.array([3, -2, 7, 7, 0], dtype=np.int32)
    lab = np.array([1, 0, 1, 0, 0])
    assert metrics.auroc(ints, lab) == pytest.approx(roc_auc_score(lab, ints))
    neg = np.array([-0.0, 0.0, -1.5, 2.5], dtype=np.float32)  # -0.0 ties with 0.0
    lab = np.array([1, 0, 0, 1])
    assert metrics.auroc(neg, lab) == pytest.approx(roc_auc_score(lab, neg))


def test_auroc_rejects_single_class_and_nan():
    with pytest.raises(ValueError, match="both classes"):
        metrics.auroc(np.arange(4.0), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="differ"):
        metrics.auroc(np.arange(3.0), np.array([0, 1]))


def test_pixel_auroc_matches_sklearn_on_flattened_pixels():
    rng = np.random.default_rng(1)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    masks = rng.random((3, 16, 16)) < 0.1
    maps[masks] += 0.3
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    # A list of maps of different sizes is the concatenation of their pixels.
    maps_list = [maps[0], maps[1, :8]]
    masks_list = [masks[0], masks[1, :8]]
    flat_maps = np.concatenate([m.ravel() for m in maps_list])
    flat_masks = np.concatenate([m.ravel() for m in masks_list])
    assert metrics.pixel_auroc(maps_list, masks_list) == pytest.approx(
        roc_auc_score(flat_masks, flat_maps), abs=1e-12
    )


# ---------------------------------------------------------------------------- PRO: hand cases


def _gt_two_regions():
    gt = np.zeros((3, 6), bool)
    gt[0, 0] = gt[1, 0] = True  # region A, 2 pixels
    gt[0, 5] = True  # region B, 1 pixel
    return gt


def test_pro_perfect_map_is_one():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 20, 20), bool)
    masks[0, 2:6, 3:9] = True
    masks[2, 10:12, 10:19] = True
    masks[2, 0, 0] = True
    maps = masks.astype(np.float32) + 0.01 * rng.random(masks.shape).astype(np.float32) * ~masks
    assert metrics.pro_score(maps, masks) == pytest.approx(1.0, abs=1e-12)


def test_pro_inverted_map_is_zero():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 2:5, 2:5] = True
    assert metrics.pro_score(-masks.astype(np.float32), masks) == pytest.approx(0.0, abs=1e-12)


def test_pro_constant_map():
    # All scores tie: the only curve points are (0, 0), (1, 1), (1, 1); the trapezoid up to the
    # limit L under the straight line y = x is L**2 / 2, divided by L gives L / 2.
    masks = np.zeros((3, 8, 8), bool)
    masks[1, 2:4, 2:6] = True
    masks[2, 7, 7] = True
    constant = np.full(masks.shape, 0.25, np.float32)
    assert metrics.pro_score(constant, masks) == pytest.approx(0.15, abs=1e-12)
    assert metrics.pro_score(constant, masks, fpr_limit=0.1) == pytest.approx(0.05, abs=1e-12)
    assert metrics.pro_score(constant, masks, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_pro_two_regions_by_hand():
    # 18 pixels: region A (2 px: scores 0.9, 0.5), region B (1 px: 0.7), 15 defect-free pixels:
    # one at 0.8, fourteen at 0.1. Descending thresholds give (FPR, PRO):
    #   0.9 -> (0, 1/4)   A half covered: (1/2 + 0) / 2
    #   0.8 -> (1/15, 1/4)
    #   0.7 -> (1/15, 3/4)
    #   0.5 -> (1/15, 1)
    #   0.1 -> (1, 1)
    # Area to 0.3: 1/4 * 1/15 + 1 * (0.3 - 1/15) = 0.25; PRO = 0.25 / 0.3.
    gt = _gt_two_regions()
    m = np.full(gt.shape, 0.1, np.float32)
    m[0, 0], m[1, 0], m[0, 5], m[2, 3] = 0.9, 0.5, 0.7, 0.8
    fprs, pros = metrics.pro_curve(m[None], gt[None])
    np.testing.assert_allclose(fprs, [0, 0, 1 / 15, 1 / 15, 1 / 15, 1, 1], atol=1e-12)
    np.testing.assert_allclose(pros, [0, 0.25, 0.25, 0.75, 1, 1, 1], atol=1e-12)
    assert metrics.pro_score(m[None], gt[None]) == pytest.approx(0.25 / 0.3, abs=1e-12)
    # Whole curve: 1/60 + 14/15 = 0.95.
    assert metrics.pro_score(m[None], gt[None], fpr_limit=1.0) == pytest.approx(0.95, abs=1e-12)


def test_pro_does_not_modify_its_inputs():
    gt = _gt_two_regions()[None]
    m = np.random.default_rng(0).random(gt.shape).astype(np.float32)
    m_copy, gt_copy = m.copy(), gt.copy()
    first = metrics.pro_score(m, gt)
    assert np.array_equal(m, m_copy) and np.array_equal(gt, gt_copy)
    assert metrics.pro_score(m, gt) == first


def test_pro_regions_are_8_connected():
    # (0,0) touches (1,1) only diagonally: one region of 3 pixels with 8-connectivity (PRO 1/3
    # once (0,0) is found); 4-connectivity would give two regions and PRO 1/2.
    gt = np.zeros((4, 4), bool)
    gt[0, 0] = gt[1, 1] = gt[1, 2] = True
    m = np.zeros((4, 4), np.float32)
    m[0, 0] = 1.0
    _, pros = metrics.pro_curve(m[None], gt[None])
    assert pros[1] == pytest.approx(1 / 3)


def test_pro_fpr_base_is_all_defect_free_pixels():
    # A good image's false positives count; its pixels are in the FPR denominator.
    gt = np.zeros((2, 5, 5), bool)
    gt[0, 0, 0] = True
    m = np.zeros((2, 5, 5), np.float32)
    m[1, 2, 2] = 2.0  # one false positive on the good image, above the defect's score
    m[0, 0, 0] = 1.0
    fprs, pros = metrics.pro_curve(m, gt)
    np.testing.assert_allclose(fprs[:3], [0, 1 / 49, 1 / 49])
    np.testing.assert_allclose(pros[:3], [0, 0, 1])


def test_pro_errors():
    with pytest.raises(ValueError, match="no anomalous region"):
        metrics.pro_score(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError, match="shape"):
        metrics.pro_score(np.zeros((1, 4, 4)), np.ones((1, 4, 5), bool))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.pro_score(np.zeros((1, 4, 4)), np.ones((1, 4, 4), bool), fpr_limit=0.0)


# ---------------------------------------------------------------------------- PRO: reference


def _reference_pro(maps, masks, fpr_limit):
    """Slow, independent PRO: sweep every distinct threshold, measure each region's overlap."""
    maps = [np.asarray(m, np.float64) for m in maps]
    regions = []  # (image index, boolean region)
    for i, gt in enumerate(masks):
        lab, n = scipy.ndimage.label(gt, structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    n_ok = sum(int((~g).sum()) for g in masks)
    xs, ys = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        fp = sum(int(((m >= t) & ~g).sum()) for m, g in zip(maps, masks, strict=True))
        overlaps = [(maps[i][r] >= t).mean() for i, r in regions]
        xs.append(fp / n_ok)
        ys.append(float(np.mean(overlaps)))
    xs.append(1.0)
    ys.append(1.0)
    xs, ys = np.asarray(xs), np.asarray(ys)
    # Integrate the polyline from 0 to fpr_limit, walking the segments.
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / fpr_limit


def _random_masks(rng, n, h, w):
    masks = np.zeros((n, h, w), bool)
    for i in range(n - 1):  # the last image stays defect-free
        noise = scipy.ndimage.gaussian_filter(rng.random((h, w)), 1.5)
        masks[i] = noise > np.quantile(noise, 0.85)
    return masks


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quantised", [False, True])
def test_pro_matches_independent_sweep(seed, quantised):
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, 4, 14, 13)
    maps = rng.random(masks.shape).astype(np.float32) + 0.4 * masks
    if quantised:  # heavy ties
        maps = np.round(maps * 6).astype(np.float32) / 6
    for limit in (0.3, 0.05, 1.0):
        expected = _reference_pro(maps, masks, limit)
        assert metrics.pro_score(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


def test_pro_accepts_images_of_different_sizes():
    rng = np.random.default_rng(7)
    masks = [_random_masks(rng, 2, 10, 12)[0], _random_masks(rng, 2, 7, 9)[0]]
    maps = [rng.random(g.shape).astype(np.float32) + 0.5 * g for g in masks]
    assert metrics.pro_score(maps, masks) == pytest.approx(_reference_pro(maps, masks, 0.3))


# ---------------------------------------------------------------------------- evaluation


def test_resize_maps_to_is_bilinear_and_keeps_matching_shapes():
    m = np.arange(16, dtype=np.float32).reshape(4, 4)
    same, up = metrics.resize_maps_to([m, m], [(4, 4), (8, 6)])
    assert same is not None and np.array_equal(same, m)
    expected = np.asarray(Image.fromarray(m, mode="F").resize((6, 8), Image.BILINEAR))
    np.testing.assert_allclose(up, expected)
    assert up.shape == (8, 6) and up.dtype == np.float32


def test_evaluate_category_resizes_to_original_resolution():
    rng = np.random.default_rng(3)
    originals = _random_masks(rng, 5, 32, 24)
    labels = originals.reshape(5, -1).any(1).astype(np.int32)
    small = rng.random((5, 8, 8)).astype(np.float32)
    scores = small.reshape(5, -1).max(1) + labels
    out = metrics.evaluate_category(scores, small, list(originals), labels)
    resized = metrics.resize_maps_to(small, [(32, 24)] * 5)
    assert set(out) == {"i_auroc", "p_auroc", "pro"}
    assert out["i_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["p_auroc"] == pytest.approx(
        roc_auc_score(originals.ravel(), np.stack(resized).ravel())
    )
    assert out["pro"] == pytest.approx(_reference_pro(resized, originals, 0.3), abs=1e-9)
