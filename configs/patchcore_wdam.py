r"""PatchCore ensemble of the plain and the WDAM-finetuned WideResNet50-2 (Table 6, "Final Model").

  python -m launch.train --config=configs/patchcore_wdam.py --workdir=workdirs/pc_wdam_bottle \
      --config.data.root=data/mvtec_ad --config.data.category=bottle \
      --config.members.plain.weights=weights/wrn50_2_imagenet \
      --config.members.wdam.workdir='workdirs/cutpaste_wdam_{category}'
  python -m launch.train --config=configs/patchcore_wdam.py:demo --workdir=workdirs/pc_wdam_demo

Input 256 x 256 (no crop). The WDAM member is the backbone of the CutPaste + WDAM run of the same
category (``{category}`` in its workdir). Each member's image scores and maps are standardised by
their mean and standard deviation on ``patchcore.calibration_images`` normal training images,
then averaged (``wdam_jax.methods.patchcore.ensemble_scores``).
"""

import ml_collections

from configs import patchcore

# The arguments --config=<this file>:<arg> accepts ("": none); the launchers check them.
VARIANTS = ("", "demo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = patchcore.get_config()
    config.data.crop_size = 0  # 256x256 input, as the paper's ensemble
    config.members.wdam = patchcore.member("run", wdam_layers=(1,))
    if arg == "demo":
        patchcore.apply_demo(config)
    elif arg:
        raise ValueError(f"Unknown config argument {arg!r}; expected nothing or 'demo'.")
    return config
