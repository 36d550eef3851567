"""Fig. 2: the Haar sub-bands of a normal image, of its synthetic anomalous counterpart, and their
difference.

One PNG per example, three rows: the normal image, the anomalous one, and their absolute
difference; columns: the image, its LL, LH, HL and HH sub-bands (``wdam_jax.wavelet.dwt2`` of the
luminance, the project's own Haar), and the anomaly mask. Detail sub-bands are shown as absolute
values; each sub-band column has one colour scale for the normal and the anomalous row, so the
two are comparable, and the difference row has its own.

The anomalous counterpart comes from the project's own augmentations (``source``): CutPaste or
CutPaste-scar (:mod:`wdam_jax.data.augment`, with the config's ``augment`` ranges when it has
them), DRAEM's Perlin-noise anomaly with its texture bank (``data.anomaly_source_dir``), or FMAS
records paired with their source images.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from wdam_jax import reporting
from wdam_jax.data import augment, sources
from wdam_jax.data.anomaly_sources import PROCEDURAL, TextureBank
from wdam_jax.errors import UserError
from wdam_jax.wavelet import dwt2
from wdam_jax.wdam import SUBBANDS

SOURCES = ("cutpaste", "scar", "perlin", "fmas")
LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601


def subbands(image: np.ndarray) -> np.ndarray:
    """``[4, ceil(H/2), ceil(W/2)]`` LL, LH, HL, HH of an ``[H, W, 3]`` image's luminance."""
    gray = jnp.asarray(image @ LUMA)[None, :, :, None]
    return np.stack([np.asarray(b[0, :, :, 0]) for b in dwt2(gray)])


def draw(normal: np.ndarray, anomalous: np.ndarray, mask: np.ndarray, *, title: str) -> Figure:
    """The figure of one example (see the module docstring).

    Args:
      normal, anomalous: ``[H, W, 3]`` in [0, 1].
      mask: ``[H, W]`` the synthetic anomaly's pixels.
      title: the figure's title.
    """
    bands = {"normal": subbands(normal), "anomalous": subbands(anomalous)}
    bands["|difference|"] = np.abs(bands["anomalous"] - bands["normal"])
    pictures = {
        "normal": normal,
        "anomalous": anomalous,
        "|difference|": np.abs(anomalous - normal).max(axis=-1),
    }
    fig = Figure(figsize=(2.0 * 6, 2.1 * 3), layout="constrained")
    axes = fig.subplots(3, 2 + len(SUBBANDS), squeeze=False)
    for i, (row, b) in enumerate(bands.items()):
        picture = pictures[row]
        axes[i, 0].imshow(np.clip(picture, 0, 1), cmap=None if picture.ndim == 3 else "magma")
        axes[i, 0].set_ylabel(row, fontsize=9)
        for k, name in enumerate(SUBBANDS):
            shown = b[k] if name == "LL" else np.abs(b[k])
            if row == "|difference|":
                hi = float(b[k].max())
            else:  # one scale for the normal and the anomalous row
                pair = [bands["normal"][k], bands["anomalous"][k]]
                hi = max(float(np.abs(p).max()) for p in pair)
            cmap = "magma" if row == "|difference|" else "gray"
            axes[i, 1 + k].imshow(shown, cmap=cmap, vmin=0, vmax=max(hi, 1e-6))
            if i == 0:
                axes[i, 1 + k].set_title(name, fontsize=9)
        axes[i, -1].imshow(mask, cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, -1].set_title("mask", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return fig


def synthesize(
    config: ml_collections.ConfigDict, images: np.ndarray, *, source: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Anomalous counterparts of ``images`` ``[N, S, S, 3]`` from an augmentation.

    Returns:
      ``(anomalous [N, S, S, 3], masks [N, S, S] bool)``; example ``i`` uses the generator
      ``default_rng([seed, i])``.
    """
    a = config.get("augment")
    outs, masks = [], []
    if source == "perlin":
        bank = TextureBank(
            config.data.get("anomaly_source_dir", PROCEDURAL),
            image_size=images.shape[1],
            seed=seed,
        )
    for i, image in enumerate(images):
        rng = np.random.default_rng([seed, i])
        if source == "cutpaste":
            out, mask = augment.cutpaste_with_mask(rng, image, **augment.cutpaste_options(a))
        elif source == "scar":
            out, mask = augment.cutpaste_scar_with_mask(rng, image, **augment.scar_options(a))
        elif source == "perlin":
            out, mask = augment.draem_anomaly(
                rng,
                image,
                bank.get(int(rng.integers(len(bank)))),
                **augment.draem_options(a),
                no_anomaly_prob=0.0,
            )
        else:
            raise UserError(f"--source={source!r}: use one of {', '.join(SOURCES)}.")
        outs.append(out)
        masks.append(mask)
    return np.stack(outs), np.stack(masks)


def fmas_pairs(
    config: ml_collections.ConfigDict, records: str, *, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The first ``count`` FMAS records of ``config.data.category`` and their source images
    (from the train split; a record's ``image/source`` and a training image's path match when
    one ends with the other): ``(normal, anomalous, masks, names)``."""
    from wdam_jax.data import fmas_records  # TensorFlow: only when FMAS records are read

    data = config.data
    crop = data.get("crop_size", 0) or None
    images, masks, origins = fmas_records.load_fmas_arrays(
        records, image_size=data.image_size, crop_size=crop, category=data.category
    )
    train = sources.load_split(data, split="train")
    normal, keep = [], []
    for k, origin in enumerate(origins):
        hits = [i for i, p in enumerate(train.paths) if origin.endswith(p) or p.endswith(origin)]
        if hits:
            normal.append(train.images[hits[0]])
            keep.append(k)
        if len(keep) == count:
            break
    if not keep:
        raise UserError(
            f"None of the FMAS records in {records} names a training image of "
            f"{data.category!r} under data.root={data.root!r} (e.g. {origins[0]!r}); point "
            "--config.data.root at the dataset FMAS read."
        )
    names = [origins[k] for k in keep]
    return np.stack(normal), images[keep], masks[keep], names


def write_figures(
    config: ml_collections.ConfigDict,
    *,
    out: str | pathlib.Path,
    source: str,
    count: int = 4,
    seed: int = 0,
    records: str = "",
) -> list[pathlib.Path]:
    """Writes ``<out>/subbands_<source>_<k>.png`` for ``count`` normal training images of
    ``config.data`` and their anomalous counterparts; returns the paths."""
    if source not in SOURCES:
        raise UserError(f"--source={source!r}: use one of {', '.join(SOURCES)}.")
    if count < 1:
        raise UserError(f"--num_examples={count}: must be at least 1.")
    if source == "fmas":
        records = records or config.data.get("fmas_records", "")
        if not records:
            raise UserError("--source=fmas needs --records=<glob of FMAS TFRecord shards>.")
        normal, anomalous, masks, names = fmas_pairs(config, records, count=count)
    else:
        train = sources.load_split(config.data, split="train")
        normal = train.images[:count]
        anomalous, masks = synthesize(config, normal, source=source, seed=seed)
        names = list(train.paths[: len(normal)])
    paths = []
    for k, (n, a, m, name) in enumerate(zip(normal, anomalous, masks, names, strict=True)):
        fig = draw(n, a, m.astype(np.float32), title=f"{name}: {source}")
        paths.append(reporting.write_png(fig, pathlib.Path(out) / f"subbands_{source}_{k}.png"))
    return paths
