"""Evaluation metrics of the MVTec AD protocol (Sec. 4.1): image AUROC, pixel AUROC and PRO.

All functions are plain numpy and memory-aware: one category of MVTec AD at full resolution
(e.g. 150 test images of 1024 x 1024, ~157 M pixels) is evaluated with one in-place sort of
packed (score, label / region) uint64 keys and a few O(pixels) arrays, never one copy per
threshold and never an ``argsort`` index array.

``pro_score`` follows MVTec's official evaluation code (``mvtec_ad_evaluation``,
``generic_util.compute_pro`` + ``trapezoid``): 8-connected ground-truth regions, the false-positive
rate over the defect-free pixels of all images, cumulative sums over scores sorted high to low with
equal scores merged into one curve point, the curve padded with (0, 0) and (1, 1), and the trapezoid
integrated to ``fpr_limit`` with linear interpolation at the limit, divided by ``fpr_limit``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage
from PIL import Image

ArrayOrList = np.ndarray | Sequence[np.ndarray]

# 8-connectivity, as MVTec's evaluation code (``np.ones((3, 3))`` structuring element).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _flat_float32(maps: ArrayOrList) -> np.ndarray:
    """Concatenates maps of possibly different shapes into one flat float32 vector."""
    if isinstance(maps, np.ndarray):
        return np.asarray(maps, dtype=np.float32).reshape(-1)
    return np.concatenate([np.asarray(m, dtype=np.float32).reshape(-1) for m in maps])


def _sortable_keys(scores: np.ndarray) -> np.ndarray:
    """Order-preserving uint64 keys of float32 scores, score bits in the high 32 bits.

    ``a < b`` as floats iff ``key(a) < key(b)``, and equal floats (``-0.0 == 0.0`` included) give
    equal keys. The low 32 bits are left free for a payload (a label, a region id) so that one
    plain ``np.sort`` of the keys replaces an ``argsort`` plus gathers: numpy's vectorised integer
    sort is ~10x faster than ``argsort`` at 10^8 elements and needs no index array.
    """
    bits = (np.asarray(scores, dtype=np.float32) + np.float32(0.0)).view(np.uint32)  # -0 -> +0
    negative = bits >= np.uint32(0x80000000)
    np.invert(bits, out=bits, where=negative)
    np.bitwise_or(bits, np.uint32(0x80000000), out=bits, where=~negative)
    keys = bits.astype(np.uint64)
    del bits
    keys <<= np.uint64(32)
    return keys


def _tie_group_ends(sorted_keys: np.ndarray) -> np.ndarray:
    """Boolean [n]: True at the last position of each run of equal scores (high 32 key bits)."""
    keep = np.empty(sorted_keys.shape[0], dtype=bool)
    diff = np.bitwise_xor(sorted_keys[1:], sorted_keys[:-1])
    diff >>= np.uint64(32)
    np.not_equal(diff, 0, out=keep[:-1])
    keep[-1] = True
    return keep


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, ties handled as ``sklearn.metrics.roc_auc_score``.

    Equal scores form one ROC point (a tied positive/negative pair counts 1/2), which is the
    Mann-Whitney statistic divided by ``P * N``.

    Args:
      scores: [N] anomaly scores, higher = more anomalous.
      labels: [N] 0/1 or bool ground truth, 1 = anomalous.

    Returns:
      The AUROC in [0, 1].

    Raises:
      ValueError: shapes differ, a score is not finite, or only one class is present.
    """
    scores = np.asarray(scores).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"auroc: scores {scores.shape} and labels {labels.shape} differ in size.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("auroc: scores contain NaN or inf; check the model's output.")
    labels = labels.astype(bool, copy=False)
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"auroc: needs both classes, got {n_pos} anomalous and {n_neg} normal samples."
        )
    if scores.dtype.kind == "f" and scores.dtype.itemsize <= 4:
        # Pixel maps (float32): one in-place sort of packed (score, label) keys.
        keys = _sortable_keys(scores)
        keys |= labels.astype(np.uint64)
        keys.sort()
        ends = _tie_group_ends(keys)
        sorted_labels = (keys & np.uint64(1)).astype(bool)
        del keys
    else:
        # float64 / integer image scores keep their full precision (no spare key bits).
        order = np.argsort(scores)
        sorted_scores = scores[order]
        ends = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
        sorted_labels = labels[order]
        del order, sorted_scores
    # Cumulative positives / negatives at the end of each tie group (ascending scores).
    cum_pos = np.cumsum(sorted_labels, dtype=np.int64)[ends]
    del sorted_labels
    cum_neg = np.flatnonzero(ends).astype(np.int64) + 1 - cum_pos
    pos_in_group = np.diff(cum_pos, prepend=0).astype(np.float64)
    neg_in_group = np.diff(cum_neg, prepend=0).astype(np.float64)
    neg_below = cum_neg.astype(np.float64) - neg_in_group
    u = np.sum(pos_in_group * neg_below) + 0.5 * np.sum(pos_in_group * neg_in_group)
    return float(u / (float(n_pos) * float(n_neg)))


def pixel_auroc(maps: ArrayOrList, masks: ArrayOrList) -> float:
    """AUROC over all pixels of all images.

    Args:
      maps: [N, H, W] anomaly maps, or a list of [H_i, W_i] maps.
      masks: ground truth of the same shape(s), bool (True = anomalous).

    Returns:
      The pixel-level AUROC in [0, 1].
    """
    _check_same_shapes(maps, masks, "pixel_auroc")
    return auroc(_flat_float32(maps), _flat_bool(masks))


def _flat_bool(masks: ArrayOrList) -> np.ndarray:
    if isinstance(masks, np.ndarray):
        return np.asarray(masks).astype(bool, copy=False).reshape(-1)
    return np.concatenate([np.asarray(m).astype(bool, copy=False).reshape(-1) for m in masks])


def _check_same_shapes(maps: ArrayOrList, masks: ArrayOrList, name: str) -> None:
    if len(maps) != len(masks):
        raise ValueError(f"{name}: {len(maps)} maps but {len(masks)} masks.")
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        if np.shape(m) != np.shape(g) or np.ndim(m) != 2:
            raise ValueError(
                f"{name}: map {i} has shape {np.shape(m)} but its mask has {np.shape(g)}; both "
                "must be [H, W] (resize maps to the ground truth with resize_maps_to)."
            )


def pro_curve(maps: ArrayOrList, masks: ArrayOrList) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve (FPR, PRO) as MVTec's ``compute_pro``.

    Args:
      maps: [N, H, W] anomaly maps, or a list of [H_i, W_i] maps.
      masks: bool ground truth of the same shape(s).

    Returns:
      (fprs, pros), each [K + 2] float64, starting at (0, 0) and ending at (1, 1); K is the
      number of distinct scores.

    Raises:
      ValueError: no anomalous region or no defect-free pixel in the ground truth.
    """
    _check_same_shapes(maps, masks, "pro_score")
    # Step 1: 8-connected regions of every ground truth, numbered globally (0 = defect-free).
    region_ids = []
    region_sizes = [np.zeros(1)]  # index 0: defect-free pixels, PRO increment 0
    num_regions = 0
    for gt in masks:
        labeled, n_components = scipy.ndimage.label(
            np.asarray(gt).astype(bool, copy=False), structure=_EIGHT_CONNECTED
        )
        labeled = labeled.reshape(-1).astype(np.uint64)
        if n_components:
            region_sizes.append(np.bincount(labeled, minlength=n_components + 1)[1:])
            labeled[labeled > 0] += np.uint64(num_regions)
        region_ids.append(labeled)
        num_regions += n_components
    if num_regions == 0:
        raise ValueError("pro_score: the ground truth holds no anomalous region; PRO is undefined.")
    if num_regions >= 2**32:
        raise ValueError("pro_score: more than 2**32 ground-truth regions.")
    sizes = np.concatenate(region_sizes).astype(np.float64)
    increment = np.zeros_like(sizes)
    increment[1:] = 1.0 / sizes[1:]  # the PRO change when one pixel of a region turns positive

    # Step 2: one sort of (score, region id) keys; scores high to low = the reversed view.
    scores = _flat_float32(maps)
    if not np.all(np.isfinite(scores)):
        raise ValueError("pro_score: maps contain NaN or inf; check the model's output.")
    keys = _sortable_keys(scores)
    del scores
    start = 0
    for ids in region_ids:
        keys[start : start + ids.size] |= ids
        start += ids.size
    del region_ids
    keys.sort()
    keys = keys[::-1]
    keep = _tie_group_ends(keys)  # last pixel of each distinct score: one curve point per score

    # Step 3: cumulative false positives over all defect-free pixels, cumulative region overlap.
    region = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    del keys
    ok = region == 0
    num_ok = int(np.count_nonzero(ok))
    if num_ok == 0:
        raise ValueError("pro_score: the ground truth holds no defect-free pixel; FPR undefined.")
    fprs = np.cumsum(ok, dtype=np.int64)[keep].astype(np.float64) / num_ok
    del ok
    pro_change = increment[region]
    del region
    np.cumsum(pro_change, out=pro_change)
    pros = pro_change[keep] / num_regions
    del pro_change, keep
    # Cumulative sums can overshoot 1 by rounding; MVTec clips.
    np.clip(fprs, None, 1.0, out=fprs)
    np.clip(pros, None, 1.0, out=pros)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def trapezoid(x: np.ndarray, y: np.ndarray, *, x_max: float | None = None) -> float:
    """Area under a curve with x ascending, cut at ``x_max`` with linear interpolation there.

    As MVTec's ``generic_util.trapezoid`` (non-finite points dropped).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if not np.any(x == x_max):
            ins = int(np.searchsorted(x, x_max, side="right"))
            if not 0 < ins < len(x):
                raise ValueError(f"trapezoid: x_max={x_max} outside the curve's x range.")
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (
                x[ins] - x[ins - 1]
            )
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        inside = x <= x_max
        x, y = x[inside], y[inside]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def pro_score(maps: ArrayOrList, masks: ArrayOrList, *, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised by ``fpr_limit`` (Sec. 4.1).

    Args:
      maps: [N, H, W] anomaly maps (higher = more anomalous), or a list of [H_i, W_i] maps,
        at the ground truth's resolution.
      masks: [N, H, W] bool ground truth (or a list matching ``maps``).
      fpr_limit: integration limit on the false-positive rate, in (0, 1].

    Returns:
      PRO in [0, 1]; a perfect map gives 1, a constant map ``fpr_limit / 2``.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"pro_score: fpr_limit must be in (0, 1], got {fpr_limit}.")
    fprs, pros = pro_curve(maps, masks)
    return trapezoid(fprs, pros, x_max=fpr_limit) / fpr_limit


def resize_maps_to(maps: ArrayOrList, shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Bilinearly resizes each anomaly map to the given (H, W) (e.g. the ground truth's original).

    Args:
      maps: [N, h, w] maps or a list of [h_i, w_i] maps.
      shapes: N target shapes (H_i, W_i).

    Returns:
      A list of N float32 maps, map i of shape ``shapes[i]``.
    """
    if len(maps) != len(shapes):
        raise ValueError(f"resize_maps_to: {len(maps)} maps but {len(shapes)} target shapes.")
    out = []
    for m, (h, w) in zip(maps, shapes, strict=True):
        m = np.asarray(m, dtype=np.float32)
        if m.shape == (h, w):
            out.append(m)
            continue
        resized = Image.fromarray(m, mode="F").resize((int(w), int(h)), Image.BILINEAR)
        out.append(np.asarray(resized, dtype=np.float32))
    return out


def evaluate_category(
    image_scores: np.ndarray,
    maps: ArrayOrList,
    original_masks: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Image AUROC, pixel AUROC and PRO of one category, pixel metrics at original resolution.

    Args:
      image_scores: [N] image anomaly scores.
      maps: [N, h, w] anomaly maps at model resolution (or a list).
      original_masks: N bool ground truths at their original resolution (``Split.original_masks``).
      labels: [N] 0 = good, 1 = anomalous.
      fpr_limit: PRO integration limit.

    Returns:
      ``{"i_auroc", "p_auroc", "pro"}`` as floats in [0, 1].
    """
    masks = [np.asarray(g, dtype=bool) for g in original_masks]
    resized = resize_maps_to(maps, [g.shape for g in masks])
    return {
        "i_auroc": auroc(image_scores, labels),
        "p_auroc": pixel_auroc(resized, masks),
        "pro": pro_score(resized, masks, fpr_limit=fpr_limit),
    }


# --------------------------------------------------------------------------------------------
# Precision-recall: AUPR and the F1-maximising threshold (image and pixel level).


def _scores_of_keys(keys: np.ndarray) -> np.ndarray:
    """float32 scores back from :func:`_sortable_keys` keys (the inverse of its bit map)."""
    bits = (keys >> np.uint64(32)).astype(np.uint32)
    positive = bits >= np.uint32(0x80000000)
    np.bitwise_xor(bits, np.uint32(0x80000000), out=bits, where=positive)
    np.invert(bits, out=bits, where=~positive)
    return bits.view(np.float32)


def _descending_counts(
    scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, tp, fp)`` at every distinct score, high to low, for "anomalous iff
    ``score >= threshold``" (the convention of ``sklearn.metrics.precision_recall_curve``).

    float32 inputs (pixel maps) go through one in-place sort of packed (score, label) keys, as
    :func:`auroc`; other dtypes keep their precision with an ``argsort``.
    """
    scores = np.asarray(scores).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool, copy=False)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in size.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf; check the model's output.")
    if not labels.any():
        raise ValueError(
            "precision and recall need at least one anomalous sample (label 1); with normal "
            "images only, use a false-positive-rate threshold (wdam_jax.thresholds)."
        )
    if scores.dtype.kind == "f" and scores.dtype.itemsize <= 4:
        keys = _sortable_keys(scores)
        keys |= labels.astype(np.uint64)
        keys.sort()
        keys = keys[::-1]
        ends = _tie_group_ends(keys)
        sorted_labels = (keys & np.uint64(1)).astype(bool)
        thresholds = _scores_of_keys(keys[ends])
        del keys
    else:
        order = np.argsort(-scores, kind="stable")
        sorted_scores = scores[order]
        ends = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
        sorted_labels = labels[order]
        thresholds = sorted_scores[ends]
    tp = np.cumsum(sorted_labels, dtype=np.int64)[ends]
    fp = np.flatnonzero(ends).astype(np.int64) + 1 - tp
    return thresholds, tp, fp


def aupr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as ``sklearn.metrics.average_precision_score``:
    ``sum_n (R_n - R_{n-1}) P_n`` over the distinct scores, high to low (no interpolation).

    Args:
      scores: [N] anomaly scores (pixels: flattened maps), higher = more anomalous.
      labels: [N] 0/1 or bool, 1 = anomalous; at least one 1.

    Returns:
      The average precision in [0, 1].
    """
    _, tp, fp = _descending_counts(scores, labels)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The largest F1 over all thresholds and the threshold reaching it.

    Decision: anomalous iff ``score >= threshold``. Only the observed scores are candidate
    thresholds, so with normal samples only there is no defined F1 (a ``ValueError``, not the
    degenerate minimum score anomalib's adaptive threshold falls back to, anomalib #2433).
    Among equal F1 values the highest threshold is returned (fewest false positives).

    Args:
      scores: [N] anomaly scores (pixels: flattened maps).
      labels: [N] 0/1 or bool, 1 = anomalous; at least one 1.

    Returns:
      ``(f1, threshold)``.
    """
    thresholds, tp, fp = _descending_counts(scores, labels)
    fn = tp[-1] - tp
    f1 = 2.0 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = int(np.argmax(f1))  # first maximum = highest threshold (thresholds descend)
    return float(f1[best]), float(thresholds[best])


def pixel_f1_max(maps: ArrayOrList, masks: ArrayOrList) -> tuple[float, float]:
    """:func:`f1_max` over all pixels of all images: ``(f1, threshold)``."""
    _check_same_shapes(maps, masks, "pixel_f1_max")
    return f1_max(_flat_float32(maps), _flat_bool(masks))


def pixel_aupr(maps: ArrayOrList, masks: ArrayOrList) -> float:
    """:func:`aupr` over all pixels of all images."""
    _check_same_shapes(maps, masks, "pixel_aupr")
    return aupr(_flat_float32(maps), _flat_bool(masks))


def decision_metrics(
    image_scores: np.ndarray, maps: ArrayOrList, masks: ArrayOrList, labels: np.ndarray
) -> dict[str, float]:
    """F1-max and AUPR at image and pixel level (maps and masks at the same resolution).

    Returns:
      ``{"i_f1_max", "i_aupr", "p_f1_max", "p_aupr"}``; the F1-maximising thresholds are
      :func:`f1_max`'s and :func:`pixel_f1_max`'s second values.
    """
    return {
        "i_f1_max": f1_max(image_scores, labels)[0],
        "i_aupr": aupr(image_scores, labels),
        "p_f1_max": pixel_f1_max(maps, masks)[0],
        "p_aupr": pixel_aupr(maps, masks),
    }
