"""The experiment runner (``wdam_jax.experiment``, ``launch.experiment``): every table config
expands into runs whose configs resolve; shards are disjoint and keep dependent rows together; a
killed experiment, re-run, finishes without redoing finished runs and fills every cell; the
paper's numbers are transcribed consistently."""

import importlib
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from wdam_jax import evaluate, experiment
from wdam_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
TABLES = ("table3", "table4", "table5", "table6", "table7", "table8")
TINY_NET = {"depths": (1, 1, 1, 1), "base_width": 8}


def _config(table: str, arg: str | None = None):
    return importlib.import_module(f"configs.experiments.{table}").get_config(arg)


def _has_draem() -> bool:
    return (REPO / "configs" / "draem.py").is_file()


@pytest.mark.parametrize("arg", [None, "demo"])
@pytest.mark.parametrize("table", TABLES)
def test_every_table_expands_into_resolvable_runs(table, arg, tmp_path):
    if table == "table5" and not _has_draem():
        pytest.skip("configs/draem.py is not on this branch (DRAEM is added on another branch)")
    config = _config(table, arg)
    runs = experiment.expand(config, tmp_path)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    expected = sum(
        len(experiment.row_categories(config, slug)) * len(config.seeds) for slug in config.order
    )
    assert len(runs) == expected
    for slug in config.order:  # one run config per row is enough: the rest differ in category
        run = next(r for r in runs if r.row == slug)
        run_config = experiment.run_config(config, run, tmp_path)
        assert run_config.data.category == run.category and run_config.seed == run.seed
        assert run.workdir == tmp_path / slug / run.category / f"seed{run.seed}"
        if arg == "demo":
            assert run_config.data.dataset == "demo"
    paper = json.loads(pathlib.Path(config.paper_values).read_text())
    assert paper["table"] == config.table
    for slug in config.order:  # each compared row names a column that exists for its section
        row = config.rows[slug]
        if row.paper_column:
            section = paper["sections"][row.section or config.section]
            assert row.paper_column in section, (slug, row.paper_column)
            assert "mean" in section[row.paper_column]


@pytest.mark.parametrize("table", ["table3", "table4", "table5"])
def test_paper_per_category_values_match_the_config_and_their_average(table):
    """Transcription check: per-category tables have one value per metric for every category of
    the config, and the printed average is the mean of the printed categories (to rounding),
    except where the JSON names the paper's own mismatch (which must then really mismatch)."""
    config = _config(table)
    paper = json.loads(pathlib.Path(config.paper_values).read_text())
    mismatch = paper.get("average_mismatch", {})
    (section,) = paper["sections"].values()
    for column, values in section.items():
        assert set(values) == {*config.categories, "mean"}, column
        per_category = np.array([values[c] for c in config.categories])
        assert per_category.shape == (len(config.categories), len(paper["metrics"]))
        gap = np.abs(per_category.mean(0) - np.array(values["mean"])).max()
        assert (gap > 0.06) == (column in mismatch), (column, gap)


def test_placeholders_and_dependent_rows_share_a_shard(tmp_path):
    config = _config("table6")
    runs = experiment.expand(config, tmp_path)
    for num_shards in (1, 2, 3, 7):
        shards = [experiment.shard(runs, i, num_shards) for i in range(num_shards)]
        flat = [r.name for s in shards for r in s]
        assert sorted(flat) == sorted(r.name for r in runs)  # disjoint and complete
        for s in shards:
            names = {r.name for r in s}
            for r in s:
                if r.row == "final":  # its dependency is on the same shard, and runs before it
                    dep = f"cutpaste_wdam/{r.category}/seed{r.seed}"
                    assert dep in names
                    assert [x.name for x in s].index(dep) < [x.name for x in s].index(r.name)
    final = next(r for r in runs if r.row == "final" and r.category == "cable")
    member = experiment.run_config(config, final, tmp_path).members.wdam.workdir
    assert member == str(tmp_path.absolute() / "cutpaste_wdam" / "cable" / "seed0")
    assert experiment.run_config(config, final, tmp_path).patchcore.normalisation == (
        "minmax_over_evaluated_set"
    )
    # Both PatchCore rows score as the official implementation (max of squared L2 distances).
    plain = next(r for r in runs if r.row == "patchcore")
    for run in (plain, final):
        assert experiment.run_config(config, run, tmp_path).patchcore.scoring == "official"
    with pytest.raises(ConfigError, match="shard_index"):
        experiment.shard(runs, 2, 2)


def test_bad_experiment_configs_are_named(tmp_path):
    config = _config("table6", "demo")
    config.order = ("final", "cutpaste_wdam")
    with pytest.raises(ConfigError, match="depends_on names 'cutpaste_wdam'"):
        experiment.expand(config, tmp_path)
    config = _config("table3", "demo")
    config.overrides.model = {"depth": (1, 1, 1, 1)}
    run = experiment.expand(config, tmp_path)[0]
    with pytest.raises(ConfigError, match=r"Did you mean model\.depths"):
        experiment.run_config(config, run, tmp_path)
    config = _config("table3", "demo")
    config.rows.cutpaste.config = "no_such_config"
    with pytest.raises(ConfigError, match=r"configs/no_such_config\.py"):
        experiment.run_config(config, experiment.expand(config, tmp_path)[0], tmp_path)


def _tiny_table3(root: pathlib.Path):
    """Table 3's demo with two rows on a tiny network at 32 px, two categories, one seed."""
    config = _config("table3", "demo")
    config.order = ("cutpaste", "cutpaste_wdam")
    config.overrides.data = {"root": str(root), "image_size": 32, "anomaly_source": "cutpaste"}
    config.overrides.model = {**TINY_NET, "head_dims": (16,)}
    config.overrides.augment = {"foreground_mask": False}
    config.overrides.train = {
        "batch_size": 2,
        "stage1_steps": 1,
        "stage2_steps": 1,
        "stage3_steps": 1,
        "checkpoint_every": 2,
    }
    config.overrides.score = {"eval_batch_size": 8, "num_figures": 2}
    config.rows.cutpaste_wdam.overrides.data.anomaly_source = "cutpaste"
    return config


def test_killed_experiment_resumes_without_redoing_finished_runs(
    demo_data_root, tmp_path, monkeypatch
):
    config = _tiny_table3(demo_data_root)
    workdir = tmp_path / "table3"
    runs = experiment.expand(config, workdir)
    assert len(runs) == 4
    real = evaluate.train_and_evaluate
    calls = []

    def killed_after_first(cfg, run_dir, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")  # the process dies while the second run starts
        calls.append(pathlib.Path(run_dir))
        return real(cfg, run_dir, **kwargs)

    monkeypatch.setattr(evaluate, "train_and_evaluate", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(config, workdir)
    assert calls == [runs[0].workdir]
    done = runs[0].workdir / experiment.DONE_FILE
    assert done.is_file() and not (runs[1].workdir / experiment.DONE_FILE).exists()
    first_mtime = done.stat().st_mtime_ns
    # The partial aggregate, written by hand as --aggregate_only would: one run finished.
    partial = experiment.write_results(config, workdir)
    assert partial["finished"] == 1 and len(partial["missing"]) == 3

    calls.clear()

    def counting(cfg, run_dir, **kwargs):
        calls.append(pathlib.Path(run_dir))
        return real(cfg, run_dir, **kwargs)

    monkeypatch.setattr(evaluate, "train_and_evaluate", counting)
    results = experiment.run_experiment(config, workdir)
    assert calls == [r.workdir for r in runs[1:]]  # the finished run is not redone
    assert done.stat().st_mtime_ns == first_mtime
    assert results["finished"] == 4 and results["missing"] == []
    written = json.loads((workdir / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    rows = written["sections"]["MVTec AD"]
    for slug in config.order:
        cells = rows[slug]["cells"]
        assert set(cells) == {"washer", "brick", "mean"}
        for category, metrics in cells.items():
            for metric in ("i_auroc", "p_auroc", "pro"):
                cell = metrics[metric]
                assert cell["n"] == 1 and 0 <= cell["mean"] <= 100, (slug, category, metric)
        mean = np.mean([cells[c]["i_auroc"]["mean"] for c in ("washer", "brick")])
        assert cells["mean"]["i_auroc"]["mean"] == pytest.approx(mean)
    # The paper's average beside ours (demo categories have no per-category paper values).
    assert rows["cutpaste"]["cells"]["mean"]["i_auroc"]["paper"] == 93.23
    assert rows["cutpaste_wdam"]["cells"]["mean"]["pro"]["paper"] == 72.04
    assert rows["cutpaste"]["cells"]["washer"]["i_auroc"]["paper"] is None
    table = (workdir / "results.md").read_text()
    assert "| **mean** |" in table and "93.23" in table and "4/4 runs finished" in table
    csv_lines = (workdir / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * 3 * 3  # header + rows x (2 categories + mean) x metrics
    # The page: the same tables, each of our cells linking to its run's page.
    page = (workdir / "report.html").read_text()
    links = re.findall(r"href='([^']+)'", page)
    assert len(links) == 3 * 2 * 2 and all((workdir / link).is_file() for link in links)
    seed = written["seeds"][0]
    mean = rows["cutpaste"]["cells"]["washer"]["i_auroc"]["mean"]
    assert f"<a href='cutpaste/washer/seed{seed}/report.html'>{mean:.2f}</a>" in page
    assert "<td class='paper'>93.23</td>" in page
    # Each run directory is an ordinary one: launch.evaluate's function re-scores it.
    again = evaluate.evaluate(None, runs[3].workdir)
    recorded = json.loads((runs[3].workdir / experiment.DONE_FILE).read_text())["metrics"]
    assert again["brick"] == pytest.approx(recorded)
    # A finished run is not silently reused by a changed experiment.
    config.overrides.train.stage3_steps = 2
    with pytest.raises(Exception, match="finished run made with another config"):
        experiment.run_experiment(config, workdir)


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.experiment", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_launcher_aggregates_and_names_bad_shards(tmp_path):
    config = "--config=configs/experiments/table8.py:demo"
    out = _launch(
        config, f"--workdir={tmp_path}", "--aggregate_only", "--config.overrides.data.root=x"
    )
    assert out.returncode == 0, out.stderr
    table = (tmp_path / "results.md").read_text()
    assert "0/10 runs finished" in table and "98.00" in table  # the paper's layer-1 mean
    assert json.loads((tmp_path / "results.json").read_text())["table"] == "Table 8"
    out = _launch(config, f"--workdir={tmp_path}", "--shard_index=2", "--num_shards=2")
    assert out.returncode == 2 and "--shard_index=2 --num_shards=2" in out.stderr


@pytest.mark.skipif(not _has_draem(), reason="configs/draem.py not present")
def test_a_method_that_selects_a_checkpoint_is_reported_from_it(
    demo_data_root, tmp_path, monkeypatch
):
    """DRAEM keeps the checkpoint with the best validation AUROC (train.select_metric): the
    experiment scores that one, records it in done.json and says so in results.md. Validation
    is made to peak at step 0 (the untrained network) so that the best and final checkpoints
    differ."""
    from wdam_jax.methods import draem

    monkeypatch.setattr(
        draem.Draem, "validate", lambda self, model, *, step: {"val/mean_auroc": -float(step)}
    )
    config = _config("table5", "demo")
    config.order = ("draem",)
    config.categories, config.seeds = ("washer",), (0,)
    config.overrides.data = {"root": str(demo_data_root), "image_size": 32}
    config.overrides.model = {"recon_width": 2, "disc_width": 2}
    config.overrides.train = {"batch_size": 2, "epochs": 1, "eval_every": 2}
    config.overrides.score = {"eval_batch_size": 8, "num_figures": 0}
    workdir = tmp_path / "table5"
    results = experiment.run_experiment(config, workdir)
    (run,) = experiment.expand(config, workdir)
    done = json.loads((run.workdir / experiment.DONE_FILE).read_text())
    selected = json.loads((run.workdir / "best_checkpoint.json").read_text())
    assert selected == {"metric": "val/mean_auroc", "value": 0.0, "step": 0}
    assert done["checkpoint"] == {"which": "best", **selected}
    # Only the best checkpoint was scored: step 0's report, no final step's.
    assert [p.name for p in (run.workdir / "eval").iterdir()] == ["step_0"]
    again = evaluate.evaluate(None, run.workdir, best=True)
    assert again["washer"] == pytest.approx(done["metrics"])
    assert results["sections"]["MVTec AD"]["draem"]["selected_on"] == ["val/mean_auroc"]
    table = (workdir / "results.md").read_text()
    assert "validation-selected checkpoint" in table and "DRAEM (val/mean_auroc)" in table


@pytest.mark.parametrize("arg", [None, "demo"])
def test_table7_rows_that_print_table3_and_4_numbers_are_the_same_runs(arg, tmp_path):
    """Table 7's CutPaste, FMAS and FMAS + WDAM rows print Table 3's CutPaste, +FM and final
    averages (Table 4's for VisA): their run configs must be identical, field for field."""
    table7 = _config("table7", arg)
    pairs = {"cutpaste": "cutpaste", "fmas": "fm", "final": "cutpaste_wdam"}
    for prefix, other in (("mvtec", "table3"), ("visa", "table4")):
        reference = _config(other, arg)
        ours = {r.name: r for r in experiment.expand(table7, tmp_path)}
        for run in experiment.expand(reference, tmp_path):
            if run.row not in pairs.values() or run.seed != reference.seeds[0]:
                continue
            suffix = next(k for k, v in pairs.items() if v == run.row)
            mine = ours[f"{prefix}_{suffix}/{run.category}/seed{run.seed}"]
            got = experiment.run_config(table7, mine, tmp_path).to_dict()
            want = experiment.run_config(reference, run, tmp_path).to_dict()
            assert got == want, (prefix, suffix, run.category)
    assert table7.rows.mvtec_cutpaste.config == ("cutpaste:published,demo" if arg else
                                                 "cutpaste:published")  # fmt: skip
    assert "mvtec_cutpaste_staged" in table7.rows and "mvtec_cutpaste_staged" not in table7.order


@pytest.mark.parametrize("study", ["study_cutpaste_demo", "study_draem_demo"])
def test_the_demo_studies_are_experiment_configs(study, tmp_path):
    config = _config(study)
    runs = experiment.expand(config, tmp_path)
    assert len(runs) == len(config.order) * len(config.categories) * len(config.seeds)
    for slug in config.order:
        run_config = experiment.run_config(config, next(r for r in runs if r.row == slug), tmp_path)
        assert run_config.data.dataset == "demo"


def test_the_untrained_row_scores_the_step0_network_as_validate_does(demo_data_root, tmp_path):
    """CutPaste with stages 0 / 0 / 0 is the network at initialisation, fitted and scored: the
    same numbers its trained run's validate logs at step 0 (the study's baseline row)."""
    config = _config("study_cutpaste_demo")
    config.order, config.seeds, config.categories = ("untrained", "cutpaste"), (0,), ("washer",)
    config.overrides.data = {"root": str(demo_data_root), "image_size": 32}
    config.overrides.model = {**TINY_NET, "head_dims": (16,)}
    config.overrides.augment = {"foreground_mask": False}
    config.overrides.train = {"batch_size": 2, "eval_every": 1, "checkpoint_every": 2}
    config.rows.cutpaste.overrides.train = {"stage1_steps": 1, "stage2_steps": 0, "stage3_steps": 0}
    config.overrides.score = {"eval_batch_size": 8, "num_figures": 0}
    experiment.run_experiment(config, tmp_path)
    untrained = json.loads((tmp_path / "untrained/washer/seed0/done.json").read_text())
    log = [
        json.loads(line)
        for line in (tmp_path / "cutpaste/washer/seed0/train_log.jsonl").read_text().splitlines()
    ]
    step0 = next(row for row in log if row["step"] == 0 and "test/i_auroc" in row)
    assert untrained["metrics"]["i_auroc"] == pytest.approx(step0["test/i_auroc"], abs=1e-9)
