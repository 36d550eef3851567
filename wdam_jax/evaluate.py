"""Evaluation of a run directory, the same for every method (Sec. 4.1).

Restores the run (:func:`wdam_jax.train.restore`), scores the test split with the method's
``score``, and writes the report to ``<workdir>/eval/step_<step>/``:

- ``metrics.json``, ``metrics.csv``, ``metrics.md``: I-AUROC, P-AUROC and PRO
  (:mod:`wdam_jax.reporting`), then F1-max and AUPR at image and pixel level;
- ``thresholds.json``: the decision thresholds and normalisation of the run
  (:mod:`wdam_jax.thresholds`), also copied to ``<workdir>/thresholds.json`` for prediction;
- ``scores.csv`` and ``scores.npz``: each test image's path, label and image score;
- ``heatmaps.png``: image, ground truth and anomaly map (Fig. 6/7 style), defective images first;
- ``learning_curves.png``: the logged training and validation scalars against the step, when the
  run logged any;
- ``report.html`` with ``report_assets/`` (one thumbnail per test image): the page a person
  opens (:mod:`wdam_jax.report`); ``<workdir>/report.html`` redirects to the newest one.
"""

from __future__ import annotations

import csv
import pathlib

import ml_collections
import numpy as np
from absl import logging

from wdam_jax import metrics, report, reporting, thresholds
from wdam_jax import train as train_lib
from wdam_jax.data import sources
from wdam_jax.methods.base import Method, describe

EVAL_DIR = report.EVAL_DIR


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
    best: bool = False,
) -> dict[str, dict[str, float]]:
    """Restores a checkpoint of ``workdir``, scores the test split and writes the report.

    Args:
      config: the run's config; None reads the one recorded in the workdir.
      workdir: the run directory.
      step: checkpoint step (default: newest).
      method: an already built method (reuses its loaded training data).
      best: the checkpoint with the best validation score (``train.select_metric``) instead of
        the newest; its report goes to ``eval/step_<its step>/`` as any other step's.

    Returns:
      ``{category: {"i_auroc", "p_auroc", "pro", "i_f1_max", "i_aupr", "p_f1_max", "p_aupr"}}``
      as fractions.
    """
    workdir = pathlib.Path(workdir)
    run = train_lib.restore(workdir, step=step, config=config, method=method, best=best)
    config = run.config
    split = sources.load_split(config.data, split="test")
    if not split.has_pixel_labels:
        logging.warning(
            "The test split of %s has no pixel masks: pixel AUROC and PRO are not meaningful.",
            config.data.category,
        )
    scores = run.method.score(run.model, run.fitted, split.images, step=run.step)
    originals = [np.asarray(g, bool) for g in split.original_masks]
    maps = metrics.resize_maps_to(scores.maps, [g.shape for g in originals])
    results = {
        config.data.category: {
            **metrics.evaluate_category(scores.image_scores, maps, originals, split.labels),
            **metrics.decision_metrics(scores.image_scores, maps, originals, split.labels),
        }
    }
    outdir = workdir / EVAL_DIR / f"step_{run.step}"
    store_thresholds(run, split, scores, maps, outdir=outdir, workdir=workdir)
    paths = reporting.write_metrics(results, outdir)
    _write_scores(outdir, split, scores.image_scores)
    # Defective images and some normal ones, with file names and image scores (0: no figure).
    if config.score.num_figures > 0:
        order = reporting.figure_selection(split.labels, config.score.num_figures)
        label = describe(config)["label"]
        reporting.save_heatmap_figure(
            split.images[order],
            split.masks[order],
            {label: scores.maps[order]},
            outdir / "heatmaps.png",
            max_images=config.score.num_figures,
            titles=[
                pathlib.Path(split.paths[i]).parent.name + "/" + pathlib.Path(split.paths[i]).name
                for i in order
            ],
            scores={label: scores.image_scores[order]},
        )
    curves = train_lib.read_train_log(workdir)
    if curves:
        reporting.save_curves_figure(curves, outdir / "learning_curves.png")
    page = report.write_evaluation_report(
        workdir, outdir, images=split.images, masks=split.masks, maps=scores.maps
    )
    table = reporting.markdown_table(results)
    logging.info("Metrics of %s at step %d written to %s.", workdir, run.step, paths["markdown"])
    label = describe(config)["label"]
    print(f"\n{label} {config.data.category}, step {run.step} ({outdir}):\n{table}", flush=True)
    print(f"Open {page} in a browser (no server needed).", flush=True)
    return results


def store_thresholds(
    run: train_lib.Restored,
    split,
    scores,
    maps: list[np.ndarray],
    *,
    outdir: pathlib.Path,
    workdir: pathlib.Path,
) -> pathlib.Path | None:
    """Computes the run's decision thresholds and writes ``thresholds.json`` (see
    :mod:`wdam_jax.thresholds`); returns the predictor's copy, or None when no held-out normal
    image exists.

    Held-out normal images: the ``holdout`` split when ``config.data.holdout_fraction > 0``
    (scored here; neither training nor ``fit`` saw it), else the normal images of the test split.
    The F1-max candidates come from the labelled test split.

    Args:
      run: the restored run.
      split: the test split it was evaluated on.
      scores: the method's ``ImageScores`` of ``split``.
      maps: those maps resized to ``split.original_masks`` (the pixel F1's resolution).
      outdir: ``<workdir>/eval/step_<n>``.
      workdir: the run directory.
    """
    config = run.config
    if config.data.get("holdout_fraction", 0.0):
        holdout = sources.load_split(config.data, split="holdout")
        normal = run.method.score(run.model, run.fitted, holdout.images, step=run.step)
        normal_scores, normal_maps = normal.image_scores, normal.maps
        source = f"holdout split ({len(holdout)} training images left out of training and fit)"
    else:
        good = split.labels == 0
        normal_scores, normal_maps = scores.image_scores[good], scores.maps[good]
        source = "test split, normal images (the run has no holdout split)"
    if len(normal_scores) < 2:
        logging.warning(
            "No thresholds stored for %s: fewer than 2 held-out normal images; set "
            "config.data.holdout_fraction.",
            workdir,
        )
        return None
    labelled = {
        "scores": scores.image_scores,
        "labels": split.labels,
        "maps": maps,
        "masks": [np.asarray(g, bool) for g in split.original_masks],
        "has_pixel_labels": split.has_pixel_labels,
        "source": "test split",
    }
    calibration = thresholds.calibrate(
        normal_scores=normal_scores,
        normal_maps=normal_maps,
        normal_source=source,
        labelled=labelled,
        fpr=float(config.score.get("threshold_fpr", thresholds.DEFAULT_FPR)),
        rule=config.score.get("threshold_rule", "normal_fpr"),
    )
    document = thresholds.to_json(calibration, step=run.step, method=config.method)
    return thresholds.write(document, eval_dir=outdir, workdir=workdir)


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
