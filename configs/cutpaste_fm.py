"""CutPaste + FMAS + FM (Table 3, third column): scar and CutPaste confined to the foreground mask.

  python -m launch.train --config=configs/cutpaste_fm.py --workdir=workdirs/cutpaste_fm_bottle
  python -m launch.train --config=configs/cutpaste_fm.py:demo --workdir=workdirs/cutpaste_fm_demo

Foreground masks are those of the FMAS mask stage (``python -m launch.synthesize``), in
``data.foreground_root``; the demo data ships its own.
"""

import ml_collections

from configs import cutpaste_fmas

# The arguments --config=<this file>:<arg> accepts ("": none); the launchers check them.
VARIANTS = ("", "demo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """CutPaste + FMAS config with the foreground mask (FM) on."""
    config = cutpaste_fmas.get_config(arg)
    config.augment.foreground_mask = True
    if arg != "demo":
        config.data.foreground_root = "workdirs/foreground_masks/mvtec_ad"
    return config
