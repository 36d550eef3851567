r"""CutPaste + FMAS (Table 3, second column): FMAS samples replace the CutPaste class in stages 2-3.

  python -m launch.synthesize --config=configs/fmas_mvtec.py          # writes the FMAS records
  python -m launch.train --config=configs/cutpaste_fmas.py --workdir=workdirs/cutpaste_fmas_bottle
  python -m launch.train --config=configs/cutpaste_fmas.py:demo \
      --workdir=workdirs/cutpaste_fmas_demo

``:demo`` reads the records of ``python -m launch.synthesize --config=configs/fmas_mvtec.py:demo``
(tiny stand-in models, so its "defects" are not realistic).
"""

import ml_collections

from configs import cutpaste

# The arguments --config=<this file>:<arg> accepts ("": none); the launchers check them.
VARIANTS = ("", "demo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """CutPaste config with ``data.anomaly_source = "fmas"``."""
    config = cutpaste.get_config(arg)
    config.data.anomaly_source = "fmas"
    if arg != "demo":
        config.data.fmas_records = "workdirs/fmas_mvtec/fmas-*.tfrecord"
    return config
