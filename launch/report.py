"""Writes (or rewrites) the page a person opens, ``report.html``, of an existing run.

  python -m launch.report --workdir=workdirs/cutpaste_wdam_demo        # newest evaluation
  python -m launch.report --workdir=workdirs/cutpaste_wdam_demo --step=80
  python -m launch.report --workdir=workdirs/predictions               # a launch.predict --out
  python -m launch.report --workdir=workdirs/table3_demo               # a launch.experiment

``launch.evaluate``, ``launch.predict`` and ``launch.experiment`` write it themselves; this
rebuilds it from the files they left (see ``wdam_jax/report.py``). Open the printed path in a
browser (``xdg-open``); it needs no server and no network.
"""

from absl import app, flags

from launch import cli
from wdam_jax import report

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A run directory, a launch.predict --out folder or an experiment's workdir."
)
_STEP = flags.DEFINE_integer("step", None, "The evaluated step (default: the newest).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    print(report.build(_WORKDIR.value, step=_STEP.value))


if __name__ == "__main__":
    cli.run(main, config_flag=None)
