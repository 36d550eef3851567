"""Every config file's argument (``--config=<file>:<arg>``): each variant it declares builds, and
an unknown, misspelt or foreign one is one message listing the variants, exit code 2.

The files are found on disk (``configs/*.py``, ``configs/experiments/*.py`` with a
``get_config``), so a config added without ``VARIANTS`` fails here.
"""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

from launch import cli
from wdam_jax import experiment
from wdam_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(
    p.relative_to(REPO)
    for folder in ("configs", "configs/experiments")
    for p in (REPO / folder).glob("*.py")
    if "def get_config(" in p.read_text()
)
ALL_VARIANTS = {"demo", "custom", "published"}


def _module(path: pathlib.Path):
    return importlib.import_module(".".join(path.with_suffix("").parts))


def _wrong_arguments(variants: tuple[str, ...]) -> list[str]:
    """A made-up one, a misspelt one (a letter swapped in a real variant), and a variant other
    configs have that this one lacks."""
    real = next(v for v in variants if v)
    misspelt = real[1] + real[0] + real[2:] if len(real) > 1 else real + "x"
    foreign = sorted(ALL_VARIANTS - {p for v in variants for p in v.split(",")})
    return ["costum_2", misspelt, *foreign[:1]]


def test_every_config_file_is_found():
    names = {str(p) for p in CONFIG_FILES}
    assert {"configs/patchcore.py", "configs/experiments/table3.py", "configs/wdam_layers.py"} <= (
        names
    )
    assert len(CONFIG_FILES) == 19  # 11 run and synthesis configs, 6 tables, 2 demo studies


@pytest.mark.parametrize("path", CONFIG_FILES, ids=str)
def test_each_declared_variant_builds(path):
    module = _module(path)
    assert isinstance(module.VARIANTS, tuple) and "" in module.VARIANTS, path
    for variant in module.VARIANTS:
        config = module.get_config(variant or None)
        assert config is not None and len(config.keys()) > 0


@pytest.mark.parametrize("path", CONFIG_FILES, ids=str)
def test_a_wrong_argument_is_one_message_with_the_variants(path, monkeypatch, capsys):
    variants = _module(path).VARIANTS
    for wrong in _wrong_arguments(variants):
        monkeypatch.setattr(sys, "argv", ["launch.x", f"--config={path}:{wrong}", "--workdir=w"])
        with pytest.raises(SystemExit) as exit_info:
            cli.run(lambda argv: pytest.fail("main must not run"))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (path, wrong, err)
        assert err.count("error:") == 1 and "Traceback" not in err, err
        assert f"has no variant {wrong!r}" in err, err
        for variant in variants:  # every variant that exists is named
            assert (f"{path}:{variant}" if variant else f"{path} (no argument)") in err, err


def test_a_misspelt_variant_is_named_with_the_nearest(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["x", "--config=configs/patchcore.py:costum", "--workdir=w"])
    with pytest.raises(SystemExit):
        cli.run(lambda argv: None)
    assert "Did you mean configs/patchcore.py:custom?" in capsys.readouterr().err
    # The order of comma-separated parts does not matter.
    for arg in ("published,demo", "demo,published", "3,demo"):
        module = "wdam_layers" if arg[0].isdigit() else "cutpaste"
        cli._load_config(f"{REPO}/configs/{module}.py:{arg}")


def test_experiment_rows_are_checked_the_same_way():
    with pytest.raises(ConfigError, match=r"Its variants: configs/patchcore\.py"):
        experiment.load_run_config("patchcore:costum")
    assert experiment.load_run_config("patchcore:custom").data.root == ""


def test_a_launcher_exits_2_on_a_misspelt_variant(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.train",
            "--config=configs/patchcore.py:costum",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,  # the config resolves against the package from anywhere
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "configs/patchcore.py:costum: configs/patchcore.py has no variant 'costum'" in (
        out.stderr
    )
    assert "configs/patchcore.py:custom" in out.stderr
    assert not (tmp_path / "run").exists()
