"""CutPaste's training data: the normal images (with foreground masks for FM, FMAS samples)
and the 3-way batches (normal, anomaly source, scar) of the proxy task."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from wdam_jax.data import augment, datasets, pipeline
from wdam_jax.data.sources import load_split
from wdam_jax.models.cutpaste import NUM_CLASSES

NORMAL, ANOMALY, SCAR = 0, 1, 2
CLASS_NAMES = ("normal", "anomaly source", "scar")

# --------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class TrainData:
    """Normal training images and what the augmentations need.

    Attributes:
      images: ``[N, S, S, 3]`` float32 in [0, 1].
      foreground: ``[N, S, S]`` bool foreground masks (FM), or None.
      fmas: ``[M, S, S, 3]`` FMAS samples of this category, or None.
    """

    images: np.ndarray
    foreground: np.ndarray | None
    fmas: np.ndarray | None


def load_train_data(config: ml_collections.ConfigDict) -> TrainData:
    """The train split plus foreground masks (FM) and FMAS samples (``data.anomaly_source``)."""
    data = config.data
    if config.augment.foreground_mask and not data.foreground_root:
        raise ValueError(
            "config.augment.foreground_mask (FM) needs config.data.foreground_root: the folder "
            "of <category>/train/good/<stem>.png masks written by the FMAS mask stage "
            "(python -m launch.synthesize)."
        )
    if config.augment.foreground_mask and data.get("tile_size", 0):
        raise ValueError(
            "config.augment.foreground_mask (FM) with config.data.tile_size: the foreground "
            "masks are whole images, not tiles; set augment.foreground_mask=False or "
            "data.tile_size=0."
        )
    split = load_split(data, split="train")
    foreground = None
    if config.augment.foreground_mask:
        foreground = datasets.load_foreground_masks(
            data.foreground_root, split, image_size=data.image_size
        )
    fmas = None
    if data.anomaly_source == "fmas":
        from wdam_jax.data import fmas_records

        # Only this category's records are decoded (all of MVTec at 256 px is ~3 GB).
        fmas, _, _ = fmas_records.load_fmas_arrays(
            data.fmas_records, image_size=data.image_size, category=data.category
        )
    elif data.anomaly_source != "cutpaste":
        raise ValueError(
            f"config.data.anomaly_source={data.anomaly_source!r}; use 'cutpaste' or 'fmas'."
        )
    return TrainData(images=split.images, foreground=foreground, fmas=fmas)


def make_batch(
    data: TrainData,
    step: int,
    *,
    batch_size: int,
    seed: int,
    source: str,
    augment_config: ml_collections.ConfigDict,
    part: int = 0,
    parts: int = 1,
) -> dict[str, np.ndarray]:
    """Part ``part`` of ``parts`` of batch ``step`` of the 3-way task, a pure function of
    ``(seed, step)`` (see :meth:`wdam_jax.methods.base.Method.batch`).

    Each of the part's ``b = batch_size / parts`` normal images yields itself (class 0), an
    anomaly-source image (class 1: CutPaste of it, or an FMAS sample drawn at random) and a scar
    of it (class 2).

    Returns:
      ``image`` ``[3b, S, S, 3]`` float32 (normals, then anomalies, then scars) and ``label``
      ``[3b]`` int32.
    """
    a = augment_config
    positions, idx = pipeline.part_indices(
        step,
        num_examples=len(data.images),
        batch_size=batch_size,
        seed=seed,
        part=part,
        parts=parts,
    )
    views: list[list[np.ndarray]] = [[], [], []]
    for i, j in zip(positions, idx, strict=True):
        rng = np.random.default_rng([seed, step, i])
        image = data.images[j]
        fg = data.foreground[j] if data.foreground is not None else None
        if source == "fmas":
            anomaly = data.fmas[int(rng.integers(len(data.fmas)))]
        else:
            confine = a.get("fm_confines_cutpaste", False)
            anomaly = augment.cutpaste(
                rng, image, **augment.cutpaste_options(a), fg_mask=fg if confine else None
            )
        scar = augment.cutpaste_scar(
            rng,
            image,
            **augment.scar_options(a),
            fg_mask=fg,
        )
        for view, x in zip(views, (image, anomaly, scar), strict=True):
            view.append(np.asarray(x, np.float32))
    images = np.concatenate([np.stack(v) for v in views])
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), len(idx))
    return {"image": images, "label": labels}
