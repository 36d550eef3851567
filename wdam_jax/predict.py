"""Scores new images with a trained run: decisions, normalised scores and overlays, any method.

``python -m launch.predict --workdir=W --images=DIR_OR_GLOB --out=O`` calls :func:`predict`:

1. restores the run (:func:`wdam_jax.runs.restore`: the model at its newest checkpoint and the
   fitted statistics saved with it) and its thresholds (:func:`wdam_jax.thresholds.read`,
   written by ``launch.evaluate``), or takes a manual threshold;
2. lists the files (a folder's files, or a glob), then per chunk of ``batch_size`` files reads
   each with the run's own preprocessing (:func:`wdam_jax.data.datasets.read_rgb` and
   ``resize_image`` with ``config.data.image_size`` / ``crop_size``, as every training and test
   image), scores the chunk with ``method.score`` (the contract's one scoring function, so every
   method, present or future, predicts the same way), and writes the chunk's rows and overlays
   before reading the next chunk: memory is bounded by one chunk whatever the folder's size;
3. writes ``<out>/predictions.csv`` (one row per file, written as it goes into the staging
   folder), ``<out>/predictions.json`` (the same rows with the threshold, its rule and the
   normalisation) and ``<out>/overlays/<index>_<name>.png`` (input as the model sees it |
   heatmap of the normalised map, 0.5 = the pixel threshold | the predicted region's outline);
4. writes ``<out>/report.html``, the page a person opens (:func:`wdam_jax.report.prediction_page`:
   one card per file with a thumbnail from ``<out>/report_assets/``, sortable and filterable, and
   a threshold control).

The output folder is written whole or not at all (:func:`wdam_jax.runlock.publish`: into a
temporary sibling, renamed into place when complete): ``out`` must be new, empty, or (with
``overwrite``) a previous prediction, replaced whole; two predictions into one ``out`` never
mix, the second is refused while the first writes.

Inputs get the warnings training gives its data (:func:`wdam_jax.data.summary.size_warnings`,
from the files' headers before anything is scored): images that are not square (their aspect
ratio changes) and images smaller than the model's input (upscaled). Files without an image
suffix (``notes.txt``) are skipped as training skips them, listed in the log and under
``skipped`` in ``predictions.json``. A file with an image suffix that cannot be read (corrupt,
truncated) becomes a row with ``status=error`` and the reason, and the other files are still
scored. An image whose size is not the model's input size is resized (then centre-cropped)
exactly as the run's data was; the row's ``note`` says so. Sizes are written width x height
everywhere, as ``data_summary.json``.

A tiled run (``data.tile_size``, :mod:`wdam_jax.data.tiling`) reads each file at its original
resolution and scores it tile by tile (``method.score_images``, one file at a time: files may
differ in size); its map is at the original resolution. Overlays and thumbnails are shrunk to at
most ``OVERLAY_MAX_SIDE`` pixels (readable, not 3 x 12 megapixels); ``save_maps`` writes each raw
map at its full resolution to ``<out>/maps/<index>_<name>.npy`` (float32 ``[H, W]``).
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

from wdam_jax import report, runlock, runs, thresholds
from wdam_jax.data import datasets
from wdam_jax.data import summary as data_summary
from wdam_jax.errors import MissingFileError
from wdam_jax.progress import Progress

CSV_FILE, JSON_FILE, OVERLAY_DIR = "predictions.csv", "predictions.json", "overlays"
MAP_DIR = "maps"
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
    "map",
)
OVERLAY_MIN_SIDE = 256  # panels are upscaled (nearest) to at least this many pixels
OVERLAY_MAX_SIDE = 1024  # larger inputs (tiled runs) are shrunk (bilinear) to this


def list_inputs(images: str | pathlib.Path) -> tuple[list[pathlib.Path], list[dict[str, str]]]:
    """The files to score: every non-hidden image file of a folder, or the image files a glob
    matches, sorted; and the files skipped (no image suffix, as training skips them).

    Returns:
      ``(files, skipped)``; ``skipped`` holds ``{"path", "why"}`` per file left out.
    """
    path = pathlib.Path(images)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    else:
        found = [pathlib.Path(p) for p in glob.glob(str(images), recursive=True)]
        found = [p for p in found if p.is_file()]
    files = sorted(p for p in found if p.suffix.lower() in datasets.IMAGE_EXTENSIONS)
    skipped = [
        {"path": str(p), "why": f"not an image ({p.suffix or 'no'} suffix)"}
        for p in sorted(found)
        if p.suffix.lower() not in datasets.IMAGE_EXTENSIONS
    ]
    if not files:
        also = f" ({len(skipped)} file(s) without an image suffix skipped)" if skipped else ""
        raise MissingFileError(
            f"--images={images}: no image file there{also}. Give a folder of images "
            f"({', '.join(datasets.IMAGE_EXTENSIONS)}) or a glob such as "
            "'line3/2026-11-24/*.png' (quoted, so that the shell does not expand it)."
        )
    return files, skipped


def input_warnings(
    paths: Sequence[pathlib.Path], skipped: Sequence[dict[str, str]], *, image_size: int | None
) -> list[str]:
    """The warnings training gives its data, for these inputs: sizes from the files' headers
    (:func:`wdam_jax.data.summary.size_warnings`; none for ``image_size=None``, a tiled run)
    and the files skipped."""
    sizes = []
    for path in paths if image_size is not None else ():
        try:
            with Image.open(path) as img:
                sizes.append((str(path), *img.size))
        except Exception:  # reported as an error row when it is read
            continue
    warnings = data_summary.size_warnings(sizes, image_size)
    if skipped:
        shown = ", ".join(s["path"] for s in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.append(f"{len(skipped)} file(s) without an image suffix skipped: {shown}.")
    return warnings


def preprocess(
    path: pathlib.Path, *, image_size: int, crop_size: int | None, tiled: bool = False
) -> tuple[np.ndarray, str, str]:
    """One file as the run's data pipeline reads it (``tiled``: at its original resolution).

    Returns:
      ``(image [S, S, 3] float32 in [0, 1], original size "WxH" (width x height, as
      data_summary.json), note)``.

    Raises:
      datasets.DatasetError: not readable as an image.
    """
    rgb = datasets.read_rgb(path)
    h, w = rgb.shape[:2]
    if tiled:
        return np.asarray(rgb, np.float32) / 255.0, f"{w}x{h}", "tiled at its original resolution"
    image = datasets.resize_image(rgb, image_size=image_size, crop_size=crop_size)
    notes = []
    if (h, w) != (image_size, image_size):
        changes = [
            *(["aspect ratio changed"] if w != h else []),
            *(["upscaled"] if min(w, h) < image_size else []),
        ]
        shown = f" ({', '.join(changes)})" if changes else ""
        notes.append(f"resized from {w}x{h} to {image_size}x{image_size} as the run's data{shown}")
    if crop_size:
        notes.append(f"centre-cropped to {crop_size}x{crop_size}")
    return image, f"{w}x{h}", "; ".join(notes)


def shrink(array: np.ndarray, side: int = OVERLAY_MAX_SIDE) -> np.ndarray:
    """``[H, W]`` or ``[H, W, 3]`` float, scaled (bilinear) to a longer side of at most ``side``."""
    h, w = array.shape[:2]
    if max(h, w) <= side:
        return array
    size = (max(1, round(w * side / max(h, w))), max(1, round(h * side / max(h, w))))
    planes = array[..., None] if array.ndim == 2 else array
    out = np.stack(
        [
            np.asarray(Image.fromarray(np.asarray(p, np.float32), "F").resize(size, Image.BILINEAR))
            for p in np.moveaxis(planes, -1, 0)
        ],
        axis=-1,
    )
    return out[..., 0] if array.ndim == 2 else out


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
    tiled = bool(config.data.get("tile_size", 0))
    chunk = _Chunk([], [], [])
    for i, path in enumerate(paths):
        row = dict.fromkeys(COLUMNS, "")
        row.update(path=str(path), index=start + i)
        try:
            image, original, note = preprocess(path, image_size=size, crop_size=crop, tiled=tiled)
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
    run: runs.Restored,
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
    overwrite: bool = False,
    save_maps: bool = False,
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
      overwrite: replace a previous prediction in ``out`` (whole); without it, one is refused.
      save_maps: write each raw anomaly map (float32, the map's full resolution) to
        ``<out>/maps/<index>_<name>.npy``.

    Returns:
      The rows written (one per file).

    Raises:
      runlock.OutputFolderError: ``out`` holds files this command did not write, or (without
        ``overwrite``) a previous prediction; nothing is written or deleted.
      runlock.FolderBusyError: another process predicts into ``out``.
    """
    workdir = pathlib.Path(workdir)
    owns = runlock.written_by(
        JSON_FILE, {JSON_FILE, CSV_FILE, OVERLAY_DIR, MAP_DIR, report.REPORT_FILE, report.ASSETS}
    )
    kind = dict(owns=owns, overwrite=overwrite, kind="prediction")
    out = runlock.check_output(out, **kind)  # before the slow part: a wrong --out fails at once
    paths, skipped = list_inputs(images)
    run = runs.restore(workdir, step=step, best=best)
    # A tiled run reads files at their original resolution: no resize to warn about.
    tiled = bool(run.config.data.get("tile_size", 0))
    warnings = input_warnings(
        paths, skipped, image_size=None if tiled else run.config.data.image_size
    )
    for warning in warnings:
        logging.warning("%s", warning)
    chosen = resolve_thresholds(run, workdir, threshold=threshold, pixel_threshold=pixel_threshold)
    thresholds.deployment_warnings(chosen, workdir)
    image_t, pixel_t = chosen["image"], chosen["pixel"]
    assert image_t is not None  # resolve_thresholds raised otherwise
    with runlock.publish(out, **kind) as staging:
        rows = _predict_into(staging, paths, run, image_t, pixel_t, batch_size, overlays, save_maps)
        _write_json(staging / JSON_FILE, rows, run, workdir, image_t, pixel_t, skipped, warnings)
    page = report.prediction_page(out)  # from the published rows (thumbnails came with them)
    n_bad = sum(r["status"] != "ok" for r in rows)
    n_anomalous = sum(r["decision"] == "anomalous" for r in rows)
    logging.info(
        "Predicted %d files (%d anomalous, %d unreadable) into %s.",
        len(rows),
        n_anomalous,
        n_bad,
        out,
    )
    print(f"Open {page} in a browser (no server needed).", flush=True)
    return rows


def _scored(run, images: list[np.ndarray]):
    """``(image score, map)`` per image: one batch, or (tiled: sizes may differ) one image at a
    time, each through ``method.score_images``."""
    method, model, fitted, step = run.method, run.model, run.fitted, run.step
    if not run.config.data.get("tile_size", 0):
        scores = method.score_images(model, fitted, np.stack(images), step=step)
        return list(zip(scores.image_scores, scores.maps, strict=True))
    out = []
    for image in images:
        scores = method.score_images(model, fitted, image[None], step=step)
        out.append((scores.image_scores[0], scores.maps[0]))
    return out


def _predict_into(
    out, paths, run, image_t, pixel_t, batch_size, overlays, save_maps=False
) -> list[dict]:
    (out / OVERLAY_DIR).mkdir(parents=True, exist_ok=True)
    progress = Progress("predict", len(paths), unit="files")
    rows: list[dict[str, Any]] = []
    with (out / CSV_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for start, chunk_paths in _chunks(paths, batch_size):
            chunk = _read_chunk(chunk_paths, start, run.config)
            if chunk.images:
                scored = _scored(run, chunk.images)
                for j, i in enumerate(chunk.ok):
                    score, amap = scored[j]
                    _fill(chunk.rows[i], score, amap, image_t, pixel_t)
                    if overlays:
                        chunk.rows[i]["overlay"] = _write_overlay(
                            out, chunk.rows[i], chunk.images[j], amap, pixel_t
                        )
                    if save_maps:
                        chunk.rows[i]["map"] = _write_map(out, chunk.rows[i], amap)
            for row in chunk.rows:
                writer.writerow(row)
            f.flush()
            rows.extend(chunk.rows)
            progress.update(start + len(chunk_paths))
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


def _write_map(out, row, amap) -> str:
    name = pathlib.Path(MAP_DIR) / f"{row['index']:05d}_{pathlib.Path(row['path']).stem}.npy"
    (out / MAP_DIR).mkdir(exist_ok=True)
    np.save(out / name, np.asarray(amap, np.float32))
    return str(name)


def _write_overlay(out, row, image, amap, pixel_t) -> str:
    image, amap = shrink(image), shrink(amap)  # the decision used the full map
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


def _write_json(path, rows, run, workdir, image_t, pixel_t, skipped, warnings) -> None:
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
            "skipped": len(skipped),
        },
        "input_warnings": list(warnings),
        "skipped": list(skipped),
        "predictions": [{k: (None if r[k] == "" else r[k]) for k in COLUMNS} for r in rows],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
