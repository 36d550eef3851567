"""Evaluation of a run directory, the same for every method (Sec. 4.1).

Restores the run (:func:`wdam_jax.runs.restore`), scores the test split with the method's
``score``, and writes the report to ``<workdir>/eval/step_<step>/``, whole
(:func:`wdam_jax.runlock.publish`; beside a training that still writes the run, too):

- ``metrics.json``, ``metrics.csv``, ``metrics.md``: I-AUROC, P-AUROC and PRO
  (:mod:`wdam_jax.reporting`), then F1-max and AUPR at image and pixel level; JSON and markdown
  also per defect type (its images against all the normal test images, :func:`by_defect_type`);
- ``thresholds.json``: the decision thresholds and normalisation of the run
  (:mod:`wdam_jax.thresholds`), also copied to ``<workdir>/thresholds.json`` for prediction
  (under the run's lock; left to a training that holds it);
- ``scores.csv`` and ``scores.npz``: each test image's path, label and image score;
- ``heatmaps.png``: image, ground truth and anomaly map (Fig. 6/7 style) of images from every
  defect type and the normal ones, the highest and the lowest scored of each
  (:func:`wdam_jax.reporting.figure_selection`), with the image threshold and each decision;
- ``learning_curves.png``: the logged training and validation scalars against the step, when the
  run logged any;
- ``report.html`` with ``report_assets/`` (one thumbnail per test image): the page a person
  opens (:mod:`wdam_jax.report`); ``<workdir>/report.html`` redirects to the newest one.
"""

from __future__ import annotations

import csv
import json
import pathlib

import ml_collections
import numpy as np
from absl import logging

from wdam_jax import checkpoints, metrics, report, reporting, runlock, runs, thresholds
from wdam_jax import train as train_lib
from wdam_jax.data import sources
from wdam_jax.methods.base import Method, describe

EVAL_DIR = thresholds.EVAL_DIR
# What an evaluation report holds (a folder with other files is not replaced).
_REPORT = runlock.written_by(
    "metrics.json",
    {"metrics.json", "metrics.csv", "metrics.md", "scores.csv", "scores.npz", "heatmaps.png",
     "learning_curves.png", thresholds.THRESHOLDS_FILE, report.REPORT_FILE, report.ASSETS},
)  # fmt: skip


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
    run = runs.restore(workdir, step=step, config=config, method=method, best=best)
    config = run.config
    if not best and (workdir / checkpoints.BEST_RECORD).is_file():
        logging.warning(
            "Scoring step %d of %s; the run also keeps a validation-selected checkpoint "
            "(%s), which launch.experiment reports: python -m launch.evaluate --workdir=%s "
            "--checkpoint=best scores that one.",
            run.step, workdir, (workdir / checkpoints.BEST_RECORD).read_text().strip(), workdir,
        )  # fmt: skip
    split = sources.load_split(config.data, split="test")
    if not split.has_pixel_labels:
        logging.warning(
            "The test split of %s has no pixel masks: pixel AUROC and PRO are not meaningful.",
            config.data.category,
        )
    scores = run.method.score_images(run.model, run.fitted, split.images, step=run.step)
    originals = [np.asarray(g, bool) for g in split.original_masks]
    maps = metrics.resize_maps_to(scores.maps, [g.shape for g in originals])
    results = {
        config.data.category: {
            **metrics.evaluate_category(scores.image_scores, maps, originals, split.labels),
            **metrics.decision_metrics(scores.image_scores, maps, originals, split.labels),
        }
    }
    final = workdir / EVAL_DIR / f"step_{run.step}"
    by_defect = {config.data.category: by_defect_type(split, scores.image_scores, maps, originals)}
    # The report is written whole into a staging folder and renamed into place: a second
    # evaluation of the step is refused while this one writes, and a reader sees one report.
    with runlock.publish(final, owns=_REPORT, kind="evaluation report") as outdir:
        _write_report(run, workdir, split, scores, maps, results, outdir, by_defect=by_defect)
    share_thresholds(workdir, final)
    # The page reads the published report (its step from the folder's name) and adds to it.
    page = report.write_evaluation_report(
        workdir, final, images=split.images, masks=split.masks, maps=scores.maps
    )
    table = reporting.markdown_table(results, by_defect)
    logging.info("Metrics of %s at step %d written to %s.", workdir, run.step, final)
    label = describe(config)["label"]
    print(f"\n{label} {config.data.category}, step {run.step} ({final}):\n{table}", flush=True)
    print(f"Open {page} in a browser (no server needed).", flush=True)
    return results


def share_thresholds(workdir: pathlib.Path, report: pathlib.Path) -> None:
    """Copies a report's ``thresholds.json`` to the run's own (what ``launch.predict`` and
    ``launch.export`` read first) under the run's lock; while another process writes the run
    (a training still running), its copy is left to it: :func:`wdam_jax.thresholds.read` finds
    the report's own copy by the step."""
    source = report / thresholds.THRESHOLDS_FILE
    if not source.is_file():
        return
    try:
        with runlock.hold(workdir):
            checkpoints.atomic_write_text(workdir / thresholds.THRESHOLDS_FILE, source.read_text())
    except runlock.FolderBusyError as e:
        logging.warning(
            "Left %s as it is: the run is being written by %s. Prediction at this step reads %s.",
            workdir / thresholds.THRESHOLDS_FILE,
            e.holder,
            source,
        )


def _write_report(
    run, workdir, split, scores, maps, results, outdir: pathlib.Path, *, by_defect
) -> None:
    config = run.config
    stored = store_thresholds(run, split, scores, maps, outdir=outdir)
    reporting.write_metrics(results, outdir, by_defect=by_defect)
    _write_scores(outdir, split, scores.image_scores)
    # Every defect type and the normal images, the highest and lowest scored of each, with file
    # names, image scores and decisions (0: no figure).
    if config.score.num_figures > 0:
        order = reporting.figure_selection(
            split.labels,
            config.score.num_figures,
            scores=scores.image_scores,
            defect_types=list(split.defect_types),
        )
        label = describe(config)["label"]
        image_t = None
        if stored:  # this report's own, not yet in the run folder
            image_t = thresholds.parse(json.loads(stored.read_text()))["image"]
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
            thresholds=None if image_t is None else {label: image_t.value},
            labels=split.labels[order],
        )
    curves = runs.read_train_log(workdir)
    if curves:
        reporting.save_curves_figure(curves, outdir / "learning_curves.png")


def by_defect_type(
    split, image_scores: np.ndarray, maps: list[np.ndarray], originals: list[np.ndarray]
) -> dict[str, dict[str, float]]:
    """I-AUROC, P-AUROC and PRO per defect type: each type's test images with all the normal
    ones (the category's figure with the other types left out).

    Args:
      split: the test split (``labels`` [N], ``defect_types`` [N]).
      image_scores: [N] image scores.
      maps: N maps at their ground truth's resolution.
      originals: N ground-truth masks (bool).

    Returns:
      ``{defect type: {"i_auroc", "p_auroc", "pro"}}`` in sorted order (empty without normal
      images or with a single defect type, whose rows would repeat the category's).
    """
    labels, kinds = np.asarray(split.labels), np.asarray(split.defect_types)
    good = np.flatnonzero(labels == 0)
    types = sorted({str(k) for k, y in zip(kinds, labels, strict=True) if y != 0})
    if not len(good) or len(types) < 2:
        return {}
    out = {}
    for kind in types:
        index = np.concatenate([good, np.flatnonzero((labels != 0) & (kinds == kind))])
        out[kind] = metrics.evaluate_category(
            np.asarray(image_scores)[index],
            [maps[i] for i in index],
            [originals[i] for i in index],
            labels[index],
        )
    return out


def store_thresholds(
    run: runs.Restored,
    split,
    scores,
    maps: list[np.ndarray],
    *,
    outdir: pathlib.Path,
) -> pathlib.Path | None:
    """Computes the run's decision thresholds and writes ``outdir/thresholds.json`` (see
    :mod:`wdam_jax.thresholds`; :func:`share_thresholds` copies it to the run); returns its
    path, or None when no held-out normal image exists.

    Held-out normal images: the ``holdout`` split when ``config.data.holdout_fraction > 0``
    (scored here; neither training nor ``fit`` saw it), else the normal images of the test split.
    The F1-max candidates come from the labelled test split.

    Args:
      run: the restored run.
      split: the test split it was evaluated on.
      scores: the method's ``ImageScores`` of ``split``.
      maps: those maps resized to ``split.original_masks`` (the pixel F1's resolution).
      outdir: the folder of the report (``<workdir>/eval/step_<n>``).
    """
    config = run.config
    if config.data.get("holdout_fraction", 0.0):
        holdout = sources.load_split(config.data, split="holdout")
        normal = run.method.score_images(run.model, run.fitted, holdout.images, step=run.step)
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
            outdir,
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
    return thresholds.write(document, eval_dir=outdir)


def selects_checkpoint(config: ml_collections.ConfigDict) -> bool:
    """Whether the run keeps a validation-selected checkpoint (``train.select_metric``, e.g.
    DRAEM's ``val/mean_auroc`` on its held-out normal images), which experiments report."""
    return bool(config.train.get("select_metric", ""))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    allow_config_change: bool = False,
    best: bool = False,
) -> dict[str, dict[str, float]]:
    """Trains (or resumes, or fits) and then evaluates the final checkpoint (``launch/train.py``),
    or with ``best`` the validation-selected one (:func:`selects_checkpoint`).

    Returns:
      The metrics: ``{category: {"i_auroc", "p_auroc", "pro"}}``.
    """
    method = train_lib.get_method(config)
    train_lib.check_run(method, pathlib.Path(workdir))
    with runlock.hold(workdir):  # from the first step to the last report: one writer
        train_lib.train(config, workdir, method=method, allow_config_change=allow_config_change)
        return evaluate(config, workdir, method=method, best=best)
