"""FMAS end to end (Sec. 3.1): masks -> prompts -> inpainting -> LPIPS selection -> TFRecords.

``run_fmas(config, shard_index=i, num_shards=n)`` processes worker ``i``'s share of the normal
training images (``<data.root>/<category>/<data.pattern>``, sorted, every n-th from i) and writes
one record per image. Every random choice of an image comes from a generator seeded by
``(config.seed, hash of its source path)``, so a record does not depend on the sharding or on
where a run was interrupted.

The models of a worker live in a :class:`Synthesizer` (loaded once). ``config.distributed.engine``
picks who runs them: ``"local"``, this process, one image after the other; ``"ray"``, a pool of
``config.distributed.num_workers`` Ray Data actors, each loading its models once
(:mod:`synthesis.distributed`). Either way the records come back to this process in the
sequential order and go through the same atomic writer, so the output is the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from synthesis import masks, prompts, selector, writer
from synthesis.files import atomic_write_text, check_category
from synthesis.progress import Progress
from synthesis.worker import (  # noqa: F401  (re-exported: the pipeline's public names)
    Plan,
    Result,
    Synthesizer,
    WorkItem,
    image_rng,
    model_identities,
    read_rgb,
    resolve_device,
    synthesize_one,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPG", ".PNG")


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
    for name in names:
        check_category(name, field="data.categories")
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


ENGINES = ("local", "ray")


def _check_distributed(config: ml_collections.ConfigDict) -> None:
    d = config.distributed
    problems = []
    if d.engine not in ENGINES:
        problems.append(f"distributed.engine={d.engine!r} must be one of {ENGINES}")
    if d.num_workers < 1:
        problems.append(f"distributed.num_workers={d.num_workers} must be >= 1")
    if d.cpus_per_worker < 0 or d.gpus_per_worker < 0:
        problems.append("distributed.cpus_per_worker and gpus_per_worker must be >= 0")
    if problems:
        raise ValueError("; ".join(problems) + ".")


def run_fmas(
    config: ml_collections.ConfigDict, *, shard_index: int = 0, num_shards: int = 1
) -> dict[str, Any]:
    """Runs FMAS for one shard and writes its records and manifest.

    Args:
      config: an FMAS config (``configs/fmas_mvtec.py``).
      shard_index, num_shards: this shard (``--shard_index/--num_shards``); with
        ``distributed.engine="ray"`` a shard is one Ray job.

    Returns:
      The manifest, also written to ``<output_dir>/manifest-<i>-of-<n>.json``.

    Raises:
      writer.ShardBusyError: another live worker has the same shard of the same output folder.
    """
    _check_distributed(config)
    import torch

    threads = torch.get_num_threads()
    if config.cpu_threads > 0:
        # On a shared CPU one thread per process is far faster than oversubscribed threads.
        torch.set_num_threads(config.cpu_threads)
    try:
        with writer.shard_lock(
            Path(config.output_dir).expanduser(), shard_index=shard_index, num_shards=num_shards
        ):
            return _run_fmas(config, shard_index=shard_index, num_shards=num_shards)
    finally:
        torch.set_num_threads(threads)


def plan_shard(config: ml_collections.ConfigDict, *, shard_index: int, num_shards: int) -> Plan:
    """The images of one shard still to do, with their prompts; checks SAM's checkpoint is
    there if an object class needs it."""
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
    return Plan(all_items, mine, done, todo, prompt_pairs, label)


def synthesize_local(
    config: ml_collections.ConfigDict, plan: Plan, workers: dict[str, dict[str, Any]]
) -> Iterator[Result]:
    """This process's results for ``plan.todo``, in order; records itself in ``workers``."""
    synth = Synthesizer(config)
    workers[synth.worker] = {"device": synth.device, "model_loading_s": synth.load_seconds}
    for item in plan.todo:
        yield synth(item, plan.prompt_pairs[item.category])


def _run_fmas(
    config: ml_collections.ConfigDict, *, shard_index: int, num_shards: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = plan_shard(config, shard_index=shard_index, num_shards=num_shards)
    engine = config.distributed.engine
    written_per_category: Counter[str] = Counter()
    foreground = Counter(
        dict.fromkeys(("cache_hits", "sam", "sam_fallback_whole_image", "texture"), 0)
    )
    workers: dict[str, dict[str, Any]] = {}  # "<host>:<pid>" -> device, model loading time
    records_per_worker: Counter[str] = Counter()
    candidates: list[float] = []  # eq. 3's LPIPS(I_A^(k), I_N) of every candidate of this run
    selected: list[float] = []  # that of each image's selected candidate
    files: list[str] = []
    if plan.todo:
        if engine == "ray":
            from synthesis import distributed

            results = distributed.synthesize_ray(config, plan, workers)
        else:
            results = synthesize_local(config, plan, workers)
        category_of = {item.source: item.category for item in plan.todo}
        progress = Progress(plan.label, len(plan.todo), unit="images", every=0, log=log.info)
        with writer.ShardedRecordWriter(
            Path(config.output_dir).expanduser(),
            shard_index=shard_index,
            num_shards=num_shards,
            records_per_file=config.output.records_per_file,
        ) as out:
            for count, result in enumerate(results, start=1):
                out.add(result.record)
                written_per_category[category_of[result.source]] += 1
                foreground.update(result.foreground)
                records_per_worker[result.worker] += 1
                candidates.extend(result.lpips_candidates)
                if result.lpips_candidates:  # the kept one: eq. 3's argmin
                    d = np.asarray(result.lpips_candidates)
                    selected.append(float(d[selector.select_closest(d, config.selector.tau)]))
                progress.update(count, result.source)
        files = out.files_written
    for name, info in workers.items():
        info["records"] = records_per_worker[name]
    seconds = time.perf_counter() - t0
    # Workers load their models in parallel: the longest load is the time it cost.
    t_models = max((w["model_loading_s"] for w in workers.values()), default=0.0)
    todo, mine, done = plan.todo, plan.mine, plan.done
    manifest = {
        "shard_index": shard_index,
        "num_shards": num_shards,
        "config": config.to_dict(),
        "counts": {
            "images_total": len(plan.all_items),
            "images_in_shard": len(mine),
            "already_done": len(mine) - len(todo),
            "written_this_run": sum(written_per_category.values()),
            "written_this_run_per_category": dict(sorted(written_per_category.items())),
            "records_in_output_dir": sum(done.values()) + sum(written_per_category.values()),
            "foreground": dict(foreground),
        },
        "files_written_this_run": files,
        "record_glob": writer.RECORD_GLOB,
        "prompts": {c: dataclasses.asdict(p) for c, p in sorted(plan.prompt_pairs.items())},
        # The distribution of eq. 3's distances, to choose selector.tau from (docs/design.md).
        "lpips": {
            "tau": config.selector.tau,
            "candidates_this_run": selector.distance_summary(candidates, config.selector.tau),
            "selected_this_run": selector.distance_summary(selected, config.selector.tau),
        },
        "models": model_identities(config, sam_used=foreground["sam"] > 0),
        "engine": {"name": engine, "workers": dict(sorted(workers.items()))},
        "device": ",".join(sorted({w["device"] for w in workers.values()}))
        or resolve_device(config.device),
        "seconds": {"total": seconds, "model_loading": t_models},
        "seconds_per_image": (seconds - t_models) / len(todo) if todo else None,
    }
    path = (
        Path(config.output_dir).expanduser()
        / f"manifest-{shard_index:05d}-of-{num_shards:05d}.json"
    )
    atomic_write_text(path, json.dumps(manifest, indent=2, default=list))
    log.info("%s done: %s", plan.label, json.dumps(manifest["counts"]))
    log.info("%s: eq. 3 distances of the candidates: %s", plan.label, json.dumps(manifest["lpips"]))
    return manifest
