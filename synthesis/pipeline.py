"""FMAS end to end (Sec. 3.1): masks -> prompts -> inpainting -> LPIPS selection -> TFRecords.

``run_fmas(config, shard_index=i, num_shards=n)`` processes worker ``i``'s share of the normal
training images (``<data.root>/<category>/<data.pattern>``, sorted, every n-th from i) and writes
one record per image. Every random choice of an image comes from a generator seeded by
``(config.seed, hash of its source path)``, so a record does not depend on the sharding or on
where a run was interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from synthesis import inpainting, masks, prompts, selector, writer
from synthesis.progress import Progress

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPG", ".PNG")


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One normal training image."""

    category: str
    source: str  # relative to the dataset root, "/"-separated, e.g. "bottle/train/good/000.png"

    @property
    def rel_to_category(self) -> str:
        return self.source.split("/", 1)[1]


def list_work(
    root: str | os.PathLike,
    *,
    categories: Sequence[str],
    pattern: str,
    limit_per_category: int,
) -> list[WorkItem]:
    """The normal images to synthesise from, in a deterministic (sorted) order.

    Args:
      root: dataset root (MVTec layout).
      categories: class folders; empty means every folder under ``root``.
      pattern: glob relative to a class folder, e.g. ``"train/good/*"``.
      limit_per_category: keep the first this many per class (0 = all).

    Returns:
      Work items sorted by category, then path.

    Raises:
      FileNotFoundError: the root or a class folder is missing, or a class has no image.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"Dataset root {root} does not exist (config field data.root). Expected the MVTec "
            "layout <root>/<category>/train/good/*.png."
        )
    names = (
        sorted(categories) if categories else sorted(p.name for p in root.iterdir() if p.is_dir())
    )
    items: list[WorkItem] = []
    for name in names:
        folder = root / name
        files = sorted(
            p for p in folder.glob(pattern) if p.is_file() and p.suffix in IMAGE_SUFFIXES
        )
        if not files:
            raise FileNotFoundError(
                f"No images match {folder / pattern} (config fields data.root, data.categories, "
                "data.pattern)."
            )
        if limit_per_category:
            files = files[:limit_per_category]
        items.extend(WorkItem(name, p.relative_to(root).as_posix()) for p in files)
    return items


def image_rng(seed: int, source: str) -> np.random.Generator:
    """The generator of all random choices for one source image."""
    digest = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """uint8 ``[H, W, 3]``; grayscale and RGBA images become RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


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
) -> bytes:
    """One record for one normal image (Sec. 3.1).

    1. ``M_fg`` (SAM or whole image, cached); 2. ``M = M_fg ∩ M_rect`` (eq. 1, 2);
    3. CFG, strength and K seeds; 4. K inpainted, composited candidates ``I_A^(k)``;
    5. LPIPS to ``I_N`` and eq. 3; 6. the serialised Example.
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
    return writer.make_example(
        image=candidates[k],
        mask=m,
        source=item.source,
        category=item.category,
        prompt=prompt_pair.prompt,
        negative_prompt=prompt_pair.negative_prompt,
        seed=seeds[k],
        cfg=cfg,
        strength=strength,
        lpips=float(distances[k]),
        tau=config.selector.tau,
    )


def run_fmas(
    config: ml_collections.ConfigDict, *, shard_index: int = 0, num_shards: int = 1
) -> dict[str, Any]:
    """Runs FMAS for one worker and writes its records and manifest.

    Args:
      config: an FMAS config (``configs/fmas_mvtec.py``).
      shard_index, num_shards: this worker's share (``--shard_index/--num_shards``).

    Returns:
      The manifest, also written to ``<output_dir>/manifest-<i>-of-<n>.json``.
    """
    import torch

    threads = torch.get_num_threads()
    if config.cpu_threads > 0:
        # On a shared CPU one thread per process is far faster than oversubscribed threads.
        torch.set_num_threads(config.cpu_threads)
    try:
        return _run_fmas(config, shard_index=shard_index, num_shards=num_shards)
    finally:
        torch.set_num_threads(threads)


def _run_fmas(
    config: ml_collections.ConfigDict, *, shard_index: int, num_shards: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    all_items = list_work(
        config.data.root,
        categories=config.data.categories,
        pattern=config.data.pattern,
        limit_per_category=config.data.limit_per_category,
    )
    mine = writer.split_work(all_items, shard_index=shard_index, num_shards=num_shards)
    output_dir = Path(config.output_dir).expanduser()
    done = Counter(writer.completed_sources(output_dir))
    duplicates = sorted(s for s, c in done.items() if c > 1)
    if duplicates:
        raise RuntimeError(f"{output_dir} holds duplicate records for {duplicates[:5]}...")
    todo = [it for it in mine if it.source not in done]
    label = f"fmas shard {shard_index}/{num_shards}:"
    log.info(
        "%s %d images in this shard (%d total), %d already done, %d to do.",
        label,
        len(mine),
        len(all_items),
        len(mine) - len(todo),
        len(todo),
    )
    device = resolve_device(config.device)
    texture = set(config.masks.texture_categories)
    needs_sam = any(
        it.category not in texture
        and not masks.fg_cache_path(config.masks.fg_root, it.category, it.rel_to_category).is_file()
        for it in todo
    )
    sam_path = Path(config.sam.checkpoint).expanduser()
    if needs_sam and not sam_path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint not found: {sam_path} (config field sam.checkpoint), needed for the "
            "foreground of object classes. "
            + masks.SAM_CHECKPOINT_HELP.format(model_type=config.sam.model_type, path=sam_path)
        )
    foreground = masks.ForegroundProvider(
        config.masks.fg_root,
        texture_categories=config.masks.texture_categories,
        sam_checkpoint=config.sam.checkpoint,
        sam_model_type=config.sam.model_type,
        sam_prompt=config.sam.prompt,
        min_fraction=config.masks.min_foreground_fraction,
        device=device,
    )
    # Before the models: a wrong endpoint or key fails in seconds, not after minutes of loading.
    prompt_pairs = {
        category: prompts.get_prompts(
            category,
            llm_base_url=config.prompts.llm_base_url,
            llm_model=config.prompts.llm_model,
            api_key_env=config.prompts.api_key_env,
            cache_dir=config.prompts.cache_dir,
            timeout_s=config.prompts.timeout_s,
        )
        for category in sorted({item.category for item in todo})
    }
    written_per_category: Counter[str] = Counter()
    files: list[str] = []
    t_models = 0.0
    if todo:
        t = time.perf_counter()
        lpips_model = selector.load_lpips(
            net=config.selector.lpips_net,
            backbone_weights=config.selector.backbone_weights,
            device=device,
            seed=config.seed,
        )
        pipe = inpainting.load_inpaint_pipeline(
            config.inpaint.model_dir, device=device, half_precision=config.inpaint.half_precision
        )
        t_models = time.perf_counter() - t
        progress = Progress(label, len(todo), unit="images", every=0, log=log.info)
        with writer.ShardedRecordWriter(
            output_dir,
            shard_index=shard_index,
            num_shards=num_shards,
            records_per_file=config.output.records_per_file,
        ) as out:
            for count, item in enumerate(todo, start=1):
                out.add(
                    synthesize_one(
                        item,
                        config=config,
                        foreground=foreground,
                        pipe=pipe,
                        lpips_model=lpips_model,
                        prompt_pair=prompt_pairs[item.category],
                    )
                )
                written_per_category[item.category] += 1
                progress.update(count, item.source)
        files = out.files_written
    seconds = time.perf_counter() - t0
    manifest = {
        "shard_index": shard_index,
        "num_shards": num_shards,
        "config": config.to_dict(),
        "counts": {
            "images_total": len(all_items),
            "images_in_shard": len(mine),
            "already_done": len(mine) - len(todo),
            "written_this_run": sum(written_per_category.values()),
            "written_this_run_per_category": dict(sorted(written_per_category.items())),
            "records_in_output_dir": sum(done.values()) + sum(written_per_category.values()),
            "foreground": foreground.stats,
        },
        "files_written_this_run": files,
        "record_glob": writer.RECORD_GLOB,
        "prompts": {c: dataclasses.asdict(p) for c, p in sorted(prompt_pairs.items())},
        "models": model_identities(config, sam_used=foreground.stats["sam"] > 0),
        "device": device,
        "seconds": {"total": seconds, "model_loading": t_models},
        "seconds_per_image": (seconds - t_models) / len(todo) if todo else None,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"manifest-{shard_index:05d}-of-{num_shards:05d}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=list))
    os.replace(tmp, path)
    log.info("%s done: %s", label, json.dumps(manifest["counts"]))
    return manifest
