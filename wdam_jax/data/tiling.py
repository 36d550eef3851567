"""Tiling of large images: the tile grid, cutting tiles, and stitching per-tile maps back.

With ``config.data.tile_size > 0`` images are read at their original resolution (no whole-image
resize) and cut into square tiles of ``tile_size`` pixels, ``tile_stride`` apart (``tile_size``:
side by side; less: overlapping; it must be set, in ``[1, tile_size]``). Along each axis the
tiles start at ``0, stride, 2 stride, ...`` and a last tile is aligned to the border (starting
at ``length - tile_size``), so every pixel is covered at least once and no tile reaches past
the image. Each tile is then resized to
``data.image_size`` (the network's input; no resize when the two are equal).

Training uses the tiles as the examples (:func:`wdam_jax.data.sources.load_split`, split
``"train"``); scoring (:meth:`wdam_jax.methods.base.Method.score_images`) scores each image's
tiles in fixed-size batches and stitches the tile maps back at the original resolution:

- **stitching** (:func:`stitch`): each tile's map is resized back to ``tile_size`` and a pixel's
  value is the *mean* of the maps of every tile covering it (a uniform blend: overlaps are
  averaged, with no window weighting), so a constant map stitches to the same constant;
- **image score** (``data.tile_image_score``): ``"map_max"`` (default) the maximum of the
  stitched map, as PatchCore's image score is the maximum of its map; ``"tile_max"`` the maximum
  of the tiles' own image scores.

Everything here is numpy and pure; nothing reads files.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from PIL import Image

from wdam_jax.errors import ConfigError

IMAGE_SCORES = ("map_max", "tile_max")


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The tiling of a run (``config.data.tile_*``).

    Attributes:
      size: tile side in original pixels.
      stride: distance between tile origins (``<= size``; ``< size`` overlaps).
      image_score: how an image's score comes from its tiles (:data:`IMAGE_SCORES`).
      input_size: the side the network sees (``data.image_size``).
    """

    size: int
    stride: int
    image_score: str
    input_size: int

    def as_json(self) -> dict:
        """What a service needs to reproduce the tiling and the stitching (export metadata)."""
        return {
            "tile_size": self.size,
            "tile_stride": self.stride,
            "grid": "origins 0, stride, 2*stride, ... along each axis, plus a last tile aligned "
            "to the border (origin length - tile_size) when they do not reach it",
            "tile_resize": f"each tile resized to {self.input_size}x{self.input_size} (PIL "
            "bilinear) before the model"
            if self.input_size != self.size
            else "none (tile_size = image_size)",
            "stitching": "each tile map resized to tile_size (PIL bilinear), then the mean over "
            "the tiles covering each pixel (uniform blend of overlaps)",
            "image_score": {
                "map_max": "maximum of the stitched map",
                "tile_max": "maximum of the tiles' image scores",
            }[self.image_score],
        }


def problems(data_config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with ``config.data``'s tiling fields (empty when tiling is off or fine)."""
    size = int(data_config.get("tile_size", 0) or 0)
    if size == 0:
        return []
    stride = int(data_config.get("tile_stride", 0) or 0)
    out = []
    if size < 0:
        out.append(f"config.data.tile_size={size}: use 0 (no tiling) or a positive tile side.")
    elif stride <= 0:
        out.append(
            f"config.data.tile_stride={stride} with data.tile_size={size}: set a stride in "
            f"[1, {size}] ({size}: tiles side by side; {size // 2}: half-overlapping tiles)."
        )
    elif stride > size:
        out.append(
            f"config.data.tile_stride={stride} is larger than config.data.tile_size={size}: "
            "pixels between tiles would never be scored; use a stride of at most tile_size."
        )
    how = data_config.get("tile_image_score", "map_max")
    if how not in IMAGE_SCORES:
        out.append(f"config.data.tile_image_score={how!r}: use one of {', '.join(IMAGE_SCORES)}.")
    if data_config.get("anomaly_source") == "fmas":
        out.append(
            f"config.data.anomaly_source='fmas' with data.tile_size={size}: FMAS samples are "
            "whole resized images, not tiles; use another anomaly source or data.tile_size=0."
        )
    if data_config.get("crop_size", 0):
        out.append(
            f"config.data.crop_size={data_config.crop_size} with data.tile_size={size}: tiled "
            "images are not resized or cropped; set data.crop_size=0."
        )
    return out


def from_config(data_config: ml_collections.ConfigDict) -> Tiling | None:
    """The run's :class:`Tiling`, or None when ``data.tile_size`` is 0 or absent.

    Raises:
      ConfigError: a tiling field that cannot work (:func:`problems`).
    """
    if not int(data_config.get("tile_size", 0) or 0):
        return None
    found = problems(data_config)
    if found:
        raise ConfigError(" ".join(found))
    size = int(data_config.tile_size)
    return Tiling(
        size=size,
        stride=int(data_config.tile_stride),
        image_score=data_config.get("tile_image_score", "map_max"),
        input_size=int(data_config.image_size),
    )


def origins(length: int, *, size: int, stride: int) -> np.ndarray:
    """Tile origins along one axis of ``length`` pixels: ``0, stride, ...`` plus the border one.

    Raises:
      ConfigError: ``size > length`` or a stride outside ``[1, size]``.
    """
    if size > length:
        raise ConfigError(
            f"config.data.tile_size={size} is larger than the image ({length} px along one "
            "side): lower data.tile_size to at most the smallest image side, or set it to 0 "
            "(resize whole images to data.image_size)."
        )
    if not 0 < stride <= size:
        raise ConfigError(
            f"config.data.tile_stride={stride}: use a stride in [1, data.tile_size={size}]."
        )
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return np.asarray(starts, np.int64)


def grid(height: int, width: int, *, size: int, stride: int) -> np.ndarray:
    """``[T, 2]`` int64 tile origins ``(top, left)`` of an ``height x width`` image, row-major."""
    tops = origins(height, size=size, stride=stride)
    lefts = origins(width, size=size, stride=stride)
    return np.stack(np.meshgrid(tops, lefts, indexing="ij"), axis=-1).reshape(-1, 2)


def _resize(square: np.ndarray, side: int) -> np.ndarray:
    """``[s, s]`` or ``[s, s, C]`` float32 -> ``[side, side, ...]`` (PIL bilinear, per channel)."""
    if square.shape[0] == side:
        return square
    planes = square[..., None] if square.ndim == 2 else square
    out = np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(p, np.float32), mode="F").resize(
                    (side, side), Image.BILINEAR
                )
            )
            for p in np.moveaxis(planes, -1, 0)
        ],
        axis=-1,
    )
    return out[..., 0] if square.ndim == 2 else out


def cut(image: np.ndarray, corners: np.ndarray, *, size: int, input_size: int) -> np.ndarray:
    """The tiles of ``image`` ``[H, W, C]`` at ``corners`` ``[T, 2]``, each resized to
    ``input_size``: ``[T, input_size, input_size, C]`` float32."""
    return np.stack(
        [
            _resize(np.asarray(image[top : top + size, left : left + size], np.float32), input_size)
            for top, left in corners
        ]
    )


def stitch(
    tile_maps: np.ndarray, corners: np.ndarray, *, size: int, shape: tuple[int, int]
) -> np.ndarray:
    """Per-tile maps ``[T, s, s]`` back into one ``[H, W]`` float32 map: each resized to
    ``size`` and placed at its corner; a pixel gets the mean over the tiles covering it."""
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.int32)
    for tile_map, (top, left) in zip(tile_maps, corners, strict=True):
        total[top : top + size, left : left + size] += _resize(
            np.asarray(tile_map, np.float32), size
        )
        count[top : top + size, left : left + size] += 1
    assert count.min() > 0, "the grid leaves pixels uncovered"
    return (total / count).astype(np.float32)


def image_score(stitched: np.ndarray, tile_scores: np.ndarray, *, how: str) -> float:
    """An image's score from its stitched map or its tiles' scores (``data.tile_image_score``)."""
    if how == "map_max":
        return float(np.max(stitched))
    if how == "tile_max":
        return float(np.max(tile_scores))
    raise ConfigError(
        f"config.data.tile_image_score={how!r}: use one of {', '.join(IMAGE_SCORES)}."
    )
