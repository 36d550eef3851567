"""One way to load a category's split for every method: ``load_split(config.data, split=...)``.

``config.data.dataset`` picks the layout:

- ``"mvtec"``: MVTec AD, ``<root>/<category>/{train/good, test/<defect>, ground_truth/...}``;
- ``"visa"``: VisA converted to the 1cls MVTec-style layout (same tree);
- ``"demo"``: the built-in demo data, generated on first use under ``root`` (MVTec layout);
- ``"tfds"``: a TensorFlow Datasets copy prepared by :mod:`wdam_jax.data.tfds_builder` under
  ``root`` (``data.tfds_name``: ``"mvtec_ad"`` or ``"visa"``; built on first use from
  ``data.tfds_manual_dir`` when that is set);
- ``"folder"``: a user's own product, ``<root>/<category>/{good, defect[, masks]}`` by default
  (the folder names are the ``data.folder_*`` fields, see :func:`folder_layout`).

Every method (training batches, fitting, scoring, evaluation) goes through this function, so a
layout that works for one method works for all.
"""

from __future__ import annotations

import pathlib

import ml_collections

from wdam_jax.data import datasets, demo

# The demo data is generated once at this size and seed, shared with configs/fmas_mvtec.py:demo;
# configs resize it to data.image_size.
DEMO_SOURCE_SIZE = 128
DEMO_SEED = 0
DATASETS = ("mvtec", "visa", "demo", "folder", "tfds")

DATASET_HELP = (
    "MVTec AD: download it from https://www.mvtec.com/company/research/datasets/mvtec-ad, "
    "extract it so that <root>/bottle/train/good exists, and pass --config.data.root=<root>. "
    "VisA: download it from https://github.com/amazon-science/spot-diff, convert it with its "
    "prepare_data.py --split-type 1cls, and pass --config.data.dataset=visa "
    "--config.data.root=<root>. Your own images: --config.data.dataset=folder with "
    "<root>/<category>/good (normal), <root>/<category>/defect and optional "
    "<root>/<category>/masks. Or run the built-in demo data: --config=configs/<name>.py:demo."
)


def dataset_root(data_config: ml_collections.ConfigDict) -> pathlib.Path:
    """The folder holding ``<category>/...`` (for the demo: generated here on first use)."""
    root = pathlib.Path(data_config.root)
    if data_config.dataset == "demo":
        return demo.ensure_demo_data(root, seed=DEMO_SEED, image_size=DEMO_SOURCE_SIZE)
    return root


def folder_layout(data_config: ml_collections.ConfigDict) -> dict[str, pathlib.Path | None]:
    """The folders of ``dataset="folder"``: normal, abnormal (optional) and masks (optional)."""
    base = pathlib.Path(data_config.root) / data_config.category
    get = lambda name, default: data_config.get(name, default)
    abnormal = base / get("folder_abnormal", "defect")
    masks = base / get("folder_masks", "masks")
    return {
        "normal_dir": base / get("folder_normal", "good"),
        "abnormal_dir": abnormal if abnormal.is_dir() else None,
        "mask_dir": masks if masks.is_dir() else None,
    }


def load_split(data_config: ml_collections.ConfigDict, *, split: str) -> datasets.Split:
    """One split (``"train"`` or ``"test"``) of ``data_config.category``, resized to
    ``data_config.image_size``."""
    kind = data_config.dataset
    if kind not in DATASETS:
        raise ValueError(f"config.data.dataset={kind!r}; use one of {', '.join(DATASETS)}.")
    size = data_config.image_size
    # Resize, then centre crop (the PatchCore protocol) when data.crop_size is set.
    crop = data_config.get("crop_size", 0) or None
    if kind == "tfds":
        from wdam_jax.data import tfds_builder  # imports TensorFlow Datasets: only when used

        return tfds_builder.load_split(
            f"{data_config.get('tfds_name', 'mvtec_ad')}/{data_config.category}",
            split=split,
            data_dir=data_config.root,
            image_size=size,
            crop_size=crop,
            manual_dir=data_config.get("tfds_manual_dir", "") or None,
        )
    root = dataset_root(data_config)
    if not (root / data_config.category).is_dir():
        raise datasets.DatasetError(
            f"No {kind} data for category {data_config.category!r} under config.data.root="
            f"{str(data_config.root)!r} ({root / data_config.category} does not exist). "
            f"{DATASET_HELP}"
        )
    crop = (
        data_config.get("crop_size", 0) or None
    )  # resize, then centre crop (PatchCore's protocol)
    if kind == "folder":
        layout = folder_layout(data_config)
        return datasets.load_folder(**layout, split=split, image_size=size, crop_size=crop)
    loader = datasets.load_visa if kind == "visa" else datasets.load_mvtec
    return loader(root, data_config.category, split=split, image_size=size, crop_size=crop)
