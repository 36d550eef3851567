"""A paper table as one command: rows x categories x seeds of ordinary runs, then one table.

An experiment config (``configs/experiments/<table>.py``) names the table's rows, each a run
config spec (``"cutpaste_wdam"``, ``"wdam_layers:2,demo"``: ``configs.<module>.get_config(arg)``),
the categories, the seeds and overrides (dotted field -> value) applied to every run, then the
row's own. String override values may hold ``{workdir}`` (the experiment's), ``{category}`` and
``{seed}``, so Table 6's WDAM member can name ``{workdir}/cutpaste_wdam/{category}/seed{seed}``.

:func:`expand` turns it into :class:`Run` s, each an ordinary run directory
``<workdir>/<row>/<category>/seed<k>`` (``python -m launch.evaluate --workdir=...`` reads it).
:func:`run_experiment` runs the unfinished ones in order (rows in the listed order, so a row that
depends on another runs after it), marks each finished one with ``done.json`` (written atomically
after ``train_and_evaluate`` returns, so a killed run is resumed, not skipped), and
:func:`write_results` aggregates whatever is finished into ``<workdir>/results.{md,csv,json}``
beside the paper's published numbers (``config.paper_values``: JSON transcribed from the paper).
A run whose method selects a checkpoint on validation data (``train.select_metric``: DRAEM) is
scored from that checkpoint, not the final one; ``done.json`` records which, and ``results.md``
names the rows so scored (``python -m launch.evaluate --checkpoint=best`` re-scores one).

Sharding: runs are grouped so that a run and the runs it depends on (``depends_on`` rows, same
category and seed) form one group; groups are dealt to shards round-robin, so shards are disjoint
and a dependent row never waits for another machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from wdam_jax import checkpoints, report, reporting, runlock
from wdam_jax import evaluate as evaluate_lib
from wdam_jax.errors import ConfigError, InputsError, check_config_variant
from wdam_jax.methods import registry
from wdam_jax.progress import Progress

DONE_FILE = "done.json"
EXPERIMENT_FILE = "experiment.json"
RESULTS_STEM = "results"
MEAN = reporting.MEAN_ROW
PLACEHOLDERS = ("workdir", "category", "seed")


@dataclasses.dataclass(frozen=True)
class Run:
    """One row x category x seed: an ordinary run directory."""

    row: str
    category: str
    seed: int
    workdir: pathlib.Path
    group: int  # runs of one group (a run and what it depends on) share a shard

    @property
    def name(self) -> str:
        return f"{self.row}/{self.category}/seed{self.seed}"


def load_run_config(spec: str) -> ml_collections.ConfigDict:
    """``"module[:arg]"`` -> ``configs.<module>.get_config(arg)`` (arg None when absent)."""
    module, _, arg = spec.partition(":")
    try:
        mod = importlib.import_module(f"configs.{module}")
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"Run config {spec!r}: no module configs/{module.replace('.', '/')}.py ({e}). "
            "Use the name of a file in configs/ (e.g. 'cutpaste_wdam' or 'wdam_layers:2')."
        ) from e
    check_config_variant(
        f"configs/{module.replace('.', '/')}.py", getattr(mod, "VARIANTS", None), arg
    )
    return mod.get_config(arg or None)


def _rows(config: ml_collections.ConfigDict) -> list[str]:
    """Row slugs in run order, checked against ``config.rows``."""
    order = list(config.order)
    unknown = [r for r in order if r not in config.rows]
    if unknown or len(set(order)) != len(order) or not order:
        raise ConfigError(
            f"config.order={tuple(order)}: every entry must be a distinct key of config.rows "
            f"({', '.join(sorted(config.rows.keys()))}); unknown: {unknown}."
        )
    for i, slug in enumerate(order):
        for dep in config.rows[slug].depends_on:
            if dep not in order[:i]:
                raise ConfigError(
                    f"config.rows.{slug}.depends_on names {dep!r}, which must be in config.order "
                    f"before {slug!r} (it runs first); config.order is {tuple(order)}."
                )
    return order


def row_categories(config: ml_collections.ConfigDict, slug: str) -> tuple[str, ...]:
    """The row's own categories, else the experiment's."""
    return tuple(config.rows[slug].categories) or tuple(config.categories)


def expand(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> list[Run]:
    """Every run of the experiment, rows in ``config.order``, then categories, then seeds."""
    workdir = pathlib.Path(workdir)
    order = _rows(config)
    # Rows linked by depends_on form one component; a component's runs of one category and seed
    # form one shard group.
    component = {slug: slug for slug in order}

    def root(slug: str) -> str:
        while component[slug] != slug:
            slug = component[slug]
        return slug

    for slug in order:
        for dep in config.rows[slug].depends_on:
            component[root(slug)] = root(dep)
    groups: dict[tuple[str, str, int], int] = {}
    runs = []
    for slug in order:
        for category in row_categories(config, slug):
            for seed in config.seeds:
                key = (root(slug), category, int(seed))
                group = groups.setdefault(key, len(groups))
                path = workdir / slug / category / f"seed{int(seed)}"
                runs.append(Run(slug, category, int(seed), path, group))
    return runs


def shard(runs: Sequence[Run], shard_index: int, num_shards: int) -> list[Run]:
    """The runs of one shard: groups dealt round-robin, order kept."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(
            f"--shard_index={shard_index} --num_shards={num_shards}: need 0 <= shard_index < "
            "num_shards."
        )
    return [r for r in runs if r.group % num_shards == shard_index]


def _substitute(value: Any, run: Run, experiment_workdir: pathlib.Path) -> Any:
    if isinstance(value, str):
        subs = {"workdir": str(experiment_workdir), "category": run.category, "seed": str(run.seed)}
        for key in PLACEHOLDERS:
            value = value.replace("{" + key + "}", subs[key])
        return value
    if isinstance(value, list):
        return tuple(value)
    return value


def _set(config: ml_collections.ConfigDict, field: str, value: Any, *, where: str) -> None:
    node, walked = config, []
    keys = field.split(".")
    for key in keys:
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean {'.'.join([*walked, near[0]])}?" if near else ""
            raise ConfigError(f"{where}: the run config has no field {field!r}.{hint}")
        if key != keys[-1]:
            node = node[key]
            walked.append(key)
    try:
        node[keys[-1]] = value
    except TypeError as e:
        raise ConfigError(f"{where}: {field}={value!r} has the wrong type ({e}).") from e


def run_config(
    config: ml_collections.ConfigDict, run: Run, experiment_workdir: str | pathlib.Path
) -> ml_collections.ConfigDict:
    """The run's config: the row's spec, the experiment's overrides, the row's, category, seed."""
    experiment_workdir = pathlib.Path(experiment_workdir).absolute()
    row = config.rows[run.row]
    out = load_run_config(row.config)
    for where, overrides in (("config.overrides", config.overrides), (
        f"config.rows.{run.row}.overrides", row.overrides)):  # fmt: skip
        for field, value in checkpoints.flatten(overrides.to_dict()).items():
            _set(out, field, _substitute(value, run, experiment_workdir), where=f"{where}.{field}")
    out.data.category = run.category
    out.seed = run.seed
    return out


def _check_done(run: Run, config: ml_collections.ConfigDict) -> None:
    """A finished run must have been made with the config it would be made with now."""
    recorded = json.loads((run.workdir / checkpoints.CONFIG_FILE).read_text())
    changed = [
        k
        for k in checkpoints.config_changes(recorded, json.loads(config.to_json()))
        if not k.startswith(checkpoints.RESUMABLE_PREFIXES)
    ]
    if changed:
        raise checkpoints.ConfigMismatchError(
            f"{run.workdir} is a finished run made with another config (fields: "
            f"{', '.join(changed)}). Use a new --workdir for the changed experiment, or delete "
            f"{run.workdir} to redo that run."
        )


def is_done(run: Run) -> bool:
    return (run.workdir / DONE_FILE).is_file()


def run_experiment(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
) -> dict[str, Any]:
    """Runs the shard's unfinished runs in order, then writes the aggregated results.

    Returns:
      The aggregated results (:func:`aggregate`).
    """
    workdir = pathlib.Path(workdir)
    runs = shard(expand(config, workdir), shard_index, num_shards)
    configs = {run: run_config(config, run, workdir) for run in runs}  # every error up front
    done = [r for r in runs if is_done(r)]
    for run in done:
        _check_done(run, configs[run])
    # Inputs of every pending run at once (a missing FMAS shard is found before hours of
    # training). A row that depends on another reads that row's runs, which may not exist yet.
    problems = [
        f"{run.name}: {problem}"
        for run in runs
        if run not in done and not config.rows[run.row].depends_on
        for problem in registry.get_method(configs[run]).check_inputs()
    ]
    if problems:
        raise InputsError(problems, what=f"{config.table} in {workdir}")
    checkpoints.atomic_write_text(workdir / EXPERIMENT_FILE, config.to_json(indent=2))
    what = f"{config.table} shard {shard_index}/{num_shards}"
    progress = Progress(what, len(runs), unit="runs", every=0, done=len(done))
    progress.update(len(done), f"({len(done)} finished before)", force=True)
    count = len(done)
    for run in runs:
        if is_done(run):
            continue
        for dep in config.rows[run.row].depends_on:
            needed = dataclasses.replace(run, row=dep, workdir=workdir / dep / run.category /
                                         f"seed{run.seed}")  # fmt: skip
            if not is_done(needed):
                raise ConfigError(f"{run.name} depends on {needed.name}, which is not finished.")
        logging.info("%s: starting %s in %s", what, run.name, run.workdir)
        # A method that selects a checkpoint on validation data (DRAEM) is reported from it.
        best = evaluate_lib.selects_checkpoint(configs[run])
        results = evaluate_lib.train_and_evaluate(configs[run], run.workdir, best=best)
        record = {
            "row": run.row,
            "category": run.category,
            "seed": run.seed,
            "config": config.rows[run.row].config,
            "checkpoint": _checkpoint_record(run.workdir, best=best),
            "metrics": results[run.category],
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        checkpoints.atomic_write_text(run.workdir / DONE_FILE, json.dumps(record, indent=2) + "\n")
        count += 1
        progress.update(count, run.name)
    return write_results(config, workdir)


def _checkpoint_record(workdir: pathlib.Path, *, best: bool) -> dict[str, Any]:
    """Which checkpoint a finished run's metrics come from (``done.json``'s ``checkpoint``)."""
    if not best:
        return {"which": "final"}
    selected = json.loads((workdir / checkpoints.BEST_RECORD).read_text())
    return {"which": "best", **selected}  # metric, value, step


def _load_paper(config: ml_collections.ConfigDict) -> dict[str, Any]:
    if not config.paper_values:
        return {"table": config.table, "sections": {}}
    path = pathlib.Path(config.paper_values)
    if not path.is_file():
        raise ConfigError(f"config.paper_values={path}: no such file.")
    return json.loads(path.read_text())


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) in percent."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(values, np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": len(arr)}


def aggregate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Finished runs as the paper's layout, in percent, with the paper's values beside.

    Per row and category: mean and standard deviation over the finished seeds. The mean row: per
    seed, the mean over the row's categories (only seeds with every category finished), then
    mean and standard deviation over those seeds.

    Returns:
      ``{"table", "metrics", "seeds", "runs", "finished", "missing": [run names],
      "sections": {section: {row: {"label", "paper_column",
      "cells": {category or "mean": {metric: {"mean", "std", "n", "paper"}}}}}}}``.
    """
    workdir = pathlib.Path(workdir)
    paper = _load_paper(config).get("sections", {})
    runs = expand(config, workdir)
    records = {}
    selected: dict[str, set[str]] = {}  # row -> validation metrics its checkpoints were chosen on
    for run in runs:
        if is_done(run):
            done = json.loads((run.workdir / DONE_FILE).read_text())
            records[run.row, run.category, run.seed] = done["metrics"]
            checkpoint = done.get("checkpoint", {"which": "final"})  # older runs: the final one
            if checkpoint["which"] == "best":
                selected.setdefault(run.row, set()).add(checkpoint["metric"])
    sections: dict[str, dict[str, Any]] = {}
    for slug in _rows(config):
        row = config.rows[slug]
        section = row.section or config.section
        published = paper.get(section, {}).get(row.paper_column, {}) if row.paper_column else {}
        categories = row_categories(config, slug)
        cells: dict[str, dict[str, Any]] = {}
        for category in (*categories, MEAN):
            cells[category] = {}
            for index, metric in enumerate(config.metrics):
                if category == MEAN:
                    per_seed = []
                    for seed in config.seeds:
                        vals = [records.get((slug, c, int(seed))) for c in categories]
                        if all(v is not None for v in vals):
                            per_seed.append(100 * float(np.mean([v[metric] for v in vals])))
                else:
                    per_seed = [
                        100 * float(records[slug, category, int(seed)][metric])
                        for seed in config.seeds
                        if (slug, category, int(seed)) in records
                    ]
                cell = _stats([v for v in per_seed if not math.isnan(v)])
                values = published.get(category)
                cell["paper"] = None if values is None else values[index]
                cells[category][metric] = cell
        sections.setdefault(section, {})[slug] = {
            "label": row.label,
            "paper_column": row.paper_column,
            "selected_on": sorted(selected.get(slug, ())),
            "cells": cells,
        }
    return {
        "table": config.table,
        "metrics": list(config.metrics),
        "seeds": [int(s) for s in config.seeds],
        "runs": len(runs),
        "finished": len(records),
        "missing": [r.name for r in runs if (r.row, r.category, r.seed) not in records],
        "sections": sections,
    }


def write_results(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Writes ``<workdir>/results.{md,csv,json}`` (each atomically) from the finished runs, and
    the page ``<workdir>/report.html`` (:func:`wdam_jax.report.experiment_page`).

    Shards finishing together take turns (the experiment folder's lock, waited for: the
    aggregation takes milliseconds), and each aggregates inside its turn, after its own
    ``done.json``: so the last to write has read every finished run, and the three files are
    always of one aggregation."""
    workdir = pathlib.Path(workdir)
    with runlock.hold(workdir, wait=True, what=f"the results of {workdir}"):
        results = aggregate(config, workdir)
        text = json.dumps(results, indent=2)
        checkpoints.atomic_write_text(workdir / f"{RESULTS_STEM}.json", text)
        csv_text = reporting.experiment_csv(results)
        checkpoints.atomic_write_text(workdir / f"{RESULTS_STEM}.csv", csv_text)
        table = reporting.experiment_markdown(results)
        checkpoints.atomic_write_text(workdir / f"{RESULTS_STEM}.md", table)
        page = report.experiment_page(workdir)
    print(f"\n{table}\n({workdir / RESULTS_STEM}.{{md,csv,json}}, {page})", flush=True)
    return results
