"""DRAEM's training data: the normal images split into train / validation, the anomaly sources
(Perlin textures or FMAS samples) and one training sample's synthesis."""

from __future__ import annotations

import ml_collections
import numpy as np

from wdam_jax.data import augment, datasets
from wdam_jax.data.anomaly_sources import TextureBank
from wdam_jax.data.sources import load_split

ANOMALY_SOURCES = ("perlin", "fmas")


class DraemData:
    """The normal training images split into train / validation, and the anomaly sources."""

    def __init__(self, config: ml_collections.ConfigDict):
        data = config.data
        if data.anomaly_source not in ANOMALY_SOURCES:
            raise ValueError(
                f"config.data.anomaly_source={data.anomaly_source!r}; use one of "
                f"{', '.join(ANOMALY_SOURCES)}."
            )
        if not 0.0 <= data.val_fraction < 1.0:
            raise ValueError(f"config.data.val_fraction={data.val_fraction}; use [0, 1).")
        split = load_split(data, split="train")
        n = len(split)
        n_val = round(data.val_fraction * n)
        if data.val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
        order = np.random.default_rng([config.seed, 271828]).permutation(n)
        train_idx, val_idx = np.sort(order[: n - n_val]), np.sort(order[n - n_val :])
        self.images = split.images[train_idx]
        self.val_images = split.images[val_idx]
        self.textures = None
        self.fmas = self.val_fmas = None
        if data.anomaly_source == "perlin":
            self.textures = TextureBank(
                data.anomaly_source_dir, image_size=data.image_size, seed=config.seed
            )
        else:
            self.fmas, self.val_fmas = self._load_fmas(data, split, train_idx, val_idx)

    @staticmethod
    def _load_fmas(data, split: datasets.Split, train_idx, val_idx):
        """FMAS samples ``(image, mask, index of the source image)`` of the train and
        validation images; samples of other images are dropped."""
        from wdam_jax.data import fmas_records

        images, masks, sources = fmas_records.load_fmas_arrays(
            data.fmas_records, image_size=data.image_size
        )
        where = {path: i for i, path in enumerate(split.paths)}
        out = []
        for part in (train_idx, val_idx):
            position = {int(j): k for k, j in enumerate(part)}
            keep = [i for i, s in enumerate(sources) if where.get(s, -1) in position]
            owner = np.asarray([position[where[sources[i]]] for i in keep], np.int64)
            out.append((images[keep], masks[keep], owner))
        parts = zip(out, (train_idx, val_idx), ("training", "validation"), strict=True)
        for (samples, *_), part, name in parts:
            if len(part) and not len(samples):
                raise datasets.DatasetError(
                    f"The FMAS records {data.fmas_records!r} hold no sample made from a {name} "
                    f"image of {data.category!r} (sources must be paths like "
                    f"{split.paths[0]!r}). Run python -m launch.synthesize for this category, "
                    "fix config.data.fmas_records, or set config.data.val_fraction=0."
                )
        return out


def synthesize(
    rng: np.random.Generator,
    image: np.ndarray,
    data: DraemData,
    augment_config: ml_collections.ConfigDict,
    *,
    fmas: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    images: np.ndarray,
    no_anomaly_prob: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample from a normal ``image`` ``[S, S, 3]``.

    Returns:
      ``(target [S, S, 3], input [S, S, 3], mask [S, S] float32)``: the reconstruction target,
      the (possibly anomalous) network input and its anomaly mask.
    """
    a = augment_config
    if rng.random() < a.rotate_prob:
        image = augment.rotate_normal(rng, image, max_angle=a.rotate_angle)
    if fmas is not None:
        if rng.random() < no_anomaly_prob:
            return image, image, np.zeros(image.shape[:2], np.float32)
        k = int(rng.integers(len(fmas[0])))
        target = images[fmas[2][k]]
        return target, fmas[0][k], fmas[1][k].astype(np.float32)
    texture = data.textures.get(int(rng.integers(len(data.textures))))
    anomalous, mask = augment.draem_anomaly(
        rng,
        image,
        texture,
        **augment.draem_options(a),
        no_anomaly_prob=no_anomaly_prob,
    )
    return image, anomalous, mask.astype(np.float32)
