"""FMAS masks (Sec. 3.1): SAM foreground, the eq. 2 rectangle and their intersection (eq. 1).

The foreground masks are cached on disk in the layout shared with the demo-data generator and the
CutPaste "+FM" option:

    <fg_root>/<category>/<source path relative to the category folder, suffix .png>

e.g. ``<fg_root>/bottle/train/good/000.png``: single channel uint8, 255 = foreground.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from synthesis.files import atomic_write, check_category

log = logging.getLogger(__name__)

SAM_CHECKPOINT_HELP = (
    "Download the Segment Anything checkpoint for model type {model_type!r} (ViT-H: "
    "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth, see "
    "https://github.com/facebookresearch/segment-anything#model-checkpoints) and put it at "
    "{path} or set --config.sam.checkpoint to where it is."
)


def fg_cache_path(fg_root: str | os.PathLike, category: str, rel_to_category: str) -> Path:
    """Path of the cached foreground mask of one image.

    Args:
      fg_root: root of the foreground-mask cache.
      category: class name, e.g. ``"bottle"``.
      rel_to_category: the image path relative to the category folder, e.g.
        ``"train/good/000.png"``.

    Returns:
      ``<fg_root>/<category>/<rel_to_category with suffix .png>``.

    Raises:
      ValueError: ``category`` is not a plain folder name, or ``rel_to_category`` is absolute or
        climbs out of the category folder.
    """
    check_category(category, field="data.categories")
    rel = Path(rel_to_category)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"Image path {rel_to_category!r} must stay inside its category folder.")
    return Path(fg_root) / category / rel.with_suffix(".png")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Reads a single-channel mask PNG. Returns bool ``[H, W]`` (True where the pixel is > 127)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def write_mask_atomic(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Writes bool ``[H, W]`` as a uint8 PNG (255 = True), atomically (tmp file + rename)."""
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    atomic_write(path, lambda fh: image.save(fh, format="PNG"))


def build_tiny_sam():
    """Builds the tiny randomly initialisable SAM used by the tests and the demo config.

    Same classes as the real model (``Sam``, ``ImageEncoderViT``, ``PromptEncoder``,
    ``MaskDecoder``), so ``SamPredictor`` and checkpoint loading run the real code path.
    """
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=1024,
            patch_size=16,
            embed_dim=32,
            depth=1,
            num_heads=2,
            out_chans=32,
            window_size=14,
            global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32,
            image_embedding_size=(64, 64),
            input_image_size=(1024, 1024),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _sam_builders() -> dict[str, Callable]:
    from segment_anything import build_sam_vit_b, build_sam_vit_h, build_sam_vit_l

    return {
        "vit_h": lambda: build_sam_vit_h(checkpoint=None),
        "vit_l": lambda: build_sam_vit_l(checkpoint=None),
        "vit_b": lambda: build_sam_vit_b(checkpoint=None),
        "tiny": build_tiny_sam,
    }


def load_sam_predictor(checkpoint: str | os.PathLike, *, model_type: str, device: str):
    """Loads a ``segment_anything.SamPredictor`` from a local checkpoint file.

    Args:
      checkpoint: path of the state_dict file (e.g. ``sam_vit_h_4b8939.pth``).
      model_type: ``"vit_h"``, ``"vit_l"``, ``"vit_b"`` or ``"tiny"`` (tests / demo).
      device: torch device string.

    Returns:
      A ``SamPredictor``.

    Raises:
      FileNotFoundError: the checkpoint is missing (the message says what to download).
      ValueError: unknown model type.
    """
    import torch
    from segment_anything import SamPredictor

    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint not found: {checkpoint} (config field sam.checkpoint). "
            + SAM_CHECKPOINT_HELP.format(model_type=model_type, path=checkpoint)
        )
    builders = _sam_builders()
    if model_type not in builders:
        raise ValueError(
            f"sam.model_type={model_type!r} is not one of {sorted(builders)} "
            "(config field sam.model_type)."
        )
    sam = builders[model_type]()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sam.load_state_dict(state)
    sam.to(device).eval()
    return SamPredictor(sam)


SAM_PROMPTS = ("center_point", "full_box", "point_grid")


@dataclasses.dataclass(frozen=True)
class PointGrid:
    """The ``"point_grid"`` SAM prompt for images with several objects.

    Attributes:
      points_per_side: a ``n x n`` grid of single positive points at the cell centres.
      min_score: a point's mask is kept only if SAM's predicted IoU is at least this.
      max_fraction: ... and if it covers at most this fraction of the image (larger masks are
        the background or the tray the objects lie on).
    """

    points_per_side: int = 8
    min_score: float = 0.8
    max_fraction: float = 0.5


def grid_points(height: int, width: int, points_per_side: int) -> np.ndarray:
    """``[n * n, 2]`` (x, y) pixel coordinates of the centres of an ``n x n`` grid of cells."""
    xs = (np.arange(points_per_side) + 0.5) * width / points_per_side
    ys = (np.arange(points_per_side) + 0.5) * height / points_per_side
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


def point_grid_union(predictor, image: np.ndarray, grid: PointGrid) -> np.ndarray:
    """Union of SAM's masks for a grid of single points: every object, not only the central one.

    Each grid point is one prompt (SAM's best-scoring mask of its three); a mask is kept if its
    score is at least ``grid.min_score``, it contains its own point and it covers at most
    ``grid.max_fraction`` of the image. Call after ``predictor.set_image(image)``.

    Returns:
      bool ``[H, W]`` (empty if no mask is kept).
    """
    h, w = image.shape[:2]
    union = np.zeros((h, w), dtype=bool)
    for x, y in grid_points(h, w, grid.points_per_side):
        masks, scores, _ = predictor.predict(
            point_coords=np.array([[x, y]]), point_labels=np.array([1]), multimask_output=True
        )
        best = int(np.argmax(scores))
        mask = np.asarray(masks[best], dtype=bool)
        inside = mask[min(int(y), h - 1), min(int(x), w - 1)]
        if scores[best] >= grid.min_score and inside and mask.mean() <= grid.max_fraction:
            union |= mask
    return union


def sam_foreground(
    predictor,
    image: np.ndarray,
    *,
    prompt: str,
    min_fraction: float,
    grid: PointGrid = PointGrid(),  # frozen: one shared default is safe
) -> tuple[np.ndarray, bool]:
    """Foreground mask from SAM with a simple prompt (Sec. 3.1).

    Args:
      predictor: a ``SamPredictor``.
      image: uint8 ``[H, W, 3]`` RGB.
      prompt: ``"center_point"`` (one positive point at the image centre), ``"full_box"`` (a box
        covering the image minus a 2% margin), SAM's highest-scoring mask of its three kept; or
        ``"point_grid"`` (several objects: :func:`point_grid_union` with ``grid``).
      min_fraction: if the mask covers less than this fraction of the image (SAM missed the
        object), the whole image is used instead.
      grid: the ``"point_grid"`` settings.

    Returns:
      ``(mask, fell_back)``: bool ``[H, W]`` and whether the whole-image fallback was used.
    """
    import torch

    h, w = image.shape[:2]
    if prompt not in SAM_PROMPTS:
        raise ValueError(f"sam.prompt={prompt!r} must be one of {', '.join(SAM_PROMPTS)}.")
    with torch.inference_mode():
        predictor.set_image(image)
        if prompt == "point_grid":
            mask = point_grid_union(predictor, image, grid)
            if mask.mean() < min_fraction:
                return np.ones((h, w), dtype=bool), True
            return mask, False
        if prompt == "center_point":
            masks, scores, _ = predictor.predict(
                point_coords=np.array([[w / 2.0, h / 2.0]]),
                point_labels=np.array([1]),
                multimask_output=True,
            )
        elif prompt == "full_box":
            mx, my = 0.02 * w, 0.02 * h
            masks, scores, _ = predictor.predict(
                box=np.array([mx, my, w - 1 - mx, h - 1 - my]), multimask_output=True
            )
    mask = np.asarray(masks[int(np.argmax(scores))], dtype=bool)
    if mask.mean() < min_fraction:
        return np.ones((h, w), dtype=bool), True
    return mask, False


def rect_mask(
    fg: np.ndarray,
    *,
    alpha: float,
    aspect_ratio_range: Sequence[float],
    rng: np.random.Generator,
) -> np.ndarray:
    """The rectangle ``M_rect`` of eq. 2.

    The centre is a pixel drawn uniformly inside ``M_fg``; the area is ``alpha * |M_fg|`` (eq. 2,
    up to rounding to whole pixels); the aspect ratio width / height is drawn log-uniformly in
    ``aspect_ratio_range``; the rectangle is shifted (never shrunk, unless it is larger than the
    image) to lie inside the image, and always contains its centre.

    Args:
      fg: bool ``[H, W]``, the foreground mask (non-empty).
      alpha: area ratio, 0.1 in the paper.
      aspect_ratio_range: ``(min, max)`` of width / height.
      rng: numpy generator.

    Returns:
      bool ``[H, W]``.
    """
    h, w = fg.shape
    ys, xs = np.nonzero(fg)
    if ys.size == 0:
        raise ValueError("rect_mask needs a non-empty foreground mask.")
    k = int(rng.integers(ys.size))
    cy, cx = int(ys[k]), int(xs[k])
    lo, hi = float(aspect_ratio_range[0]), float(aspect_ratio_range[1])
    ratio = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    area = alpha * float(ys.size)
    rh = min(h, max(1, round(math.sqrt(area / ratio))))
    rw = min(w, max(1, round(area / rh)))
    top = min(max(cy - rh // 2, 0), h - rh)
    left = min(max(cx - rw // 2, 0), w - rw)
    out = np.zeros((h, w), dtype=bool)
    out[top : top + rh, left : left + rw] = True
    return out


def anomaly_mask(
    fg: np.ndarray,
    *,
    alpha: float,
    aspect_ratio_range: Sequence[float],
    rng: np.random.Generator,
) -> np.ndarray:
    """``M = M_fg ∩ M_rect`` (eq. 1) with ``M_rect`` from :func:`rect_mask` (eq. 2).

    Returns bool ``[H, W]``, never empty (the rectangle contains its centre, which is in M_fg).
    """
    return fg & rect_mask(fg, alpha=alpha, aspect_ratio_range=aspect_ratio_range, rng=rng)


class ForegroundProvider:
    """Foreground masks with the on-disk cache; SAM is loaded on the first cache miss.

    Args:
      fg_root: cache root (layout in the module docstring).
      texture_categories: classes whose foreground is the whole image.
      sam_checkpoint, sam_model_type, sam_prompt: see :func:`load_sam_predictor` and
        :func:`sam_foreground`.
      multi_object_categories: classes with several objects per image, segmented with the
        ``"point_grid"`` prompt and ``grid`` instead of ``sam_prompt``.
      min_fraction: see :func:`sam_foreground`.
      device: torch device for SAM.
    """

    def __init__(
        self,
        fg_root: str | os.PathLike,
        *,
        texture_categories: Sequence[str],
        sam_checkpoint: str,
        sam_model_type: str,
        sam_prompt: str,
        min_fraction: float,
        device: str,
        multi_object_categories: Sequence[str] = (),
        grid: PointGrid = PointGrid(),
    ) -> None:
        self.fg_root = Path(fg_root)
        self.texture_categories = frozenset(texture_categories)
        self.sam_checkpoint = sam_checkpoint
        self.sam_model_type = sam_model_type
        self.sam_prompt = sam_prompt
        self.multi_object_categories = frozenset(multi_object_categories)
        self.grid = grid
        self.min_fraction = min_fraction
        self.device = device
        self._predictor = None
        self.stats = {"cache_hits": 0, "sam": 0, "sam_fallback_whole_image": 0, "texture": 0}

    def __call__(self, image: np.ndarray, *, category: str, rel_to_category: str) -> np.ndarray:
        """Foreground of ``image`` (uint8 ``[H, W, 3]``) as bool ``[H, W]``; cached on disk."""
        path = fg_cache_path(self.fg_root, category, rel_to_category)
        if path.is_file():
            try:
                fg = read_mask(path)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                log.warning("Ignoring unreadable cached foreground %s (%s); redoing it.", path, e)
                fg = None
            if fg is not None and fg.shape == image.shape[:2] and fg.any():
                self.stats["cache_hits"] += 1
                return fg
            if fg is not None:
                log.warning("Ignoring cached foreground %s (wrong size or empty).", path)
        if category in self.texture_categories:
            fg = np.ones(image.shape[:2], dtype=bool)
            self.stats["texture"] += 1
        else:
            if self._predictor is None:
                self._predictor = load_sam_predictor(
                    self.sam_checkpoint, model_type=self.sam_model_type, device=self.device
                )
            multi = category in self.multi_object_categories
            fg, fell_back = sam_foreground(
                self._predictor,
                image,
                prompt="point_grid" if multi else self.sam_prompt,
                min_fraction=self.min_fraction,
                grid=self.grid,
            )
            self.stats["sam"] += 1
            self.stats["sam_fallback_whole_image"] += int(fell_back)
        write_mask_atomic(path, fg)
        return fg
