"""Table 10: the sub-band weights ``A_w`` (eq. 7) each WDAM module gives a run's test images.

Works for every method with WDAM (CutPaste, DRAEM, PatchCore's WDAM member) without knowing
which: the WDAM modules are found in the restored model by type (``nnx.iter_graph``), and the
method's own scoring function (``Method.inference_fn``, the contract's pure form of ``score``)
runs the test images, so each module sees exactly the features it sees when the run is evaluated
(CutPaste's stage gate set from the step, DRAEM's reconstructive encoder, PatchCore's member).
Each WDAM reports its weights through its ``on_weights`` hook (``jax.debug.callback``).

Outputs, in ``<workdir>/analysis/`` (or another folder), written atomically:

- ``subband_weights.md`` / ``.csv`` / ``.json``: mean and standard deviation (over images,
  ``ddof=0``) of each module's LL, LH, HL, HH weight, over the normal test images, the anomalous
  ones, and all of them;
- ``subband_weights.npz``: the per-image weights (``modules``, ``weights [M, N, 4]``, ``labels``,
  ``paths``, ``image_scores``);
- ``subband_weights.png``: a bar chart, one panel per module, normal vs anomalous, with the
  standard deviation as error bars.

:func:`write_table10` puts several runs (one per category) in the paper's layout: rows LL, LH,
HL, HH; one column per category; each cell the modules' means over all test images, in order.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import pathlib
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from matplotlib.figure import Figure

from wdam_jax import reporting, runs
from wdam_jax.checkpoints import atomic_write_bytes, atomic_write_text
from wdam_jax.data import pipeline, sources
from wdam_jax.errors import UserError
from wdam_jax.methods.base import describe
from wdam_jax.progress import Progress
from wdam_jax.wdam import SUBBANDS, WDAM, SubbandWeights

ANALYSIS_DIR = "analysis"
STEM = "subband_weights"
GROUPS = ("normal", "anomalous", "all")


@dataclasses.dataclass(frozen=True)
class RunWeights:
    """The sub-band weights of one run's test images.

    Attributes:
      workdir: the run directory.
      label: the run's short name (``describe(config)["label"]``, e.g. ``cutpaste+wdam1``).
      category: the test split's category.
      step: the checkpoint step.
      paths: ``N`` test image paths, relative to the dataset root.
      labels: ``[N]`` 0 = normal, 1 = anomalous.
      weights: module path (``backbone.layer1.0.wdam.wdam``) -> ``[N, 4]`` (LL, LH, HL, HH), in
        the order the modules appear in the model.
      image_scores: ``[N]`` the run's image scores of the same forward.
    """

    workdir: str
    label: str
    category: str
    step: int
    paths: list[str]
    labels: np.ndarray
    weights: dict[str, np.ndarray]
    image_scores: np.ndarray


def wdam_modules(model: nnx.Module) -> dict[str, WDAM]:
    """Every :class:`WDAM` in ``model`` by its path (``"."``-joined), in graph order."""
    return {
        ".".join(map(str, path)): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, WDAM)
    }


def _switched_off(model: nnx.Module, modules: Sequence[str]) -> list[str]:
    """Scalar non-trained variables equal to 0 in a module enclosing a WDAM: a gate that keeps
    WDAM out of the network (CutPaste before the stage WDAM enters)."""
    off = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Variable) or isinstance(
            node, nnx.Param | nnx.BatchStat | SubbandWeights
        ):
            continue
        value = np.asarray(node.get_value())
        owner = ".".join(map(str, path[:-1])) + "."
        if value.shape == () and value == 0 and any(m.startswith(owner) for m in modules):
            off.append(".".join(map(str, path)))
    return off


def _append(sink: list[np.ndarray], weights) -> None:
    sink.append(np.asarray(weights))


def collect(
    run: runs.Restored, images: np.ndarray, *, batch_size: int, name: str = "the run"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Runs the method's scoring function over ``images`` and records every WDAM's weights.

    Args:
      run: a restored run.
      images: ``[N, S, S, 3]`` in [0, 1].
      batch_size: images per call (the last batch is padded and the padding dropped).
      name: the run's name in messages (its workdir).

    Returns:
      ``({module path: [N, 4]}, image_scores [N])``.

    Raises:
      UserError: the run has no WDAM, its method has no pure scoring function, or WDAM is
        switched off at this step.
    """
    modules = wdam_modules(run.model)
    workdir = name
    if not modules:
        raise UserError(
            f"{workdir} ({describe(run.config)['label']}) has no WDAM module, so there are no "
            "sub-band weights to collect. Table 10 needs a run with WDAM: CutPaste with "
            "model.wdam_layers, DRAEM with model.wdam_blocks, or PatchCore with a WDAM member."
        )
    received: dict[str, list[np.ndarray]] = {path: [] for path in modules}
    for path, module in modules.items():
        module.on_weights = functools.partial(_append, received[path])
    try:
        try:  # built after the hooks are set: the function splits the model it closes over
            fn = run.method.inference_fn(run.model, run.fitted, step=run.step)
        except NotImplementedError as e:
            raise UserError(f"{workdir}: {e} The sub-band weights are read through it.") from None
        off = _switched_off(run.model, list(modules))
        if off:
            raise UserError(
                f"{workdir} at step {run.step}: WDAM is switched off ({', '.join(off)} = 0): it "
                "enters the network at a later stage of training, so its weights do nothing "
                "yet. Pass --step=<a checkpoint after WDAM entered>, or the final one."
            )
        fn = jax.jit(fn)

        def batch(chunk: np.ndarray):
            for sink in received.values():
                sink.clear()
            scores = np.asarray(fn(chunk)[0])
            jax.effects_barrier()  # every callback of this call has run
            per_module = []
            for path, sink in received.items():
                if len(sink) > 1:
                    raise RuntimeError(f"WDAM {path} ran {len(sink)} times in one forward.")
                per_module.append(sink[0] if sink else np.full((len(chunk), 4), np.nan))
            return (scores, *per_module)

        progress = Progress(f"{name} WDAM weights", len(images), unit="images")
        scores, *weights = pipeline.map_batches(
            batch, images, batch_size=batch_size, progress=progress
        )
    finally:
        for module in modules.values():
            module.on_weights = None
    out = {}
    for path, w in zip(modules, weights, strict=True):
        if np.isnan(w).all():  # not on the scoring path
            logging.warning("WDAM %s is not used by %s's scoring: left out.", path, workdir)
            continue
        out[path] = w.astype(np.float64)
    return out, scores


def run_weights(workdir: str | pathlib.Path, *, step: int | None = None) -> RunWeights:
    """Restores ``workdir`` and collects the sub-band weights of its category's test split."""
    run = runs.restore(workdir, step=step)
    config = run.config
    split = sources.load_split(config.data, split="test")
    weights, scores = collect(
        run, split.images, batch_size=config.score.eval_batch_size, name=str(workdir)
    )
    return RunWeights(
        workdir=str(workdir),
        label=describe(config)["label"],
        category=config.data.category,
        step=run.step,
        paths=list(split.paths),
        labels=np.asarray(split.labels),
        weights=weights,
        image_scores=np.asarray(scores),
    )


def summarise(weights: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    """``{group: {"n", "mean": [4], "std": [4]}}`` of one module's ``[N, 4]`` weights, for the
    normal (label 0), anomalous (label 1) and all images; a group without images is NaN."""
    out = {}
    for group in GROUPS:
        keep = {"normal": labels == 0, "anomalous": labels != 0, "all": np.ones_like(labels, bool)}
        rows = weights[keep[group]]
        n = len(rows)
        out[group] = {
            "n": n,
            "mean": rows.mean(axis=0) if n else np.full(4, np.nan),
            "std": rows.std(axis=0) if n else np.full(4, np.nan),
        }
    return out


def _cell(mean: float, std: float) -> str:
    return "-" if np.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def markdown(result: RunWeights) -> str:
    """One table: a row per module and image group, ``mean ± std`` per sub-band."""
    lines = [
        f"Sub-band weights of {result.label}, {result.category}, step {result.step} "
        f"({result.workdir}); mean ± std over test images.",
        "",
        "| module | images | n | " + " | ".join(SUBBANDS) + " |",
        "|---|---|---:|" + "---:|" * len(SUBBANDS),
    ]
    for module, w in result.weights.items():
        for group, s in summarise(w, result.labels).items():
            cells = [_cell(m, d) for m, d in zip(s["mean"], s["std"], strict=True)]
            lines.append(f"| {module} | {group} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def as_json(result: RunWeights) -> dict:
    modules = {}
    for module, w in result.weights.items():
        modules[module] = {
            group: {
                "n": s["n"],
                "mean": dict(zip(SUBBANDS, map(_number, s["mean"]), strict=True)),
                "std": dict(zip(SUBBANDS, map(_number, s["std"]), strict=True)),
            }
            for group, s in summarise(w, result.labels).items()
        }
    return {
        "workdir": result.workdir,
        "label": result.label,
        "category": result.category,
        "step": result.step,
        "std": "population (ddof=0) over images",
        "modules": modules,
    }


def csv_text(results: Sequence[RunWeights]) -> str:
    """Long form: one line per run, module, group and sub-band."""
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["category", "run", "step", "module", "images", "n", "subband", "mean", "std"])
    for r in results:
        for module, w in r.weights.items():
            for group, s in summarise(w, r.labels).items():
                for k, band in enumerate(SUBBANDS):
                    mean, std = s["mean"][k], s["std"][k]
                    writer.writerow([
                        r.category, r.label, r.step, module, group, s["n"], band,
                        "" if np.isnan(mean) else repr(float(mean)),
                        "" if np.isnan(std) else repr(float(std)),
                    ])  # fmt: skip
    return table.getvalue()


def bar_chart(result: RunWeights, path: str | pathlib.Path) -> pathlib.Path:
    """One panel per module: LL, LH, HL, HH, normal vs anomalous mean with std error bars."""
    modules = list(result.weights)
    fig = Figure(figsize=(3.2 * len(modules) + 0.6, 3.0), layout="constrained")
    axes = fig.subplots(1, len(modules), squeeze=False)[0]
    x = np.arange(len(SUBBANDS))
    for ax, module in zip(axes, modules, strict=True):
        stats = summarise(result.weights[module], result.labels)
        for offset, group, colour in ((-0.2, "normal", "tab:blue"), (0.2, "anomalous", "tab:red")):
            s = stats[group]
            if s["n"]:
                ax.bar(x + offset, s["mean"], 0.4, yerr=s["std"], capsize=2, color=colour,
                       label=f"{group} ({s['n']})")  # fmt: skip
        ax.set_xticks(x, SUBBANDS)
        ax.set_ylim(0, 1.05)
        ax.set_title(module, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("weight $A_w$")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result.label} {result.category}, step {result.step}", fontsize=9)
    return reporting.write_png(fig, path)


def write(result: RunWeights, outdir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Writes ``subband_weights.{md,csv,json,npz,png}`` of one run into ``outdir``."""
    outdir = pathlib.Path(outdir)
    paths = {kind: outdir / f"{STEM}.{kind}" for kind in ("md", "csv", "json", "npz", "png")}
    atomic_write_text(paths["md"], markdown(result))
    atomic_write_text(paths["csv"], csv_text([result]))
    atomic_write_text(paths["json"], json.dumps(as_json(result), indent=2) + "\n")
    buffer = io.BytesIO()
    np.savez(
        buffer,
        modules=np.asarray(list(result.weights)),
        weights=np.stack(list(result.weights.values())),
        labels=result.labels,
        paths=np.asarray(result.paths),
        image_scores=result.image_scores,
    )
    atomic_write_bytes(paths["npz"], buffer.getvalue())
    bar_chart(result, paths["png"])
    return paths


def table10(results: Sequence[RunWeights]) -> dict[str, dict[str, list[float]]]:
    """The paper's layout: ``{column: {sub-band: [mean of module 1, module 2, ...]}}`` over all
    test images; the column is the category (``category (run)`` when categories repeat)."""
    categories = [r.category for r in results]
    out: dict[str, dict[str, list[float]]] = {}
    for r in results:
        column = r.category if categories.count(r.category) == 1 else f"{r.category} ({r.label})"
        if column in out:
            raise UserError(
                f"Two runs give the Table 10 column {column!r}: {r.workdir} and another."
            )
        means = [summarise(w, r.labels)["all"]["mean"] for w in r.weights.values()]
        out[column] = {band: [float(m[k]) for m in means] for k, band in enumerate(SUBBANDS)}
    return out


def write_table10(
    results: Sequence[RunWeights], outdir: str | pathlib.Path
) -> dict[str, pathlib.Path]:
    """Writes ``table10.{md,json}`` (the paper's layout) and ``table10.csv`` (long form, every
    run, module, image group and sub-band) into ``outdir``."""
    outdir = pathlib.Path(outdir)
    table = table10(results)
    columns = list(table)
    lines = [
        "Mean WDAM sub-band weights over all test images; each cell lists the modules in order.",
        "",
        "| Sub-band | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for band in SUBBANDS:
        cells = [",".join(f"{v:.2f}" for v in table[c][band]) for c in columns]
        lines.append(f"| {band} | " + " | ".join(cells) + " |")
    paths = {kind: outdir / f"table10.{kind}" for kind in ("md", "csv", "json")}
    atomic_write_text(paths["md"], "\n".join(lines) + "\n")
    atomic_write_text(paths["csv"], csv_text(results))
    document = {
        "columns": {
            c: {"workdir": r.workdir, "run": r.label, "step": r.step, "modules": list(r.weights)}
            for c, r in zip(columns, results, strict=True)
        },
        "means_all_images": table,
    }
    atomic_write_text(paths["json"], json.dumps(document, indent=2) + "\n")
    return paths


def analyse(
    workdirs: Sequence[str | pathlib.Path],
    *,
    out: str | pathlib.Path | None = None,
    step: int | None = None,
) -> list[RunWeights]:
    """Collects and writes the sub-band weights of each run into ``<workdir>/analysis/`` (one
    run: ``out`` if given), and with several runs ``table10.*`` into ``out``.

    Args:
      workdirs: training run directories (one per category for Table 10).
      out: the one run's output folder, or the several runs' Table 10 folder (required then).
      step: checkpoint step (default: each run's newest).

    Returns:
      The weights of each run.
    """
    if not workdirs:
        raise UserError("No run given: pass --workdir=<run> or --workdirs=<run>,<run>,...")
    if len(workdirs) > 1 and out is None:
        raise UserError("Several runs need --out=<folder> for their Table 10.")
    results = []
    for workdir in workdirs:
        result = run_weights(workdir, step=step)
        single = out is not None and len(workdirs) == 1
        paths = write(result, out if single else pathlib.Path(workdir) / ANALYSIS_DIR)
        print(markdown(result), flush=True)
        logging.info("Sub-band weights of %s written to %s.", workdir, paths["md"])
        results.append(result)
    if len(results) > 1:
        paths = write_table10(results, out)
        print(paths["md"].read_text(), flush=True)
    return results
