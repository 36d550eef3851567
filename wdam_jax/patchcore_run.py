"""PatchCore fit + evaluation run (Sec. 4.2, Table 6): backbones, banks, scores, metrics, figures.

``fit_and_evaluate(config, workdir)`` is what ``python -m launch.patchcore`` calls. Per category
and per ensemble member it extracts patch features of the normal training images, selects the
coreset memory bank (saved to ``<workdir>/banks/<category>/<member>.npz`` and reused when the
config has not changed), scores the test images, and, with several members, averages the
members' scores after standardising each by its statistics on normal training images
(``patchcore.ensemble_scores``). Metrics go to ``<workdir>/metrics.{json,csv,md}`` and heatmap
figures to ``<workdir>/figures/<category>.png``.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wdam_jax import metrics, reporting
from wdam_jax.data import datasets, demo
from wdam_jax.methods import patchcore as pc
from wdam_jax.models import wide_resnet

RANDOM_INIT_WARNING = (
    "\n" + "!" * 100 + "\n"
    "PatchCore member {name!r} uses a RANDOMLY INITIALISED WideResNet50-2: its scores are "
    "MEANINGLESS.\nPatchCore needs ImageNet weights: download torchvision's wide_resnet50_2 "
    "IMAGENET1K_V1 .pth, run\n  python -m launch.convert_weights "
    "--torchvision=wide_resnet50_2-<hash>.pth --out=weights/wrn50_2_imagenet\nand pass "
    "--config.members.{name}.weights=weights/wrn50_2_imagenet.\n" + "!" * 100
)


class _Progress:
    """Logs ``what: done/total (rate/s, ETA)`` at most every ``every`` seconds and at the end."""

    def __init__(self, what: str, unit: str, *, every: float = 10.0):
        self.what, self.unit, self.every = what, unit, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / max(rate, 1e-9)
        logging.info(
            "%s: %d/%d %s (%.1f %s/s, ETA %.0f s)",
            self.what, done, total, self.unit, rate, self.unit, eta,
        )  # fmt: skip


def load_backbone(name: str, member: ml_collections.ConfigDict) -> wide_resnet.WideResNet50_2:
    """Builds one ensemble member's backbone from its config.

    ``member.kind``: ``"imagenet"`` loads ``member.weights`` (a folder written by
    ``python -m launch.convert_weights``); ``"cutpaste"`` restores the WDAM-finetuned backbone of a
    CutPaste run from ``member.workdir``. When the weights (or the workdir) are not given and
    ``member.allow_random_init`` is set (demo configs only), a randomly initialised network with
    ``member.wdam_layers`` is used and a loud warning logged.

    Args:
      name: the member's name (for messages).
      member: its config.

    Returns:
      The backbone.
    """
    source = member.weights if member.kind == "imagenet" else member.workdir
    if not source:
        if not member.allow_random_init:
            field = "weights" if member.kind == "imagenet" else "workdir"
            raise ValueError(
                f"PatchCore member {name!r} ({member.kind}) needs --config.members.{name}.{field}"
                + (
                    " (ImageNet WideResNet50-2 weights converted by python -m "
                    "launch.convert_weights)."
                    if member.kind == "imagenet"
                    else " (the workdir of a CutPaste+WDAM run of launch.train)."
                )
            )
        logging.warning(RANDOM_INIT_WARNING.format(name=name))
        return wide_resnet.WideResNet50_2(
            wdam_layers=tuple(member.wdam_layers), num_classes=None, rngs=nnx.Rngs(member.seed)
        )
    if member.kind == "imagenet":
        return wide_resnet.load_pretrained(source, wdam_layers=tuple(member.wdam_layers))
    if member.kind == "cutpaste":
        workdir = pathlib.Path(source)
        if not workdir.is_dir():
            raise FileNotFoundError(
                f"PatchCore member {name!r}: CutPaste workdir {workdir} does not exist. Train it "
                "with python -m launch.train --config=configs/cutpaste_wdam.py "
                f"--workdir={workdir}, or set --config.members.{name}.workdir."
            )
        from wdam_jax import train  # imports TF and optax: only when needed

        train.quiet_orbax()
        model = train.restore_backbone(workdir)
        if tuple(model.wdam_layers) != tuple(member.wdam_layers):
            raise ValueError(
                f"PatchCore member {name!r}: the backbone in {workdir} has WDAM in layers "
                f"{tuple(model.wdam_layers)}, the config says {tuple(member.wdam_layers)}; set "
                f"--config.members.{name}.wdam_layers to match the CutPaste run (a checkpoint "
                "taken before WDAM entered training has none: use a later one)."
            )
        return model
    raise ValueError(
        f"--config.members.{name}.kind={member.kind!r}: expected 'imagenet' or 'cutpaste'."
    )


def make_feature_fn(
    model: wide_resnet.WideResNet50_2, cfg: ml_collections.ConfigDict
) -> Callable[[np.ndarray], jax.Array]:
    """A jit-compiled ``images [B, S, S, 3] -> patch features [B, S/8, S/8, D]`` for ``model``.

    Only layer2 and layer3 are returned, so XLA drops layer4 and the classifier.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def features(state: Any, images: jax.Array) -> jax.Array:
        out = nnx.merge(graphdef, state)(images, train=False)
        return pc.patch_features(
            out["layer2"],
            out["layer3"],
            patch_size=cfg.patch_size,
            pretrain_dim=cfg.pretrain_dim,
            target_dim=cfg.target_dim,
        )

    return lambda images: features(state, jnp.asarray(images))


def extract_features(
    feature_fn: Callable[[np.ndarray], jax.Array],
    images: np.ndarray,
    *,
    batch_size: int,
    what: str,
) -> np.ndarray:
    """Patch features of ``images [N, S, S, 3]`` in batches (the last one padded), with progress.

    Returns:
      ``[N, h, w, D]`` float32 numpy.
    """
    progress = _Progress(what, "images")
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        valid = len(batch)
        if valid < batch_size:
            batch = np.concatenate(
                [batch, np.zeros((batch_size - valid, *batch.shape[1:]), batch.dtype)]
            )
        out.append(np.asarray(feature_fn(batch))[:valid])
        progress(start + valid, len(images))
    return np.concatenate(out)


def _bank_fingerprint(config: ml_collections.ConfigDict, name: str, category: str) -> str:
    keys = {
        "member": config.members[name].to_dict(),
        "patchcore": config.patchcore.to_dict(),
        "data": {k: config.data[k] for k in ("root", "image_size", "crop_size")},
        "demo": config.demo,
        "category": category,
        "seed": config.seed,
    }
    return json.dumps(keys, sort_keys=True, default=str)


def fit_member(
    key: jax.Array,
    feature_fn: Callable[[np.ndarray], jax.Array],
    train: datasets.Split,
    cfg: ml_collections.ConfigDict,
    *,
    what: str,
) -> np.ndarray:
    """Memory bank of one member: coreset of the training images' patch features.

    Returns:
      ``[M, D]`` float32 with ``M = max(1, round(coreset_ratio * N h w))``.
    """
    feats = extract_features(feature_fn, train.images, batch_size=cfg.batch_size, what=what)
    flat = feats.reshape(-1, feats.shape[-1])
    n = max(1, min(len(flat), round(cfg.coreset_ratio * len(flat))))
    logging.info("%s: coreset of %d of %d patch features", what, n, len(flat))
    idx = pc.greedy_coreset(
        key, flat, n, proj_dim=cfg.proj_dim, on_progress=_Progress(what + " coreset", "picks")
    )
    return flat[np.asarray(idx)]


def score_images(
    bank: np.ndarray,
    feature_fn: Callable[[np.ndarray], jax.Array],
    images: np.ndarray,
    cfg: ml_collections.ConfigDict,
    *,
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores ``[N]`` and anomaly maps ``[N, S, S]`` of ``images`` against ``bank``."""
    feats = extract_features(feature_fn, images, batch_size=cfg.batch_size, what=what)
    bank = jnp.asarray(bank)
    scores, maps = [], []
    for start in range(0, len(feats), cfg.batch_size):
        s, m = pc.score_patches(
            bank,
            feats[start : start + cfg.batch_size],
            image_size=images.shape[1:3],
            num_neighbors=cfg.num_neighbors,
            sigma=cfg.sigma,
        )
        scores.append(np.asarray(s))
        maps.append(np.asarray(m))
    return np.concatenate(scores), np.concatenate(maps)


def _dataset_root(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    if config.demo:
        return demo.ensure_demo_data(
            workdir / "data", seed=config.seed, image_size=config.data.image_size
        )
    if not config.data.root:
        raise ValueError(
            "Set --config.data.root to the MVTec AD folder (holding bottle/, cable/, ...), or use "
            "the :demo config."
        )
    return pathlib.Path(config.data.root)


def fit_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, dict[str, float]]:
    """Fits PatchCore (one bank per category and member) and evaluates it on the test split.

    Args:
      config: a ``configs/patchcore*.py`` config.
      workdir: output folder (banks, metrics, figures, demo data).

    Returns:
      category -> ``{"i_auroc", "p_auroc", "pro"}``.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    root = _dataset_root(config, workdir)
    cfg = config.patchcore
    names = list(config.members.keys())
    feature_fns = {}
    for name in names:
        feature_fns[name] = make_feature_fn(load_backbone(name, config.members[name]), cfg)
    key = jax.random.key(config.seed)
    results = {}
    for c_index, category in enumerate(config.data.categories):
        load = dict(image_size=config.data.image_size, crop_size=config.data.crop_size or None)
        train = datasets.load_mvtec(root, category, split="train", **load)
        test = datasets.load_mvtec(root, category, split="test", **load)
        logging.info("%s: %d train, %d test images", category, len(train), len(test))
        members, stats = {}, []
        for m_index, name in enumerate(names):
            what = f"{category}/{name}"
            path = workdir / "banks" / category / f"{name}.npz"
            fingerprint = _bank_fingerprint(config, name, category)
            bank = None
            if path.is_file():
                bank, meta = pc.load_bank(path)
                if meta.get("fingerprint") != fingerprint:
                    logging.info("%s: bank %s was made with another config; refitting", what, path)
                    bank = None
                else:
                    logging.info("%s: reusing the memory bank %s", what, path)
            if bank is None:
                member_key = jax.random.fold_in(jax.random.fold_in(key, c_index), m_index)
                bank = fit_member(member_key, feature_fns[name], train, cfg, what=what)
                meta = {"fingerprint": fingerprint}
                if len(names) > 1:
                    calib = train.images[: cfg.calibration_images]
                    meta.update(
                        pc.normalisation_stats(
                            *score_images(bank, feature_fns[name], calib, cfg, what=what + " calib")
                        )
                    )
                pc.save_bank(path, bank, **meta)
            members[name] = score_images(bank, feature_fns[name], test.images, cfg, what=what)
            stats.append(meta)
        if len(names) > 1:
            scores, maps = (
                np.asarray(a) for a in pc.ensemble_scores(list(members.values()), stats)
            )
        else:
            scores, maps = members[names[0]]
        results[category] = metrics.evaluate_category(
            scores, maps, test.original_masks, test.labels
        )
        logging.info(
            "%s: image AUROC %.4f, pixel AUROC %.4f, PRO %.4f",
            category, *(results[category][k] for k in ("i_auroc", "p_auroc", "pro")),
        )  # fmt: skip
        shown = np.argsort(-test.labels, kind="stable")[: cfg.figure_images]
        figure_maps: Mapping[str, np.ndarray] = {n: members[n][1][shown] for n in names}
        if len(names) > 1:
            figure_maps = {**figure_maps, "ensemble": maps[shown]}
        reporting.save_heatmap_figure(
            test.images[shown],
            test.masks[shown],
            dict(figure_maps),
            workdir / "figures" / f"{category}.png",
            max_images=cfg.figure_images,
        )
    paths = reporting.write_metrics(results, workdir)
    print(reporting.markdown_table(results), end="")
    logging.info("metrics written to %s", paths["markdown"])
    return results
