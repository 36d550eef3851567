"""Scores new images with a trained run: decisions, normalised scores and overlays, any method.

``python -m launch.predict --workdir=W --images=DIR_OR_GLOB --out=O`` calls :func:`predict`:

1. restores the run (:func:`wdam_jax.train.restore`: the model at its newest checkpoint and the
   fitted statistics saved with it) and its thresholds (:func:`wdam_jax.thresholds.read`,
   written by ``launch.evaluate``), or takes a manual threshold;
2. lists the files (a folder's files, or a glob), then per chunk of ``batch_size`` files reads
   each with the run's own preprocessing (:func:`wdam_jax.data.datasets.read_rgb` and
   ``resize_image`` with ``config.data.image_size`` / ``crop_size``, as every training and test
   image), scores the chunk with ``method.score`` (the contract's one scoring function, so every
   method, present or future, predicts the same way), and writes the chunk's rows and overlays
   before reading the next chunk: memory is bounded by one chunk whatever the folder's size;
3. writes ``<out>/predictions.csv`` (one row per file, written as it goes), ``<out>/
   predictions.json`` (the same rows with the threshold, its rule and the normalisation) and
   ``<out>/overlays/<index>_<name>.png`` (input as the model sees it | heatmap of the normalised
   map, 0.5 = the pixel threshold | the predicted region's outline);
4. writes ``<out>/report.html``, the page a person opens (:func:`wdam_jax.report.prediction_page`:
   one card per file with a thumbnail from ``<out>/report_assets/``, sortable and filterable, and
   a threshold control).

A file that cannot be read as an image (corrupt, truncated, not an image) becomes a row with
``status=error`` and the reason, and the other files are still scored. An image whose size is not
the model's input size is resized (then centre-cropped) exactly as the run's data was; the row's
``note`` says so.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import matplotlib
import numpy as np
import scipy.ndimage
from absl import logging
from PIL import Image, ImageDraw

from wdam_jax import report, thresholds
from wdam_jax import train as train_lib
from wdam_jax.data import datasets
from wdam_jax.errors import MissingFileError
from wdam_jax.progress import Progress

CSV_FILE, JSON_FILE, OVERLAY_DIR = "predictions.csv", "predictions.json", "overlays"
COLUMNS = (
    "path",
    "status",
    "score",
    "normalised_score",
    "decision",
    "threshold",
    "threshold_rule",
    "anomalous_pixel_fraction",
    "original_size",
    "note",
    "overlay",
    "error",
)
OVERLAY_MIN_SIDE = 256  # panels are upscaled (nearest) to at least this many pixels


def list_inputs(images: str | pathlib.Path) -> list[pathlib.Path]:
    """The files to score: every non-hidden file of a folder, or the files a glob matches,
    sorted. Non-image files are kept: they are reported as errors, not silently dropped."""
    path = pathlib.Path(images)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    else:
        files = [pathlib.Path(p) for p in glob.glob(str(images), recursive=True)]
        files = [p for p in files if p.is_file()]
    if not files:
        raise MissingFileError(
            f"--images={images}: no file there. Give a folder of images or a glob such as "
            "'line3/2026-11-24/*.png' (quoted, so that the shell does not expand it)."
        )
    return sorted(files)


def preprocess(
    path: pathlib.Path, *, image_size: int, crop_size: int | None
) -> tuple[np.ndarray, str, str]:
    """One file as the run's data pipeline reads it.

    Returns:
      ``(image [S, S, 3] float32 in [0, 1], original size "HxW", note)``.

    Raises:
      datasets.DatasetError: not readable as an image.
    """
    rgb = datasets.read_rgb(path)
    h, w = rgb.shape[:2]
    image = datasets.resize_image(rgb, image_size=image_size, crop_size=crop_size)
    notes = []
    if (h, w) != (image_size, image_size):
        notes.append(f"resized from {h}x{w} to {image_size}x{image_size} as the run's data")
    if crop_size:
        notes.append(f"centre-cropped to {crop_size}x{crop_size}")
    return image, f"{h}x{w}", "; ".join(notes)


def _panel(array: np.ndarray, side: int) -> Image.Image:
    return Image.fromarray(array).resize((side, side), Image.NEAREST)


def overlay(
    image: np.ndarray, normalised_map: np.ndarray, caption: str, *, outline: bool = True
) -> Image.Image:
    """Three panels: the input as the model sees it, the normalised anomaly map as a heatmap over
    it (jet, fixed scale [0, 1]: 0.5 is the pixel threshold in every image), and the input with
    the predicted region (normalised map >= 0.5) outlined in red.

    Args:
      image: ``[S, S, 3]`` float in [0, 1].
      normalised_map: ``[S, S]`` in [0, 1].
      caption: one line drawn above the panels.
      outline: draw the region (False when there is no pixel threshold).
    """
    side = max(OVERLAY_MIN_SIDE, image.shape[0])
    rgb = np.asarray(np.clip(image, 0, 1) * 255, np.uint8)
    heat = matplotlib.colormaps["jet"](np.clip(normalised_map, 0, 1))[..., :3]
    blend = np.asarray((0.5 * heat + 0.5 * np.clip(image, 0, 1)) * 255, np.uint8)
    region = np.asarray(_panel(rgb, side)).copy()
    if outline:
        mask = np.asarray(_panel((normalised_map >= 0.5).astype(np.uint8) * 255, side)) > 0
        edge = mask & ~scipy.ndimage.binary_erosion(mask, iterations=2)
        region[edge] = (255, 0, 0)
    bar = 18
    canvas = Image.new("RGB", (3 * side, side + bar), (255, 255, 255))
    for i, panel in enumerate((_panel(rgb, side), _panel(blend, side), Image.fromarray(region))):
        canvas.paste(panel, (i * side, bar))
    ImageDraw.Draw(canvas).text((4, 3), caption, fill=(0, 0, 0))
    return canvas


@dataclasses.dataclass
class _Chunk:
    rows: list[dict[str, Any]]  # one per file, in order; ok rows filled after scoring
    images: list[np.ndarray]  # the readable files' images
    ok: list[int]  # their row indices


def _read_chunk(paths: Sequence[pathlib.Path], start: int, config) -> _Chunk:
    size, crop = config.data.image_size, config.data.get("crop_size", 0) or None
    chunk = _Chunk([], [], [])
    for i, path in enumerate(paths):
        row = dict.fromkeys(COLUMNS, "")
        row.update(path=str(path), index=start + i)
        try:
            image, original, note = preprocess(path, image_size=size, crop_size=crop)
        except datasets.DatasetError as e:
            row.update(status="error", error=str(e))
            logging.warning("Skipped %s: %s", path, e)
        else:
            row.update(status="ok", original_size=original, note=note)
            chunk.images.append(image)
            chunk.ok.append(i)
        chunk.rows.append(row)
    return chunk


def _chunks(paths: Sequence[pathlib.Path], size: int) -> Iterator[tuple[int, Sequence]]:
    for start in range(0, len(paths), size):
        yield start, paths[start : start + size]


def resolve_thresholds(
    run: train_lib.Restored,
    workdir: pathlib.Path,
    *,
    threshold: float | None,
    pixel_threshold: float | None,
) -> dict[str, thresholds.Threshold | None]:
    """The image and pixel thresholds prediction uses: manual ones where given, else the run's
    stored ones (``launch.evaluate`` writes them).

    Raises:
      FileNotFoundError: no stored thresholds and no manual image threshold.
    """
    try:
        stored: dict[str, thresholds.Threshold | None] = dict(
            thresholds.read(workdir, step=run.step)
        )
    except FileNotFoundError:
        if threshold is None:
            raise
        stored = {"image": None, "pixel": None}
    out = {
        "image": thresholds.manual(threshold, stored["image"])
        if threshold is not None
        else stored["image"],
        "pixel": thresholds.manual(pixel_threshold, stored["pixel"])
        if pixel_threshold is not None
        else stored["pixel"],
    }
    return out


def predict(
    workdir: str | pathlib.Path,
    images: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    batch_size: int = 64,
    overlays: bool = True,
    step: int | None = None,
    best: bool = False,
) -> list[dict[str, Any]]:
    """Scores every file of ``images`` with the run in ``workdir``; writes the outputs to ``out``.

    Args:
      workdir: a trained (and evaluated, for stored thresholds) run directory.
      images: a folder or a glob.
      out: output folder (created).
      threshold: manual image threshold on the raw score (default: the run's stored one).
      pixel_threshold: manual pixel threshold on the raw map (default: the stored one).
      batch_size: files read and scored at a time (bounds memory).
      overlays: write one overlay PNG per image.
      step: checkpoint step (default: newest).
      best: the checkpoint with the best validation score instead (``train.select_metric``).

    Returns:
      The rows written (one per file).
    """
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    paths = list_inputs(images)
    run = train_lib.restore(workdir, step=step, best=best)
    chosen = resolve_thresholds(run, workdir, threshold=threshold, pixel_threshold=pixel_threshold)
    image_t, pixel_t = chosen["image"], chosen["pixel"]
    assert image_t is not None  # resolve_thresholds raised otherwise
    (out / OVERLAY_DIR).mkdir(parents=True, exist_ok=True)
    progress = Progress("predict", len(paths), unit="files")
    rows: list[dict[str, Any]] = []
    with (out / CSV_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for start, chunk_paths in _chunks(paths, batch_size):
            chunk = _read_chunk(chunk_paths, start, run.config)
            if chunk.images:
                scores = run.method.score(
                    run.model, run.fitted, np.stack(chunk.images), step=run.step
                )
                for j, i in enumerate(chunk.ok):
                    _fill(chunk.rows[i], scores.image_scores[j], scores.maps[j], image_t, pixel_t)
                    if overlays:
                        chunk.rows[i]["overlay"] = _write_overlay(
                            out, chunk.rows[i], chunk.images[j], scores.maps[j], pixel_t
                        )
            for row in chunk.rows:
                writer.writerow(row)
            f.flush()
            rows.extend(chunk.rows)
            progress.update(start + len(chunk_paths))
    _write_json(out / JSON_FILE, rows, run, workdir, image_t, pixel_t)
    report.prediction_page(out)
    n_bad = sum(r["status"] != "ok" for r in rows)
    n_anomalous = sum(r["decision"] == "anomalous" for r in rows)
    logging.info(
        "Predicted %d files (%d anomalous, %d unreadable) into %s.",
        len(rows),
        n_anomalous,
        n_bad,
        out,
    )
    return rows


def _fill(row, score, amap, image_t: thresholds.Threshold, pixel_t) -> None:
    score = float(score)
    row.update(
        score=score,
        normalised_score=float(image_t.normalise(score)),
        decision="anomalous" if image_t.decide(score) else "normal",
        threshold=image_t.value,
        threshold_rule=image_t.rule,
        anomalous_pixel_fraction=(
            float(np.mean(pixel_t.decide(amap))) if pixel_t is not None else ""
        ),
    )


def _write_overlay(out, row, image, amap, pixel_t) -> str:
    if pixel_t is not None:
        normalised = pixel_t.normalise(amap)
    else:  # no pixel threshold: a per-image min-max heatmap, no region
        lo, hi = float(amap.min()), float(amap.max())
        normalised = (amap - lo) / max(hi - lo, 1e-12)
    caption = (
        f"{row['decision']}  score {row['score']:.4g}  normalised {row['normalised_score']:.3f}"
        f"  (threshold {row['threshold']:.4g}, {row['threshold_rule']})"
    )
    name = f"{row['index']:05d}_{pathlib.Path(row['path']).stem}.png"
    overlay(image, normalised, caption, outline=pixel_t is not None).save(out / OVERLAY_DIR / name)
    report.save_thumbnail(
        out / report.ASSETS / report.thumb_name(row["index"]),
        report.thumbnail(image, normalised, outline=pixel_t is not None),
    )
    return str(pathlib.Path(OVERLAY_DIR) / name)


def _write_json(path, rows, run, workdir, image_t, pixel_t) -> None:
    data = run.config.data
    document = {
        "workdir": str(workdir),
        "method": run.config.method,
        "step": run.step,
        "preprocessing": {
            "image_size": data.image_size,
            "crop_size": data.get("crop_size", 0) or None,
            "resize": "PIL bilinear (antialiased), then centre crop; RGB in [0, 1]",
        },
        "decision": thresholds.DECISION,
        "normalisation": thresholds.NORMALISATION,
        "threshold": image_t.as_json(),
        "pixel_threshold": pixel_t.as_json() if pixel_t is not None else None,
        "counts": {
            "files": len(rows),
            "anomalous": sum(r["decision"] == "anomalous" for r in rows),
            "normal": sum(r["decision"] == "normal" for r in rows),
            "errors": sum(r["status"] != "ok" for r in rows),
        },
        "predictions": [{k: (None if r[k] == "" else r[k]) for k in COLUMNS} for r in rows],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
