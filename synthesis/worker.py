"""One FMAS worker's part (Sec. 3.1): its models, and one source image to one record.

A :class:`Synthesizer` loads SAM, the inpainting pipeline and LPIPS once; ``synthesize_one``
turns one :class:`WorkItem` into a serialised Example. The drivers that hand out the work are
:mod:`synthesis.pipeline` (this process) and :mod:`synthesis.distributed` (Ray actors); both
import this module, neither imports the other's internals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from synthesis import inpainting, masks, prompts, selector, writer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One normal training image."""

    category: str
    source: str  # relative to the dataset root, "/"-separated, e.g. "bottle/train/good/000.png"

    @property
    def rel_to_category(self) -> str:
        return self.source.split("/", 1)[1]


def image_rng(seed: int, source: str) -> np.random.Generator:
    """The generator of all random choices for one source image."""
    digest = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """uint8 ``[H, W, 3]``; grayscale and RGBA images become RGB.

    Raises:
      ValueError: the file is not a readable image, or is larger than Pillow's decompression-bomb
        limit (``PIL.Image.MAX_IMAGE_PIXELS``); the message names the file.
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"{path} is too large to read safely ({e}). Resize it, remove it from the dataset, "
            "or raise PIL.Image.MAX_IMAGE_PIXELS if the image is trusted."
        ) from None
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e}); replace or remove it.") from None


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def model_identities(config: ml_collections.ConfigDict, *, sam_used: bool) -> dict[str, Any]:
    """What identifies the models of a run (for the manifest).

    The SD folder is fingerprinted by the SHA-256 of its JSON files and the names and sizes of its
    weight files (hashing GBs of weights per worker would cost minutes); SAM and the LPIPS backbone
    by the SHA-256 of their files.
    """
    sd_dir = Path(config.inpaint.model_dir).expanduser()
    fingerprint = hashlib.sha256()
    for p in sorted(sd_dir.rglob("*")):
        if p.is_file():
            rel = p.relative_to(sd_dir).as_posix()
            extra = _sha256_file(p) if p.suffix == ".json" else str(p.stat().st_size)
            fingerprint.update(f"{rel}:{extra}\n".encode())
    index_path = sd_dir / "model_index.json"
    model_index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    sam_path = Path(config.sam.checkpoint).expanduser()
    lpips_path = selector.backbone_weights_path(
        config.selector.lpips_net, config.selector.backbone_weights
    )
    return {
        "inpaint": {
            "model_dir": str(sd_dir),
            "class": model_index.get("_class_name"),
            "saved_with_diffusers": model_index.get("_diffusers_version"),
            "fingerprint_sha256": fingerprint.hexdigest(),
            "scheduler": "DPMSolverMultistepScheduler(algorithm_type=dpmsolver++, solver_order=2)",
        },
        "sam": {
            "used": sam_used,
            "checkpoint": str(sam_path),
            "model_type": config.sam.model_type,
            "sha256": _sha256_file(sam_path) if sam_used and sam_path.is_file() else None,
        },
        "lpips": {
            "net": config.selector.lpips_net,
            "version": "0.1",
            "backbone": str(lpips_path) if lpips_path else "random",
            "backbone_sha256": _sha256_file(lpips_path) if lpips_path else None,
        },
        "packages": {
            p: _version(p)
            for p in ("torch", "diffusers", "transformers", "segment-anything", "lpips")
        },
    }


def synthesize_one(
    item: WorkItem,
    *,
    config: ml_collections.ConfigDict,
    foreground: masks.ForegroundProvider,
    pipe,
    lpips_model,
    prompt_pair: prompts.PromptPair,
    on_distances: Callable[[np.ndarray], None] | None = None,
) -> bytes:
    """One record for one normal image (Sec. 3.1).

    1. ``M_fg`` (SAM or whole image, cached); 2. ``M = M_fg ∩ M_rect`` (eq. 1, 2);
    3. CFG, strength and K seeds; 4. K inpainted, composited candidates ``I_A^(k)``;
    5. LPIPS to ``I_N`` and eq. 3; 6. the serialised Example.

    ``on_distances``, if given, receives the ``[K]`` candidates' distances of step 5 (the
    manifest's ``lpips`` summary, from which ``selector.tau`` can be chosen).
    """
    image = read_rgb(Path(config.data.root).expanduser() / item.source)
    fg = foreground(image, category=item.category, rel_to_category=item.rel_to_category)
    rng = image_rng(config.seed, item.source)
    m = masks.anomaly_mask(
        fg,
        alpha=config.masks.alpha,
        aspect_ratio_range=config.masks.aspect_ratio_range,
        rng=rng,
    )
    cfg = float(rng.uniform(*config.inpaint.cfg_range))
    strength = float(rng.uniform(*config.inpaint.strength_range))
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=config.inpaint.num_candidates)]
    candidates = inpainting.inpaint_candidates(
        pipe,
        image,
        m,
        prompt=prompt_pair.prompt,
        negative_prompt=prompt_pair.negative_prompt,
        seeds=seeds,
        cfg=cfg,
        strength=strength,
        steps=config.inpaint.steps,
        resolution=config.inpaint.resolution,
    )
    distances = selector.lpips_distances(lpips_model, image, candidates)
    k = selector.select_closest(distances, config.selector.tau)
    if on_distances is not None:
        on_distances(distances)
    return writer.make_example(
        image=candidates[k],
        mask=m,
        source=item.source,
        category=item.category,
        prompt=prompt_pair.prompt,
        negative_prompt=prompt_pair.negative_prompt,
        prompt_source=prompt_pair.source,
        seed=seeds[k],
        cfg=cfg,
        strength=strength,
        lpips=float(distances[k]),
        tau=config.selector.tau,
    )


class Synthesizer:
    """The models of one FMAS worker, loaded once: SAM (on the first foreground cache miss),
    Stable Diffusion inpainting and LPIPS.

    Args:
      config: an FMAS config.

    Attributes:
      device: the torch device the models run on (``config.device`` resolved here, on the worker).
      load_seconds: how long loading took.
    """

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        t = time.perf_counter()
        self.config = config
        self.device = resolve_device(config.device)
        self.foreground = masks.ForegroundProvider(
            config.masks.fg_root,
            texture_categories=config.masks.texture_categories,
            sam_checkpoint=config.sam.checkpoint,
            sam_model_type=config.sam.model_type,
            sam_prompt=config.sam.prompt,
            min_fraction=config.masks.min_foreground_fraction,
            device=self.device,
            multi_object_categories=config.sam.multi_object_categories,
            grid=masks.PointGrid(
                points_per_side=config.sam.grid_points_per_side,
                min_score=config.sam.grid_min_score,
                max_fraction=config.sam.grid_max_fraction,
            ),
        )
        self.lpips_model = selector.load_lpips(
            net=config.selector.lpips_net,
            backbone_weights=config.selector.backbone_weights,
            device=self.device,
            seed=config.seed,
        )
        self.pipe = inpainting.load_inpaint_pipeline(
            config.inpaint.model_dir,
            device=self.device,
            half_precision=config.inpaint.half_precision,
        )
        self.load_seconds = time.perf_counter() - t
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, item: WorkItem, prompt_pair: prompts.PromptPair) -> Result:
        """The record of one image, with how its foreground was obtained."""
        before = dict(self.foreground.stats)
        distances: list[float] = []
        record = synthesize_one(
            item,
            config=self.config,
            foreground=self.foreground,
            pipe=self.pipe,
            lpips_model=self.lpips_model,
            prompt_pair=prompt_pair,
            on_distances=lambda d: distances.extend(float(x) for x in d),
        )
        foreground = {k: v - before[k] for k, v in self.foreground.stats.items()}
        return Result(item.source, record, foreground, self.worker, tuple(distances))


@dataclasses.dataclass(frozen=True)
class Result:
    """What a worker returns for one image."""

    source: str
    record: bytes  # the serialised Example
    foreground: dict[str, int]  # this image's increments of ``ForegroundProvider.stats``
    worker: str  # "<host>:<pid>" of the process that made it
    lpips_candidates: tuple[float, ...] = ()  # eq. 3's distance of each candidate


@dataclasses.dataclass(frozen=True)
class Plan:
    """One shard's work, decided before any model loads."""

    all_items: list[WorkItem]
    mine: list[WorkItem]
    done: Counter[str]  # sources already in the output folder (any worker)
    todo: list[WorkItem]
    prompt_pairs: dict[str, prompts.PromptPair]
    label: str
