r"""PatchCore with an ImageNet WideResNet50-2 (Sec. 4.2; Table 6, "PatchCore" column).

  python -m launch.train --config=configs/patchcore.py --workdir=workdirs/patchcore_bottle \
      --config.data.root=data/mvtec_ad --config.data.category=bottle \
      --config.members.plain.weights=weights/wrn50_2_imagenet
  python -m launch.train --config=configs/patchcore.py:demo --workdir=workdirs/patchcore_demo
  python -m launch.evaluate --workdir=workdirs/patchcore_demo
  python -m launch.train --config=configs/patchcore.py:custom --workdir=runs/mine_patchcore \
      --config.data.root=my_images --config.data.category=my_product \
      [--config.members.plain.weights=weights/wrn50_2_imagenet]

PatchCore has no gradient steps: ``launch.train`` fits the memory bank (checkpointed with orbax in
the workdir, like any run) and evaluates; ``launch.evaluate`` re-scores from the checkpoint. The
weights folder is made by ``python -m launch.convert_weights`` from torchvision's
``wide_resnet50_2`` IMAGENET1K_V1 file. ``:demo`` runs on the built-in demo data (128 x 128)
with a randomly initialised backbone (no weights exist here; a warning says so). ``:custom`` is
the same on your own images, with the ImageNet weights where ``members.plain.weights`` names
them: a random backbone's features are fixed random filters, so its scores rank images by how
far their local colour and texture statistics are from the normal images', not by learnt
features (on the four demo categories 71.1 image AUROC, against 84.0 for CutPaste + WDAM and 98.5
for DRAEM trained from scratch: README.md, "Your own images").
"""

import ml_collections

# The arguments --config=<this file>:<arg> accepts ("": none); the launchers check them.
VARIANTS = ("", "demo", "custom")

WRN50_2 = {"depths": (3, 4, 6, 3), "base_width": 64}


def member(kind: str, *, wdam_layers: tuple[int, ...] = ()) -> ml_collections.ConfigDict:
    """One ensemble member: where its backbone comes from."""
    return ml_collections.ConfigDict(
        {
            "kind": kind,  # "imagenet" (weights folder) or "run" (a launch.train run directory)
            "weights": "",  # converted ImageNet weights (kind "imagenet")
            "workdir": "",  # run directory (kind "run"); "{category}" is replaced per category
            "wdam_layers": wdam_layers,  # used to build the network when loading it
            "allow_random_init": False,  # demo/tests only: random weights when none are given
            "seed": 0,  # random-init seed (demo only)
            # Architecture of a randomly initialised member (a run's comes from its config).
            **WRN50_2,
        }
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The PatchCore config; ``arg="demo"`` for the demo data on a CPU."""
    config = ml_collections.ConfigDict()
    config.method = "patchcore"
    config.seed = 0
    config.data = ml_collections.ConfigDict(
        {
            "dataset": "mvtec",  # "mvtec", "visa", "demo" or "folder"
            "root": "data/mvtec_ad",
            "category": "bottle",
            # The official PatchCore baseline: resize to 256, centre crop 224.
            "image_size": 256,
            "crop_size": 224,
            # Normal training images held out of the bank to set the decision threshold
            # (wdam_jax/thresholds.py); 0 keeps the paper's protocol.
            "holdout_fraction": 0.0,
            "holdout_seed": 0,
            # Tiling (wdam_jax/data/tiling.py): tile_size > 0 cuts the images at their
            # original resolution into tiles (resized to image_size), tile_stride apart (in
            # [1, tile_size]); maps are stitched back at the original resolution. 0 = off.
            "tile_size": 0,
            "tile_stride": 0,
            "tile_image_score": "map_max",  # or "tile_max" (maximum of the tiles' scores)
        }
    )
    config.patchcore = ml_collections.ConfigDict(
        {
            "patch_size": 3,  # local neighbourhood aggregation
            "pretrain_dim": 1024,  # per-layer dimension after channel pooling
            "target_dim": 1024,  # patch feature dimension D
            "coreset_ratio": 0.1,  # memory bank = 10% of the training patches
            "proj_dim": 128,  # random projection of the coreset selection
            # At most this many training patches enter the coreset (0: all): with tiling, a
            # seeded subset of the tiles, so the features held in memory stay bounded.
            "fit_max_patches": 0,
            # How patch distances become scores: "official" (patchcore-inspection, the paper's
            # "official PatchCore implementation": maximum patch score of squared L2 distances,
            # maps from squared distances) or "anomalib" (reweighted score w s* on Euclidean
            # distances, maps from Euclidean distances).
            "scoring": "official",
            "num_neighbors": 9,  # b of the image-score reweighting (scoring "anomalib" only)
            "sigma": 4.0,  # Gaussian smoothing of the maps (input pixels)
            "calibration_images": 16,  # ensemble: normal images giving each member's statistics
            # Ensemble: "train_standardise" (deployable: statistics of normal training images)
            # or "minmax_over_evaluated_set" (the official ensemble's protocol, for Table 6).
            "normalisation": "train_standardise",
            # Memory bank and coreset sharded by rows over this host's devices (a bank bounded
            # by their total memory); the same results (wdam_jax/methods/patchcore_sharded.py).
            "shard_bank": False,
            # Exact kNN that skips the bank rows a proven lower bound rules out (the same
            # neighbours as brute force; wdam_jax/methods/patchcore_index.py), its index built
            # at fit and saved with the bank. The sharded bank searches by brute force.
            "knn_index": True,
        }
    )
    config.members = ml_collections.ConfigDict({"plain": member("imagenet")})
    # Fields the shared loop reads; PatchCore has no gradient steps.
    config.train = ml_collections.ConfigDict(
        {"log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 1, "eval_every": 0}
    )
    config.score = ml_collections.ConfigDict(
        {
            "eval_batch_size": 8,
            "num_figures": 8,
            "threshold_rule": "normal_fpr",  # or "f1_max" (needs labelled anomalies)
            "threshold_fpr": 0.01,  # false-positive rate on held-out normal images
        }
    )
    if arg in ("demo", "custom"):
        apply_demo(config)
    if arg == "custom":
        apply_custom(config)
    elif arg not in (None, "", "demo"):
        raise ValueError(f"Unknown config argument {arg!r}; use nothing, 'demo' or 'custom'.")
    return config


def apply_custom(config: ml_collections.ConfigDict) -> None:
    """Your own images in the MVTec layout (``<root>/<category>/train/good``, ``test/<defect>``,
    optional ``ground_truth/<defect>/<stem>_mask.png``) at the demo's size and bank: ImageNet
    weights where ``--config.members.plain.weights`` gives them, else a randomly initialised
    WideResNet50-2 (the run's log says what that means). A tenth of the training images is held
    out of the bank for the decision threshold. Give ``--config.data.root`` and
    ``--config.data.category``."""
    config.data.dataset = "mvtec"
    config.data.root = ""
    config.data.category = ""


def apply_demo(config: ml_collections.ConfigDict) -> None:
    """Demo data, small images, a small bank, random weights allowed (with a loud warning)."""
    config.data.dataset = "demo"
    config.data.root = "workdirs/demo_data"
    config.data.category = "washer"
    config.data.image_size = 128
    config.data.crop_size = 0  # no crop
    config.patchcore.coreset_ratio = 0.02
    config.patchcore.calibration_images = 8
    config.data.holdout_fraction = 0.1  # a decision threshold from unseen normal images
    for m in config.members.values():
        m.allow_random_init = True
