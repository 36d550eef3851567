"""Helpers for tests/test_synthesis.py: a tiny MVTec-layout dataset, tiny models, a config."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import skimage.data
from PIL import Image

from configs import fmas_mvtec
from synthesis import tiny_models, writer

TEXTURE = "tile"  # whole-image foreground
OBJECT = "bottle"  # foreground from (tiny) SAM


def _crop(photo: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    crop = int(rng.integers(size * 2, size * 4))
    y, x = rng.integers(0, np.array(photo.shape[:2]) - crop + 1)
    patch = Image.fromarray(photo[y : y + crop, x : x + crop]).convert("RGB")
    return np.asarray(patch.resize((size, size), Image.Resampling.BILINEAR))


def make_mvtec_images(root: Path, *, per_category: int, size: int, seed: int) -> list[str]:
    """Writes ``<root>/{tile,bottle}/train/good/00i.png`` from scikit-image photographs.

    Returns the sources relative to ``root``.
    """
    rng = np.random.default_rng(seed)
    photos = {TEXTURE: skimage.data.brick(), OBJECT: skimage.data.coins()}
    sources = []
    for category, photo in photos.items():
        folder = root / category / "train" / "good"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_category):
            Image.fromarray(_crop(photo, rng, size)).save(folder / f"{i:03d}.png")
            sources.append(f"{category}/train/good/{i:03d}.png")
    return sources


def make_models(folder: Path) -> dict[str, Path]:
    """Tiny SD inpainting folder and tiny SAM checkpoint, through the public builders."""
    return {
        "sd": tiny_models.build_tiny_inpaint_pipeline(folder / "sd_inpaint", seed=0),
        "sam": tiny_models.build_tiny_sam_checkpoint(folder / "sam_tiny.pth", seed=0),
    }


def make_config(
    tmp: Path, *, data_root: Path, models: dict[str, Path], output: str
) -> ml_collections.ConfigDict:
    """``configs/fmas_mvtec.py`` pointed at the test data and tiny models, 64x64, CPU."""
    config = fmas_mvtec.get_config()
    config.device = "cpu"
    config.cpu_threads = 1
    config.output_dir = str(tmp / output)
    config.data.root = str(data_root)
    config.data.categories = (OBJECT, TEXTURE)
    config.masks.fg_root = str(tmp / output / "fg")
    config.sam.checkpoint = str(models["sam"])
    config.sam.model_type = "tiny"
    config.prompts.cache_dir = str(tmp / output / "prompts")
    config.inpaint.model_dir = str(models["sd"])
    config.inpaint.resolution = 64
    config.selector.backbone_weights = "random"
    config.output.records_per_file = 2
    return config


def tiny_record(source: str) -> bytes:
    """One serialised FMAS record of a 4 x 4 image with every field set."""
    return writer.make_example(
        image=np.zeros((4, 4, 3), np.uint8),
        mask=np.ones((4, 4), bool),
        source=source,
        category="c",
        prompt="p",
        negative_prompt="n",
        prompt_source="library:generic",
        seed=1,
        cfg=5.0,
        strength=0.5,
        lpips=0.1,
        tau=0.13,
    )
