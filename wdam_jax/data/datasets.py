"""Readers for MVTec AD, VisA (RealNet / MVTec-style layout) and a generic folder layout.

Every reader returns a :class:`Split` of numpy arrays: images resized to ``image_size`` (bilinear,
antialiased, PIL) and optionally centre-cropped to ``crop_size``; masks go through the same
geometry with nearest-neighbour resampling so they stay binary.

``Split.original_masks`` holds the ground truth at its original resolution for the pixel metrics
(``wdam_jax.metrics.evaluate_category`` resizes anomaly maps to it). With a centre crop, the model
never sees the border, so ``original_masks`` is the *crop region mapped back to the original
resolution* (the crop box scaled by ``original_size / image_size``): the metrics are computed at
the original resolution over exactly the area the model sees.

Bad data raises :class:`DatasetError` naming the file and the fix; nothing is skipped silently.

``Split.paths`` are relative to ``Split.root`` (for MVTec AD / VisA, the dataset root, e.g.
``bottle/train/good/000.png``), the same convention as the FMAS TFRecord ``image/source`` field and
the foreground-mask layout ``<fg_root>/<category>/train/good/<stem>.png``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from wdam_jax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

MVTEC_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
VISA_CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)

PathLike = str | os.PathLike


class DatasetError(UserError, ValueError):
    """Bad or missing data on disk; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of one category, as arrays.

    Attributes:
      images: [N, S, S, 3] float32 in [0, 1] (after resize and optional centre crop).
      masks: [N, S, S] bool ground truth under the same geometry (all False for good images).
      labels: [N] int32, 0 = good, 1 = anomalous.
      defect_types: N names ("good" for normal images, else the defect folder name).
      paths: N image paths relative to ``root``.
      original_masks: N bool [H_i, W_i] ground truths at the original resolution (with a centre
        crop: the crop region mapped back to the original resolution).
      root: the directory ``paths`` are relative to.
      has_pixel_labels: False when anomalous images came without masks (folder layout without
        ``mask_dir``); pixel metrics are then meaningless.
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    defect_types: list[str]
    paths: list[str]
    original_masks: list[np.ndarray]
    root: str = ""
    has_pixel_labels: bool = True

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclasses.dataclass(frozen=True)
class _Item:
    image: pathlib.Path
    mask: pathlib.Path | None
    defect_type: str


# --------------------------------------------------------------------------------------------
# Low-level image I/O shared by every reader (and the FMAS reader, so all sources are resampled
# by the same kernel: a classifier must not learn resampling artefacts).


def to_rgb(img: Image.Image) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of an opened image: grayscale is repeated over the channels,
    alpha is dropped, palettes are expanded, and 16/32-bit grey is scaled to 8 bits by its
    type's range (Pillow's own ``convert("RGB")`` would clip it at 255)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(65535.0, float(grey.max()))
        grey = np.clip(np.round(grey / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("the image holds NaN or infinite values")
    return np.asarray(img.convert("RGB"))


def read_rgb(path: PathLike) -> np.ndarray:
    """Reads an image file as uint8 RGB [H, W, 3] (see :func:`to_rgb` for other modes)."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(
            f"Cannot read image {path}: {e}. Replace or remove the file (it may be truncated, "
            "not an image, or too large to decode safely)."
        ) from e


def read_mask(path: PathLike) -> np.ndarray:
    """Reads a mask file as bool [H, W]: any non-zero grey value is anomalous (255 in MVTec AD,
    small label values in VisA)."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L") if img.mode not in ("L", "1", "I", "I;16") else img)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(
            f"Cannot read mask {path}: {e}. Replace the file with a single-channel PNG "
            "(0 = normal, 255 = anomalous)."
        ) from e
    return arr > 0


def crop_box(size: int, crop_size: int | None) -> tuple[int, int]:
    """(offset, length) of the centre crop on a ``size`` x ``size`` image."""
    if crop_size is None:
        return 0, size
    if not 0 < crop_size <= size:
        raise ValueError(f"crop_size={crop_size} must be in (0, image_size={size}].")
    return (size - crop_size) // 2, crop_size


def resize_image(image: np.ndarray, *, image_size: int, crop_size: int | None = None) -> np.ndarray:
    """uint8 or float [H, W, 3] -> float32 [S, S, 3] in [0, 1] (bilinear resize, centre crop)."""
    if image.dtype != np.uint8:
        image = np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)
    resized = Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR)
    out = np.asarray(resized, dtype=np.float32) / 255.0
    off, n = crop_box(image_size, crop_size)
    return out[off : off + n, off : off + n]


def resize_mask(mask: np.ndarray, *, image_size: int, crop_size: int | None = None) -> np.ndarray:
    """bool [H, W] -> bool [S, S] (nearest-neighbour resize, centre crop)."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    out = np.asarray(img.resize((image_size, image_size), Image.NEAREST)) > 127
    off, n = crop_box(image_size, crop_size)
    return out[off : off + n, off : off + n]


def crop_original(mask: np.ndarray, *, image_size: int, crop_size: int | None) -> np.ndarray:
    """The centre-crop region of ``mask`` mapped back to its original resolution."""
    if crop_size is None:
        return mask
    off, n = crop_box(image_size, crop_size)
    h, w = mask.shape
    top, height = round(off * h / image_size), round(n * h / image_size)
    left, width = round(off * w / image_size), round(n * w / image_size)
    return mask[top : top + height, left : left + width]


def _is_image(p: pathlib.Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def list_images(directory: PathLike) -> list[pathlib.Path]:
    """Image files directly inside ``directory``, sorted by name."""
    return sorted(p for p in pathlib.Path(directory).iterdir() if _is_image(p))


# --------------------------------------------------------------------------------------------
# MVTec AD / VisA layout.


def _category_dir(root: PathLike, category: str, dataset: str) -> pathlib.Path:
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"{dataset} root {root} does not exist. Download the dataset and point the config's "
            "data.root at the folder holding one sub-folder per category."
        )
    cat_dir = root / category
    if not cat_dir.is_dir():
        available = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        raise DatasetError(
            f"{dataset} category {category!r} not found: {cat_dir} does not exist. "
            f"Categories found under {root}: {available or 'none'}. Fix data.category or data.root."
        )
    return cat_dir


def _mask_candidates(gt_dir: pathlib.Path, stem: str) -> list[pathlib.Path]:
    # MVTec AD names masks <stem>_mask.png; VisA in the RealNet layout uses <stem>.png.
    return [gt_dir / f"{stem}_mask.png", gt_dir / f"{stem}.png"]


def list_mvtec_items(root: PathLike, category: str, *, split: str, dataset: str = "MVTec AD"):
    """Lists (image, mask or None, defect type) of one split in the MVTec layout, validated.

    Layout: ``<root>/<category>/train/good/*``, ``<root>/<category>/test/<defect>/*`` and
    ``<root>/<category>/ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``, VisA).

    Raises:
      DatasetError: missing category / split folder, empty folder, or an anomalous test image
        without its mask.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    cat_dir = _category_dir(root, category, dataset)
    split_dir = cat_dir / split
    if not split_dir.is_dir():
        raise DatasetError(
            f"{dataset} {category}: folder {split_dir} is missing; the layout is "
            f"<root>/{category}/{{train/good,test/<defect>,ground_truth/<defect>}}."
        )
    items: list[_Item] = []
    defect_dirs = [split_dir / "good"] if split == "train" else sorted(split_dir.iterdir())
    for d in defect_dirs:
        if not d.is_dir():
            if split == "train":
                raise DatasetError(f"{dataset} {category}: folder {d} is missing.")
            continue
        images = list_images(d)
        if not images:
            raise DatasetError(
                f"{dataset} {category}: folder {d} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); remove the empty folder or restore its images."
            )
        for img in images:
            mask = None
            if d.name != "good":
                candidates = _mask_candidates(cat_dir / "ground_truth" / d.name, img.stem)
                mask = next((c for c in candidates if c.is_file()), None)
                if mask is None:
                    raise DatasetError(
                        f"{dataset} {category}: anomalous image {img} has no mask; expected "
                        f"{candidates[0]} (or {candidates[1].name}). Restore the ground truth."
                    )
            items.append(_Item(img, mask, d.name))
    if not items:
        raise DatasetError(f"{dataset} {category}: no images under {split_dir}.")
    return items


def split_from_arrays(
    examples: Iterable[tuple[np.ndarray, np.ndarray | None, str, str]],
    *,
    root: str,
    image_size: int | None,
    crop_size: int | None,
) -> Split:
    """A :class:`Split` from ``(rgb uint8/float [H, W, 3], mask bool [H, W] or None, defect type,
    path)`` examples at their original resolution: resize (and crop) as every reader does.

    ``image_size=None`` keeps the original resolution (tiling, :mod:`wdam_jax.data.tiling`):
    every image of the split must then have the same size."""
    if image_size is None:
        return _full_resolution(examples, root=root)
    side = crop_size if crop_size is not None else image_size
    images, masks, labels, defect_types, paths, original_masks = [], [], [], [], [], []
    for rgb, gt, defect_type, path in examples:
        images.append(resize_image(rgb, image_size=image_size, crop_size=crop_size))
        labels.append(int(defect_type != "good"))
        if gt is None:
            gt = np.zeros(rgb.shape[:2], bool)
            masks.append(np.zeros((side, side), bool))
        else:
            masks.append(resize_mask(gt, image_size=image_size, crop_size=crop_size))
        original_masks.append(crop_original(gt, image_size=image_size, crop_size=crop_size))
        defect_types.append(defect_type)
        paths.append(path)
    return Split(
        images=np.asarray(images, np.float32).reshape(-1, side, side, 3),
        masks=np.asarray(masks, bool).reshape(-1, side, side),
        labels=np.asarray(labels, np.int32),
        defect_types=defect_types,
        paths=paths,
        original_masks=original_masks,
        root=root,
    )


def _full_resolution(examples, *, root: str) -> Split:
    images, masks, labels, defect_types, paths = [], [], [], [], []
    for rgb, gt, defect_type, path in examples:
        if images and rgb.shape != images[0].shape:
            raise DatasetError(
                f"{path} is {rgb.shape[1]}x{rgb.shape[0]} but {paths[0]} is "
                f"{images[0].shape[1]}x{images[0].shape[0]} (W x H): with config.data.tile_size "
                "set, every image of a split is read at its original resolution and they must "
                "have one size. Resize the files to one size, or set config.data.tile_size=0 "
                "(every image resized to data.image_size)."
            )
        images.append(np.asarray(rgb, np.float32) / (255.0 if rgb.dtype == np.uint8 else 1.0))
        masks.append(np.zeros(rgb.shape[:2], bool) if gt is None else np.asarray(gt, bool))
        labels.append(int(defect_type != "good"))
        defect_types.append(defect_type)
        paths.append(path)
    return Split(
        images=np.stack(images),
        masks=np.stack(masks),
        labels=np.asarray(labels, np.int32),
        defect_types=defect_types,
        paths=paths,
        original_masks=list(masks),
        root=root,
    )


def _read_item(item: _Item, root: pathlib.Path):
    rgb = read_rgb(item.image)
    gt = None
    if item.mask is not None:
        gt = read_mask(item.mask)
        if gt.shape != rgb.shape[:2]:
            raise DatasetError(
                f"Mask {item.mask} is {gt.shape[1]}x{gt.shape[0]} but its image {item.image} "
                f"is {rgb.shape[1]}x{rgb.shape[0]} (W x H). Regenerate the mask at the "
                "image's size."
            )
    return rgb, gt, item.defect_type, os.path.relpath(item.image, root)


def _load_items(
    items: Sequence[_Item],
    *,
    root: pathlib.Path,
    image_size: int | None,
    crop_size: int | None,
) -> Split:
    return split_from_arrays(
        (_read_item(item, root) for item in items),
        root=str(root),
        image_size=image_size,
        crop_size=crop_size,
    )


def load_mvtec(
    root: PathLike,
    category: str,
    *,
    split: str,
    image_size: int | None,
    crop_size: int | None = None,
) -> Split:
    """Loads one split of one MVTec AD category.

    Good test images get all-zero masks; grayscale categories (grid, screw, zipper) become
    3-channel.

    Args:
      root: dataset root holding ``<category>/train``, ``test``, ``ground_truth``.
      category: e.g. "bottle".
      split: "train" or "test".
      image_size: images are resized to [image_size, image_size].
      crop_size: optional centre crop after the resize.

    Returns:
      A :class:`Split`; arrays are [N, S, S, ...] with S = crop_size or image_size.
    """
    items = list_mvtec_items(root, category, split=split, dataset="MVTec AD")
    return _load_items(items, root=pathlib.Path(root), image_size=image_size, crop_size=crop_size)


def load_visa(
    root: PathLike,
    category: str,
    *,
    split: str,
    image_size: int | None,
    crop_size: int | None = None,
) -> Split:
    """Loads one split of one VisA category in the RealNet / MVTec-style layout (1cls split).

    The layout is the one VisA's ``prepare_data.py`` (``--split-type 1cls``) and RealNet use:
    ``<root>/<category>/train/good/*.JPG``, ``test/{good,bad}/*.JPG`` and
    ``ground_truth/bad/<stem>.png`` (``<stem>_mask.png`` is accepted too). Masks are binarised with
    ``> 0`` (VisA masks store small label values, not 255).

    Args and returns as :func:`load_mvtec`.
    """
    items = list_mvtec_items(root, category, split=split, dataset="VisA")
    return _load_items(items, root=pathlib.Path(root), image_size=image_size, crop_size=crop_size)


# --------------------------------------------------------------------------------------------
# Generic folder layout for a user's own product.


def _existing_dir(path: PathLike, what: str) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.is_dir():
        raise DatasetError(f"{what} {p} does not exist or is not a folder; fix the path.")
    if not list_images(p):
        raise DatasetError(
            f"{what} {p} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images or fix the "
            "path."
        )
    return p


def load_folder(
    normal_dir: PathLike,
    *,
    abnormal_dir: PathLike | None = None,
    mask_dir: PathLike | None = None,
    normal_test_dir: PathLike | None = None,
    split: str,
    image_size: int | None,
    crop_size: int | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Split:
    """Loads a user's own product from plain folders.

    Train = the normal images. Test = the normal test images plus the abnormal images. Without
    ``normal_test_dir``, a seeded ``test_fraction`` of ``normal_dir`` is held out for the test
    split (and left out of the train split), so train and test never share an image.

    Masks for abnormal images are looked up in ``mask_dir`` by file stem (``<stem>.png`` or
    ``<stem>_mask.png``); with a ``mask_dir`` every abnormal image needs one. Without
    ``mask_dir`` pixel labels are unknown: the masks are all False and the split has
    ``has_pixel_labels=False``, so only the image metric is valid.

    Args:
      normal_dir: folder of defect-free images.
      abnormal_dir: folder of defective images (test split only).
      mask_dir: folder of masks for the abnormal images; every abnormal image needs one.
      normal_test_dir: optional folder of defect-free test images.
      split: "train" or "test".
      image_size: resize target.
      crop_size: optional centre crop after the resize.
      test_fraction: share of ``normal_dir`` held out for testing when ``normal_test_dir`` is
        None.
      split_seed: seed of that hold-out.

    Returns:
      A :class:`Split` whose ``paths`` are relative to the folders' common parent.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    normal = list_images(_existing_dir(normal_dir, "Normal image folder"))
    held_out: list[pathlib.Path] = []
    if normal_test_dir is None:
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
        n_test = round(test_fraction * len(normal))
        perm = np.random.default_rng(split_seed).permutation(len(normal))
        test_idx = set(perm[:n_test].tolist())
        held_out = [p for i, p in enumerate(normal) if i in test_idx]
        normal = [p for i, p in enumerate(normal) if i not in test_idx]
    dirs = [pathlib.Path(normal_dir)]
    if split == "train":
        items = [_Item(p, None, "good") for p in normal]
    else:
        if normal_test_dir is not None:
            held_out = list_images(_existing_dir(normal_test_dir, "Normal test image folder"))
            dirs.append(pathlib.Path(normal_test_dir))
        items = [_Item(p, None, "good") for p in held_out]
        if abnormal_dir is not None:
            abnormal = list_images(_existing_dir(abnormal_dir, "Abnormal image folder"))
            dirs.append(pathlib.Path(abnormal_dir))
            mdir = None
            if mask_dir is not None:
                mdir = pathlib.Path(mask_dir)
                if not mdir.is_dir():
                    raise DatasetError(f"Mask folder {mdir} does not exist; fix mask_dir.")
                dirs.append(mdir)
            for p in abnormal:
                mask = None
                if mdir is not None:
                    candidates = [mdir / f"{p.stem}.png", mdir / f"{p.stem}_mask.png"]
                    mask = next((c for c in candidates if c.is_file()), None)
                    if mask is None:
                        raise DatasetError(
                            f"Abnormal image {p} has no mask in {mdir}; expected {candidates[0]} "
                            f"or {candidates[1].name}. Add it, or drop mask_dir to use image "
                            "labels only."
                        )
                items.append(_Item(p, mask, "abnormal"))
        if not items:
            raise DatasetError(
                f"Test split of {normal_dir} is empty: give abnormal_dir and/or normal_test_dir, "
                "or test_fraction > 0."
            )
    if not items:
        raise DatasetError(f"Train split of {normal_dir} is empty; add normal images.")
    root = pathlib.Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
    items = [dataclasses.replace(it, image=it.image.resolve()) for it in items]
    loaded = _load_items(items, root=root, image_size=image_size, crop_size=crop_size)
    has_pixel_labels = split == "train" or abnormal_dir is None or mask_dir is not None
    return dataclasses.replace(loaded, has_pixel_labels=has_pixel_labels)


# --------------------------------------------------------------------------------------------
# Foreground masks (FMAS stage / CutPaste FM option).


def foreground_mask_path(fg_root: PathLike, relative_path: str) -> pathlib.Path:
    """``<fg_root>/<category>/train/good/<stem>.png`` for image ``<category>/train/good/<file>``."""
    return pathlib.Path(fg_root) / pathlib.Path(relative_path).with_suffix(".png")


def load_foreground_masks(
    fg_root: PathLike,
    paths: Split | Sequence[str],
    *,
    image_size: int,
    crop_size: int | None = None,
) -> np.ndarray:
    """Loads the foreground masks of a split, under the split's resize / crop geometry.

    Layout: ``<fg_root>/<relative image path with suffix .png>``, i.e.
    ``<fg_root>/<category>/train/good/<stem>.png``, single channel, 255 = foreground.

    Args:
      fg_root: root of the foreground masks.
      paths: a :class:`Split` or image paths relative to the dataset root (``Split.paths``).
      image_size: resize target, as the split's.
      crop_size: centre crop, as the split's.

    Returns:
      [N, S, S] bool, True = foreground.

    Raises:
      DatasetError: a mask is missing or unreadable.
    """
    rel = paths.paths if isinstance(paths, Split) else list(paths)
    side = crop_size if crop_size is not None else image_size
    out = np.empty((len(rel), side, side), bool)
    for i, r in enumerate(rel):
        p = foreground_mask_path(fg_root, r)
        if not p.is_file():
            raise DatasetError(
                f"Foreground mask {p} for image {r} is missing. Run the FMAS mask stage "
                "(python -m launch.synthesize) or point data.foreground_root at the folder "
                "holding <category>/train/good/<stem>.png."
            )
        out[i] = resize_mask(read_mask(p), image_size=image_size, crop_size=crop_size)
    return out
