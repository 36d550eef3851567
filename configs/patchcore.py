"""PatchCore with an ImageNet WideResNet50-2 (Sec. 4.2; Table 6, "PatchCore" column).

  python -m launch.patchcore --config=configs/patchcore.py --workdir=workdirs/patchcore \
      --config.data.root=/data/mvtec_ad --config.members.plain.weights=weights/wrn50_2_imagenet
  python -m launch.patchcore --config=configs/patchcore.py:demo --workdir=workdirs/patchcore_demo

The weights folder is made by ``python -m launch.convert_weights`` from torchvision's
``wide_resnet50_2`` IMAGENET1K_V1 file. ``:demo`` runs on the built-in demo data (128x128) and,
without weights, on a randomly initialised backbone (its scores are meaningless; a warning says so).
"""

import ml_collections

from wdam_jax.data.datasets import MVTEC_CATEGORIES
from wdam_jax.data.demo import DEMO_CATEGORIES


def member(kind: str, *, wdam_layers: tuple[int, ...] = ()) -> ml_collections.ConfigDict:
    """One ensemble member: where its backbone comes from."""
    return ml_collections.ConfigDict(
        {
            "kind": kind,  # "imagenet" (weights folder) or "cutpaste" (a launch.train workdir)
            "weights": "",  # converted ImageNet weights (kind "imagenet")
            "workdir": "",  # CutPaste+WDAM run (kind "cutpaste")
            "wdam_layers": wdam_layers,  # used to build the network when loading it
            "allow_random_init": False,  # demo only: random weights when none are given
            "seed": 0,  # random-init seed (demo only)
        }
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.demo = False
    config.data = ml_collections.ConfigDict(
        # The official PatchCore baseline: resize to 256, centre crop 224.
        {"root": "", "categories": MVTEC_CATEGORIES, "image_size": 256, "crop_size": 224}
    )
    config.patchcore = ml_collections.ConfigDict(
        {
            "patch_size": 3,  # local neighbourhood aggregation
            "pretrain_dim": 1024,  # per-layer dimension after channel pooling
            "target_dim": 1024,  # patch feature dimension D
            "coreset_ratio": 0.1,  # memory bank = 10% of the training patches
            "proj_dim": 128,  # random projection of the coreset selection
            "num_neighbors": 9,  # b of the image-score reweighting
            "sigma": 4.0,  # Gaussian smoothing of the maps (input pixels)
            "batch_size": 8,
            "figure_images": 8,
        }
    )
    config.members = ml_collections.ConfigDict({"plain": member("imagenet")})
    if arg == "demo":
        apply_demo(config)
    elif arg:
        raise ValueError(f"Unknown config argument {arg!r}; expected nothing or 'demo'.")
    return config


def apply_demo(config: ml_collections.ConfigDict) -> None:
    """Demo data, small images, a small bank, random weights allowed (with a loud warning)."""
    config.demo = True
    config.data.categories = DEMO_CATEGORIES
    config.data.image_size = 128
    config.data.crop_size = 0  # no crop
    config.patchcore.coreset_ratio = 0.02
    config.patchcore.figure_images = 4
    for m in config.members.values():
        m.allow_random_init = True
