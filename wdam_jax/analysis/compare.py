"""Figs. 6 and 7: heatmaps of two or more runs side by side on the same test images.

Columns are test images; rows are the image (file name above), the ground truth, then one
heatmap row per run with its image score under each heatmap. All heatmaps share one colour scale
and one colour bar:

- ``normalize="minmax"`` (default): each run's maps are rescaled by their minimum and maximum
  over the whole test split, so runs whose map units differ (a Mahalanobis distance, a DRAEM
  probability, a PatchCore distance) share the scale [0, 1];
- ``normalize="none"``: raw map values, the scale spanning every map shown (for runs of one
  method, whose units agree).

Each run is restored and scores its whole test split with its method's ``score``: the evaluation
(``<workdir>/eval/step_<n>/scores.npz``) stores image scores but not the maps, and some scores
depend on the set scored together (PatchCore's ``minmax_over_evaluated_set`` ensemble), so
scoring a subset would not reproduce them. Runs must share the test split (the same image files
in the same order).

Outputs: ``<out>/compare.png`` and ``<out>/compare.json`` (the runs, the images shown, each
run's image scores and the colour scale), written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from wdam_jax import checkpoints, reporting, runs
from wdam_jax.data import sources
from wdam_jax.errors import UserError
from wdam_jax.methods.base import describe

NORMALIZE = ("minmax", "none")


@dataclasses.dataclass(frozen=True)
class ScoredRun:
    """One run's scores of its test split.

    Attributes:
      workdir: the run directory.
      label: the row's name.
      step: the checkpoint step.
      image_scores: ``[N]``.
      maps: ``[N, S, S]`` at the run's input resolution.
    """

    workdir: str
    label: str
    step: int
    image_scores: np.ndarray
    maps: np.ndarray


@dataclasses.dataclass(frozen=True)
class TestSet:
    """What a run is scored on, read from its recorded config before anything is restored."""

    workdir: str
    category: str
    paths: list[str]
    crop: float  # the centre crop as a fraction of the resized image (1.0: none)


def test_set(workdir: str | pathlib.Path) -> tuple[TestSet, object]:
    """``(TestSet, split)`` of a run: its config's test split."""
    data = checkpoints.read_config(workdir).data
    split = sources.load_split(data, split="test")
    crop = (data.get("crop_size", 0) or data.image_size) / data.image_size
    return TestSet(str(workdir), data.category, list(split.paths), crop), split


def check_same_test_set(sets: Sequence[TestSet]) -> None:
    """Raises a :class:`UserError` unless every run has the same test files in one order, under
    the same crop (the input sizes may differ: maps are resized to the first run's)."""
    first = sets[0]
    for other in sets[1:]:
        if other.paths != first.paths:
            raise UserError(
                f"The runs do not share a test set: {first.workdir} has category "
                f"{first.category!r} ({len(first.paths)} test images), {other.workdir} has "
                f"{other.category!r} ({len(other.paths)} test images"
                + (", other files" if len(other.paths) == len(first.paths) else "")
                + "). Compare runs of the same category and dataset."
            )
        if other.crop != first.crop:
            raise UserError(
                f"{first.workdir} and {other.workdir} crop their test images differently "
                f"(data.crop_size / data.image_size = {first.crop:.3f} and {other.crop:.3f}): "
                "their maps cover different regions and cannot be drawn on one image."
            )


def score_run(workdir: str | pathlib.Path, *, step: int | None = None) -> ScoredRun:
    """Restores ``workdir`` and scores its whole test split."""
    run = runs.restore(workdir, step=step)
    split = sources.load_split(run.config.data, split="test")
    scores = run.method.score_images(run.model, run.fitted, split.images, step=run.step)
    return ScoredRun(
        workdir=str(workdir),
        label=describe(run.config)["label"],
        step=run.step,
        image_scores=np.asarray(scores.image_scores),
        maps=np.asarray(scores.maps, np.float32),
    )


def select(paths: Sequence[str], labels: np.ndarray, *, count: int, names: Sequence[str] = ()):
    """Indices of the images to show: those whose path ends with one of ``names`` (in that
    order), else :func:`wdam_jax.reporting.figure_selection` (anomalous first)."""
    if not names:
        return reporting.figure_selection(labels, count)
    chosen = []
    for name in names:
        hits = [i for i, p in enumerate(paths) if p.endswith(name)]
        if len(hits) != 1:
            raise UserError(
                f"--images: {name!r} matches {len(hits)} test images; give a path suffix that "
                f"names one (for example {paths[0]!r})."
            )
        chosen.append(hits[0])
    return np.asarray(chosen, int)


def _resize(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.stack([reporting.fit_to(m, size, nearest=False) for m in maps])


def draw(
    images: np.ndarray,
    masks: np.ndarray,
    heatmaps: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    *,
    titles: Sequence[str],
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Figure:
    """The figure: images, ground truth, then one row per run, one colour scale and bar.

    Args:
      images: ``[K, H, W, 3]`` in [0, 1].
      masks: ``[K, H, W]`` ground truth.
      heatmaps: row label -> ``[K, H, W]`` maps (already at the images' size).
      scores: row label -> ``[K]`` image scores.
      titles: ``K`` column titles (file names).
      vmin, vmax: the shared colour scale.
    """
    k, rows = len(images), 2 + len(heatmaps)
    fig = Figure(figsize=(1.9 * k + 1.4, 2.0 * rows), layout="constrained")
    axes = fig.subplots(rows, k, squeeze=False)
    shown = None
    for j in range(k):
        axes[0, j].imshow(np.clip(images[j], 0, 1))
        axes[0, j].set_title(titles[j], fontsize=7)
        axes[1, j].imshow(masks[j], cmap="gray", vmin=0, vmax=1)
        for i, (label, maps) in enumerate(heatmaps.items(), start=2):
            axes[i, j].imshow(np.clip(images[j], 0, 1))
            shown = axes[i, j].imshow(maps[j], cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax)
            axes[i, j].set_xlabel(f"score {float(scores[label][j]):.4g}", fontsize=7)
    for i, label in enumerate(["image", "ground truth", *heatmaps]):
        axes[i, 0].set_ylabel(label, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=list(axes[2:].ravel()), shrink=0.9, pad=0.01).ax.tick_params(labelsize=6)
    return fig


def compare(
    workdirs: Sequence[str | pathlib.Path],
    *,
    out: str | pathlib.Path,
    labels: Sequence[str] = (),
    num_images: int = 8,
    images: Sequence[str] = (),
    normalize: str = "minmax",
    step: int | None = None,
) -> dict[str, pathlib.Path]:
    """Scores each run's test split and writes ``compare.png`` and ``compare.json`` into ``out``.

    Args:
      workdirs: two or more run directories of one category.
      out: output folder.
      labels: row names (default: each run's method label, e.g. ``cutpaste+wdam1``).
      num_images: columns when ``images`` is empty (anomalous images first).
      images: test image path suffixes to show (``crack/000.png``), in order.
      normalize: ``"minmax"`` or ``"none"`` (see the module docstring).
      step: checkpoint step of every run (default: each run's newest).

    Returns:
      ``{"png": path, "json": path}``.
    """
    if len(workdirs) < 2:
        raise UserError(f"--workdirs: compare needs two or more runs, got {len(workdirs)}.")
    if labels and len(labels) != len(workdirs):
        raise UserError(f"--labels: {len(labels)} labels for {len(workdirs)} runs.")
    if normalize not in NORMALIZE:
        raise UserError(f"--normalize={normalize!r}: use one of {', '.join(NORMALIZE)}.")
    for w in workdirs:  # all problems before any (long) scoring
        if not pathlib.Path(w).is_dir():
            raise UserError(f"--workdirs: {w} is not a folder (a training run directory).")
    sets = [test_set(w) for w in workdirs]
    check_same_test_set([s for s, _ in sets])
    split = sets[0][1]
    scored = [score_run(w, step=step) for w in workdirs]
    names = list(labels) or [r.label for r in scored]
    if len(set(names)) < len(names):  # same method twice: tell the rows apart by workdir
        names = [
            f"{n} ({pathlib.Path(r.workdir).name})" for n, r in zip(names, scored, strict=True)
        ]
    order = select(split.paths, split.labels, count=num_images, names=images)
    size = split.images.shape[1:3]
    heatmaps, scores = {}, {}
    for name, run in zip(names, scored, strict=True):
        maps = run.maps
        if normalize == "minmax":
            lo, hi = float(maps.min()), float(maps.max())
            maps = (maps - lo) / max(hi - lo, 1e-12)
        heatmaps[name] = _resize(maps[order], size)
        scores[name] = run.image_scores[order]
    vmin = min(float(m.min()) for m in heatmaps.values())
    vmax = max(max(float(m.max()) for m in heatmaps.values()), vmin + 1e-12)
    if normalize == "minmax":
        vmin, vmax = 0.0, 1.0
    titles = ["/".join(pathlib.Path(split.paths[i]).parts[-2:]) for i in order]
    fig = draw(
        split.images[order],
        split.masks[order].astype(np.float32),
        heatmaps,
        scores,
        titles=titles,
        vmin=vmin,
        vmax=vmax,
    )
    out = pathlib.Path(out)
    paths = {"png": out / "compare.png", "json": out / "compare.json"}
    reporting.write_png(fig, paths["png"])
    document = {
        "category": sets[0][0].category,
        "normalize": normalize,
        "colour_scale": {"vmin": vmin, "vmax": vmax},
        "images": [split.paths[i] for i in order],
        "labels": [int(split.labels[i]) for i in order],
        "runs": [
            {
                "label": name,
                "workdir": run.workdir,
                "step": run.step,
                "image_scores": [float(s) for s in scores[name]],
            }
            for name, run in zip(names, scored, strict=True)
        ],
    }
    checkpoints.atomic_write_text(paths["json"], json.dumps(document, indent=2) + "\n")
    return paths
