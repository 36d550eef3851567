"""TensorFlow Datasets builders for MVTec AD and VisA from a manually downloaded copy.

Neither dataset can be downloaded by TFDS (both need accepting a licence), so the builders read
``manual_dir``, which holds the dataset in the MVTec layout (``<category>/train/good``,
``test/<defect>``, ``ground_truth/<defect>``). One builder config per category; the MVTec AD
builder also has configs for the built-in demo categories (``wdam_jax.data.demo``).

Build in Python::

  build_dataset("mvtec_ad/bottle", manual_dir="/data/mvtec_anomaly_detection", data_dir=data_dir)
  ds = tfds.load("mvtec_ad/bottle", split="test", data_dir=data_dir, download=False)

or with the TFDS command line (in tensorflow-datasets 4.9.10 the ``tfds`` CLI imports
``apache_beam`` at start-up, so it needs ``pip install apache-beam``; the Python route does not)::

  tfds build mvtec_ad/bottle --imports=wdam_jax.data.tfds_builder \\
      --manual_dir=/data/mvtec_anomaly_detection --data_dir=~/tensorflow_datasets

Examples hold images at their original resolution (``image`` uint8 [H, W, 3], ``mask`` uint8
[H, W, 1], 255 = anomalous), ``label`` (0 good, 1 anomalous), ``defect_type`` and ``path``
(relative to the dataset root). The same validation as the numpy readers applies: a missing
category, an image without its mask, an unreadable file or a mask of another size fails the build.
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from wdam_jax.data import datasets, demo
from wdam_jax.data.tf_setup import import_tensorflow

import_tensorflow()

_MVTEC_INSTRUCTIONS = """\
Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad (accept the
licence, CC BY-NC-SA 4.0), extract mvtec_anomaly_detection.tar.xz, and pass the extracted folder
(the one holding bottle/, cable/, ...) as manual_dir. The built-in demo categories can be built
from the folder returned by wdam_jax.data.demo.ensure_demo_data(workdir).
"""

_VISA_INSTRUCTIONS = """\
Download VisA (VisA_20220922.tar) from https://github.com/amazon-science/spot-diff, convert it to
the MVTec-style 1cls layout with the repository's prepare_data.py
(python prepare_data.py --split-type 1cls --data-folder VisA --save-folder VisA_pytorch
--split-file split_csv/1cls.csv), as RealNet does, and pass VisA_pytorch/1cls (the folder
holding candle/, capsules/, ...) as manual_dir.
"""


def _features():
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=["good", "anomalous"]),
            "defect_type": tfds.features.Text(),
            "path": tfds.features.Text(),
        }
    )


def _generate(root: pathlib.Path, category: str, split: str, dataset: str):
    for item in datasets.list_mvtec_items(root, category, split=split, dataset=dataset):
        image = datasets.read_rgb(item.image)
        if item.mask is None:
            mask = np.zeros(image.shape[:2], bool)
        else:
            mask = datasets.read_mask(item.mask)
            if mask.shape != image.shape[:2]:
                raise datasets.DatasetError(
                    f"Mask {item.mask} is {mask.shape} but its image {item.image} is "
                    f"{image.shape[:2]} (H, W). Regenerate the mask at the image's size."
                )
        rel = item.image.relative_to(root).as_posix()
        yield (
            rel,
            {
                "image": image,
                "mask": mask.astype(np.uint8)[..., None] * 255,
                "label": int(item.defect_type != "good"),
                "defect_type": item.defect_type,
                "path": rel,
            },
        )


class MvtecAd(tfds.core.GeneratorBasedBuilder):
    """MVTec AD (Bergmann et al., CVPR 2019) from a manual download, one config per category."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MVTEC_INSTRUCTIONS
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=c, description=f"MVTec AD category {c}.")
        for c in datasets.MVTEC_CATEGORIES
    ] + [
        tfds.core.BuilderConfig(name=c, description=f"Built-in demo category {c}.")
        for c in demo.DEMO_CATEGORIES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MVTec AD industrial anomaly detection, one category.",
            features=_features(),
            supervised_keys=("image", "label"),
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
        )

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        return {split: self._generate_examples(root, split) for split in ("train", "test")}

    def _generate_examples(self, root: pathlib.Path, split: str):
        yield from _generate(root, self.builder_config.name, split, "MVTec AD")


class Visa(tfds.core.GeneratorBasedBuilder):
    """VisA (Zou et al., ECCV 2022) in the MVTec-style 1cls layout, one config per category."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012
    MANUAL_DOWNLOAD_INSTRUCTIONS = _VISA_INSTRUCTIONS
    BUILDER_CONFIGS = [  # noqa: RUF012
        tfds.core.BuilderConfig(name=c, description=f"VisA category {c}.")
        for c in datasets.VISA_CATEGORIES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="VisA visual anomaly dataset (1cls split), one category.",
            features=_features(),
            supervised_keys=("image", "label"),
            homepage="https://github.com/amazon-science/spot-diff",
        )

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        return {split: self._generate_examples(root, split) for split in ("train", "test")}

    def _generate_examples(self, root: pathlib.Path, split: str):
        yield from _generate(root, self.builder_config.name, split, "VisA")


def build_dataset(
    name: str, *, manual_dir: str | pathlib.Path, data_dir: str | pathlib.Path
) -> tfds.core.DatasetBuilder:
    """Prepares ``"mvtec_ad/<category>"`` or ``"visa/<category>"`` from a manual download.

    Args:
      name: dataset and config, e.g. ``"mvtec_ad/bottle"``.
      manual_dir: the extracted dataset (see the builder's MANUAL_DOWNLOAD_INSTRUCTIONS).
      data_dir: where TFDS writes the prepared dataset.

    Returns:
      The prepared builder (``builder.as_dataset(split="test")`` reads it).
    """
    builders = {"mvtec_ad": MvtecAd, "visa": Visa}
    dataset, _, config = name.partition("/")
    if dataset not in builders or not config:
        raise ValueError(f"name must be 'mvtec_ad/<category>' or 'visa/<category>', got {name!r}")
    builder = builders[dataset](config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


def load_split(
    name: str,
    *,
    split: str,
    data_dir: str | pathlib.Path,
    image_size: int,
    crop_size: int | None = None,
    manual_dir: str | pathlib.Path | None = None,
) -> datasets.Split:
    """One split of a prepared TFDS dataset (``"mvtec_ad/<category>"``, ``"visa/<category>"``)
    as a :class:`datasets.Split`, resized as the folder readers do.

    Args:
      name: dataset and config.
      split: ``"train"`` or ``"test"``.
      data_dir: the TFDS data folder (``data.root``).
      image_size, crop_size: resize target and optional centre crop.
      manual_dir: the extracted dataset; when given and the dataset is not prepared in
        ``data_dir`` yet, it is built first.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    builders = {"mvtec_ad": MvtecAd, "visa": Visa}
    dataset, _, config = name.partition("/")
    if dataset not in builders or not config:
        raise ValueError(f"name must be 'mvtec_ad/<category>' or 'visa/<category>', got {name!r}")
    builder = builders[dataset](config=config, data_dir=str(data_dir))
    if not pathlib.Path(builder.data_dir).is_dir():
        if not manual_dir:
            raise datasets.DatasetError(
                f"TFDS dataset {name} is not prepared under {data_dir}. Build it with "
                f"--config.data.tfds_manual_dir=<extracted dataset> (built on first use), or "
                f"wdam_jax.data.tfds_builder.build_dataset({name!r}, manual_dir=..., "
                f"data_dir={str(data_dir)!r})."
            )
        builder = build_dataset(name, manual_dir=manual_dir, data_dir=data_dir)
    examples = (
        (
            ex["image"],
            ex["mask"][..., 0] > 0 if ex["label"] else None,
            ex["defect_type"].decode(),
            ex["path"].decode(),
        )
        for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    )
    return datasets.split_from_arrays(
        examples, root=str(data_dir), image_size=image_size, crop_size=crop_size
    )
