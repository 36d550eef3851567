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

import dataclasses
import hashlib
import json
import pathlib

import ml_collections
import numpy as np

from wdam_jax.data import datasets, demo, tiling

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
    if data_config.dataset == "demo" and data_config.category in demo.LARGE_CATEGORIES:
        return demo.ensure_large_demo_data(root, seed=DEMO_SEED)  # only when named
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


def check(data_config: ml_collections.ConfigDict) -> list[str]:
    """Problems with ``config.data`` found without loading anything (empty if none): each names
    the field, the value and the fix."""
    kind, root, category = data_config.dataset, data_config.root, data_config.category
    if kind not in DATASETS:
        return [f"config.data.dataset={kind!r} is not one of {', '.join(DATASETS)}."]
    problems = []
    if data_config.image_size <= 0:
        problems.append(f"config.data.image_size={data_config.image_size}: must be positive.")
    crop = data_config.get("crop_size", 0) or 0
    if crop < 0 or crop > data_config.image_size:
        problems.append(
            f"config.data.crop_size={crop}: must be 0 (no crop) or at most data.image_size="
            f"{data_config.image_size}."
        )
    problems += tiling.problems(data_config)
    if kind in ("demo", "tfds"):
        return problems  # generated on first use / built from tfds_manual_dir (checked there)
    if not root:
        return [*problems, f"config.data.root is empty: set --config.data.root. {DATASET_HELP}"]
    if not pathlib.Path(root).is_dir():
        return [
            *problems,
            f"config.data.root={str(root)!r} does not exist (relative paths are relative to the "
            f"working directory, {pathlib.Path.cwd()}). {DATASET_HELP}",
        ]
    base = pathlib.Path(root) / category
    if not category or not base.is_dir():
        found = sorted(p.name for p in pathlib.Path(root).iterdir() if p.is_dir())
        return [
            *problems,
            f"config.data.category={category!r}: no folder {base}. Folders under "
            f"data.root: {', '.join(found) or 'none'}.",
        ]
    if kind == "folder":
        layout = folder_layout(data_config)
        if not layout["normal_dir"].is_dir():
            problems.append(
                f"{layout['normal_dir']} (normal images of dataset='folder') does not exist; put "
                "the defect-free images there, or set config.data.folder_normal."
            )
        return problems
    for needed in ("train/good", "test"):
        if not (base / needed).is_dir():
            problems.append(
                f"{base / needed} is missing: data.dataset={kind!r} expects "
                f"<root>/<category>/{{train/good, test/<defect>, ground_truth/<defect>}}; for "
                "a folder of normal and defective images use --config.data.dataset=folder."
            )
    return problems


def train_fingerprint(data_config: ml_collections.ConfigDict) -> str:
    """A hash of the training files (relative paths, sizes, modification times) and of the data
    fields that change what is read: a statistic fitted on other files does not match it."""
    names = ("dataset", "category", "image_size", "crop_size", "holdout_fraction", "holdout_seed")
    fields = {k: data_config.get(k) for k in names}
    if data_config.get("tile_size", 0):  # only when set: untiled runs keep their fingerprint
        fields |= {k: data_config.get(k) for k in ("tile_size", "tile_stride")}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    if data_config.dataset == "tfds":
        digest.update(str(data_config.root).encode())
        return digest.hexdigest()
    base = dataset_root(data_config) / data_config.category
    folder = (
        folder_layout(data_config)["normal_dir"]
        if data_config.dataset == "folder"
        else base / "train" / "good"
    )
    if folder.is_dir():
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def holdout_indices(num_images: int, *, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the training images held out from training and ``fit``.

    ``round(fraction * num_images)`` images (at least 2 when ``fraction > 0``, at most all but
    one), chosen by a permutation seeded with ``seed``: the same files for every method and every
    command of a run.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"config.data.holdout_fraction={fraction}: use a fraction in [0, 1).")
    n = 0 if fraction == 0 else min(num_images - 1, max(2, round(fraction * num_images)))
    if fraction and n < 2:
        raise datasets.DatasetError(
            f"config.data.holdout_fraction={fraction} of {num_images} training images leaves "
            "fewer than 2 held-out images or no training image; add images or set "
            "holdout_fraction=0."
        )
    return np.sort(np.random.default_rng([seed, 0x401D]).permutation(num_images)[:n])


def _subset(split: datasets.Split, indices: np.ndarray) -> datasets.Split:
    idx = [int(i) for i in indices]
    return dataclasses.replace(
        split,
        images=split.images[indices],
        masks=split.masks[indices],
        labels=split.labels[indices],
        defect_types=[split.defect_types[i] for i in idx],
        paths=[split.paths[i] for i in idx],
        original_masks=[split.original_masks[i] for i in idx],
    )


def load_split(data_config: ml_collections.ConfigDict, *, split: str) -> datasets.Split:
    """One split (``"train"``, ``"holdout"`` or ``"test"``) of ``data_config.category``, resized
    to ``data_config.image_size``.

    With tiling (``data.tile_size > 0``, :mod:`wdam_jax.data.tiling`) images are read at their
    original resolution (one size per split); the ``"train"`` split is then the *tiles* of the
    training images, each resized to ``data.image_size``: the tiles are the training examples
    (and what ``fit`` sees); a tile's path is its image's. ``"holdout"`` and ``"test"`` are the
    whole images, scored tile by tile (:meth:`wdam_jax.methods.base.Method.score_images`).

    ``data.holdout_fraction`` (default 0: none) of the training images form the ``"holdout"``
    split and are left out of ``"train"``, so neither training nor ``fit`` sees them: their
    scores are those of unseen normal images, from which :mod:`wdam_jax.thresholds` sets the
    normal-only decision threshold. The choice is seeded by ``data.holdout_seed`` (default 0).
    """
    out = _load_with_holdout(data_config, split=split)
    tiles = tiling.from_config(data_config)
    if tiles is None:
        return out
    corners = tiling.grid(*out.images.shape[1:3], size=tiles.size, stride=tiles.stride)
    return tile_split(out, tiles, corners) if split == "train" else out


def tile_split(split: datasets.Split, tiles: tiling.Tiling, corners: np.ndarray) -> datasets.Split:
    """The normal images of ``split`` ``[N, H, W, 3]`` as their tiles ``[N * T, s, s, 3]`` (image
    by image, each image's tiles in grid order), ``s = data.image_size``."""
    if split.labels.any():
        raise ValueError("tile_split: training tiles are cut from normal images only.")
    images = np.concatenate(
        [
            tiling.cut(im, corners, size=tiles.size, input_size=tiles.input_size)
            for im in split.images
        ]
    )
    n, side = len(images), tiles.input_size
    owner = np.repeat(np.arange(len(split)), len(corners))
    return dataclasses.replace(
        split,
        images=images,
        masks=np.zeros((n, side, side), bool),
        labels=np.zeros(n, np.int32),
        defect_types=["good"] * n,
        paths=[split.paths[i] for i in owner],
        original_masks=[np.zeros((side, side), bool)] * n,
    )


def _load_with_holdout(data_config: ml_collections.ConfigDict, *, split: str) -> datasets.Split:
    fraction = float(data_config.get("holdout_fraction", 0.0) or 0.0)
    if split == "holdout" or (split == "train" and fraction):
        if split == "holdout" and not fraction:
            raise ValueError(
                "The holdout split is empty: config.data.holdout_fraction is 0 (or absent)."
            )
        train = _load_split(data_config, split="train")
        held = holdout_indices(
            len(train), fraction=fraction, seed=int(data_config.get("holdout_seed", 0))
        )
        keep = held if split == "holdout" else np.setdiff1d(np.arange(len(train)), held)
        return _subset(train, keep)
    return _load_split(data_config, split=split)


def _load_split(data_config: ml_collections.ConfigDict, *, split: str) -> datasets.Split:
    kind = data_config.dataset
    if kind not in DATASETS:
        raise ValueError(f"config.data.dataset={kind!r}; use one of {', '.join(DATASETS)}.")
    # Tiling reads the original resolution (None); else resize, then centre crop (the
    # PatchCore protocol) when data.crop_size is set.
    size = None if data_config.get("tile_size", 0) else data_config.image_size
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
    if kind == "folder":
        layout = folder_layout(data_config)
        return datasets.load_folder(**layout, split=split, image_size=size, crop_size=crop)
    loader = datasets.load_visa if kind == "visa" else datasets.load_mvtec
    return loader(root, data_config.category, split=split, image_size=size, crop_size=crop)
