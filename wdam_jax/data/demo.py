"""Built-in demo data: a small MVTec-layout dataset generated on first use, deterministically.

Texture categories are crops of the real photographs that ship with scikit-image (``brick``,
``grass``, ``gravel``); the object category ``washer`` is a rendered metal washer on a plain
background (so the foreground-mask option matters). Test images carry defects of five kinds with
exact pixel masks: a defect changes pixels only inside its mask, and its mask is exactly the set
of pixels the defect drew.

The high-resolution category ``fabric_2k`` (2048 x 2048 woven fabric, defects 16-48 pixels
across: what a whole-image resize to 256 shrinks to a few pixels; for tiling, issue 28) is
generated only when a config names it (:func:`ensure_large_demo_data`, ``<root>/mvtec_demo_2k``),
so the default demo data stays small and fast.

Layout written by :func:`ensure_demo_data` under ``root``::

  <root>/mvtec_demo/<category>/train/good/000.png ...
  <root>/mvtec_demo/<category>/test/{good,scratch,hole,stain,crack,contamination}/000.png ...
  <root>/mvtec_demo/<category>/ground_truth/<defect>/000_mask.png ...
  <root>/foreground_masks/<category>/train/good/000.png ...   (255 = foreground)
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import scipy.ndimage
import skimage.data
import skimage.draw
from PIL import Image

from wdam_jax.data.datasets import DatasetError, PathLike

TEXTURE_CATEGORIES = ("brick", "grass", "gravel")
OBJECT_CATEGORIES = ("washer",)
DEMO_CATEGORIES = TEXTURE_CATEGORIES + OBJECT_CATEGORIES
DEFECT_TYPES = ("scratch", "hole", "stain", "crack", "contamination")

DATASET_DIR = "mvtec_demo"
FOREGROUND_DIR = "foreground_masks"
_INFO_FILE = "demo_info.json"
# Bump when the generator's output changes, so stale folders are reported instead of reused.
_GENERATOR_VERSION = 1

NUM_TRAIN = 30
NUM_TEST_GOOD = 10
NUM_TEST_PER_DEFECT = 4

_PHOTOS = {"brick": skimage.data.brick, "grass": skimage.data.grass, "gravel": skimage.data.gravel}


def _photo(name: str) -> np.ndarray:
    """A scikit-image texture photograph as float32 [512, 512] in [0, 1]."""
    return np.asarray(_PHOTOS[name](), dtype=np.float32) / 255.0


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(gray.astype(np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32)


def _texture_image(rng: np.random.Generator, category: str, size: int) -> np.ndarray:
    """A random crop (random scale, flips, small brightness change) of the category's photo."""
    photo = _photo(category)
    crop = int(rng.integers(192, 289))
    y, x = rng.integers(0, photo.shape[0] - crop + 1, size=2)
    patch = photo[y : y + crop, x : x + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    gray = _resize(np.ascontiguousarray(patch), size) * rng.uniform(0.92, 1.08)
    # Tint so the images are genuinely 3-channel (brick reddish, grass green, gravel grey).
    tint = {"brick": (1.0, 0.78, 0.66), "grass": (0.72, 1.0, 0.55), "gravel": (1.0, 0.97, 0.92)}
    return np.clip(gray[..., None] * np.asarray(tint[category], np.float32), 0.0, 1.0)


def _washer_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A metal washer on a dark background; returns (image [S, S, 3] float, foreground [S, S])."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-0.05, 0.05, size=2) * size
    r_out = size * rng.uniform(0.33, 0.37)
    r_in = r_out * rng.uniform(0.38, 0.44)
    dist = np.hypot(yy - cy, xx - cx)
    fg = (dist <= r_out) & (dist >= r_in)
    # Background: dark blue-grey with a soft vertical gradient and fine noise.
    bg = 0.16 + 0.06 * yy / size + rng.normal(0.0, 0.008, (size, size))
    background = np.stack([bg * 0.9, bg * 0.95, bg * 1.1], axis=-1)
    # Metal: radial brushed look + a light direction that changes per image.
    angle = np.arctan2(yy - cy, xx - cx)
    light = rng.uniform(0, 2 * np.pi)
    shade = 0.62 + 0.18 * np.cos(angle - light) + 0.05 * np.sin(dist * 0.9)
    shade = shade + rng.normal(0.0, 0.012, (size, size))
    metal = np.stack([shade, shade * 0.98, shade * 0.93], axis=-1)
    img = np.where(fg[..., None], metal, background)
    return np.clip(img, 0.0, 1.0).astype(np.float32), fg


def make_clean_image(
    rng: np.random.Generator, category: str, *, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One defect-free demo image and its foreground mask.

    Args:
      rng: the only source of randomness.
      category: one of ``DEMO_CATEGORIES``.
      image_size: S.

    Returns:
      (image uint8 [S, S, 3], foreground bool [S, S]); textures are all foreground.
    """
    if category in TEXTURE_CATEGORIES:
        img = _texture_image(rng, category, image_size)
        fg = np.ones((image_size, image_size), bool)
    elif category == "washer":
        img, fg = _washer_image(rng, image_size)
    else:
        raise DatasetError(f"Unknown demo category {category!r}; choose from {DEMO_CATEGORIES}.")
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), fg


# --------------------------------------------------------------------------------------------
# Defects. Each returns a mask; ``_paint`` then changes exactly the masked pixels.


def _point_in(rng: np.random.Generator, region: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(region)
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


def _polyline_mask(points: np.ndarray, shape: tuple[int, int], width: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for (y0, x0), (y1, x1) in itertools.pairwise(points):
        rr, cc = skimage.draw.line(int(y0), int(x0), int(y1), int(x1))
        keep = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        mask[rr[keep], cc[keep]] = True
    if width > 1:
        mask = scipy.ndimage.binary_dilation(mask, iterations=width - 1)
    return mask


def _scratch(rng, shape, fg):
    y, x = _point_in(rng, fg)
    length = rng.uniform(0.25, 0.5) * shape[0]
    theta = rng.uniform(0, np.pi)
    bend = rng.uniform(-0.3, 0.3)
    t = np.linspace(-0.5, 0.5, 12)
    ang = theta + bend * t
    pts = np.stack([y + t * length * np.sin(ang), x + t * length * np.cos(ang)], axis=-1)
    return _polyline_mask(np.rint(pts), shape, width=int(rng.integers(2, 4))), "bright"


def _hole(rng, shape, fg):
    y, x = _point_in(rng, fg)
    r = rng.uniform(0.05, 0.1) * shape[0]
    rr, cc = skimage.draw.ellipse(
        y, x, r, r * rng.uniform(0.7, 1.3), shape=shape, rotation=rng.uniform(0, np.pi)
    )
    mask = np.zeros(shape, bool)
    mask[rr, cc] = True
    return mask, "dark"


def _stain(rng, shape, fg):
    y, x = _point_in(rng, fg)
    mask = np.zeros(shape, bool)
    for _ in range(int(rng.integers(3, 6))):
        dy, dx = rng.normal(0, 0.03 * shape[0], 2)
        r = rng.uniform(0.03, 0.07) * shape[0]
        rr, cc = skimage.draw.ellipse(
            y + dy, x + dx, r, r * rng.uniform(0.6, 1.4), shape=shape, rotation=rng.uniform(0, 3)
        )
        mask[rr, cc] = True
    return mask, "colour"


def _crack(rng, shape, fg):
    y, x = _point_in(rng, fg)
    pts = [(y, x)]
    heading = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(10, 18))):
        heading += rng.normal(0, 0.6)
        step = rng.uniform(2.0, 5.0) * shape[0] / 128
        y, x = y + step * np.sin(heading), x + step * np.cos(heading)
        pts.append((y, x))
    mask = _polyline_mask(np.rint(np.asarray(pts)), shape, width=2)
    # One branch from the middle of the crack.
    mid = np.asarray(pts[len(pts) // 2])
    branch = [mid]
    heading += rng.choice([-1.0, 1.0]) * 1.0
    for _ in range(5):
        heading += rng.normal(0, 0.5)
        mid = mid + 3.0 * np.asarray([np.sin(heading), np.cos(heading)]) * shape[0] / 128
        branch.append(mid)
    return mask | _polyline_mask(np.rint(np.asarray(branch)), shape, width=2), "dark"


def _contamination(rng, shape, fg):
    mask = np.zeros(shape, bool)
    y0, x0 = _point_in(rng, fg)
    for _ in range(int(rng.integers(2, 5))):
        y = y0 + rng.normal(0, 0.06 * shape[0])
        x = x0 + rng.normal(0, 0.06 * shape[0])
        r = rng.uniform(0.025, 0.05) * shape[0]
        rr, cc = skimage.draw.polygon(
            y + r * np.sin(np.linspace(0, 2 * np.pi, 7)) * rng.uniform(0.6, 1.4, 7),
            x + r * np.cos(np.linspace(0, 2 * np.pi, 7)) * rng.uniform(0.6, 1.4, 7),
            shape=shape,
        )
        mask[rr, cc] = True
    return mask, "foreign"


_DEFECTS = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "crack": _crack,
    "contamination": _contamination,
}


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, style: str):
    """Returns a copy of ``image`` (uint8) changed inside ``mask`` only, visibly everywhere."""
    img = image.astype(np.float32) / 255.0
    n = int(mask.sum())
    h, w = mask.shape
    if style == "bright":
        new = np.clip(img[mask] * 0.3 + rng.uniform(0.75, 0.95), 0, 1)
    elif style == "dark":
        new = img[mask] * rng.uniform(0.05, 0.2) + rng.uniform(0.0, 0.04)
    elif style == "colour":
        colour = np.asarray([rng.uniform(0.5, 0.9), rng.uniform(0.2, 0.5), rng.uniform(0.0, 0.2)])
        alpha = rng.uniform(0.6, 0.8)
        new = (1 - alpha) * img[mask] + alpha * rng.permutation(colour)
    else:  # foreign material: a patch of a different photo, blue-green tinted.
        other = _resize(_photo("gravel"), max(h, w))[:h, :w]
        tex = other[mask][:, None] * np.asarray([0.35, 0.75, 0.65], np.float32)
        new = 0.25 * img[mask] + 0.75 * tex + rng.normal(0, 0.02, (n, 1))
    out = img.copy()
    out[mask] = new
    out = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    # A painted pixel that happens to round back to its old value would make the mask inexact;
    # push such pixels by 64 grey levels.
    same = mask & np.all(out == image, axis=-1)
    if same.any():
        out[same] = np.where(image[same] > 127, image[same] - 64, image[same] + 64)
    return out


def add_defect(
    rng: np.random.Generator, image: np.ndarray, foreground: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Draws one defect on a clean demo image.

    Args:
      rng: the only source of randomness.
      image: uint8 [S, S, 3] clean image.
      foreground: bool [S, S]; the defect is drawn on the foreground (object categories).
      kind: one of ``DEFECT_TYPES``.

    Returns:
      (defective uint8 [S, S, 3], mask bool [S, S]): every pixel in ``mask`` differs from
      ``image`` and every pixel outside is unchanged.
    """
    if kind not in _DEFECTS:
        raise ValueError(f"Unknown defect kind {kind!r}; choose from {DEFECT_TYPES}.")
    shape = image.shape[:2]
    # Keep the defect on the object; redraw in the rare case it falls entirely off it.
    for _ in range(100):
        mask, style = _DEFECTS[kind](rng, shape, foreground)
        mask &= foreground
        if mask.sum() >= 4:
            break
    else:
        raise RuntimeError(f"could not place a {kind} defect on the foreground")
    return _paint(rng, image, mask, style), mask


# --------------------------------------------------------------------------------------------
# Writing the dataset.


def _save_png(path: pathlib.Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False)


def _write_category(
    base: pathlib.Path, fg_base: pathlib.Path, category: str, seed: int, size: int
) -> None:
    # One independent stream per (category, split, index): adding a category or changing the
    # number of images never changes the other images.
    cat_id = DEMO_CATEGORIES.index(category)

    def rng_for(*key: int) -> np.random.Generator:
        return np.random.default_rng([seed, cat_id, *key])

    for i in range(NUM_TRAIN):
        img, fg = make_clean_image(rng_for(0, i), category, image_size=size)
        _save_png(base / category / "train" / "good" / f"{i:03d}.png", img)
        _save_png(fg_base / category / "train" / "good" / f"{i:03d}.png", fg.astype(np.uint8) * 255)
    for i in range(NUM_TEST_GOOD):
        img, _ = make_clean_image(rng_for(1, i), category, image_size=size)
        _save_png(base / category / "test" / "good" / f"{i:03d}.png", img)
    for k, kind in enumerate(DEFECT_TYPES):
        for i in range(NUM_TEST_PER_DEFECT):
            rng = rng_for(2, k, i)
            img, fg = make_clean_image(rng, category, image_size=size)
            bad, mask = add_defect(rng, img, fg, kind)
            _save_png(base / category / "test" / kind / f"{i:03d}.png", bad)
            _save_png(
                base / category / "ground_truth" / kind / f"{i:03d}_mask.png",
                mask.astype(np.uint8) * 255,
            )


def _finished(dataset: pathlib.Path, info: dict, *, also: pathlib.Path | None = None) -> bool:
    """Whether ``dataset`` is a finished demo dataset made with ``info`` (and ``also`` exists).

    Raises:
      DatasetError: it was made with other settings, or is half-written.
    """
    info_path = dataset / _INFO_FILE
    if info_path.is_file():
        found = json.loads(info_path.read_text())
        if found != info or (also is not None and not also.is_dir()):
            extra = f" (or {also} is missing)" if also is not None else ""
            raise DatasetError(
                f"Demo data in {dataset} was generated with {found}, not {info}{extra}. Delete "
                f"{dataset}{f' and {also}' if also is not None else ''}, or use another root."
            )
        return True
    if dataset.exists():
        raise DatasetError(
            f"{dataset} exists but is not a finished demo dataset (no {_INFO_FILE}); delete it."
        )
    return False


def ensure_demo_data(root: PathLike, *, seed: int = 0, image_size: int = 128) -> pathlib.Path:
    """Generates the demo dataset under ``root`` on first use and returns the dataset root.

    Idempotent: a finished dataset (marked by ``demo_info.json``) with the same seed and size is
    reused; one made with other settings raises. Generation writes to a temporary folder and
    renames it, so an interrupted run leaves nothing half-written behind. The output is a pure
    function of (seed, image_size): same arguments, identical bytes.

    Args:
      root: folder to hold ``mvtec_demo/`` and ``foreground_masks/`` (e.g. the workdir).
      seed: generator seed.
      image_size: side of the square images.

    Returns:
      ``<root>/mvtec_demo``, to pass to ``load_mvtec``; foreground masks are in
      ``<root>/foreground_masks``.
    """
    root = pathlib.Path(root)
    dataset = root / DATASET_DIR
    fg_root = root / FOREGROUND_DIR
    info = {
        "seed": int(seed),
        "image_size": int(image_size),
        "categories": list(DEMO_CATEGORIES),
        "version": _GENERATOR_VERSION,
    }
    info_path = dataset / _INFO_FILE
    if _finished(dataset, info, also=fg_root):
        return dataset
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".demo_tmp_", dir=root))
    try:
        for category in DEMO_CATEGORIES:
            _write_category(tmp / DATASET_DIR, tmp / FOREGROUND_DIR, category, seed, image_size)
        (tmp / DATASET_DIR / _INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        try:
            if fg_root.exists():
                shutil.rmtree(fg_root)  # left by an interrupted run: its dataset has no info file
            os.replace(tmp / FOREGROUND_DIR, fg_root)
            os.replace(tmp / DATASET_DIR, dataset)
        except OSError:
            # Another process generated the same data at the same time and renamed first.
            if not info_path.is_file():
                raise
            return ensure_demo_data(root, seed=seed, image_size=image_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dataset


def skimage_anomaly_sources(image_size: int) -> np.ndarray:
    """Texture photographs shipped with scikit-image, for DRAEM's anomaly source offline.

    DRAEM uses DTD; this is a stand-in needing no download (brick, grass, gravel, and the
    camera, moon and coins photos), each resized to [S, S] and made RGB.

    Returns:
      [6, S, S, 3] float32 in [0, 1].
    """
    names = ("brick", "grass", "gravel", "camera", "moon", "coins")
    out = []
    for name in names:
        gray = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
        out.append(np.repeat(_resize(gray, image_size)[..., None], 3, axis=-1))
    return np.clip(np.stack(out), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# The high-resolution category (tiling), generated only when named.

LARGE_CATEGORIES = ("fabric_2k",)
LARGE_DATASET_DIR = "mvtec_demo_2k"
LARGE_SIZE = 2048
LARGE_DEFECT_TYPES = ("hole", "stain", "thread")
LARGE_COUNTS = {"train": 10, "test_good": 6, "test_per_defect": 4}


def _fabric_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain-weave fabric, uint8 [S, S, 3]: threads ~12 px apart crossing over and under, a
    slow illumination gradient, per-thread brightness and fine noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(11.0, 13.0)
    u = (xx + rng.uniform(0, period)) / period
    v = (yy + rng.uniform(0, period)) / period
    over = (np.floor(u) + np.floor(v)) % 2 == 0
    # Each thread its own brightness: a warp thread is a column index, a weft thread a row one.
    warp_gain = rng.normal(1.0, 0.04, int(u.max()) + 2)[np.floor(u).astype(int)]
    weft_gain = rng.normal(1.0, 0.04, int(v.max()) + 2)[np.floor(v).astype(int)]
    warp = (0.45 + 0.35 * np.sin(np.pi * (u % 1.0))) * warp_gain
    weft = (0.45 + 0.35 * np.sin(np.pi * (v % 1.0))) * weft_gain
    grey = np.where(over, warp, weft)
    tilt = rng.uniform(-0.06, 0.06, 2)
    grey = grey * (1.0 + tilt[0] * (yy / size - 0.5) + tilt[1] * (xx / size - 0.5))
    grey = grey + rng.normal(0.0, 0.02, grey.shape)
    rgb = grey[..., None] * np.asarray([0.55, 0.68, 0.95], np.float32)  # denim blue
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _small_defect(rng: np.random.Generator, shape: tuple[int, int], kind: str):
    """A defect 16-48 pixels across at a random place: ``(mask, paint style)``."""
    y, x = (int(rng.integers(64, n - 64)) for n in shape)
    mask = np.zeros(shape, bool)
    if kind == "hole":
        r = rng.uniform(8, 20)
        rr, cc = skimage.draw.ellipse(y, x, r, r * rng.uniform(0.7, 1.3), shape=shape)
        mask[rr, cc] = True
        return mask, "dark"
    if kind == "stain":
        for _ in range(int(rng.integers(2, 4))):
            r = rng.uniform(6, 14)
            dy, dx = rng.normal(0, 6, 2)
            rr, cc = skimage.draw.ellipse(y + dy, x + dx, r, r * rng.uniform(0.6, 1.4), shape=shape)
            mask[rr, cc] = True
        return mask, "colour"
    length, theta = rng.uniform(24, 48), rng.uniform(0, np.pi)  # a loose thread
    t = np.linspace(-0.5, 0.5, 6)
    pts = np.stack([y + t * length * np.sin(theta), x + t * length * np.cos(theta)], axis=-1)
    return _polyline_mask(np.rint(pts), shape, width=3), "bright"


def _write_large_category(base: pathlib.Path, category: str, seed: int) -> None:
    size, n = LARGE_SIZE, LARGE_COUNTS
    cat_id = len(DEMO_CATEGORIES) + LARGE_CATEGORIES.index(category)

    def rng_for(*key: int) -> np.random.Generator:
        return np.random.default_rng([seed, cat_id, *key])

    def save(path: pathlib.Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, format="PNG", compress_level=1)

    for i in range(n["train"]):
        save(
            base / category / "train" / "good" / f"{i:03d}.png", _fabric_image(rng_for(0, i), size)
        )
    for i in range(n["test_good"]):
        save(base / category / "test" / "good" / f"{i:03d}.png", _fabric_image(rng_for(1, i), size))
    for k, kind in enumerate(LARGE_DEFECT_TYPES):
        for i in range(n["test_per_defect"]):
            rng = rng_for(2, k, i)
            img = _fabric_image(rng, size)
            mask, style = _small_defect(rng, (size, size), kind)
            save(base / category / "test" / kind / f"{i:03d}.png", _paint(rng, img, mask, style))
            save(
                base / category / "ground_truth" / kind / f"{i:03d}_mask.png",
                mask.astype(np.uint8) * 255,
            )


def ensure_large_demo_data(root: PathLike, *, seed: int = 0) -> pathlib.Path:
    """Generates the high-resolution demo category (``fabric_2k``) under ``root`` on first use
    and returns ``<root>/mvtec_demo_2k``; as :func:`ensure_demo_data` (idempotent, written to a
    temporary folder and renamed, a pure function of ``seed``), but only when a config names
    it: ~30 s and ~200 MB of PNGs that ``make demo`` does not need."""
    root = pathlib.Path(root)
    dataset = root / LARGE_DATASET_DIR
    info = {
        "seed": int(seed),
        "image_size": LARGE_SIZE,
        "categories": list(LARGE_CATEGORIES),
        "counts": LARGE_COUNTS,
        "version": 1,
    }
    info_path = dataset / _INFO_FILE
    if _finished(dataset, info):
        return dataset
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".demo2k_tmp_", dir=root))
    try:
        for category in LARGE_CATEGORIES:
            _write_large_category(tmp, category, seed)
        (tmp / _INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        try:
            os.replace(tmp, dataset)
        except OSError:
            if not info_path.is_file():  # not another process generating the same data
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dataset
