"""Pixel metrics at the ground truth's original resolution against the method's own resolution.

The project computes P-AUROC and PRO on the MVTec AD protocol: anomaly maps bilinearly resized to
each ground-truth mask's original size (``wdam_jax.evaluate``). DRAEM's official code evaluates at
its 256 x 256 input and PatchCore's at its 224 x 224 centre crop, with the masks resized down
instead. :func:`compare_resolutions` scores one run's test split once and computes both, so the
difference between the protocols is measured on the same maps (``docs/design.md``).
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from wdam_jax import metrics, runs
from wdam_jax.data import sources


def compare_resolutions(
    workdir: str | pathlib.Path, *, step: int | None = None, best: bool = False
) -> dict[str, Any]:
    """P-AUROC and PRO of a run's test split at both resolutions, from one scoring.

    Args:
      workdir: an evaluated or at least trained run directory.
      step: checkpoint step (default: newest).
      best: the validation-selected checkpoint (``train.select_metric``) instead.

    Returns:
      ``{"step", "category", "model_size": [h, w], "original": {"p_auroc", "pro"},
      "model": {"p_auroc", "pro"}, "delta": {metric: original - model}}`` (fractions).
      "original": maps resized to ``Split.original_masks`` (the reported numbers); "model": the
      maps as scored, against ``Split.masks`` (the ground truth resized, nearest neighbour, and
      cropped as the images were).
    """
    run = runs.restore(workdir, step=step, best=best)
    split = sources.load_split(run.config.data, split="test")
    scores = run.method.score(run.model, run.fitted, split.images, step=run.step)
    maps = np.asarray(scores.maps, np.float32)
    originals = [np.asarray(g, bool) for g in split.original_masks]
    at_original = metrics.resize_maps_to(maps, [g.shape for g in originals])
    model_masks = [np.asarray(g, bool) for g in split.masks]
    out: dict[str, Any] = {
        "step": run.step,
        "category": run.config.data.category,
        "model_size": list(maps.shape[1:3]),
    }
    for name, m, g in (("original", at_original, originals), ("model", list(maps), model_masks)):
        out[name] = {"p_auroc": metrics.pixel_auroc(m, g), "pro": metrics.pro_score(m, g)}
    out["delta"] = {k: out["original"][k] - out["model"][k] for k in ("p_auroc", "pro")}
    return out
