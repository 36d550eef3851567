r"""DRAEM (Table 5, "DRAEM" column): the official hyperparameters plus a validation phase, no WDAM.

  python -m launch.train --config=configs/draem.py --workdir=workdirs/draem_bottle \
      --config.data.root=data/mvtec_ad --config.data.category=bottle \
      --config.data.anomaly_source_dir=data/dtd/images
  python -m launch.train --config=configs/draem.py:demo --workdir=workdirs/draem_demo
  python -m launch.evaluate --workdir=workdirs/draem_demo
  python -m launch.train --config=configs/draem.py:custom --workdir=runs/mine_draem \
      --config.data.root=my_images --config.data.category=my_product

The plain config expects MVTec AD under ``data.root`` and DTD's ``images/`` folder under
``data.anomaly_source_dir`` (DRAEM's anomaly source). ``:demo`` runs on the built-in demo data
with generated textures (``anomaly_source_dir="procedural"``), a reduced network and 64 x 64
inputs, within 15 minutes on 2 CPU cores. ``:custom`` is the demo's network and schedule on your
own images (``apply_custom``).

Official DRAEM: 700 epochs at batch 8 on 256 x 256 images, Adam 1e-4 with x0.2 at 80 % and 90 %
of the epochs, base widths 128 (reconstructive) and 64 (discriminative). The paper adds a
validation phase; here ``data.val_fraction`` of the training images is held out for it
(``wdam_jax/methods/draem.py``).
"""

import ml_collections

# The arguments --config=<this file>:<arg> accepts ("": none); the launchers check them.
VARIANTS = ("", "demo", "custom")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The DRAEM config; ``arg="demo"`` for the demo data on a CPU."""
    config = ml_collections.ConfigDict()
    config.method = "draem"
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "mvtec"  # "mvtec", "visa", "folder" or "demo"
    config.data.root = "data/mvtec_ad"
    config.data.category = "bottle"
    config.data.image_size = 256
    config.data.anomaly_source = "perlin"  # "perlin" (DRAEM) or "fmas" (FMAS samples instead)
    config.data.anomaly_source_dir = "data/dtd/images"  # textures; or "procedural" (generated)
    config.data.fmas_records = ""  # glob of FMAS TFRecord shards (anomaly_source="fmas")
    config.data.val_fraction = 0.1  # training images held out for validation (not trained on)
    # Normal training images held out of training, validation and the threshold's choice, to
    # set the decision threshold (wdam_jax/thresholds.py); 0 keeps the paper's protocol.
    config.data.holdout_fraction = 0.0
    config.data.holdout_seed = 0
    # Tiling (wdam_jax/data/tiling.py): tile_size > 0 cuts the images at their original
    # resolution into tiles (resized to image_size), tile_stride apart (in [1, tile_size]);
    # maps are stitched back at the original resolution. 0 = off (resize whole images).
    config.data.tile_size = 0
    config.data.tile_stride = 0
    config.data.tile_image_score = "map_max"  # or "tile_max" (maximum of the tiles' scores)

    config.augment = ml_collections.ConfigDict()
    config.augment.perlin_scale_exponents = (0, 6)  # Perlin scale 2**k per axis, k in [0, 6)
    config.augment.perlin_threshold = 0.5
    config.augment.max_beta = 0.8  # blend opacity beta ~ U(0, max_beta)
    config.augment.no_anomaly_prob = 0.5  # half of the samples stay normal
    config.augment.rotate_prob = 0.3  # rotation of the normal image
    config.augment.rotate_angle = 90.0  # degrees, U(-a, a)

    config.model = ml_collections.ConfigDict()
    config.model.recon_width = 128
    config.model.disc_width = 64
    config.model.wdam_blocks = ()  # reconstructive encoder blocks followed by WDAM
    config.model.wdam_reduction = 16

    config.loss = ml_collections.ConfigDict()
    config.loss.ssim_window = 11
    config.loss.ssim_sigma = 1.5
    config.loss.focal_gamma = 2.0

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 8
    config.train.epochs = 700  # of ceil(N_train / batch_size) steps
    config.train.lr = 1e-4
    config.train.lr_milestones = (0.8, 0.9)  # fractions of the epochs
    config.train.lr_decay = 0.2
    config.train.log_every = 100
    config.train.checkpoint_every = 2000
    config.train.keep_checkpoints = 1
    config.train.save_final_params_only = False  # True: the final one without the Adam moments
    config.train.eval_every = 1000
    # "Adding a validation phase": the state with the best validation score (held-out normal
    # images with synthetic anomalies, never the test split) is kept beside the newest one;
    # python -m launch.evaluate --checkpoint=best scores it.
    config.train.select_metric = "val/mean_auroc"

    config.score = ml_collections.ConfigDict()
    config.score.pool_size = 21  # image score: max of the pool_size-averaged anomaly map
    config.score.eval_batch_size = 16
    config.score.num_figures = 8

    if arg in ("demo", "custom"):
        apply_demo(config)
    if arg == "custom":
        apply_custom(config)
    elif arg not in (None, "", "demo"):
        raise ValueError(f"Unknown config argument {arg!r}; use nothing, 'demo' or 'custom'.")
    return config


def apply_custom(config: ml_collections.ConfigDict) -> None:
    """Your own images in the MVTec layout (``<root>/<category>/train/good``, ``test/<defect>``,
    optional ``ground_truth/<defect>/<stem>_mask.png``) with the demo's network and schedule:
    generated textures as the anomaly source (no DTD), and a tenth of the training images held
    out of training and validation for the decision threshold. Give ``--config.data.root`` and
    ``--config.data.category``."""
    config.data.dataset = "mvtec"
    config.data.root = ""
    config.data.category = ""
    config.data.holdout_fraction = 0.1  # a decision threshold from unseen normal images
    config.data.holdout_seed = 0


def apply_demo(config: ml_collections.ConfigDict) -> None:
    """Built-in demo data, generated textures, a reduced network; 15 minutes on 2 CPU cores."""
    config.data.dataset = "demo"
    config.data.root = "workdirs/demo_data"
    config.data.category = "washer"
    config.data.image_size = 64
    config.data.anomaly_source_dir = "procedural"
    config.data.val_fraction = 0.2
    config.data.holdout_fraction = 0.1  # a decision threshold from unseen normal images
    config.model.recon_width = 16
    config.model.disc_width = 16
    config.train.epochs = 250
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 1
    config.train.eval_every = 150
    config.score.pool_size = 5  # DRAEM's 21 px at 256 px, scaled to 64 px
    config.score.eval_batch_size = 16
