"""Writing results: metrics as JSON / CSV / markdown, and Fig. 6/7-style heatmap figures.

``results`` maps a category name to its metrics as fractions in [0, 1]
(``{"bottle": {"i_auroc": 0.99, "p_auroc": 0.97, "pro": 0.91}, ...}``); a metric a dataset does
not report (VisA has no PRO in the paper) may be missing or NaN and shows as "-". The markdown
table shows percent with one decimal, as the paper's tables.

``by_defect`` (optional, :func:`write_metrics`, :func:`markdown_table`) maps a category to
``{defect type: metrics}``, each computed on that defect type's test images with all the normal
ones; those rows stand beside their category's and stay out of the mean.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from wdam_jax.checkpoints import atomic_write_bytes, atomic_write_text

METRICS = ("i_auroc", "p_auroc", "pro")
# Written when the results hold them (``wdam_jax.evaluate`` adds them; the paper reports none).
DECISION_METRICS = ("i_f1_max", "i_aupr", "p_f1_max", "p_aupr")
METRIC_TITLES = {
    "i_auroc": "I-AUROC",
    "p_auroc": "P-AUROC",
    "pro": "PRO",
    "i_f1_max": "I-F1max",
    "i_aupr": "I-AUPR",
    "p_f1_max": "P-F1max",
    "p_aupr": "P-AUPR",
}
MEAN_ROW = "mean"
BY_DEFECT_KEY = "by_defect_type"  # metrics.json: {category: {defect type: metrics}}

Results = Mapping[str, Mapping[str, float]]


def _value(row: Mapping[str, float], metric: str) -> float:
    v = row.get(metric)
    return float("nan") if v is None else float(v)


def columns(results: Results) -> tuple[str, ...]:
    """The paper's metrics, then the decision metrics any row holds."""
    extra = tuple(m for m in DECISION_METRICS if any(m in r for r in results.values()))
    return METRICS + extra


def mean_metrics(results: Results) -> dict[str, float]:
    """Per-metric mean over categories, ignoring missing / NaN entries (NaN if none)."""
    out = {}
    for m in columns(results):
        vals = [_value(r, m) for r in results.values()]
        vals = [v for v in vals if not math.isnan(v)]
        out[m] = float(np.mean(vals)) if vals else float("nan")
    return out


def _with_mean(results: Results) -> dict[str, dict[str, float]]:
    if MEAN_ROW in results:
        raise ValueError(f"{MEAN_ROW!r} is reserved for the mean row; rename that category.")
    rows = {c: {m: _value(r, m) for m in columns(results)} for c, r in results.items()}
    rows[MEAN_ROW] = mean_metrics(results)
    return rows


def markdown_table(results: Results, by_defect: Mapping[str, Results] | None = None) -> str:
    """Markdown table: rows = categories + a mean row, columns I-AUROC / P-AUROC / PRO (then the
    decision metrics the rows hold, see :func:`columns`) in %.

    Args:
      results: category -> {"i_auroc", "p_auroc", "pro"} as fractions.
      by_defect: optional category -> {defect type -> metrics}: rows ``category: defect`` under
        their category's (not in the mean); a metric a defect row lacks shows "-".

    Returns:
      The table, ending with a newline.
    """
    rows, metrics = _with_mean(results), columns(results)
    header = "| Category | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " |"
    lines = [header, "|---|" + "---:|" * len(metrics)]

    def line(name: str, row: Mapping[str, float]) -> str:
        cells = [
            "-" if math.isnan(_value(row, m)) else f"{100 * _value(row, m):.1f}" for m in metrics
        ]
        return f"| {name} | " + " | ".join(cells) + " |"

    for cat, row in rows.items():
        lines.append(line(f"**{cat}**" if cat == MEAN_ROW else cat, row))
        for defect, defect_row in ((by_defect or {}).get(cat) or {}).items():
            lines.append(line(f"{cat}: {defect}", defect_row))
    return "\n".join(lines) + "\n"


def write_metrics(
    results: Results, outdir: str | os.PathLike, *, by_defect: Mapping[str, Results] | None = None
) -> dict[str, pathlib.Path]:
    """Writes ``metrics.json``, ``metrics.csv`` and ``metrics.md`` into ``outdir``.

    JSON and CSV hold the fractions at full precision (NaN as null / empty), including the mean
    row; the markdown is :func:`markdown_table`. ``by_defect`` (category -> defect type ->
    metrics) goes into the JSON under ``"by_defect_type"`` and into the markdown's rows.

    Returns:
      {"json": path, "csv": path, "markdown": path}.
    """
    outdir = pathlib.Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rows = _with_mean(results)
    paths = {
        "json": outdir / "metrics.json",
        "csv": outdir / "metrics.csv",
        "markdown": outdir / "metrics.md",
    }
    as_json: dict = {
        c: {m: (None if math.isnan(v) else v) for m, v in r.items()} for c, r in rows.items()
    }
    if by_defect:
        as_json[BY_DEFECT_KEY] = {
            c: {
                d: {m: (None if math.isnan(_value(r, m)) else _value(r, m)) for m in r}
                for d, r in defects.items()
            }
            for c, defects in by_defect.items()
        }
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    metrics = columns(results)
    writer.writerow(["category", *metrics])
    for c, r in rows.items():
        writer.writerow([c, *("" if math.isnan(r[m]) else repr(r[m]) for m in metrics)])
    texts = {
        "json": json.dumps(as_json, indent=2) + "\n",
        "csv": table.getvalue(),
        "markdown": markdown_table(results, by_defect),
    }
    # All three composed first, then each through a temporary file and a rename: a failure or
    # a kill never leaves a truncated table.
    for kind, text in texts.items():
        atomic_write_text(paths[kind], text)
    return paths


def read_metrics_json(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Reads ``metrics.json``'s category rows back (null -> NaN), mean row included (the
    per-defect-type rows under ``"by_defect_type"`` are left out).

    Raises:
      ValueError: the file is not valid JSON (the message names it and how to rewrite it).
    """
    try:
        raw = json.loads(pathlib.Path(path).read_text())
    except ValueError as e:
        raise ValueError(
            f"{path} is damaged ({e}); rewrite it with python -m launch.evaluate --workdir=<the "
            "run directory> --step=<its step>."
        ) from None
    return {
        c: {m: float("nan") if v is None else float(v) for m, v in r.items()}
        for c, r in raw.items()
        if c != BY_DEFECT_KEY
    }


def fit_to(array: np.ndarray, shape: tuple[int, int], *, nearest: bool) -> np.ndarray:
    """``array`` [h, w] resized to ``shape`` (nearest or bilinear), as float32."""
    array = np.asarray(array, dtype=np.float32)
    if array.shape == shape:
        return array
    method = Image.NEAREST if nearest else Image.BILINEAR
    img = Image.fromarray(array, mode="F").resize((shape[1], shape[0]), method)
    return np.asarray(img, dtype=np.float32)


def save_heatmap_figure(
    images: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray | Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    max_images: int = 8,
    alpha: float = 0.5,
    cmap: str = "jet",
    titles: list[str] | None = None,
    scores: Mapping[str, np.ndarray] | None = None,
    thresholds: Mapping[str, float] | None = None,
    labels: np.ndarray | None = None,
) -> pathlib.Path:
    """Saves a figure like the paper's Fig. 6/7: columns = images; rows = image, ground truth,
    then one heatmap overlay per method (or run).

    Masks and maps are resized to each image's size (nearest / bilinear) when they differ. Each
    row's maps share one colour scale (min-max over the images shown), drawn as a colour bar, so
    columns are comparable.

    Args:
      images: [N, H, W, 3] float in [0, 1].
      masks: [N, h, w] bool ground truth (any size; a list of arrays also works).
      maps: [N, h', w'] anomaly maps, or {row label: [N, h', w']} for several heatmap rows.
      path: output PNG path.
      max_images: at most this many columns (the first ones).
      alpha: heatmap opacity over the image.
      cmap: matplotlib colormap of the heatmap.
      titles: optional column titles (e.g. file names).
      scores: optional {row label: [N] image scores}, printed under each heatmap.
      thresholds: optional {row label: image threshold}: the row's label shows it and each
        image's score is marked with its decision (``score >= threshold``: anomalous), in red
        where ``labels`` says the decision is wrong.
      labels: optional [N] ground truth (0 normal, 1 anomalous) the decisions are checked with.

    Returns:
      The written path.
    """
    rows = dict(maps) if isinstance(maps, Mapping) else {"heatmap": maps}
    n = min(len(images), max_images)
    if n == 0:
        raise ValueError("save_heatmap_figure: no images to draw.")
    for name, m in rows.items():
        if len(m) < n or len(masks) < n:
            raise ValueError(f"save_heatmap_figure: {name} has fewer maps/masks than images.")
    nrows = 2 + len(rows)
    # A bare Figure renders with the Agg canvas: no pyplot, no global backend change, no display.
    fig = Figure(figsize=(1.9 * n + 1.2, 2.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, n, squeeze=False)
    for j in range(n):
        image = np.clip(np.asarray(images[j], np.float32), 0, 1)
        hw = image.shape[:2]
        axes[0, j].imshow(image)
        axes[1, j].imshow(fit_to(masks[j], hw, nearest=True), cmap="gray", vmin=0, vmax=1)
        if titles is not None:
            axes[0, j].set_title(titles[j], fontsize=7)
    for i, (name, m) in enumerate(rows.items(), start=2):
        fitted = [fit_to(m[j], images[j].shape[:2], nearest=False) for j in range(n)]
        lo = min(float(f.min()) for f in fitted)
        hi = max(max(float(f.max()) for f in fitted), lo + 1e-12)
        shown = None
        for j in range(n):
            axes[i, j].imshow(np.clip(np.asarray(images[j], np.float32), 0, 1))
            shown = axes[i, j].imshow(fitted[j], cmap=cmap, alpha=alpha, vmin=lo, vmax=hi)
            if scores is not None and name in scores:
                value = float(scores[name][j])
                limit = (thresholds or {}).get(name)
                truth = None if labels is None else bool(labels[j])
                text, color = decision_caption(value, limit, truth)
                axes[i, j].set_xlabel(text, fontsize=7, color=color)
        limit = (thresholds or {}).get(name)
        row_label = name if limit is None else f"{name}\nthreshold {limit:.3g}"
        axes[i, 0].set_ylabel(row_label, fontsize=8)
        fig.colorbar(shown, ax=list(axes[i, :]), shrink=0.9, pad=0.01).ax.tick_params(labelsize=6)
    axes[0, 0].set_ylabel("image", fontsize=8)
    axes[1, 0].set_ylabel("ground truth", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def write_png(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> pathlib.Path:
    """Renders ``fig`` as a PNG and writes it atomically (never a truncated image)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def decision_caption(score: float, threshold: float | None, truth: bool | None) -> tuple[str, str]:
    """What the heatmap figure writes under an image: its score and, with a threshold, the
    decision (``score >= threshold``: anomalous, as :mod:`wdam_jax.thresholds`) and whether the
    ground truth ``truth`` (True: anomalous) agrees; returns ``(text, colour)``, red if wrong."""
    text = f"score {score:.3g}"
    if threshold is None:
        return text, "black"
    anomalous = score >= threshold
    text += f" {'>=' if anomalous else '<'} thr\n-> {'anomalous' if anomalous else 'normal'}"
    if truth is not None and truth != anomalous:
        return text + " (wrong)", "red"
    return text, "black"


def figure_selection(
    labels: np.ndarray,
    count: int,
    *,
    scores: np.ndarray | None = None,
    defect_types: list[str] | None = None,
) -> np.ndarray:
    """Indices of up to ``count`` images to draw.

    Without ``scores``: defective ones and about a quarter normal ones (at least one of each
    when both exist), each group in its original order.

    With ``scores`` and ``defect_types`` ([N] each): every group (each defect type, and the
    normal images) in turn gives its highest-scored image not yet shown, then in the next
    round (normal images first) its lowest-scored one, and so on: each defect type and the
    normal images appear, with the likeliest misses (a defect's lowest score) and false alarms
    (a normal image's highest) among them. Returned grouped by defect type (normal last),
    highest score first.
    """
    labels = np.asarray(labels)
    if scores is None or defect_types is None:
        bad, good = np.flatnonzero(labels != 0), np.flatnonzero(labels == 0)
        n_good = min(len(good), max(1 if len(bad) else count, count // 4))
        n_bad = min(len(bad), count - n_good)
        n_good = min(len(good), count - n_bad)
        return np.concatenate([bad[:n_bad], good[:n_good]]).astype(int)
    scores = np.asarray(scores, np.float64)
    kinds = [str(d) if labels[i] != 0 else "good" for i, d in enumerate(defect_types)]
    groups = sorted({k for k in kinds if k != "good"}) + (["good"] if "good" in kinds else [])
    queues = {}
    for group in groups:
        ranked = sorted((i for i, k in enumerate(kinds) if k == group), key=lambda i: -scores[i])
        queue = []  # highest, lowest, second highest, second lowest, ...
        while ranked:
            queue.append(ranked.pop(0))
            if ranked:
                queue.append(ranked.pop())
        queues[group] = queue
    chosen: list[int] = []
    # Round 1 in the groups' order; later rounds start with the normal images, so that their
    # lowest score is shown before a defect type's second image.
    rounds = [groups, sorted(groups, key=lambda g: g != "good")]
    while len(chosen) < min(count, len(labels)):
        for group in rounds[bool(chosen)]:
            if queues[group] and len(chosen) < count:
                chosen.append(queues[group].pop(0))
    order = {g: n for n, g in enumerate(groups)}
    return np.asarray(sorted(chosen, key=lambda i: (order[kinds[i]], -scores[i])), int)


def save_curves_figure(
    curves: Mapping[str, list[tuple[int, float]]],
    path: str | os.PathLike,
    *,
    names: tuple[str, ...] | None = None,
) -> pathlib.Path:
    """Draws logged scalars against the training step, one panel per scalar.

    Args:
      curves: name -> [(step, value), ...] (``wdam_jax.train.read_train_log``).
      path: output PNG path.
      names: which scalars, in order (default: every one except the gradient norm and flags,
        validation and test scalars first).

    Returns:
      The written path.
    """
    if names is None:
        hidden = ("grad_norm", "wdam_on")
        shown = [k for k in curves if k not in hidden]
        names = tuple(sorted(shown, key=lambda k: ("/" not in k, k)))
    names = tuple(n for n in names if curves.get(n))
    if not names:
        raise ValueError("save_curves_figure: no scalars to draw.")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.0 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        steps, values = zip(*curves[name], strict=True)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if "auroc" in name:  # chance level dashed
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    for ax in axes.ravel()[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


# ---- experiments (rows x categories x seeds, beside the paper's values)


def _experiment_cell(cell: Mapping[str, Any]) -> str:
    if cell["mean"] is None:
        return "-"
    if cell["n"] > 1:
        return f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    return f"{cell['mean']:.2f}"


def _paper_cell(cell: Mapping[str, Any]) -> str:
    return "" if cell["paper"] is None else f"{cell['paper']:.2f}"


def experiment_markdown(results: Mapping[str, Any]) -> str:
    """An experiment's results (:func:`wdam_jax.experiment.aggregate`) as markdown: one table
    per section and metric, categories down, each row's ours and the paper's across."""
    seeds = ", ".join(map(str, results["seeds"]))
    lines = [
        f"# {results['table']}: ours (mean ± std over seeds {seeds}) and the paper's",
        "",
        f"{results['finished']}/{results['runs']} runs finished.",
    ]
    if results["missing"]:
        lines.append(f"Not finished (shown as -): {', '.join(results['missing'])}.")
    chosen = [
        f"{row['label']} ({', '.join(row['selected_on'])})"
        for rows in results["sections"].values()
        for row in rows.values()
        if row.get("selected_on")
    ]
    if chosen:
        lines.append(
            "Scored from the validation-selected checkpoint (train.select_metric; validation on "
            f"held-out training images, never the test split): {'; '.join(chosen)}. Other rows: "
            "the final checkpoint."
        )
    for section, rows in results["sections"].items():
        categories = list(next(iter(rows.values()))["cells"])
        for metric in results["metrics"]:
            lines += ["", f"## {section}: {METRIC_TITLES.get(metric, metric)} (%)", ""]
            header = ["Category"]
            for row in rows.values():
                header += [row["label"], f"{row['label']} (paper)"] if row["paper_column"] else [
                    row["label"]]  # fmt: skip
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|---|" + "---:|" * (len(header) - 1))
            for category in categories:
                cells = []
                for row in rows.values():
                    cell = row["cells"].get(category, {}).get(metric)
                    if cell is None:
                        cells += ["", ""] if row["paper_column"] else [""]
                        continue
                    cells.append(_experiment_cell(cell))
                    if row["paper_column"]:
                        cells.append(_paper_cell(cell))
                name = f"**{category}**" if category == MEAN_ROW else category
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def experiment_csv(results: Mapping[str, Any]) -> str:
    """An experiment's results as CSV: one line per section, row, category and metric."""
    out = ["section,row,label,category,metric,mean,std,n_seeds,paper"]
    for section, rows in results["sections"].items():
        for slug, row in rows.items():
            for category, metrics in row["cells"].items():
                for metric, cell in metrics.items():
                    fields = [section, slug, row["label"], category, metric]
                    fields = [f'"{f}"' if "," in f else f for f in fields]
                    nums = [cell["mean"], cell["std"], cell["n"], cell["paper"]]
                    out.append(",".join(fields + ["" if v is None else repr(v) for v in nums]))
    return "\n".join(out) + "\n"
