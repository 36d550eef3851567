"""Evaluation of a run directory, the same for every method (Sec. 4.1).

Restores the run (:func:`wdam_jax.train.restore`), scores the test split with the method's
``score``, and writes the report to ``<workdir>/eval/step_<step>/``:

- ``metrics.json``, ``metrics.csv``, ``metrics.md``: I-AUROC, P-AUROC and PRO
  (:mod:`wdam_jax.reporting`);
- ``scores.csv`` and ``scores.npz``: each test image's path, label and image score;
- ``heatmaps.png``: image, ground truth and anomaly map (Fig. 6/7 style), defective images first;
- ``learning_curves.png``: the logged training and validation scalars against the step, when the
  run logged any.
"""

from __future__ import annotations

import csv
import pathlib

import ml_collections
import numpy as np
from absl import logging

from wdam_jax import metrics, reporting
from wdam_jax import train as train_lib
from wdam_jax.data import sources
from wdam_jax.methods.base import Method, describe

EVAL_DIR = "eval"


def _write_scores(outdir: pathlib.Path, split, image_scores: np.ndarray) -> None:
    np.savez(
        outdir / "scores.npz",
        image_scores=image_scores,
        labels=split.labels,
        paths=np.asarray(split.paths),
    )
    with (outdir / "scores.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "defect_type", "label", "image_score"])
        for row in zip(split.paths, split.defect_types, split.labels, image_scores, strict=True):
            writer.writerow([row[0], row[1], int(row[2]), f"{float(row[3]):.6g}"])


def evaluate(
    config: ml_collections.ConfigDict | None,
    workdir: str | pathlib.Path,
    *,
    step: int | None = None,
    method: Method | None = None,
) -> dict[str, dict[str, float]]:
    """Restores a checkpoint of ``workdir``, scores the test split and writes the report.

    Args:
      config: the run's config; None reads the one recorded in the workdir.
      workdir: the run directory.
      step: checkpoint step (default: newest).
      method: an already built method (reuses its loaded training data).

    Returns:
      ``{category: {"i_auroc", "p_auroc", "pro"}}`` as fractions.
    """
    workdir = pathlib.Path(workdir)
    run = train_lib.restore(workdir, step=step, config=config, method=method)
    config = run.config
    split = sources.load_split(config.data, split="test")
    if not split.has_pixel_labels:
        logging.warning(
            "The test split of %s has no pixel masks: pixel AUROC and PRO are not meaningful.",
            config.data.category,
        )
    scores = run.method.score(run.model, run.fitted, split.images, step=run.step)
    results = {
        config.data.category: metrics.evaluate_category(
            scores.image_scores, scores.maps, split.original_masks, split.labels
        )
    }
    outdir = workdir / EVAL_DIR / f"step_{run.step}"
    paths = reporting.write_metrics(results, outdir)
    _write_scores(outdir, split, scores.image_scores)
    # Anomalous images first (stable), then good ones, so the figure shows defects.
    order = np.argsort(-split.labels, kind="stable")[: config.score.num_figures]
    reporting.save_heatmap_figure(
        split.images[order],
        split.masks[order],
        {describe(config)["label"]: scores.maps[order]},
        outdir / "heatmaps.png",
        max_images=config.score.num_figures,
    )
    curves = train_lib.read_train_log(workdir)
    if curves:
        reporting.save_curves_figure(curves, outdir / "learning_curves.png")
    table = reporting.markdown_table(results)
    logging.info("Metrics of %s at step %d written to %s.", workdir, run.step, paths["markdown"])
    label = describe(config)["label"]
    print(f"\n{label} {config.data.category}, step {run.step} ({outdir}):\n{table}", flush=True)
    return results


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    allow_config_change: bool = False,
) -> dict[str, dict[str, float]]:
    """Trains (or resumes, or fits) and then evaluates the final checkpoint (``launch/train.py``).

    Returns:
      The metrics: ``{category: {"i_auroc", "p_auroc", "pro"}}``.
    """
    method = train_lib.get_method(config)
    train_lib.train(config, workdir, method=method, allow_config_change=allow_config_change)
    return evaluate(config, workdir, method=method)
