"""What every experiment config (``configs/experiments/table*.py``) shares: the row and
experiment fields read by ``wdam_jax.experiment``, and the demo reduction.

An experiment config has:

- ``table``: the paper table it reproduces; ``paper_values``: the JSON of its published numbers
  (``<table>_paper.json`` beside the config, transcribed from the paper text);
- ``rows``: slug -> :func:`row` (the slug names the run folder ``<workdir>/<slug>/...``);
  ``order``: the slugs run and shown, in order (a subset runs only those);
- ``categories``, ``seeds``; ``metrics`` shown; ``section`` (the dataset name of the paper's
  table);
- ``overrides``: nested fields (or dotted keys) set in every run's config; a string may hold
  ``{workdir}``, ``{category}``, ``{seed}``. ``overrides.data.root`` is always there, so the
  data can be elsewhere without editing the config: ``--config.overrides.data.root=DIR``.
"""

import pathlib

import ml_collections

HERE = pathlib.Path(__file__).resolve().parent
DEMO_CATEGORIES = ("washer", "brick")  # an object and a texture of the built-in demo data
DEMO_SEEDS = (0,)
MVTEC_ROOT = "data/mvtec_ad"
DEMO_ROOT = "workdirs/demo_data"
# The arguments every experiment config accepts (its VARIANTS); the launcher checks them.
VARIANTS = ("", "demo")


def row(
    label: str,
    config: str,
    *,
    paper_column: str = "",
    section: str = "",
    categories: tuple[str, ...] = (),
    depends_on: tuple[str, ...] = (),
    overrides: dict | None = None,
) -> ml_collections.ConfigDict:
    """One row of a table.

    Args:
      label: the column title shown (ours).
      config: the run config spec, ``"module[:arg]"`` of ``configs/<module>.py``.
      paper_column: the column of ``paper_values`` it is compared with ("" for none).
      section: the paper's dataset block it belongs to ("" = the experiment's ``section``).
      categories: the row's categories ("" = the experiment's).
      depends_on: rows whose run of the same category and seed this row's run reads.
      overrides: nested fields set in this row's runs, after the experiment's overrides.
    """
    return ml_collections.ConfigDict(
        {
            "label": label,
            "config": config,
            "paper_column": paper_column,
            "section": section,
            "categories": categories,
            "depends_on": depends_on,
            "overrides": ml_collections.ConfigDict(overrides or {}),
        }
    )


def experiment(
    table: str,
    paper_file: str,
    *,
    section: str,
    categories: tuple[str, ...],
    seeds,
    data_root: str,
) -> ml_collections.ConfigDict:
    """The fields of an experiment config other than its rows; ``overrides.data.root`` is set so
    that ``--config.overrides.data.root=DIR`` points every run at the data."""
    config = ml_collections.ConfigDict()
    config.table = table
    config.paper_values = str(HERE / paper_file) if paper_file else ""
    config.section = section
    config.metrics = ("i_auroc", "p_auroc", "pro")
    config.categories = categories
    config.seeds = tuple(seeds)
    config.overrides = ml_collections.ConfigDict({"data": {"root": data_root}})
    config.rows = ml_collections.ConfigDict()
    config.order = ()
    return config


def spec(module: str, arg: str, demo: bool) -> str:
    """``module:arg`` with ``demo`` appended to the argument for ``:demo`` experiments."""
    args = [a for a in (arg, "demo" if demo else "") if a]
    return f"{module}:{','.join(args)}" if args else module


def parse_demo(arg: str | None) -> bool:
    if arg not in (None, "", "demo"):
        raise ValueError(f"Unknown experiment config argument {arg!r}; use nothing or 'demo'.")
    return arg == "demo"


# The demo studies (configs/experiments/study_*_demo.py): the four demo categories, 3 seeds;
# ``quick``: seed 0 on an object and a texture.
STUDY_CATEGORIES = ("washer", "brick", "grass", "gravel")
STUDY_VARIANTS = ("", "quick")


def demo_study(table: str, arg: str | None) -> ml_collections.ConfigDict:
    """The fields of a demo study other than its rows (no published values to compare with)."""
    if arg not in (None, *STUDY_VARIANTS):
        raise ValueError(f"Unknown argument {arg!r}; use nothing or 'quick'.")
    quick = arg == "quick"
    return experiment(
        table,
        "",
        section="demo data",
        categories=STUDY_CATEGORIES[:2] if quick else STUDY_CATEGORIES,
        data_root=DEMO_ROOT,
        seeds=(0,) if quick else (0, 1, 2),
    )
