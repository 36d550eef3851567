"""Evaluation metrics of the MVTec AD protocol (Sec. 4.1): image AUROC, pixel AUROC and PRO.

All functions are plain numpy and memory-aware: one category of MVTec AD at full resolution
(e.g. 150 test images of 1024 x 1024, ~157 M pixels) is evaluated with a single ``argsort`` over
the pixels and a few O(pixels) arrays, not one copy per threshold.

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


def _tie_group_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Boolean [n]: True at the last position of each run of equal values in a sorted vector."""
    keep = np.empty(sorted_scores.shape[0], dtype=bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=keep[:-1])
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
    labels = labels.astype(bool)
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"auroc: needs both classes, got {n_pos} anomalous and {n_neg} normal samples."
        )
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    del order
    ends = _tie_group_ends(sorted_scores)
    del sorted_scores
    # Cumulative positives at the end of each tie group (ascending scores).
    cum_pos = np.cumsum(sorted_labels, dtype=np.int64)[ends]
    del sorted_labels
    cum_all = np.flatnonzero(ends).astype(np.int64) + 1
    cum_neg = cum_all - cum_pos
    pos_in_group = np.diff(cum_pos, prepend=0).astype(np.float64)
    neg_in_group = np.diff(cum_neg, prepend=0).astype(np.float64)
    neg_below = (cum_neg - neg_in_group).astype(np.float64)
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
    n_pixels = sum(int(np.size(g)) for g in masks)
    # Per pixel: is it defect-free (FPR base) and its PRO increment 1 / |region| (0 outside).
    ok = np.empty(n_pixels, dtype=bool)
    pro_change = np.zeros(n_pixels, dtype=np.float64)
    num_regions = 0
    start = 0
    for gt in masks:
        gt = np.asarray(gt).astype(bool, copy=False)
        labeled, n_components = scipy.ndimage.label(gt, structure=_EIGHT_CONNECTED)
        labeled = labeled.reshape(-1)
        stop = start + labeled.size
        ok[start:stop] = labeled == 0
        if n_components:
            sizes = np.bincount(labeled, minlength=n_components + 1).astype(np.float64)
            inverse = np.zeros_like(sizes)
            inverse[1:] = 1.0 / sizes[1:]
            pro_change[start:stop] = inverse[labeled]
        num_regions += n_components
        start = stop
    num_ok = int(np.count_nonzero(ok))
    if num_regions == 0:
        raise ValueError("pro_score: the ground truth holds no anomalous region; PRO is undefined.")
    if num_ok == 0:
        raise ValueError("pro_score: the ground truth holds no defect-free pixel; FPR undefined.")

    scores = _flat_float32(maps)
    if isinstance(maps, np.ndarray) and np.shares_memory(scores, maps):
        scores = scores.copy()  # sorted in place below; never modify the caller's maps
    if not np.all(np.isfinite(scores)):
        raise ValueError("pro_score: maps contain NaN or inf; check the model's output.")
    # One sort, high to low. Tie order does not matter: only the last point of a tie is kept.
    order = np.argsort(scores)[::-1]
    np.take(scores, order, out=scores)
    keep = _tie_group_ends(scores)
    del scores

    fp = np.cumsum(ok[order], dtype=np.int64)[keep]
    del ok
    fprs = fp.astype(np.float64) / num_ok
    del fp
    np.take(pro_change, order, out=pro_change)
    del order
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
