"""Evaluation of a training workdir: restore, score, metrics tables, heatmap figures (Sec. 4.1).

Outputs go to ``<workdir>/eval/step_<step>/``: ``metrics.json``, ``metrics.csv``, ``metrics.md``
(I-AUROC, P-AUROC, PRO; :mod:`wdam_jax.reporting`), ``heatmaps.png`` (Fig. 6/7 style: image,
ground truth, anomaly map; anomalous test images first) and ``scores.npz`` (image scores, labels).
"""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
from absl import logging

from wdam_jax import metrics, reporting
from wdam_jax import train as train_lib

EVAL_DIR = "eval"


def evaluate(
    config: ml_collections.ConfigDict | None,
    workdir: str | pathlib.Path,
    *,
    step: int | None = None,
    method: train_lib.Method | None = None,
) -> dict[str, dict[str, float]]:
    """Restores a checkpoint of ``workdir``, scores the test split and writes the reports.

    Args:
      config: the run's config; None reads the one recorded in the workdir.
      workdir: the training workdir.
      step: checkpoint step (default: newest).
      method: an already built method (reuses its loaded training data).

    Returns:
      ``{category: {"i_auroc", "p_auroc", "pro"}}`` as fractions.
    """
    workdir = pathlib.Path(workdir)
    model, method, step = train_lib.restore_model(workdir, step=step, config=config, method=method)
    config = method.config
    scores = method.score(model, step=step)
    split = scores.split
    if not split.has_pixel_labels:
        raise ValueError(f"The test split of {config.data.category} has no pixel masks.")
    results = {
        config.data.category: metrics.evaluate_category(
            scores.image_scores, scores.maps, split.original_masks, split.labels
        )
    }
    outdir = workdir / EVAL_DIR / f"step_{step}"
    paths = reporting.write_metrics(results, outdir)
    np.savez(outdir / "scores.npz", image_scores=scores.image_scores, labels=split.labels)
    # Anomalous images first (stable), then good ones, so the figure shows defects.
    order = np.argsort(-split.labels, kind="stable")[: config.score.num_figures]
    reporting.save_heatmap_figure(
        split.images[order],
        split.masks[order],
        {config.method: scores.maps[order]},
        outdir / "heatmaps.png",
        max_images=config.score.num_figures,
    )
    table = reporting.markdown_table(results)
    logging.info("Metrics of %s at step %d written to %s.", workdir, step, paths["markdown"])
    print(f"\n{config.method} {config.data.category}, step {step} ({outdir}):\n{table}", flush=True)
    return results
