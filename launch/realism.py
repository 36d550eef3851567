r"""Table 2: realism of synthetic anomalies (FID, LPIPS) against the real anomalous test images.

  python -m launch.realism --real=data/mvtec_ad/bottle/test \
      --synthetic=fmas,cutpaste,scar,draem --fmas_records='workdirs/fmas_mvtec/fmas-*.tfrecord' \
      --texture_dir=data/dtd/images --out=workdirs/realism/bottle

``--real``: one or more ``<root>/<category>/test`` folders; their defect images (every subfolder
but ``good``) are the real set, pooled over the folders given (one folder: one category's row;
all fifteen: the whole dataset). ``--synthetic``: the sets to compare, one anomalous image per
normal training image (``<root>/<category>/train/good``, or ``--normal``) as the paper's Table 2:

- ``fmas``: the FMAS records of those categories (``--fmas_records``, read without TensorFlow);
- ``cutpaste``, ``scar``: this project's CutPaste and CutPaste-scar (``wdam_jax.data.augment``)
  with ``configs/cutpaste.py``'s parameters (scar sizes are for 256 px, scaled to
  ``--image_size``);
- ``draem``: DRAEM's Perlin-noise anomaly with ``configs/draem.py``'s parameters and textures from
  ``--texture_dir`` (DTD's ``images/``, or ``procedural``), always anomalous (a draw with an empty
  mask is redrawn).

Every image is resized to ``--image_size`` (the training size) with the data loaders' kernel.
FID and LPIPS are computed on the PyTorch side (``synthesis/realism.py``, whose docstring states
how the paper's LPIPS is read); writes ``realism.{md,csv,json}`` to ``--out``.
"""

from __future__ import annotations

from absl import app, flags

from configs import cutpaste as cutpaste_config
from configs import draem as draem_config
from launch import cli
from synthesis import realism, selector
from wdam_jax.analysis import realism as realism_lib
from wdam_jax.data.anomaly_sources import PROCEDURAL

SOURCES = realism_lib.SOURCES
_REAL = flags.DEFINE_list("real", None, "<root>/<category>/test folders.", required=True)
_SYNTHETIC = flags.DEFINE_list("synthetic", list(SOURCES), f"Sets to compare: {SOURCES}.")
_OUT = flags.DEFINE_string("out", None, "Folder of realism.{md,csv,json}.", required=True)
_NORMAL = flags.DEFINE_list(
    "normal", None, "Normal image folders, one per --real (default <real>/../train/good)."
)
_FMAS_RECORDS = flags.DEFINE_string("fmas_records", "", "Glob of FMAS TFRecord files.")
_TEXTURE_DIR = flags.DEFINE_string(
    "texture_dir",
    draem_config.get_config().data.anomaly_source_dir,
    f"DRAEM's texture folder (DTD images/) or '{PROCEDURAL}'.",
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Side every image is resized to.")
_MAX_IMAGES = flags.DEFINE_integer(
    "max_images", 0, "At most this many images per set (a seeded subset); 0: all."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the augmentations and subsets.")
_INCEPTION = flags.DEFINE_string(
    "inception_weights", realism.DEFAULT_INCEPTION_WEIGHTS, "torch-fidelity InceptionV3 file."
)
_FID_FEATURES = flags.DEFINE_enum(
    "fid_features", "2048", [str(f) for f in realism.FID_FEATURES], "Inception layer of FID."
)
_LPIPS_NET = flags.DEFINE_enum("lpips_net", "alex", list(selector.BACKBONE_FILES), "LPIPS net.")
_LPIPS_BACKBONE = flags.DEFINE_string(
    "lpips_backbone", "torch_hub", "LPIPS backbone weights: 'torch_hub', a path, or 'random'."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per forward pass.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    realism_lib.compute(
        realism_lib.RealismInputs(
            real=_REAL.value,
            out=_OUT.value,
            cutpaste_augment=cutpaste_config.get_config().augment,
            draem_augment=draem_config.get_config().augment,
            synthetic=_SYNTHETIC.value,
            normal=_NORMAL.value,
            fmas_records=_FMAS_RECORDS.value,
            texture_dir=_TEXTURE_DIR.value,
            image_size=_IMAGE_SIZE.value,
            max_images=_MAX_IMAGES.value,
            seed=_SEED.value,
            inception_weights=_INCEPTION.value,
            fid_features=int(_FID_FEATURES.value),
            lpips_net=_LPIPS_NET.value,
            lpips_backbone=_LPIPS_BACKBONE.value,
            batch_size=_BATCH_SIZE.value,
        )
    )


if __name__ == "__main__":
    cli.run(main, config_flag=None)
