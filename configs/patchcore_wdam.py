"""PatchCore ensemble of the plain and the WDAM-finetuned WideResNet50-2 (Table 6, "Final Model").

  python -m launch.patchcore --config=configs/patchcore_wdam.py --workdir=workdirs/patchcore_wdam \
      --config.data.root=/data/mvtec_ad --config.members.plain.weights=weights/wrn50_2_imagenet \
      --config.members.wdam.workdir=workdirs/cutpaste_wdam
  python -m launch.patchcore --config=configs/patchcore_wdam.py:demo --workdir=workdirs/pc_demo

Input 256x256 (no crop). Each member's image scores and maps are standardised by their mean and
standard deviation on ``calibration_images`` normal training images, then averaged
(``wdam_jax.methods.patchcore.ensemble_scores``).
"""

import ml_collections

from configs import patchcore


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = patchcore.get_config()
    config.data.crop_size = 0  # 256x256 input, as the paper's ensemble
    config.members.wdam = patchcore.member("cutpaste", wdam_layers=(1,))
    config.patchcore.calibration_images = 16  # normal images giving each member's statistics
    if arg == "demo":
        patchcore.apply_demo(config)
        config.patchcore.calibration_images = 8
    elif arg:
        raise ValueError(f"Unknown config argument {arg!r}; expected nothing or 'demo'.")
    return config
