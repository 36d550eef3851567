"""Host-side anomaly generators: CutPaste, CutPaste-scar (Li et al., 2021) and DRAEM's Perlin-noise
anomalies (Zavrtanik et al., 2021).

Everything is numpy on float32 images [H, W, 3] in [0, 1] and deterministic given the
``np.random.Generator`` passed in (no global RNG). With ``fg_mask`` the pasted region is confined to
the foreground, the paper's FM option (Sec. 4.3): the paste location is drawn on a foreground pixel
and the pasted region is intersected with the foreground, the same ``M_fg ∩ M_rect`` rule as
FMAS's eq. 1.

Each generator has one return type: ``cutpaste`` / ``cutpaste_scar`` return the image,
``cutpaste_with_mask`` / ``cutpaste_scar_with_mask`` / ``draem_anomaly`` return (image, mask).
"""

from __future__ import annotations

import ml_collections
import numpy as np
import scipy.ndimage
import skimage.color
import skimage.transform

Range = tuple[float, float]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
    return image


def _check_fg(fg_mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    if fg_mask is None:
        return None
    fg = np.asarray(fg_mask, dtype=bool)
    if fg.shape != shape:
        raise ValueError(f"fg_mask has shape {fg.shape}, the image {shape}; they must match.")
    if not fg.any():
        raise ValueError("fg_mask is empty: there is no foreground to paste on.")
    return fg


def jitter_colors(rng: np.random.Generator, patch: np.ndarray, strength: float) -> np.ndarray:
    """torchvision-style ColorJitter(brightness=s, contrast=s, saturation=s, hue=s), random order.

    Args:
      rng: randomness.
      patch: [h, w, 3] float in [0, 1].
      strength: factors drawn from [1 - s, 1 + s]; hue shift from [-s, s] (in turns, s <= 0.5).

    Returns:
      [h, w, 3] float32 in [0, 1].
    """
    if strength <= 0:
        return patch.astype(np.float32)
    out = patch.astype(np.float32)
    lum_w = np.asarray([0.299, 0.587, 0.114], np.float32)
    for op in rng.permutation(4):
        if op == 0:
            out = out * rng.uniform(1 - strength, 1 + strength)
        elif op == 1:
            mean = float((out @ lum_w).mean())
            out = (out - mean) * rng.uniform(1 - strength, 1 + strength) + mean
        elif op == 2:
            gray = (out @ lum_w)[..., None]
            out = (out - gray) * rng.uniform(1 - strength, 1 + strength) + gray
        else:
            hsv = skimage.color.rgb2hsv(np.clip(out, 0, 1))
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-strength, strength)) % 1.0
            out = skimage.color.hsv2rgb(hsv).astype(np.float32)
        out = np.clip(out, 0.0, 1.0)
    return out.astype(np.float32)


def _place(
    rng: np.random.Generator,
    shape: tuple[int, int],
    size: tuple[int, int],
    fg: np.ndarray | None,
) -> tuple[int, int]:
    """Top-left corner for a [h, w] patch: uniform, or centred on a random foreground pixel."""
    (H, W), (h, w) = shape, size
    if fg is None:
        return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    ys, xs = np.nonzero(fg)
    i = int(rng.integers(len(ys)))
    top = int(np.clip(ys[i] - h // 2, 0, H - h))
    left = int(np.clip(xs[i] - w // 2, 0, W - w))
    return top, left


def _sample_aspect(rng: np.random.Generator, aspect_ratio: tuple[Range, ...]) -> float:
    lo, hi = aspect_ratio[int(rng.integers(len(aspect_ratio)))]
    return float(rng.uniform(lo, hi))


def _paste(
    rng: np.random.Generator,
    image: np.ndarray,
    patch: np.ndarray,
    footprint: np.ndarray,
    fg: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pastes ``patch`` where ``footprint`` is set, at a place drawn by ``_place`` (in ``fg``).

    Returns the new [H, W, 3] image and the bool [H, W] mask of changed pixels.
    """
    H, W = image.shape[:2]
    h, w = footprint.shape
    ty, tx = _place(rng, (H, W), (h, w), fg)
    mask = np.zeros((H, W), bool)
    mask[ty : ty + h, tx : tx + w] = footprint
    if fg is not None:
        mask &= fg
    canvas = image.copy()
    canvas[ty : ty + h, tx : tx + w] = patch
    return np.where(mask[..., None], canvas, image), mask


def cutpaste_with_mask(
    rng: np.random.Generator,
    image: np.ndarray,
    *,
    area_ratio: Range = (0.02, 0.15),
    aspect_ratio: tuple[Range, ...] = ((0.3, 1.0), (1.0, 3.3)),
    color_jitter: float = 0.1,
    fg_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: cut a rectangle, colour-jitter it, paste it at another location.

    The patch area is ``U(area_ratio) * H * W``; its aspect ratio (width / height) is drawn
    uniformly from one of the ``aspect_ratio`` intervals, picked with equal probability
    ((0.3, 1) ∪ (1, 3.3) as the CutPaste paper).

    Args:
      rng: randomness.
      image: [H, W, 3] float in [0, 1].
      area_ratio: patch area as a fraction of the image.
      aspect_ratio: intervals of width / height.
      color_jitter: ColorJitter strength applied to the patch (0 disables).
      fg_mask: optional bool [H, W]; the pasted region is confined to it (FM).

    Returns:
      (image [H, W, 3] float32, mask [H, W] bool of the pasted pixels).
    """
    image = _check_image(image)
    H, W = image.shape[:2]
    fg = _check_fg(fg_mask, (H, W))
    area = rng.uniform(*area_ratio) * H * W
    aspect = _sample_aspect(rng, aspect_ratio)
    w = int(np.clip(round(np.sqrt(area * aspect)), 1, W))
    h = int(np.clip(round(np.sqrt(area / aspect)), 1, H))
    sy, sx = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    patch = jitter_colors(rng, image[sy : sy + h, sx : sx + w], color_jitter)
    return _paste(rng, image, patch, np.ones((h, w), bool), fg)


def cutpaste(rng: np.random.Generator, image: np.ndarray, **options) -> np.ndarray:
    """:func:`cutpaste_with_mask` (same options) without the mask: [H, W, 3] -> [H, W, 3]."""
    return cutpaste_with_mask(rng, image, **options)[0]


def cutpaste_scar_with_mask(
    rng: np.random.Generator,
    image: np.ndarray,
    *,
    width: Range = (2, 16),
    length: Range = (10, 25),
    rotation: Range = (-45, 45),
    color_jitter: float = 0.1,
    fg_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste-scar: a thin rectangle (``width`` x ``length`` pixels, as the CutPaste paper's
    defaults for 256 x 256 inputs), colour-jittered, rotated by ``U(rotation)`` degrees, pasted.

    Args:
      rng: randomness.
      image: [H, W, 3] float in [0, 1].
      width: scar width range in pixels.
      length: scar length range in pixels.
      rotation: rotation range in degrees.
      color_jitter: ColorJitter strength (0 disables).
      fg_mask: optional bool [H, W]; the scar is confined to it (FM).

    Returns:
      (image [H, W, 3] float32, mask [H, W] bool of the pasted pixels).
    """
    image = _check_image(image)
    H, W = image.shape[:2]
    fg = _check_fg(fg_mask, (H, W))
    w = int(np.clip(round(rng.uniform(*width)), 1, W))
    h = int(np.clip(round(rng.uniform(*length)), 1, H))
    sy, sx = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
    patch = jitter_colors(rng, image[sy : sy + h, sx : sx + w], color_jitter)
    angle = rng.uniform(*rotation)
    # Nearest-neighbour rotation keeps the patch's pixels and makes its footprint exact.
    # ``grid-constant``: the input's edges are at -0.5 and n - 0.5, as for a pixel grid. The
    # default ``constant`` puts them at pixel centres, so a 1-2 pixel wide scar rotated by a few
    # degrees loses most or all of its pixels (a 1 x 7 scar at 5 degrees kept 0 of 7).
    patch = scipy.ndimage.rotate(
        patch, angle, axes=(1, 0), reshape=True, order=0, mode="grid-constant"
    )
    footprint = (
        scipy.ndimage.rotate(
            np.ones((h, w), np.uint8), angle, reshape=True, order=0, mode="grid-constant"
        )
        > 0
    )
    ph, pw = min(footprint.shape[0], H), min(footprint.shape[1], W)
    patch, footprint = patch[:ph, :pw], footprint[:ph, :pw]
    return _paste(rng, image, patch, footprint, fg)


def cutpaste_scar(rng: np.random.Generator, image: np.ndarray, **options) -> np.ndarray:
    """:func:`cutpaste_scar_with_mask` (same options) without the mask: [H, W, 3] -> [H, W, 3]."""
    return cutpaste_scar_with_mask(rng, image, **options)[0]


# --------------------------------------------------------------------------------------------
# DRAEM


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise_2d(
    rng: np.random.Generator, shape: tuple[int, int], scale: tuple[int, int]
) -> np.ndarray:
    """Gradient (Perlin) noise as DRAEM's ``rand_perlin_2d_np``.

    Args:
      rng: randomness (the gradient angles).
      shape: (H, W) of the output.
      scale: (res_y, res_x) lattice cells along each axis (DRAEM draws 2**k, k in [0, 6)).

    Returns:
      [H, W] float32, roughly in [-1, 1] (sqrt(2) times the classic noise, as DRAEM).
    """
    (H, W), (ry, rx) = shape, scale
    angles = 2 * np.pi * rng.random((ry + 1, rx + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.arange(H) * ry / H
    x = np.arange(W) * rx / W
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]

    def dot(dy: int, dx: int) -> np.ndarray:
        g = gradients[(iy + dy)[:, None], (ix + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    n0 = dot(0, 0) + ty * (dot(1, 0) - dot(0, 0))
    n1 = dot(0, 1) + ty * (dot(1, 1) - dot(0, 1))
    return (np.sqrt(2) * (n0 + tx * (n1 - n0))).astype(np.float32)


# DRAEM's PIL smoothing kernel (ImageFilter.SMOOTH), the "degenerate" image of EnhanceSharpness.
_SMOOTH = np.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
# imgaug's YCrCb luma weights (MultiplyAndAddToBrightness changes Y and keeps Cr, Cb).
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)
NUM_SOURCE_AUGMENTERS = 10


def _equalize(channel: np.ndarray) -> np.ndarray:
    """PIL ``ImageOps.equalize`` of one [H, W] channel in [0, 1] at 256 levels: level ``i`` maps
    to ``(step // 2 + #pixels below i) // step``, ``step = (N - #pixels at the top level) // 255``.
    """
    levels = np.clip(np.rint(channel * 255.0), 0, 255).astype(np.int64)
    hist = np.bincount(levels.ravel(), minlength=256)
    nonzero = hist[hist > 0]
    step = (int(nonzero.sum()) - int(nonzero[-1])) // 255
    if len(nonzero) <= 1 or step == 0:
        return levels.astype(np.float32) / 255.0
    below = np.concatenate([[0], np.cumsum(hist)[:-1]])
    lut = np.minimum((step // 2 + below) // step, 255)
    return lut[levels].astype(np.float32) / 255.0


def _enhance_sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """PIL ``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image (border pixels kept);
    factor 0 is the smoothed image, 1 the image, 2 sharpened."""
    smooth = scipy.ndimage.correlate(image, _SMOOTH[..., None], mode="nearest")
    smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = (
        image[0], image[-1], image[:, 0], image[:, -1]
    )  # fmt: skip
    return smooth + factor * (image - smooth)


def augment_anomaly_source(rng: np.random.Generator, source: np.ndarray) -> np.ndarray:
    """DRAEM's RandAugment of the anomaly source: three of its ten imgaug augmenters, drawn
    without replacement and applied in the drawn order.

    The ten, with imgaug's default ranges where DRAEM gives none: GammaContrast((0.5, 2),
    per_channel), MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)) on the luma,
    pillike.EnhanceSharpness(factor (0, 2)), AddToHueAndSaturation((-50, 50), per_channel: hue
    and saturation get separate values), Solarize(p=0.5, threshold=(32, 128)), Posterize(1..8
    bits), Invert, pillike.Autocontrast(cutoff 0..20 %, per band as PIL), pillike.Equalize (per
    band), Affine(rotate=(-45, 45)) with black fill.

    Args:
      rng: randomness.
      source: [H, W, 3] float in [0, 1].

    Returns:
      [H, W, 3] float32 in [0, 1].
    """
    out = np.clip(np.asarray(source, np.float32), 0.0, 1.0)
    for op in rng.choice(NUM_SOURCE_AUGMENTERS, size=3, replace=False):
        if op == 0:
            out = out ** rng.uniform(0.5, 2.0, size=3).astype(np.float32)
        elif op == 1:
            luma = out @ _LUMA
            new = luma * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30) / 255.0
            out = out + (new - luma)[..., None]  # Cr, Cb unchanged: every channel moves by dY
        elif op == 2:
            out = _enhance_sharpness(out, rng.uniform(0.0, 2.0))
        elif op == 3:
            hsv = skimage.color.rgb2hsv(out)
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-50, 50) / 255.0) % 1.0
            hsv[..., 1] = np.clip(hsv[..., 1] + rng.uniform(-50, 50) / 255.0, 0, 1)
            out = skimage.color.hsv2rgb(hsv)
        elif op == 4:
            thr = rng.uniform(32, 128) / 255.0
            if rng.random() < 0.5:
                out = np.where(out >= thr, 1.0 - out, out)
        elif op == 5:
            bits = int(rng.integers(1, 9))
            out = np.floor(out * 255.0 / 2 ** (8 - bits)) * 2 ** (8 - bits) / 255.0
        elif op == 6:
            out = 1.0 - out
        elif op == 7:
            cut = rng.uniform(0, 20)
            lo, hi = np.percentile(out, [cut, 100 - cut], axis=(0, 1))
            out = (out - lo) / np.maximum(hi - lo, 1e-6)
        elif op == 8:
            out = np.stack([_equalize(out[..., c]) for c in range(3)], axis=-1)
        else:
            out = scipy.ndimage.rotate(out, rng.uniform(-45, 45), reshape=False, order=1)
        out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return out


def rotate_normal(rng: np.random.Generator, image: np.ndarray, *, max_angle: float = 90.0):
    """DRAEM's optional rotation of the normal image (imgaug ``Affine(rotate=(-90, 90))``,
    bilinear, black fill), applied before the anomaly is synthesised.

    Args:
      rng: randomness.
      image: [H, W, 3] float in [0, 1].
      max_angle: the angle is ``U(-max_angle, max_angle)`` degrees.

    Returns:
      [H, W, 3] float32 in [0, 1].
    """
    angle = rng.uniform(-max_angle, max_angle)
    out = scipy.ndimage.rotate(_check_image(image), angle, axes=(1, 0), reshape=False, order=1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def draem_anomaly(
    rng: np.random.Generator,
    image: np.ndarray,
    source: np.ndarray,
    *,
    scale_exponents: tuple[int, int] = (0, 6),
    threshold: float = 0.5,
    max_beta: float = 0.8,
    no_anomaly_prob: float = 0.5,
    augment_source: bool = True,
    fg_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM's simulated anomaly: a thresholded, rotated Perlin-noise mask ``M`` and an anomaly
    source ``A`` blended in, ``I_a = (1 - M) * I + (1 - beta) * M * A + beta * M * I``.

    Args:
      rng: randomness.
      image: [H, W, 3] float in [0, 1].
      source: [h, w, 3] float in [0, 1] anomaly source (DTD in DRAEM), resized to [H, W].
      scale_exponents: Perlin scales are ``2**k`` per axis with ``k`` in ``[lo, hi)``.
      threshold: noise threshold of the mask (0.5 in DRAEM).
      max_beta: opacity ``beta ~ U(0, max_beta)`` (0.8 in DRAEM).
      no_anomaly_prob: probability of returning the image unchanged with an empty mask (0.5 in
        DRAEM, so half of each batch is normal).
      augment_source: apply :func:`augment_anomaly_source` first.
      fg_mask: optional bool [H, W]; the mask is intersected with it.

    Returns:
      (image [H, W, 3] float32, mask [H, W] bool); the mask may be empty.
    """
    image = _check_image(image)
    H, W = image.shape[:2]
    fg = _check_fg(fg_mask, (H, W))
    if rng.random() < no_anomaly_prob:
        return image.copy(), np.zeros((H, W), bool)
    source = _check_image(source)
    if source.shape[:2] != (H, W):
        source = skimage.transform.resize(source, (H, W), order=1, anti_aliasing=True)
    if augment_source:
        source = augment_anomaly_source(rng, source)
    sy, sx = 2 ** rng.integers(*scale_exponents, size=2)
    noise = perlin_noise_2d(rng, (H, W), (int(sy), int(sx)))
    noise = scipy.ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, order=1)
    mask = noise > threshold
    if fg is not None:
        mask &= fg
    beta = rng.uniform(0.0, max_beta)
    m = mask[..., None].astype(np.float32)
    out = (1 - m) * image + (1 - beta) * m * source + beta * m * image
    return np.clip(out, 0.0, 1.0).astype(np.float32), mask


# --------------------------------------------------------------------------------------------
# The augmentation arguments a config's ``augment`` section gives (the one place they are read).
# A missing section or field keeps the function's default: CutPaste's and DRAEM's published
# strengths.

_CUTPASTE_FIELDS = {"area_ratio": "cutpaste_area_ratio", "aspect_ratio": "cutpaste_aspect_ratio"}
_SCAR_FIELDS = {"width": "scar_width", "length": "scar_length", "rotation": "scar_rotation"}
_PERLIN_FIELDS = {"scale_exponents": "perlin_scale_exponents"}


def _as_range(value):
    if len(value) and isinstance(value[0], list | tuple):
        return tuple(tuple(v) for v in value)
    return tuple(value)


def _options(section, ranges: dict[str, str], scalars: dict[str, str]) -> dict:
    if section is None:
        return {}
    out = {arg: _as_range(section[f]) for arg, f in ranges.items() if f in section}
    return out | {arg: section[f] for arg, f in scalars.items() if f in section}


def cutpaste_options(section: ml_collections.ConfigDict | None) -> dict:
    """Keyword arguments of :func:`cutpaste` / :func:`cutpaste_with_mask` from
    ``config.augment`` (``cutpaste_area_ratio``, ``cutpaste_aspect_ratio``, ``color_jitter``)."""
    return _options(section, _CUTPASTE_FIELDS, {"color_jitter": "color_jitter"})


def scar_options(section: ml_collections.ConfigDict | None, *, scale: float = 1.0) -> dict:
    """Keyword arguments of :func:`cutpaste_scar` / :func:`cutpaste_scar_with_mask` from
    ``config.augment`` (``scar_width``, ``scar_length``, ``scar_rotation``, ``color_jitter``);
    ``scale`` resizes width and length (CutPaste's sizes are for 256 x 256 inputs; at least 1)."""
    out = _options(section, _SCAR_FIELDS, {"color_jitter": "color_jitter"})
    if scale != 1.0:
        for arg in ("width", "length"):
            if arg in out:
                out[arg] = tuple(max(1.0, v * scale) for v in out[arg])
    return out


def draem_options(section: ml_collections.ConfigDict | None) -> dict:
    """Keyword arguments of :func:`draem_anomaly` from ``config.augment``
    (``perlin_scale_exponents``, ``perlin_threshold``, ``max_beta``)."""
    scalars = {"threshold": "perlin_threshold", "max_beta": "max_beta"}
    return _options(section, _PERLIN_FIELDS, scalars)
