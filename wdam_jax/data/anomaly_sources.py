"""DRAEM's anomaly-source textures: a folder of images (DTD in DRAEM), or procedural textures.

DRAEM blends external texture images into its Perlin-noise masks. The paper's setting reads them
from a folder (``config.data.anomaly_source_dir``; DTD's ``images/<class>/*.jpg``). For runs that
must download nothing (the demo, tests) ``anomaly_source_dir = "procedural"`` draws textures
from five generic families instead: coloured fractal noise, gratings, checkerboards, dots and
Voronoi cells. They are built from nothing but a seed, so they share no image with any dataset
(the demo's brick / grass / gravel photographs included).
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import skimage.color
import skimage.transform

from wdam_jax.data import augment, datasets

PROCEDURAL = "procedural"
NUM_PROCEDURAL = 256  # distinct procedural textures per seed
_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def _palette(rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` random RGB colours, spread in hue and value."""
    hsv = np.stack([rng.random(k), rng.uniform(0.2, 1.0, k), rng.uniform(0.1, 1.0, k)], axis=-1)
    return skimage.color.hsv2rgb(hsv[None])[0].astype(np.float32)


def _colourise(rng: np.random.Generator, field: np.ndarray) -> np.ndarray:
    """Maps a scalar field in [0, 1] through a random piecewise-linear colour ramp."""
    k = int(rng.integers(2, 5))
    stops = np.sort(np.concatenate([[0.0, 1.0], rng.random(k - 2)]))
    colours = _palette(rng, k)
    return np.stack([np.interp(field, stops, colours[:, c]) for c in range(3)], axis=-1)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / max(float(x.max() - x.min()), 1e-6)


def procedural_texture(seed: int, index: int, size: int) -> np.ndarray:
    """Texture ``index`` of the procedural family: a pure function of ``(seed, index, size)``.

    Returns:
      ``[size, size, 3]`` float32 in [0, 1].
    """
    rng = np.random.default_rng([seed, index, 104729])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = index % 5
    if kind == 0:  # fractal Perlin noise, 2-4 octaves
        field = np.zeros((size, size), np.float32)
        base = int(2 ** rng.integers(0, 3))
        for octave in range(int(rng.integers(2, 5))):
            res = min(base * 2**octave, size)
            field += 0.5**octave * augment.perlin_noise_2d(rng, (size, size), (res, res))
    elif kind == 1:  # gratings: sum of one or two rotated sinusoids, optionally squared off
        field = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(1, 3))):
            theta, freq = rng.uniform(0, np.pi), rng.uniform(2, 24)
            field += np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))
        if rng.random() < 0.5:
            field = np.sign(field)
    elif kind == 2:  # checkerboard, rotated and scaled
        theta, cells = rng.uniform(0, np.pi), rng.uniform(3, 16)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        field = (np.floor(u * cells) + np.floor(v * cells)) % 2
    elif kind == 3:  # dots of random radii
        field = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(10, 80))):
            cy, cx, r = rng.random(), rng.random(), rng.uniform(0.01, 0.08)
            field = np.maximum(field, (np.hypot(yy - cy, xx - cx) < r) * rng.uniform(0.3, 1.0))
    else:  # Voronoi cells: distance to the nearest of random seeds, or the cell's id
        points = rng.random((int(rng.integers(8, 64)), 2))
        d = np.hypot(yy[..., None] - points[:, 0], xx[..., None] - points[:, 1])
        field = np.sort(d, axis=-1)[..., 0] if rng.random() < 0.5 else np.argmin(d, -1) * 0.618 % 1
    image = _colourise(rng, _normalise(np.asarray(field, np.float32)))
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.05), image.shape)  # grain
    return np.clip(image, 0.0, 1.0).astype(np.float32)


class TextureBank:
    """The anomaly-source textures of a run; ``bank.get(i)`` is texture ``i`` at ``image_size``.

    Folder textures are read and resized on demand (DTD holds 5640 images; all of them in memory
    at 256 x 256 would take 1 GB as uint8).

    Args:
      source_dir: a folder searched recursively for images, or ``"procedural"``.
      image_size: side of the returned textures.
      seed: the procedural textures' seed.
    """

    def __init__(self, source_dir: str, *, image_size: int, seed: int):
        self.image_size = image_size
        self.seed = seed
        self.procedural = source_dir == PROCEDURAL
        self.paths: list[pathlib.Path] = []
        if self.procedural:
            return
        root = pathlib.Path(source_dir)
        if not root.is_dir():
            raise datasets.DatasetError(
                f"config.data.anomaly_source_dir={source_dir!r} is not a folder. DRAEM blends "
                "texture images into its anomalies: download DTD from "
                "https://www.robots.ox.ac.uk/~vgg/data/dtd/ and pass "
                "--config.data.anomaly_source_dir=<dtd>/images, or use "
                f"--config.data.anomaly_source_dir={PROCEDURAL} for generated textures."
            )
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in _EXTENSIONS)
        if not self.paths:
            raise datasets.DatasetError(
                f"config.data.anomaly_source_dir={source_dir!r} holds no image "
                f"({', '.join(_EXTENSIONS)}); point it at DTD's images/ folder."
            )

    def __len__(self) -> int:
        return NUM_PROCEDURAL if self.procedural else len(self.paths)

    @functools.lru_cache(maxsize=128)  # noqa: B019 (the bank lives as long as the run)
    def get(self, index: int) -> np.ndarray:
        """Texture ``index`` as ``[S, S, 3]`` float32 in [0, 1]."""
        s = self.image_size
        if self.procedural:
            return procedural_texture(self.seed, index, s)
        image = datasets.read_rgb(self.paths[index]).astype(np.float32) / 255.0
        return skimage.transform.resize(image, (s, s), order=1, anti_aliasing=True).astype(
            np.float32
        )


def perlin_validation_set(
    images: np.ndarray, *, seed: int, source_dir: str = PROCEDURAL
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out normal images and one DRAEM-style anomaly on each, for model selection.

    A method that trains on one family of synthetic anomalies (CutPaste's patches and scars)
    is validated on another (Perlin-noise masks blended with textures,
    :func:`wdam_jax.data.augment.draem_anomaly`), so a setting chosen on it is not chosen for
    detecting its own training task. Each anomaly is redrawn, deterministically, until its mask
    is not empty.

    Args:
      images: ``[V, S, S, 3]`` float32 normal images never trained on (the holdout split).
      seed: the run's seed.
      source_dir: the texture source (:class:`TextureBank`).

    Returns:
      ``(images [2V, S, S, 3], masks [2V, S, S] bool)``: the V normal images, then the V
      anomalous ones.
    """
    bank = TextureBank(source_dir, image_size=images.shape[1], seed=seed)
    anomalous, masks = [], []
    for v, image in enumerate(images):
        for attempt in range(100):
            rng = np.random.default_rng([seed, 161803, v, attempt])
            texture = bank.get(int(rng.integers(len(bank))))
            x, m = augment.draem_anomaly(rng, image, texture, no_anomaly_prob=0.0)
            if m.any():
                break
        anomalous.append(x)
        masks.append(m)
    zeros = np.zeros((len(images), *images.shape[1:3]), bool)
    return np.concatenate([images, np.stack(anomalous)]), np.concatenate([zeros, np.stack(masks)])
