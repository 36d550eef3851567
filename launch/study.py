"""The small Table 3 / Table 5 studies on the demo data: rows x categories x seeds, mean and
spread, as a markdown file.

  python -m launch.study --out=docs/study_cutpaste_demo.md \
      --categories=washer,brick,grass,gravel --seeds=0,1,2
  python -m launch.study --method=draem --out=docs/study_draem_demo.md \
      --workdir=workdirs/study_draem --categories=washer,brick,grass,gravel --seeds=0,1,2

``--method=cutpaste`` (Table 3): rows CutPaste / +FM / +WDAM. ``--method=draem`` (Table 5): rows
DRAEM / +WDAM, each ``configs/draem*.py:demo`` as it is (its validation phase included).
Runs go seed by seed (every row and category of seed 0 first), and the table is rewritten after
each run, so a study stopped early still shows every finished run.

Each run is ``python -m launch.train --config=configs/<row>.py:demo`` with ``--config.seed=<s>``
and the stage lengths of ``--stages``, in ``<workdir>/<row>_seed<s>``; a finished run (metrics
present) is reused, so an interrupted study resumes. Without FMAS records for the demo data
(``python -m launch.synthesize --config=configs/fmas_mvtec.py:demo``) the rows keep the CutPaste
class, so "+FM" is CutPaste + FM and "+WDAM" is CutPaste + FM + WDAM; ``--fmas`` adds the +FMAS
row and uses FMAS in the later rows as the paper does.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time

import jax
import numpy as np
from absl import app, flags, logging

from configs import cutpaste, cutpaste_fm, cutpaste_fmas, cutpaste_wdam, draem, draem_wdam
from wdam_jax import checkpoints, evaluate, reporting

_OUT = flags.DEFINE_string("out", "docs/study_cutpaste_demo.md", "Markdown file to write.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/study", "Folder of the runs.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per row.")
_STAGES = flags.DEFINE_list(
    "stages", [], "Steps of stages 1, 2, 3 (default: the demo config's, as `make demo`)."
)
_CATEGORIES = flags.DEFINE_list("categories", ["washer"], "Demo categories.")
_ROOT = flags.DEFINE_string("data_root", "workdirs/demo_data", "Where the demo data is generated.")
_FMAS = flags.DEFINE_bool("fmas", False, "Use the demo FMAS records (+FMAS row).")
_METHOD = flags.DEFINE_enum("method", "cutpaste", ["cutpaste", "draem"], "Table 3 or Table 5 rows.")
_KEEP = flags.DEFINE_bool("keep_checkpoints", False, "Keep each run's ~1 GB checkpoint.")


def _rows(fmas: bool):
    if _METHOD.value == "draem":
        return [("DRAEM", draem), ("+WDAM", draem_wdam)]
    rows = [("CutPaste", cutpaste)]
    if fmas:
        rows.append(("+FMAS", cutpaste_fmas))
    return [*rows, ("+FM", cutpaste_fm), ("+WDAM", cutpaste_wdam)]


def _config(module, seed: int, category: str):
    config = module.get_config("demo")
    config.seed = seed
    config.data.category = category
    config.data.root = _ROOT.value
    if _METHOD.value == "draem":
        return config
    config.data.foreground_root = f"{_ROOT.value}/foreground_masks"
    if not _FMAS.value:
        config.data.anomaly_source = "cutpaste"
    elif module is not cutpaste:
        config.data.anomaly_source = "fmas"
    t = config.train
    if _STAGES.value:
        t.stage1_steps, t.stage2_steps, t.stage3_steps = (int(s) for s in _STAGES.value)
    t.checkpoint_every = t.stage1_steps + t.stage2_steps + t.stage3_steps
    t.eval_every = 0  # learning curves are not part of the table (they change no number)
    return config


def _stages(config) -> str:
    t = config.train
    return f"{t.stage1_steps}/{t.stage2_steps}/{t.stage3_steps}"


def _run(name: str, module, seed: int, category: str) -> dict[str, float]:
    workdir = pathlib.Path(_WORKDIR.value) / f"{category}_{_slug(name)}_seed{seed}"
    done = workdir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    config = _config(module, seed, category)
    start = time.perf_counter()
    results = evaluate.train_and_evaluate(config, workdir)[config.data.category]
    results["wall_s"] = time.perf_counter() - start
    if not _KEEP.value:
        shutil.rmtree(workdir / checkpoints.CHECKPOINT_DIR)
    checkpoints.atomic_write_text(done, json.dumps(results))
    return results


def _slug(name: str) -> str:
    return name.strip("+").lower()


def _done(name: str, seed: int, category: str) -> dict[str, float] | None:
    path = pathlib.Path(_WORKDIR.value) / f"{category}_{_slug(name)}_seed{seed}" / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(values: list[float]) -> str:
    if len(values) < 2:
        return f"{100 * np.mean(values):.1f}" if values else "-"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def _table(seeds: list[int]) -> tuple[str, int]:
    """The markdown table of the finished runs, and how many there are. The mean rows average
    the categories within a seed first (seeds with every category finished), then give mean ±
    std over those seeds."""
    metrics = reporting.METRICS
    lines = [
        "| Category | Row | " + " | ".join(reporting.METRIC_TITLES[m] for m in metrics) + " | per "
        "seed (I-AUROC) | wall s / run |",
        "|---|---|" + "---:|" * len(metrics) + "---|---:|",
    ]
    finished = 0
    categories = list(_CATEGORIES.value)
    for category in [*categories, "mean"]:
        for name, _ in _rows(_FMAS.value):
            if category == "mean":
                per_seed = [[_done(name, s, c) for c in categories] for s in seeds]
                runs = [
                    {m: np.mean([r[m] for r in rs]) for m in (*metrics, "wall_s")}
                    for rs in per_seed
                    if all(rs)
                ]
            else:
                runs = [r for r in (_done(name, s, category) for s in seeds) if r]
                finished += len(runs)
            if not runs:
                continue
            cells = [_cell([r[m] for r in runs]) for m in metrics]
            seeds_text = ", ".join(f"{100 * r['i_auroc']:.1f}" for r in runs)
            wall = np.mean([r["wall_s"] for r in runs])
            title = "**mean**" if category == "mean" else category
            lines.append(
                f"| {title} | {name} | " + " | ".join(cells) + f" | {seeds_text} | {wall:.0f} |"
            )
    return "\n".join(lines), finished


def _write(seeds: list[int]) -> str:
    table, finished = _table(seeds)
    total = len(seeds) * len(_CATEGORIES.value) * len(_rows(_FMAS.value))
    if _METHOD.value == "draem":
        schedule = f"{draem.get_config('demo').train.epochs} epochs"
    else:
        schedule = f"stages {_stages(_config(cutpaste, seeds[0], _CATEGORIES.value[0]))} steps"
    out = pathlib.Path(_OUT.value)
    header = out.read_text().split("<!-- table -->")[0] if out.is_file() else ""
    body = (
        f"<!-- table -->\nSeeds {seeds}, {schedule}, mean ± sample std over seeds, in %; "
        f"{finished} of {total} runs finished. Generated by `python -m launch.study "
        f"--method={_METHOD.value} --out={out} --seeds={','.join(_SEEDS.value)} "
        f"--categories={','.join(_CATEGORIES.value)}`.\n\n" + table + "\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoints.atomic_write_text(out, header + body)
    return body


def main(argv):
    del argv
    checkpoints.quiet_orbax()
    # Runs of one row (and rows with the same model) compile the same programs: cache them.
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(_WORKDIR.value) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    seeds = [int(s) for s in _SEEDS.value]
    for seed in seeds:
        for category in _CATEGORIES.value:
            for name, module in _rows(_FMAS.value):
                result = _run(name, module, seed, category)
                logging.info("%s %s seed %d: %s", category, name, seed, result)
                _write(seeds)
    print(_write(seeds))


if __name__ == "__main__":
    app.run(main)
