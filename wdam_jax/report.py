"""One page a person opens: ``report.html``, a run's scores, maps and threshold in the browser.

Three pages, each one self-contained HTML file (its script and style inline, the data embedded as
JSON; no server, no network) plus, for images, a folder of small JPEG thumbnails beside it that
the page loads lazily, so a run of thousands of test images opens in seconds:

- an **evaluation** (``<workdir>/eval/step_<n>/report.html``, written by
  :func:`wdam_jax.evaluate.evaluate` through :func:`write_evaluation_report`; also
  ``<workdir>/report.html``, a redirect to the newest one written): the run (method, config,
  data summary and its warnings, checkpoint step), the metrics table and the per-defect-type
  I-AUROC, the learning curves, the score distribution of normal and anomalous test images with
  the threshold drawn and a threshold control (moving it updates the misses, false alarms, FPR,
  recall and which images change decision), and one card per test image (image | anomaly map
  over it | ground truth with the predicted region outlined; score, decision, file name),
  sortable by score and filterable by defect type and decision;
- a **prediction** (``<out>/report.html``, written by :func:`wdam_jax.predict.predict` through
  :func:`prediction_page`): the same without labels (the control shows how many files are
  flagged and which change decision), one card per file, unreadable files included;
- an **experiment** (``<workdir>/report.html`` of ``launch.experiment``, :func:`experiment_page`):
  the results table with the paper's numbers beside ours, each cell linking to its runs' pages.

``python -m launch.report --workdir=W`` (:func:`build`) rewrites the page of an existing run,
prediction folder or experiment from the files they hold. The page reads its initial state from
the URL fragment (``report.html#threshold=1.5&decision=misses&defect=crack&sort=score_desc``),
set through the same controls a person uses; the fragment follows the controls, so a view can be
shared as a link.

Map panels: the anomaly map normalised with the run's pixel threshold (``thresholds.json``;
0.5 = the threshold, jet colour map on a fixed [0, 1] scale, as ``launch.predict``'s overlays),
else min-max over all of the run's maps; the predicted region (normalised map >= 0.5) is outlined
in red on the ground-truth panel.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import scipy.ndimage
from PIL import Image

from wdam_jax import checkpoints, metrics, reporting, thresholds
from wdam_jax.errors import MissingFileError

REPORT_FILE = "report.html"
ASSETS = "report_assets"
THUMB_SIDE = 128  # each panel of a card's thumbnail, in pixels
EVAL_DIR = "eval"  # wdam_jax.evaluate.EVAL_DIR (that module imports this one)
DATA_SUMMARY = "data_summary.json"  # as wdam_jax.train.DATA_SUMMARY
CONFIG_SUMMARY = (
    "seed",
    "data.dataset",
    "data.category",
    "data.image_size",
    "data.crop_size",
    "data.holdout_fraction",
    "data.anomaly_source",
    "train.batch_size",
    "train.stage1_steps",
    "train.stage2_steps",
    "train.stage3_steps",
    "train.steps",
    "model.wdam_layers",
    "model.wdam_blocks",
    "score.threshold_rule",
    "score.threshold_fpr",
)


# --------------------------------------------------------------------------------------------
# Thumbnails.


def thumbnail(
    image: np.ndarray,
    normalised_map: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    outline: bool = True,
    side: int = THUMB_SIDE,
) -> Image.Image:
    """A card's picture: panels ``side`` pixels square, side by side.

    Panels: the image; the map as a jet heatmap over it (fixed scale [0, 1]); with ``mask``, the
    ground truth (white on black) with the predicted region (map >= 0.5) outlined in red.

    Args:
      image: ``[S, S, 3]`` float in [0, 1].
      normalised_map: ``[S', S']`` in [0, 1] (resized to the panel).
      mask: ``[S'', S'']`` bool ground truth, or None (no third panel).
      outline: draw the predicted region (False when the run has no pixel threshold).
      side: panel size.
    """

    def fit(array: np.ndarray, nearest: bool) -> np.ndarray:
        return reporting.fit_to(array, (side, side), nearest=nearest)

    rgb = np.stack([fit(image[..., c], False) for c in range(3)], -1).clip(0, 1)
    amap = fit(normalised_map, False).clip(0, 1)
    heat = matplotlib.colormaps["jet"](amap)[..., :3]
    panels = [rgb, 0.5 * heat + 0.5 * rgb]
    if mask is not None:
        truth = np.repeat((fit(mask.astype(np.float32), True) > 0.5)[..., None], 3, -1)
        truth = truth.astype(np.float32)
        if outline:
            region = amap >= 0.5
            truth[region & ~scipy.ndimage.binary_erosion(region, iterations=2)] = (1.0, 0.1, 0.1)
        panels.append(truth)
    strip = np.concatenate(panels, axis=1)
    return Image.fromarray(np.asarray(np.clip(strip, 0, 1) * 255, np.uint8))


def save_thumbnail(path: pathlib.Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=88)


def thumb_name(index: int) -> str:
    """The thumbnail file of the ``index``-th image (test split order, or predict's row)."""
    return f"{index:05d}.jpg"


def map_normaliser(pixel: Mapping[str, Any] | None, maps: np.ndarray):
    """``map -> [0, 1]``: the run's pixel threshold at 0.5 when it has one (``thresholds.json``'s
    ``pixel`` entry), else min-max over ``maps`` (one scale for every card)."""
    if pixel is not None:
        value, scale = float(pixel["threshold"]), float(pixel["scale"])
        return lambda m: thresholds.normalise(m, threshold=value, scale=scale)
    lo, hi = float(np.min(maps)), float(np.max(maps))
    return lambda m: (np.asarray(m, np.float32) - lo) / max(hi - lo, 1e-12)


# --------------------------------------------------------------------------------------------
# Reading what a run wrote.


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _finite(value: Any) -> Any:
    """JSON-able copy with NaN / inf as None (the page shows "-")."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


def _png_data_url(path: pathlib.Path) -> str | None:
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def eval_dirs(workdir: pathlib.Path) -> dict[int, pathlib.Path]:
    """``{step: <workdir>/eval/step_<step>}`` of every evaluation that wrote metrics."""
    out = {}
    for d in (workdir / EVAL_DIR).glob("step_*"):
        suffix = d.name.removeprefix("step_")
        if suffix.isdigit() and (d / "metrics.json").is_file():
            out[int(suffix)] = d
    return dict(sorted(out.items()))


def _config_rows(config: Mapping[str, Any] | None) -> tuple[list[list[str]], list[list[str]]]:
    """(the summary's chosen fields, every field), as ``[name, value]`` rows."""
    if not config:
        return [], []
    flat = checkpoints.flatten(config)
    show = lambda v: json.dumps(v) if isinstance(v, list | tuple | dict) else str(v)
    chosen = [[k, show(flat[k])] for k in CONFIG_SUMMARY if k in flat and flat[k] not in ("", None)]
    return chosen, [[k, show(v)] for k, v in sorted(flat.items())]


def _data_rows(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    if not summary:
        return {"note": "no data summary recorded with this run", "splits": [], "warnings": []}
    if "images" not in summary:
        warnings = summary.get("warnings", [])
        return {"note": summary.get("note", ""), "splits": [], "warnings": warnings}
    splits = [
        [split, sum(kinds.values()), ", ".join(f"{k} {n}" for k, n in kinds.items())]
        for split, kinds in summary["images"].items()
    ]
    top = lambda d: ", ".join(f"{k} × {n}" for k, n in list(d.items())[:4])
    return {
        "note": f"{summary.get('folder', '')} ({summary.get('dataset', '')})",
        "splits": splits,
        "sizes": top(summary.get("sizes", {})),
        "modes": top(summary.get("modes", {})),
        "warnings": list(summary.get("warnings", [])),
    }


def _per_defect(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per defect type: images and I-AUROC against the normal images (None for "good")."""
    good = [it["score"] for it in items if it["label"] == 0]
    out = []
    for defect in sorted({it["defect"] for it in items}, key=lambda d: (d != "good", d)):
        scores = [it["score"] for it in items if it["defect"] == defect]
        label = next(it["label"] for it in items if it["defect"] == defect)
        value = None
        if label == 1 and good:
            both = np.asarray(good + scores, np.float64)
            value = metrics.auroc(both, np.r_[np.zeros(len(good)), np.ones(len(scores))])
        out.append({"defect": defect, "label": label, "count": len(scores), "i_auroc": value})
    return out


# --------------------------------------------------------------------------------------------
# Evaluation pages.


def write_evaluation_report(
    workdir: str | os.PathLike,
    outdir: str | os.PathLike,
    *,
    images: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
) -> pathlib.Path:
    """Writes a thumbnail per test image into ``<outdir>/report_assets/``, then the page
    (:func:`evaluation_page`). Called by :func:`wdam_jax.evaluate.evaluate` after it wrote the
    metrics, scores, thresholds and curves.

    Args:
      workdir: the run directory.
      outdir: ``<workdir>/eval/step_<n>``.
      images: ``[N, S, S, 3]`` the test images in [0, 1], in ``scores.npz``'s order.
      masks: ``[N, S, S]`` bool ground truth.
      maps: ``[N, S', S']`` the method's anomaly maps.

    Returns:
      The page's path.
    """
    outdir = pathlib.Path(outdir)
    stored = _read_json(outdir / thresholds.THRESHOLDS_FILE)
    normalise = map_normaliser(stored["pixel"] if stored else None, maps)
    for i in range(len(images)):
        picture = thumbnail(images[i], normalise(maps[i]), mask=masks[i], outline=bool(stored))
        save_thumbnail(outdir / ASSETS / thumb_name(i), picture)
    return evaluation_page(workdir, outdir)


def evaluation_page(workdir: str | os.PathLike, outdir: str | os.PathLike) -> pathlib.Path:
    """Writes ``<outdir>/report.html`` from the files of an evaluation (``metrics.json``,
    ``scores.npz`` / ``scores.csv``, ``thresholds.json``, ``learning_curves.png``, thumbnails)
    and the run's ``config.json`` and ``data_summary.json``; ``<workdir>/report.html`` becomes a
    redirect to it.

    Raises:
      MissingFileError: the evaluation's metrics or scores are missing.
    """
    workdir, outdir = pathlib.Path(workdir), pathlib.Path(outdir)
    fix = f"run python -m launch.evaluate --workdir={workdir} first"
    for name in ("metrics.json", "scores.npz", "scores.csv"):
        if not (outdir / name).is_file():
            raise MissingFileError(f"{outdir / name} not found: no evaluation there; {fix}.")
    saved = np.load(outdir / "scores.npz")
    with (outdir / "scores.csv").open() as f:
        defects = [row["defect_type"] for row in csv.DictReader(f)]
    paths = [str(p) for p in saved["paths"]]
    if len(defects) != len(paths):
        raise MissingFileError(f"{outdir}: scores.csv and scores.npz disagree; {fix} again.")
    items = []
    for i, (path, label, score) in enumerate(
        zip(paths, saved["labels"], saved["image_scores"], strict=True)
    ):
        thumb = outdir / ASSETS / thumb_name(i)
        items.append(
            {
                "name": "/".join(pathlib.Path(path).parts[-2:]),  # defect folder / file
                "path": path,
                "defect": defects[i],
                "label": int(label),
                "score": float(score),
                "status": "ok",
                "thumb": f"{ASSETS}/{thumb.name}" if thumb.is_file() else None,
            }
        )
    config = _read_json(workdir / checkpoints.CONFIG_FILE) or {}
    step = int(outdir.name.removeprefix("step_"))
    stored = _read_json(outdir / thresholds.THRESHOLDS_FILE)
    raw = _read_json(outdir / "metrics.json")
    raw = {k: v for k, v in raw.items() if k != reporting.BY_DEFECT_KEY}  # the page's own below
    columns = [
        c
        for c in reporting.METRICS + reporting.DECISION_METRICS
        if any(c in row for row in raw.values())
    ]
    category = config.get("data", {}).get("category", "")
    label = _label(config)
    chosen, every = _config_rows(config)
    data = {
        "kind": "evaluation",
        "title": f"{label} · {category} · step {step}",
        "subtitle": str(workdir),
        "summary": [
            ["method", label],
            ["category", category],
            ["checkpoint step", str(step)],
            ["run directory", str(workdir)],
            ["evaluated", _mtime(outdir / "metrics.json")],
            ["test images", f"{len(items)} ({sum(it['label'] for it in items)} anomalous)"],
            *_threshold_rows(stored),
        ],
        "config": chosen,
        "config_all": every,
        "data": _data_rows(_read_json(workdir / DATA_SUMMARY)),
        "metrics": {
            "columns": [[c, reporting.METRIC_TITLES.get(c, c)] for c in columns],
            "rows": [[name, {c: row.get(c) for c in columns}] for name, row in raw.items()],
        },
        "defects": _per_defect(items),
        "curves": _png_data_url(outdir / "learning_curves.png"),
        "threshold": _threshold_data(stored, items),
        "panels": ["image", "anomaly map", "ground truth, predicted region in red"],
        "group": "defect type",
        "thumb_size": [3 * THUMB_SIDE, THUMB_SIDE],
        "items": items,
    }
    page = _write_page(outdir / REPORT_FILE, data)
    _redirect(workdir / REPORT_FILE, page)
    return page


def _label(config: Mapping[str, Any]) -> str:
    model = config.get("model", {})
    wdam = model.get("wdam_layers") or model.get("wdam_blocks") or ()
    return config.get("method", "?") + (f"+wdam{''.join(map(str, wdam))}" if wdam else "")


def _mtime(path: pathlib.Path) -> str:
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
    return stamp.isoformat(timespec="seconds").replace("+00:00", " UTC")


def _threshold_rows(stored: Mapping[str, Any] | None) -> list[list[str]]:
    if not stored:
        return [["threshold", "none stored (fewer than 2 held-out normal images)"]]
    image = stored["image"]
    pixel = stored["pixel"]
    return [
        ["image threshold", f"{image['threshold']:.6g} ({image['rule']}; {image.get('source')})"],
        ["pixel threshold", f"{pixel['threshold']:.6g} ({pixel['rule']})"],
    ]


def _threshold_data(
    stored: Mapping[str, Any] | None, items: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The page's starting threshold and its named alternatives (the stored candidates)."""
    if stored:
        presets = {
            rule: entry["threshold"]
            for rule, entry in stored.get("candidates", {}).get("image", {}).items()
        }
        return {
            "value": stored["image"]["threshold"],
            "rule": stored["image"]["rule"],
            "presets": presets,
        }
    scores = [it["score"] for it in items if it["status"] == "ok"]
    value = float(np.median(scores)) if scores else 0.0
    return {"value": value, "rule": "median score (the run stored no threshold)", "presets": {}}


# --------------------------------------------------------------------------------------------
# Prediction pages.


def prediction_page(out: str | os.PathLike) -> pathlib.Path:
    """Writes ``<out>/report.html`` from ``launch.predict``'s ``predictions.json`` and the
    thumbnails it wrote (``report_assets/<index>.jpg``).

    Raises:
      MissingFileError: ``predictions.json`` is missing.
    """
    out = pathlib.Path(out)
    document = _read_json(out / "predictions.json")
    if document is None:
        raise MissingFileError(
            f"{out / 'predictions.json'} not found; run python -m launch.predict --out={out} first."
        )
    items = []
    for i, row in enumerate(document["predictions"]):
        thumb = out / ASSETS / thumb_name(i)  # predict's row index
        ok = row["status"] == "ok"
        items.append(
            {
                "name": pathlib.Path(row["path"]).name,
                "path": row["path"],
                "defect": pathlib.Path(row["path"]).parent.name or ".",
                "label": None,
                "score": row["score"] if ok else None,
                "status": row["status"],
                "error": row.get("error") or "",
                "note": row.get("note") or "",
                "link": row.get("overlay") or None,
                # Only this run's thumbnails (an older prediction here may have left some).
                "thumb": f"{ASSETS}/{thumb.name}"
                if ok and row.get("overlay") and thumb.is_file()
                else None,
            }
        )
    workdir = pathlib.Path(document["workdir"])
    config = _read_json(workdir / checkpoints.CONFIG_FILE) or {}
    chosen, every = _config_rows(config)
    threshold = document["threshold"]
    counts = document["counts"]
    data = {
        "kind": "prediction",
        "title": f"Predictions · {_label(config) if config else document['method']} · step "
        f"{document['step']}",
        "subtitle": str(out),
        "summary": [
            ["run directory", str(workdir)],
            ["method", _label(config) if config else document["method"]],
            ["checkpoint step", str(document["step"])],
            [
                "files",
                f"{counts['files']} ({counts['anomalous']} anomalous, {counts['normal']} "
                f"normal, {counts['errors']} unreadable)",
            ],
            ["image threshold", f"{threshold['threshold']:.6g} ({threshold['rule']})"],
            [
                "preprocessing",
                f"{document['preprocessing']['resize']}, "
                f"{document['preprocessing']['image_size']} px",
            ],
            ["written", _mtime(out / "predictions.json")],
        ],
        "config": chosen,
        "config_all": every,
        "data": {"note": "", "splits": [], "warnings": []},
        "metrics": None,
        "defects": [],
        "curves": None,
        "threshold": {"value": threshold["threshold"], "rule": threshold["rule"], "presets": {}},
        "panels": ["image", "anomaly map"],
        "group": "folder",
        "thumb_size": [2 * THUMB_SIDE, THUMB_SIDE],
        "items": items,
    }
    return _write_page(out / REPORT_FILE, data)


# --------------------------------------------------------------------------------------------
# Experiment pages.


def experiment_page(workdir: str | os.PathLike) -> pathlib.Path:
    """Writes ``<workdir>/report.html`` of an experiment from its ``results.json``: one table per
    section and metric, categories down, each row's ours and the paper's across; our cells link
    to the run pages (``<row>/<category>/seed<k>/report.html``) of the seeds they average.

    Raises:
      MissingFileError: ``results.json`` is missing.
    """
    workdir = pathlib.Path(workdir)
    results = _read_json(workdir / "results.json")
    if results is None:
        raise MissingFileError(
            f"{workdir / 'results.json'} not found; run python -m launch.experiment "
            f"--workdir={workdir} --aggregate_only first."
        )
    esc = html.escape
    parts = [
        f"<header><h1>{esc(results['table'])}: ours and the paper's</h1>",
        f"<div class='sub'>{esc(str(workdir))} · {results['finished']}/{results['runs']} runs "
        f"finished · seeds {esc(', '.join(map(str, results['seeds'])))} · mean ± std over seeds, "
        "in %</div></header>",
    ]
    if results["missing"]:
        parts.append(
            "<p class='warn'>Not finished (shown as –): "
            + esc(", ".join(results["missing"]))
            + "</p>"
        )
    titles = reporting.METRIC_TITLES
    for section, rows in results["sections"].items():
        categories = list(next(iter(rows.values()))["cells"])
        for metric in results["metrics"]:
            parts.append(f"<section><h2>{esc(section)}: {esc(titles.get(metric, metric))} (%)</h2>")
            head = ["<th>category</th>"]
            for row in rows.values():
                head.append(f"<th>{esc(row['label'])}</th>")
                if row["paper_column"]:
                    head.append(f"<th class='paper'>{esc(row['label'])} (paper)</th>")
            lines = ["<table class='results'><tr>" + "".join(head) + "</tr>"]
            for category in categories:
                cells = [f"<th>{esc(category)}</th>"]
                for slug, row in rows.items():
                    cell = row["cells"].get(category, {}).get(metric)
                    cells.append(_ours_cell(workdir, slug, category, cell, results["seeds"]))
                    if row["paper_column"]:
                        paper = None if cell is None else cell["paper"]
                        shown = "" if paper is None else f"{paper:.2f}"
                        cells.append(f"<td class='paper'>{shown}</td>")
                cls = " class='mean'" if category == "mean" else ""
                lines.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
            parts.append("\n".join(lines) + "</table></section>")
    body = "\n".join(parts)
    text = _SHELL.replace("__TITLE__", esc(results["table"])).replace("__STYLE__", _STYLE)
    text = text.replace("__BODY__", body).replace("__SCRIPT__", "")
    return checkpoints.atomic_write_text(workdir / REPORT_FILE, text)


def _ours_cell(
    workdir: pathlib.Path,
    slug: str,
    category: str,
    cell: Mapping[str, Any] | None,
    seeds: Sequence[int],
) -> str:
    if cell is None or cell["mean"] is None:
        return "<td>–</td>"
    text = f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if cell["n"] > 1 else "")
    if category == "mean":
        return f"<td>{text}</td>"
    links = [
        f"{slug}/{category}/seed{s}/{REPORT_FILE}"
        for s in seeds
        if (workdir / slug / category / f"seed{s}" / REPORT_FILE).is_file()
    ]
    if len(links) == 1:
        return f"<td><a href='{html.escape(links[0])}'>{text}</a></td>"
    seeds_html = " ".join(
        f"<a class='seed' href='{html.escape(link)}'>s{link.split('/seed')[1].split('/')[0]}</a>"
        for link in links
    )
    return f"<td>{text} <span class='seeds'>{seeds_html}</span></td>"


# --------------------------------------------------------------------------------------------
# Entry point and writing.


def build(path: str | os.PathLike, *, step: int | None = None) -> pathlib.Path:
    """Rewrites the page of what ``path`` holds (``launch.report``): an experiment
    (``results.json``), a prediction folder (``predictions.json``) or a run directory (its
    evaluation at ``step``, default the newest).

    Raises:
      MissingFileError: nothing there to make a page of, or no evaluation at ``step``.
    """
    path = pathlib.Path(path)
    if (path / "results.json").is_file():
        return experiment_page(path)
    if (path / "predictions.json").is_file():
        return prediction_page(path)
    evaluated = eval_dirs(path)
    if not evaluated:
        raise MissingFileError(
            f"--workdir={path}: no evaluation, prediction or experiment results there. Run "
            f"python -m launch.evaluate --workdir={path} (a trained run) first."
        )
    if step is None:
        step = max(evaluated)
    if step not in evaluated:
        raise MissingFileError(
            f"--workdir={path}: no evaluation at step {step}; evaluated steps: "
            f"{', '.join(map(str, evaluated))}."
        )
    return evaluation_page(path, evaluated[step])


def _redirect(path: pathlib.Path, target: pathlib.Path) -> None:
    relative = html.escape(target.relative_to(path.parent).as_posix())
    checkpoints.atomic_write_text(
        path,
        f"<!doctype html><meta charset='utf-8'><meta http-equiv='refresh' content='0; url="
        f"{relative}'><title>report</title><a href='{relative}'>{relative}</a>\n",
    )


def _write_page(path: pathlib.Path, data: Mapping[str, Any]) -> pathlib.Path:
    """The run/prediction page: the template with ``data`` embedded as JSON (``<`` escaped, so
    no string in it can close the script element)."""
    payload = json.dumps(_finite(data), allow_nan=False, separators=(",", ":"))
    payload = payload.replace("<", "\\u003c").replace("\u2028", "\\u2028")
    body = _RUN_BODY.replace("__DATA__", payload)
    text = _SHELL.replace("__TITLE__", html.escape(data["title"])).replace("__STYLE__", _STYLE)
    text = text.replace("__BODY__", body).replace("__SCRIPT__", _RUN_SCRIPT)
    return checkpoints.atomic_write_text(path, text)


_SHELL = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__STYLE__</style></head>
<body><main>
__BODY__
</main>
<script>__SCRIPT__</script>
</body></html>
"""

_STYLE = """
:root { --bg:#f6f7f9; --fg:#1d2330; --muted:#5d6678; --line:#d9dde5; --card:#fff;
  --bad:#c62839; --good:#1f7a4a; --warn:#9a5b00; --accent:#2f5fb3; --normal:#4a7cc9; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; }
main { max-width:1320px; margin:0 auto; padding:18px 24px 60px; }
header h1 { font-size:22px; margin:4px 0 2px; }
.sub { color:var(--muted); font-size:13px; word-break:break-all; }
nav { margin:10px 0 4px; font-size:13px; }
nav a { margin-right:14px; color:var(--accent); text-decoration:none; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px;
  padding:14px 18px; margin:14px 0; }
h2 { font-size:16px; margin:0 0 10px; }
h3 { font-size:14px; margin:14px 0 6px; color:var(--muted); }
.cols { display:flex; flex-wrap:wrap; gap:24px; }
.cols > div { flex:1 1 380px; min-width:0; }
table { border-collapse:collapse; font-size:13px; }
th, td { padding:3px 10px; border-bottom:1px solid var(--line); text-align:left; }
#metrics th, #defects th { white-space:nowrap; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
table.kv th { color:var(--muted); font-weight:normal; white-space:nowrap; }
table.results td { text-align:right; font-variant-numeric:tabular-nums; }
table.results td.paper, table.results th.paper { color:var(--muted); }
tr.mean { font-weight:600; }
.seeds a, a.seed { font-size:11px; margin-left:3px; }
.warn { color:var(--warn); background:#fff6e5; border:1px solid #f0d9a8; border-radius:6px;
  padding:6px 10px; margin:6px 0; }
details { margin-top:8px; } summary { cursor:pointer; color:var(--accent); }
#curves img { max-width:100%; }
.threshold-controls { display:flex; flex-wrap:wrap; align-items:center; gap:10px; margin:6px 0; }
#threshold { flex:1 1 420px; accent-color:var(--accent); }
#threshold-number { width:160px; font:inherit; padding:2px 6px; }
button { font:inherit; font-size:12px; padding:2px 9px; border:1px solid var(--line);
  border-radius:12px; background:#eef2fa; cursor:pointer; }
.stats { display:flex; flex-wrap:wrap; gap:10px; margin-top:8px; }
.stat { border:1px solid var(--line); border-radius:6px; padding:6px 12px; flex:1 1 0;
  min-width:120px; }
.stat b { display:block; font-size:20px; font-variant-numeric:tabular-nums; }
.stat span { color:var(--muted); font-size:12px; }
.stat.bad b { color:var(--bad); }
#hist { width:100%; height:auto; display:block; cursor:crosshair; }
.legend { font-size:12px; color:var(--muted); }
.swatch { display:inline-block; width:10px; height:10px; margin:0 4px 0 10px; border-radius:2px; }
.toolbar { display:flex; flex-wrap:wrap; gap:12px; align-items:center; margin-bottom:10px; }
.toolbar select { font:inherit; padding:2px 4px; }
#cards { display:grid; grid-template-columns:repeat(auto-fill, minmax(300px, 1fr)); gap:12px; }
.card { background:#fff; border:1px solid var(--line); border-radius:7px; overflow:hidden;
  content-visibility:auto; contain-intrinsic-size:auto 300px auto 190px; }
.card img { display:block; width:100%; height:auto; background:#e8ebf0; image-rendering:auto;
  cursor:zoom-in; }
.card.zoom { grid-column:1 / -1; } .card.zoom img { cursor:zoom-out; }
.card .meta { padding:6px 9px 8px; font-size:12px; }
.card .name { font-weight:600; font-size:13px; white-space:nowrap; overflow:hidden;
  text-overflow:ellipsis; }
.card .line { display:flex; flex-wrap:wrap; gap:6px; align-items:center; margin-top:3px; }
.card .line .line { margin-top:0; }
.chip { background:#eef0f4; border-radius:10px; padding:0 7px; }
.score { font-variant-numeric:tabular-nums; color:var(--muted); }
.badge { border-radius:10px; padding:0 8px; color:#fff; font-weight:600; }
.badge.anomalous { background:var(--bad); } .badge.normal { background:var(--good); }
.badge.error { background:#777; }
.tag { border:1px solid var(--bad); color:var(--bad); border-radius:10px; padding:0 6px; }
.tag.changed { border-color:var(--accent); color:var(--accent); }
.card.wrong { border-color:var(--bad); box-shadow:0 0 0 1px var(--bad) inset; }
.card .err { color:var(--bad); padding:8px 9px; font-size:12px; word-break:break-word; }
.panels { color:var(--muted); font-size:12px; }
"""

_RUN_BODY = """
<script id="report-data" type="application/json">__DATA__</script>
<header><h1 id="title"></h1><div class="sub" id="subtitle"></div>
<nav><a href="#run">run</a><a href="#metrics-section">metrics</a>
<a href="#threshold-section">threshold</a><a href="#images">images</a>
<a href="#curves">learning curves</a></nav></header>
<section id="run"><h2>Run</h2><div class="cols">
<div><table class="kv" id="summary-table"></table>
<h3>Data</h3><div id="data"></div><div id="warnings"></div></div>
<div><table class="kv" id="config-table"></table>
<details><summary>every config field</summary><table class="kv" id="config-all"></table></details>
</div></div></section>
<section id="metrics-section"><h2>Metrics <span class="sub">(%)</span></h2><div class="cols">
<div id="metrics-box"><table id="metrics"></table></div>
<div id="defects-box"><table id="defects"></table></div></div></section>
<section id="threshold-section"><h2>Threshold</h2>
<svg id="hist" viewBox="0 0 1000 230" role="img" aria-label="score distribution"></svg>
<div class="legend" id="legend"></div>
<div class="threshold-controls">
<label for="threshold">image threshold</label>
<input type="range" id="threshold" step="any">
<input type="number" id="threshold-number" step="any">
<span id="presets"></span></div>
<div class="stats" id="stats"></div></section>
<section id="images"><h2>Images</h2>
<div class="toolbar">
<label>sort <select id="sort">
<option value="score_desc">score, highest first</option>
<option value="score_asc">score, lowest first</option>
<option value="name">file name</option><option value="order">as evaluated</option>
</select></label>
<label><span id="defect-label">defect type</span> <select id="defect"></select></label>
<label>decision <select id="decision"></select></label>
<span id="n-shown"></span> <span class="panels" id="panels"></span></div>
<div id="cards"></div></section>
<section id="curves"><h2>Learning curves</h2></section>
"""

_RUN_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("report-data").textContent);
const $ = (id) => document.getElementById(id);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}
const num = (v) => (v === null || v === undefined) ? "–" :
  (Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0)) ? v.toExponential(3) : v.toPrecision(5);
const pct = (v) => (v === null || v === undefined || !isFinite(v)) ? "–" : (100 * v).toFixed(1);
const items = D.items;
const ok = items.filter((it) => it.status === "ok");
const labelled = ok.some((it) => it.label !== null);
const stored = D.threshold.value;
let T = stored;

// ---- static parts
$("title").textContent = D.title;
$("subtitle").textContent = D.subtitle;
function kv(table, rows) {
  for (const [k, v] of rows) table.append(el("tr", {}, el("th", {text: k}), el("td", {text: v})));
}
kv($("summary-table"), D.summary);
kv($("config-table"), D.config);
kv($("config-all"), D.config_all);
if (!D.config.length) $("config-table").closest("div").remove();
const data = D.data;
const dataBox = $("data");
if (data.note) dataBox.append(el("div", {class: "sub", text: data.note}));
if (data.splits.length) {
  const t = el("table", {class: "kv", id: "data-table"});
  for (const [split, n, kinds] of data.splits)
    t.append(el("tr", {}, el("th", {text: split}), el("td", {class: "num", text: String(n)}),
      el("td", {text: kinds})));
  for (const k of ["sizes", "modes"]) if (data[k])
    t.append(el("tr", {}, el("th", {text: k}), el("td"), el("td", {text: data[k]})));
  dataBox.append(t);
}
if (!data.note && !data.splits.length) $("data").previousElementSibling.remove();
for (const w of data.warnings) $("warnings").append(el("div", {class: "warn", text: "⚠ " + w}));

if (D.metrics) {
  const t = $("metrics");
  t.append(el("tr", {}, el("th", {text: "category"}),
    ...D.metrics.columns.map(([k, title]) => el("th", {class: "num", text: title}))));
  for (const [name, row] of D.metrics.rows) {
    t.append(el("tr", {class: name === "mean" ? "mean" : null}, el("th", {text: name}),
      ...D.metrics.columns.map(([k]) => el("td", {class: "num", "data-key": k,
        "data-row": name, "data-value": row[k] === null ? "null" : String(row[k]),
        title: row[k] === null ? "not available" : String(row[k]), text: pct(row[k])}))));
  }
} else {
  $("metrics-section").remove();
  document.querySelector("nav a[href='#metrics-section']").remove();
}
if (D.defects.length) {
  const t = $("defects");
  t.append(el("tr", {}, el("th", {text: "defect type"}), el("th", {class: "num", text: "images"}),
    el("th", {class: "num", text: "I-AUROC vs good"}),
    el("th", {class: "num", text: "flagged at threshold"})));
  for (const d of D.defects)
    t.append(el("tr", {}, el("th", {text: d.defect}),
      el("td", {class: "num", text: String(d.count)}),
      el("td", {class: "num", text: d.i_auroc === null ? "–" : pct(d.i_auroc)}),
      el("td", {class: "num", id: "flagged-" + d.defect})));
} else if ($("defects-box")) $("defects-box").remove();
if (D.curves) $("curves").append(el("img", {src: D.curves, alt: "learning curves"}));
else for (const e of [$("curves"), document.querySelector("nav a[href='#curves']")]) e.remove();

// ---- histogram
const scores = ok.map((it) => it.score);
let lo = Math.min(...scores, stored, ...Object.values(D.threshold.presets));
let hi = Math.max(...scores, stored, ...Object.values(D.threshold.presets));
if (!(hi > lo)) { lo -= 1; hi += 1; }
const pad = 0.02 * (hi - lo); lo -= pad; hi += pad;
const W = 1000, H = 230, L = 46, R = 12, TOP = 10, B = 36;
const xOf = (v) => L + (v - lo) / (hi - lo) * (W - L - R);
const vOf = (x) => lo + (x - L) / (W - L - R) * (hi - lo);
const NS = "http://www.w3.org/2000/svg";
function sv(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
const svg = $("hist");
const NB = Math.max(10, Math.min(60, Math.round(Math.sqrt(scores.length) * 2)));
const groups = labelled ? [["normal", 0, "var(--normal)"], ["anomalous", 1, "var(--bad)"]]
  : [["predicted files", null, "var(--normal)"]];
const counts = groups.map(([, label]) => {
  const c = new Array(NB).fill(0);
  for (const it of ok) if (it.label === label) {
    c[Math.min(NB - 1, Math.max(0, Math.floor((it.score - lo) / (hi - lo) * NB)))] += 1;
  }
  return c;
});
const cmax = Math.max(1, ...counts.flat());
const yOf = (n) => H - B - n / cmax * (H - B - TOP);
svg.append(sv("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#888"}));
for (let g = 0; g < groups.length; g++) {
  const bw = (W - L - R) / NB;
  for (let b = 0; b < NB; b++) if (counts[g][b]) {
    svg.append(sv("rect", {x: L + b * bw + 0.5, width: Math.max(1, bw - 1), y: yOf(counts[g][b]),
      height: H - B - yOf(counts[g][b]), fill: groups[g][2], "fill-opacity": 0.55}));
  }
}
for (let k = 0; k <= 5; k++) {
  const v = lo + k / 5 * (hi - lo), x = xOf(v);
  svg.append(sv("line", {x1: x, x2: x, y1: H - B, y2: H - B + 5, stroke: "#888"}));
  svg.append(sv("text", {x: x, y: H - B + 18, "text-anchor": "middle", "font-size": 12,
    fill: "#5d6678"}, num(v)));
}
svg.append(sv("text", {x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle", "font-size": 12,
  fill: "#5d6678"}, "image score"));
svg.append(sv("text", {x: L - 6, y: TOP + 10, "text-anchor": "end", "font-size": 12,
  fill: "#5d6678"}, String(cmax)));
svg.append(sv("text", {x: L - 6, y: H - B, "text-anchor": "end", "font-size": 12,
  fill: "#5d6678"}, "0"));
const storedX = xOf(stored);
svg.append(sv("line", {x1: storedX, x2: storedX, y1: TOP, y2: H - B, stroke: "#999",
  "stroke-dasharray": "4 3"}));
const tLine = sv("line", {y1: TOP - 4, y2: H - B, stroke: "#e07b00", "stroke-width": 2.5});
const tText = sv("text", {y: TOP + 8, "font-size": 12, fill: "#b35f00"});
svg.append(tLine, tText);
svg.addEventListener("click", (ev) => {
  const box = svg.getBoundingClientRect();
  setThreshold(vOf((ev.clientX - box.left) / box.width * W));
});
const legend = $("legend");
for (const [name, , color] of groups)
  legend.append(el("span", {class: "swatch", style: `background:${color};opacity:.6`}), name);
legend.append(el("span", {class: "swatch", style: "background:#e07b00"}), "threshold",
  el("span", {class: "swatch", style: "background:#999"}),
  `stored threshold (${D.threshold.rule}) · click the plot to move the threshold`);

// ---- threshold control: every route (slider, number box, presets, plot, URL) goes through
// the slider's own input event
const slider = $("threshold"), box = $("threshold-number");
slider.min = lo; slider.max = hi; slider.value = stored;
function setThreshold(v) { slider.value = v; slider.dispatchEvent(new Event("input")); }
box.addEventListener("change", () => setThreshold(parseFloat(box.value)));
const presets = {"stored": stored, ...D.threshold.presets};
for (const [name, v] of Object.entries(presets))
  $("presets").append(el("button", {type: "button", title: String(v), text: name}), " ");
$("presets").querySelectorAll("button").forEach((b, i) =>
  b.addEventListener("click", () => setThreshold(Object.values(presets)[i])));
const statBox = $("stats");
function stat(id, label, cls) {
  const b = el("b", {id: id});
  statBox.append(el("div", {class: "stat " + (cls || "")}, b, el("span", {text: label})));
  return b;
}
const S = labelled ? {
  misses: stat("n-misses", "misses (anomalous scored normal)", "bad"),
  alarms: stat("n-false-alarms", "false alarms (normal flagged)", "bad"),
  flagged: stat("n-flagged", "flagged anomalous"),
  recall: stat("recall", "recall (anomalous caught)"),
  fpr: stat("fpr", "false-positive rate"),
  precision: stat("precision", "precision"),
  changed: stat("n-changed", "decisions changed vs stored"),
} : {
  flagged: stat("n-flagged", "flagged anomalous"),
  normal: stat("n-normal", "normal"),
  changed: stat("n-changed", "decisions changed vs stored"),
};

// ---- cards
$("panels").textContent = "panels: " + D.panels.join(" | ");
$("defect-label").textContent = D.group;
const [tw, th] = D.thumb_size;
const cards = items.map((it, i) => {
  const kids = [];
  if (it.thumb) {
    const img = el("img", {src: it.thumb, loading: "lazy", decoding: "async", width: tw, height: th,
      alt: it.name});
    img.addEventListener("click", () => card.classList.toggle("zoom"));
    kids.push(img);
  }
  const name = el("div", {class: "name", title: it.path, text: it.name});
  const dec = el("span", {class: "badge"});
  const tags = el("span", {class: "line"});
  const line1 = el("div", {class: "line"}, el("span", {class: "chip", text: it.defect}),
    el("span", {class: "score", text: it.status === "ok" ? "score " + num(it.score) : ""}));
  const line2 = el("div", {class: "line"}, dec, tags);
  const meta = el("div", {class: "meta"}, name, line1, line2);
  if (it.link)
    meta.append(el("div", {class: "line"}, el("a", {href: it.link, text: "full overlay"})));
  if (it.note) meta.append(el("div", {class: "line sub", text: it.note}));
  kids.push(meta);
  if (it.status !== "ok") kids.push(el("div", {class: "err", text: it.error || it.status}));
  const card = el("div", {class: "card", id: "card-" + i, "data-index": i, "data-defect": it.defect,
    "data-score": it.status === "ok" ? String(it.score) : ""}, ...kids);
  it._dec = dec; it._tags = tags; it._card = card; it._i = i;
  return card;
});
const defects = [...new Set(items.map((it) => it.defect))].sort();
const defectSel = $("defect");
defectSel.append(el("option", {value: "", text: `all (${items.length})`}));
for (const d of defects)
  defectSel.append(el("option", {value: d,
    text: `${d} (${items.filter((it) => it.defect === d).length})`}));
const decisionSel = $("decision");
const decisionOptions = [["", "all"], ["anomalous", "flagged anomalous"], ["normal", "normal"]];
if (labelled) decisionOptions.push(["misses", "misses"], ["false_alarms", "false alarms"],
  ["correct", "correct"]);
decisionOptions.push(["changed", "changed vs stored"]);
if (items.some((it) => it.status !== "ok")) decisionOptions.push(["errors", "unreadable"]);
for (const [v, t] of decisionOptions) decisionSel.append(el("option", {value: v, text: t}));

function keep(it) {
  const f = decisionSel.value, d = defectSel.value;
  if (d && it.defect !== d) return false;
  if (!f) return true;
  if (f === "errors") return it.status !== "ok";
  if (it.status !== "ok") return false;
  if (f === "anomalous") return it.dec;
  if (f === "normal") return !it.dec;
  if (f === "misses") return it.label === 1 && !it.dec;
  if (f === "false_alarms") return it.label === 0 && it.dec;
  if (f === "correct") return it.dec === (it.label === 1);
  if (f === "changed") return it.changed;
  return true;
}
function order(a, b) {
  const s = $("sort").value;
  if (s === "order") return a._i - b._i;
  if (s === "name") return a.path < b.path ? -1 : a.path > b.path ? 1 : 0;
  const x = a.status === "ok" ? a.score : -Infinity, y = b.status === "ok" ? b.score : -Infinity;
  return s === "score_asc" ? (x - y) || (a._i - b._i) : (y - x) || (a._i - b._i);
}
function refresh() {
  const shown = items.filter(keep).sort(order);
  $("cards").replaceChildren(...shown.map((it) => it._card));
  $("n-shown").textContent = `showing ${shown.length} of ${items.length}`;
  writeHash();
}
function writeHash() {
  const p = new URLSearchParams();
  if (T !== stored) p.set("threshold", String(T));
  for (const id of ["sort", "defect", "decision"]) {
    const v = $(id).value;
    if (v && !(id === "sort" && v === "score_desc")) p.set(id, v);
  }
  const h = p.toString();
  try { history.replaceState(null, "", h ? "#" + h : location.pathname + location.search); }
  catch (e) { /* some browsers refuse history on file:// pages; the view still works */ }
}

function update() {
  T = parseFloat(slider.value);
  box.value = String(T);
  let tp = 0, fn = 0, fp = 0, tn = 0, changed = 0, flagged = 0;
  const perDefect = {};
  for (const it of ok) {
    it.dec = it.score >= T;
    it.changed = it.dec !== (it.score >= stored);
    flagged += it.dec; changed += it.changed;
    if (it.label === 1) { if (it.dec) tp++; else fn++; }
    if (it.label === 0) { if (it.dec) fp++; else tn++; }
    const pd = perDefect[it.defect] || (perDefect[it.defect] = [0, 0]);
    pd[0] += it.dec; pd[1] += 1;
    it._dec.textContent = it.dec ? "anomalous" : "normal";
    it._dec.className = "badge " + (it.dec ? "anomalous" : "normal");
    const wrong = it.label !== null && it.dec !== (it.label === 1);
    it._card.classList.toggle("wrong", wrong);
    it._card.dataset.decision = it.dec ? "anomalous" : "normal";
    const tags = [];
    if (wrong) tags.push(el("span", {class: "tag", text: it.label === 1 ? "miss" : "false alarm"}));
    if (it.changed) tags.push(el("span", {class: "tag changed", text: "changed"}));
    it._tags.replaceChildren(...tags);
  }
  for (const it of items) if (it.status !== "ok") {
    it._dec.textContent = "unreadable"; it._dec.className = "badge error";
    it._card.dataset.decision = "error";
  }
  S.flagged.textContent = String(flagged);
  S.changed.textContent = String(changed);
  if (labelled) {
    S.misses.textContent = String(fn);
    S.alarms.textContent = String(fp);
    S.recall.textContent = tp + fn ? (tp / (tp + fn)).toFixed(3) : "–";
    S.fpr.textContent = fp + tn ? (fp / (fp + tn)).toFixed(3) : "–";
    S.precision.textContent = tp + fp ? (tp / (tp + fp)).toFixed(3) : "–";
  } else S.normal.textContent = String(ok.length - flagged);
  for (const [d, [k, n]] of Object.entries(perDefect)) {
    const cell = $("flagged-" + d);
    if (cell) cell.textContent = `${k} / ${n}`;
  }
  const x = xOf(Math.min(hi, Math.max(lo, T)));
  tLine.setAttribute("x1", x); tLine.setAttribute("x2", x);
  tText.setAttribute("x", x + (x > W - 160 ? -6 : 6));
  tText.setAttribute("text-anchor", x > W - 160 ? "end" : "start");
  tText.textContent = "threshold " + num(T);
  $("threshold-section").dataset.threshold = String(T);
  refresh();
}
slider.addEventListener("input", update);
for (const id of ["sort", "defect", "decision"]) $(id).addEventListener("change", refresh);

// ---- initial state from the URL fragment, through the same controls
const start = new URLSearchParams(location.hash.slice(1));
for (const id of ["sort", "defect", "decision"]) {
  const v = start.get(id);
  if (v !== null && [...$(id).options].some((o) => o.value === v)) $(id).value = v;
}
const t0 = start.get("threshold");
if (t0 !== null && isFinite(parseFloat(t0))) {
  const v = parseFloat(t0);
  if (v < lo) slider.min = v;
  if (v > hi) slider.max = v;
  setThreshold(v);
} else setThreshold(stored);
document.body.dataset.renderedMs = performance.now().toFixed(0);  // page start to ready
"""
