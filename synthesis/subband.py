"""Table 1: how much each Haar sub-band (LL, LH, HL, HH) changes when FMAS paints an anomaly.

For a pair (normal ``I_N``, synthesised ``I_A``), both RGB in [0, 1], the one-level orthonormal
Haar DWT (pywt, ``mode="symmetric"``) of each channel gives four sub-bands; the change of a
sub-band is the mean absolute difference of its coefficients over all positions and channels.
Per class the changes are averaged over pairs and normalised across the four sub-bands to sum to
one, which is what Table 1 reports. Naming follows docs/design.md: LH = pywt cH, HL = pywt cV,
HH = pywt cD.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pywt

SUBBANDS = ("LL", "LH", "HL", "HH")


def subband_change(normal: np.ndarray, synthesized: np.ndarray) -> np.ndarray:
    """Mean absolute change per sub-band between two images.

    Args:
      normal: ``[H, W, C]`` in [0, 1] (``I_N``).
      synthesized: ``[H, W, C]`` in [0, 1] (``I_A``), same shape.

    Returns:
      float64 ``[4]``, in the order LL, LH, HL, HH (not normalised).
    """
    if normal.shape != synthesized.shape:
        raise ValueError(f"Shapes differ: {normal.shape} vs {synthesized.shape}")
    ll_n, (lh_n, hl_n, hh_n) = pywt.dwt2(normal.astype(np.float64), "haar", axes=(0, 1))
    ll_a, (lh_a, hl_a, hh_a) = pywt.dwt2(synthesized.astype(np.float64), "haar", axes=(0, 1))
    pairs = ((ll_n, ll_a), (lh_n, lh_a), (hl_n, hl_a), (hh_n, hh_a))
    return np.array([np.mean(np.abs(a - n)) for n, a in pairs])


def class_table(
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]],
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Normalised per-class sub-band changes (Table 1).

    Args:
      pairs: ``(category, normal [H, W, C], synthesized [H, W, C])`` in [0, 1].

    Returns:
      ``(rows, counts)``: per class a float64 ``[4]`` (LL, LH, HL, HH) summing to 1, and the
      number of pairs per class.
    """
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for category, normal, synthesized in pairs:
        sums[category] = sums.get(category, np.zeros(4)) + subband_change(normal, synthesized)
        counts[category] = counts.get(category, 0) + 1
    rows = {}
    for category in sorted(sums):
        mean = sums[category] / counts[category]
        total = mean.sum()
        rows[category] = mean / total if total > 0 else np.full(4, np.nan)
    return rows, counts


def markdown_table(rows: dict[str, np.ndarray]) -> str:
    """Table 1's orientation: one column per class, one row per sub-band, two decimals."""
    classes = list(rows)
    lines = [
        "| Class | " + " | ".join(classes) + " |",
        "|---|" + "---|" * len(classes),
    ]
    for b, name in enumerate(SUBBANDS):
        lines.append(f"| {name} | " + " | ".join(f"{rows[c][b]:.2f}" for c in classes) + " |")
    return "\n".join(lines)
