"""What a run read, and what in it deserves a warning: a data summary saved with every run.

``summarize(config.data)`` scans the category's folders without decoding the images (Pillow
reads the header for the mode and size; masks of defect images are decoded to see if they are
empty; files are hashed to find duplicates) and returns the counts per split and defect type,
the image sizes, modes and formats, the files ignored and why, and the warnings:

- grayscale, RGBA / alpha, palette and 16-bit images (converted to 8-bit RGB: say how);
- images that are not square (resized to ``image_size`` squared: the aspect ratio changes) and
  images smaller than ``image_size`` (upscaled: no detail is added), by :func:`size_warnings`,
  which ``launch.predict`` uses for its inputs too;
- mixed file formats;
- defect images whose mask is empty (they count for image AUROC but add no anomalous pixel);
- byte-identical duplicate files;
- files that are not images (ignored).
"""

from __future__ import annotations

import collections
import hashlib
import json
import pathlib
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from wdam_jax.data import datasets, sources, tiling
from wdam_jax.errors import ConfigError

_MODE_NOTES = {
    "L": "grayscale: repeated over the three channels",
    "LA": "grayscale with alpha: alpha dropped, grey repeated over the three channels",
    "1": "1-bit: converted to 8-bit RGB",
    "P": "palette: expanded to RGB (transparency dropped)",
    "PA": "palette with alpha: expanded to RGB, alpha dropped",
    "RGBA": "RGBA: the alpha channel is dropped (not composited)",
    "CMYK": "CMYK: converted to RGB",
    "I;16": "16-bit grey: scaled to 8 bits (x 255 / 65535) and repeated over the channels",
    "I;16B": "16-bit grey: scaled to 8 bits (x 255 / 65535) and repeated over the channels",
    "I;16L": "16-bit grey: scaled to 8 bits (x 255 / 65535) and repeated over the channels",
    "I": "32-bit grey: scaled to 8 bits and repeated over the channels",
    "F": "floating-point grey: converted to 8 bits",
}
_MASK_DIRS = ("ground_truth", "masks")


def size_warnings(sizes: list[tuple[str, int, int]], image_size: int) -> list[str]:
    """What resizing to ``image_size`` squared does to these images, one warning per kind.

    Args:
      sizes: ``(path, width, height)`` of each image (sizes are written width x height, as
        Pillow and ``data_summary.json`` give them).
      image_size: the side every image is resized to.

    Returns:
      A warning for the non-square images (the aspect ratio changes) and one for those smaller
      than ``image_size`` in either side (upscaled), each with its count and an example.
    """
    non_square = [f"{p} ({w}x{h})" for p, w, h in sizes if w != h]
    small = [f"{p} ({w}x{h})" for p, w, h in sizes if w < image_size or h < image_size]
    warnings = []
    if non_square:
        warnings.append(
            f"{len(non_square)} image(s) are not square (e.g. {non_square[0]}): each is resized "
            f"to {image_size}x{image_size}, which changes its aspect ratio. Crop them square "
            "beforehand if shape matters for the defects."
        )
    if small:
        warnings.append(
            f"{len(small)} image(s) are smaller than {image_size}x{image_size} (e.g. {small[0]}): "
            "each is upscaled, which adds no detail (a defect a few pixels wide stays a blur). "
            "Use images of at least that size, or a run with a smaller config.data.image_size."
        )
    return warnings


def _split_and_kind(rel: pathlib.Path, data_config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(split, defect type) of an image path relative to ``<root>/<category>``."""
    parts = rel.parts
    if data_config.dataset == "folder":
        normal = data_config.get("folder_normal", "good")
        return ("train" if parts[0] == normal else "test"), (
            "good" if parts[0] == normal else parts[0]
        )
    if parts[0] in ("train", "test") and len(parts) > 2:
        return parts[0], parts[1]
    return "other", parts[0]


def summarize(data_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The summary of ``data_config``'s category (see the module docstring) as a JSON-able dict."""
    if data_config.dataset == "tfds":
        return {"dataset": "tfds", "note": "a prepared TFDS dataset: files are not scanned"}
    base = sources.dataset_root(data_config) / data_config.category
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    modes, formats, sizes = collections.Counter(), collections.Counter(), collections.Counter()
    mode_examples: dict[str, str] = {}
    dims: list[tuple[str, int, int]] = []
    ignored: list[dict[str, str]] = []
    empty_masks: list[str] = []
    by_hash: dict[str, list[str]] = collections.defaultdict(list)
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        rel = path.relative_to(base)
        if path.name.startswith("."):
            ignored.append({"path": str(rel), "why": "hidden file"})
            continue
        if path.suffix.lower() not in datasets.IMAGE_EXTENSIONS:
            ignored.append(
                {"path": str(rel), "why": f"not an image ({path.suffix or 'no'} suffix)"}
            )
            continue
        if rel.parts[0] in _MASK_DIRS:
            continue
        split, kind = _split_and_kind(rel, data_config)
        counts[split][kind] += 1
        formats[path.suffix.lower()] += 1
        by_hash[hashlib.sha256(path.read_bytes()).hexdigest()].append(str(rel))
        try:
            with Image.open(path) as img:
                mode, (w, h) = img.mode, img.size
        except Exception as e:  # reported, and the loader will name it again with its fix
            ignored.append({"path": str(rel), "why": f"unreadable: {e}"})
            continue
        modes[mode] += 1
        mode_examples.setdefault(mode, str(rel))
        sizes[f"{w}x{h}"] += 1
        dims.append((str(rel), w, h))
    orphan_masks: list[str] = []
    if data_config.dataset != "folder" and (base / "ground_truth").is_dir():
        for mask in sorted((base / "ground_truth").rglob("*")):
            if mask.is_file() and mask.suffix.lower() in datasets.IMAGE_EXTENSIONS:
                rel = mask.relative_to(base)
                stem = mask.stem.removesuffix("_mask")
                images = base / "test" / rel.parts[1]
                if not images.is_dir() or not any(
                    p.stem == stem for p in images.iterdir() if p.is_file()
                ):
                    orphan_masks.append(str(rel))
                elif not datasets.read_mask(mask).any():
                    empty_masks.append(str(rel))
    warnings = []
    size = data_config.image_size
    for mode, n in sorted(modes.items()):
        if mode != "RGB":
            note = _MODE_NOTES.get(mode, f"mode {mode}: converted to RGB")
            warnings.append(f"{n} image(s) are {note} (e.g. {mode_examples[mode]}).")
    tiles = tiling.from_config(data_config)
    if tiles is None:  # tiled images are read at their original resolution: not resized
        warnings.extend(size_warnings(dims, size))
    if len(formats) > 1:
        shown = ", ".join(f"{n} {f}" for f, n in sorted(formats.items()))
        warnings.append(f"Mixed image formats ({shown}): all are read, but check they belong.")
    if empty_masks:
        warnings.append(
            f"{len(empty_masks)} defect mask(s) are empty (e.g. {empty_masks[0]}): those images "
            "count as anomalous for image AUROC but add no anomalous pixel to pixel AUROC / PRO."
        )
    if orphan_masks:
        warnings.append(
            f"{len(orphan_masks)} mask(s) have no test image (e.g. {orphan_masks[0]}): ignored; "
            "check the image was not renamed or deleted."
        )
    duplicates = [paths for paths in by_hash.values() if len(paths) > 1]
    if duplicates:
        warnings.append(
            f"{len(duplicates)} group(s) of byte-identical images (e.g. "
            f"{', '.join(duplicates[0][:3])}): a duplicate across train and test inflates scores."
        )
    if ignored:
        warnings.append(
            f"{len(ignored)} file(s) ignored (e.g. {ignored[0]['path']}: {ignored[0]['why']})."
        )
    return {
        "dataset": data_config.dataset,
        "folder": str(base),
        "images": {split: dict(sorted(c.items())) for split, c in sorted(counts.items())},
        "held_out": _held_out(data_config, sum(counts["train"].values())),
        "sizes": dict(sizes.most_common()),
        "tiling": _tiling(tiles, sizes, counts["train"]) if tiles is not None else None,
        "modes": dict(modes.most_common()),
        "formats": dict(formats.most_common()),
        "ignored": ignored,
        "empty_defect_masks": empty_masks,
        "masks_without_image": orphan_masks,
        "duplicates": duplicates,
        "warnings": warnings,
    }


def _tiling(tiles: tiling.Tiling, sizes: collections.Counter, train: collections.Counter):
    """Tiles per image of each size (``"WxH": T``) and the training tiles (``data.tile_*``)."""
    per_size = {}
    for key in sizes:
        w, h = map(int, key.split("x"))
        try:
            per_size[key] = len(tiling.grid(h, w, size=tiles.size, stride=tiles.stride))
        except ConfigError as e:  # the loader raises it; the summary shows it
            per_size[key] = str(e)
    counts = [t for t in per_size.values() if isinstance(t, int)]
    return {
        **tiles.as_json(),
        "tiles_per_image": per_size,
        "training_tiles": sum(train.values()) * counts[0] if len(counts) == 1 else None,
    }


def _held_out(data_config: ml_collections.ConfigDict, num_train: int) -> dict[str, Any]:
    """How many of the ``num_train`` training images the run holds out, and what for."""
    fraction = float(data_config.get("holdout_fraction", 0.0) or 0.0)
    held = 0
    if fraction and num_train:
        try:
            held = len(
                sources.holdout_indices(
                    num_train, fraction=fraction, seed=int(data_config.get("holdout_seed", 0))
                )
            )
        except datasets.DatasetError:  # too few images: the loader names it with its fix
            held = 0
    out: dict[str, Any] = {
        "threshold": held,
        "left_for_training": num_train - held,
        "why": "normal training images left out of training and fit; the decision threshold is "
        "set on their scores (data.holdout_fraction)",
    }
    if data_config.get("val_fraction"):
        out["validation_fraction_of_the_rest"] = float(data_config.val_fraction)
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A few readable lines: images per split and defect type, sizes, modes."""
    if "images" not in summary:
        return f"data: {summary.get('note', '')}"
    lines = [f"data: {summary['folder']} ({summary['dataset']})"]
    held = summary.get("held_out", {})
    for split, kinds in summary["images"].items():
        shown = ", ".join(f"{k} {n}" for k, n in kinds.items())
        line = f"  {split}: {sum(kinds.values())} images ({shown})"
        if split == "train" and held.get("threshold"):
            line += (
                f"; {held['threshold']} held out for the decision threshold, "
                f"{held['left_for_training']} left for training"
            )
        if split == "train" and held.get("validation_fraction_of_the_rest"):
            line += (
                f"; {held['validation_fraction_of_the_rest']:.0%} of those held out for "
                "validation (data.val_fraction)"
            )
        lines.append(line)
    top = lambda d: ", ".join(f"{k} x{n}" for k, n in list(d.items())[:4])
    lines.append(f"  sizes: {top(summary['sizes'])}; modes: {top(summary['modes'])}")
    if summary.get("tiling"):
        t = summary["tiling"]
        lines.append(
            f"  tiles: {t['tile_size']} px, stride {t['tile_stride']}; per image "
            f"{top(t['tiles_per_image'])}; training tiles (before any hold-out) "
            f"{t['training_tiles']}"
        )
    return "\n".join(lines)


def save(summary: dict[str, Any], path: str | pathlib.Path) -> None:
    from wdam_jax.checkpoints import atomic_write_text

    atomic_write_text(path, json.dumps(summary, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value))
