"""PatchCore as a method of the shared loop (Sec. 4.2, Table 6): gradient-free, one fit.

The model is one WideResNet backbone per ensemble member (``config.members``); there are no
gradient steps (``total_steps == 0``). ``fit`` extracts the patch features of the normal training
images, selects each member's coreset memory bank and, with several members, each member's
score statistics on ``patchcore.calibration_images`` normal training images; the loop saves them
in the checkpoint (orbax item ``fitted``), so ``python -m launch.evaluate`` and prediction use
exactly the fitted bank. ``score`` is the kNN patch score, the image score and the smoothed map
as ``patchcore.scoring`` says (``"official"``: patchcore-inspection's maximum squared L2
distance, the paper configs' default; ``"anomalib"``: anomalib's reweighted Euclidean score);
with ``patchcore.shard_bank`` the bank and the coreset are sharded by rows over this host's
devices (:mod:`wdam_jax.methods.patchcore_sharded`). Several members are combined as
``patchcore.normalisation`` says:

- ``"train_standardise"`` (default, deployable): each member standardised by its statistics on
  normal training images (``patchcore.ensemble_scores``); an image's score does not depend on
  the other images scored with it;
- ``"minmax_over_evaluated_set"`` (the official PatchCore ensemble's protocol, for reproducing
  Table 6): each member min-max normalised over the images scored together
  (``patchcore.minmax_ensemble_scores``); it uses the test set's statistics, so it is for
  reporting, not deployment.

Members (``config.members.<name>``):

- ``kind="imagenet"``: WideResNet50-2 from ``weights`` (``python -m launch.convert_weights``);
- ``kind="run"``: the backbone of a training run (CutPaste + WDAM) in ``workdir``; a
  ``{category}`` in the path is replaced by ``config.data.category``, so each category uses its
  own fine-tuned network;
- no weights and ``allow_random_init`` (demo and tests only): a randomly initialised member of
  the WideResNet family (``depths``, ``base_width``), with a loud warning.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wdam_jax import checkpoints
from wdam_jax.components.scoring import fill_untrained
from wdam_jax.data import pipeline
from wdam_jax.errors import ConfigError, MissingFileError
from wdam_jax.methods import patchcore as pc
from wdam_jax.methods import patchcore_index as pindex
from wdam_jax.methods import patchcore_sharded as sharded
from wdam_jax.methods.base import Fitted, ImageScores, Method
from wdam_jax.models import wide_resnet
from wdam_jax.progress import Progress

RANDOM_INIT_WARNING = (
    "\n" + "!" * 100 + "\n"
    "PatchCore member {name!r} uses a RANDOMLY INITIALISED {network}: no ImageNet weights.\n"
    "Its features are fixed random filters, so the scores rank images by how far their local "
    "colour and texture\nstatistics are from the normal training images', not by learnt "
    "features. On the four demo categories it scored\n71 image AUROC on average against 84 "
    "(CutPaste + WDAM) and 98 (DRAEM) trained from scratch (README.md, 'Your own images').\n"
    "For PatchCore proper, download torchvision's wide_resnet50_2 IMAGENET1K_V1 .pth, run\n"
    "  python -m launch.convert_weights --torchvision=wide_resnet50_2-<hash>.pth "
    "--out=weights/wrn50_2_imagenet\nand pass --config.members.{name}.weights="
    "weights/wrn50_2_imagenet.\n" + "!" * 100
)
STAT_KEYS = ("image_mean", "image_std", "pixel_mean", "pixel_std")
NORMALISATIONS = ("train_standardise", "minmax_over_evaluated_set")


def normalisation(config: ml_collections.ConfigDict) -> str:
    """``config.patchcore.normalisation`` (runs recorded before the field existed: the default)."""
    return config.patchcore.get("normalisation", NORMALISATIONS[0])


def knn_index(config: ml_collections.ConfigDict) -> bool:
    """``config.patchcore.knn_index``: the pruned exact search (:mod:`patchcore_index`); runs
    recorded before the field existed get it too (same answers; their index is built on load)."""
    return bool(config.patchcore.get("knn_index", True))


def index_arrays(fitted: Fitted, name: str) -> dict[str, np.ndarray] | None:
    """Member ``name``'s saved index (``<name>.index.<key>``), or None (fitted without one)."""
    keys = [f"{name}.index.{k}" for k in pindex.INDEX_KEYS]
    return (
        {k: fitted[f"{name}.index.{k}"] for k in pindex.INDEX_KEYS}
        if all(k in fitted for k in keys)
        else None
    )


def scoring(config: ml_collections.ConfigDict) -> str:
    """``config.patchcore.scoring`` (:data:`patchcore.SCORINGS`); runs recorded before the field
    existed were scored as anomalib, and re-scoring them keeps that."""
    return config.patchcore.get("scoring", "anomalib")


class PatchCoreNet(nnx.Module):
    """The ensemble's backbones by member name."""

    def __init__(self, members: dict[str, wide_resnet.WideResNet50_2]):
        self.names = tuple(members)
        for name, backbone in members.items():
            setattr(self, f"member_{name}", backbone)

    def member(self, name: str) -> wide_resnet.WideResNet50_2:
        return getattr(self, f"member_{name}")


def member_workdir(member: ml_collections.ConfigDict, category: str) -> pathlib.Path:
    """The run directory of a ``kind="run"`` member for ``category``."""
    return pathlib.Path(member.workdir.format(category=category))


def member_category_problem(
    name: str, member: ml_collections.ConfigDict, category: str
) -> str | None:
    """Why a ``kind="run"`` member cannot serve ``category`` (its run recorded another
    ``data.category``: a path written without ``{category}``), or None.

    A run whose recorded config has no category is not judged."""
    run = member_workdir(member, category)
    recorded = checkpoints.read_config(run).get("data", {}).get("category")
    if recorded is None or recorded == category:
        return None
    return (
        f"PatchCore member {name!r}: {run} is a run of category {recorded!r}, but this PatchCore "
        f"run is for {category!r}; the fine-tuned member must be the same category's. Put "
        f"{{category}} in --config.members.{name}.workdir (e.g. "
        f"'workdirs/cutpaste_wdam_{{category}}') or point it at the {category!r} run."
    )


def _member_shape(name: str, member: ml_collections.ConfigDict, category: str):
    """``(depths, base_width)`` of a member's network."""
    if member.kind == "run" and member.workdir:
        run = member_workdir(member, category)
        if not run.is_dir():
            raise MissingFileError(
                f"PatchCore member {name!r}: run directory {run} does not exist. Train it with "
                f"python -m launch.train --config=configs/cutpaste_wdam.py --workdir={run}, or "
                f"set --config.members.{name}.workdir."
            )
        problem = member_category_problem(name, member, category)
        if problem:
            raise ConfigError(problem)
        model_config = checkpoints.read_config(run).model
        return tuple(model_config.depths), model_config.base_width
    return tuple(member.depths), member.base_width


def load_member(
    name: str, member: ml_collections.ConfigDict, category: str
) -> wide_resnet.WideResNet50_2:
    """One member's backbone, from its weights, its run, or (demo) a random initialisation."""
    if member.kind not in ("imagenet", "run"):
        raise ValueError(f"--config.members.{name}.kind={member.kind!r}: use 'imagenet' or 'run'.")
    source = member.weights if member.kind == "imagenet" else member.workdir
    wdam_layers = tuple(member.wdam_layers)
    if not source:
        if not member.allow_random_init:
            field = "weights" if member.kind == "imagenet" else "workdir"
            what = (
                "ImageNet WideResNet50-2 weights converted by python -m launch.convert_weights"
                if member.kind == "imagenet"
                else "the run directory of a CutPaste+WDAM launch.train run; {category} allowed"
            )
            raise ValueError(f"PatchCore member {name!r} needs --config.members.{name}.{field} "
                             f"({what}).")  # fmt: skip
        depths, base_width = _member_shape(name, member, category)
        network = wide_resnet.network_name(depths, base_width)
        logging.warning(RANDOM_INIT_WARNING.format(name=name, network=network))
        return wide_resnet.create(
            seed=member.seed,
            wdam_layers=wdam_layers,
            num_classes=None,
            depths=depths,
            base_width=base_width,
        )
    if member.kind == "imagenet":
        return wide_resnet.load_pretrained(source, wdam_layers=wdam_layers)
    run = member_workdir(member, category)
    _member_shape(name, member, category)  # a clear error for a missing run directory
    weights = run / checkpoints.BACKBONE_FILE
    if not weights.is_file():
        raise MissingFileError(
            f"PatchCore member {name!r}: {run} has no trained backbone ({weights}): the run has "
            "not finished, or finished before runs wrote one. Run its training command again "
            f"(python -m launch.train --config=... --workdir={run}): a finished run only writes "
            "the backbone."
        )
    state_dict = wide_resnet.read_state_dict(weights)
    shape = wide_resnet.architecture(state_dict)
    trained = shape["wdam_layers"]
    if trained != wdam_layers:
        raise ValueError(
            f"PatchCore member {name!r}: the backbone in {run} has WDAM in layers "
            f"{trained}, the config says {wdam_layers}; set "
            f"--config.members.{name}.wdam_layers to match the run (a run that ended before "
            "WDAM entered training has none)."
        )
    return wide_resnet.from_torchvision(
        state_dict, wdam_layers=wdam_layers, wdam_reduction=shape["wdam_reduction"]
    )


def _reweighted_score(bank, feats, dist, index, num_neighbors: int):
    """:func:`patchcore.reweighted_image_scores` for one image, ``N_b(m*)`` by a full sort.

    Args:
      bank: ``[M, D]``.
      feats: ``[L, D]`` the image's patch features.
      dist: ``[L]`` each patch's distance to its nearest bank row.
      index: ``[L]`` that row.
      num_neighbors: ``b``.

    Returns:
      The scalar image score ``w s*``.
    """
    worst = jnp.argmax(dist)
    s_star = dist[worst]  # s* in the paper
    b = min(num_neighbors, bank.shape[0])
    if b == 1:
        return s_star
    m_test, m_star = feats[worst], bank[index[worst]]  # m_test,* and m*
    support = jnp.argsort(jnp.sum(jnp.square(bank - m_star), axis=1))[:b]  # N_b(m*)
    d_support = jnp.linalg.norm(m_test - bank[support], axis=-1)
    return (1.0 - jnp.exp(s_star - jax.nn.logsumexp(d_support))) * s_star


class PatchCore(Method):
    """PatchCore and its ensemble (see the module docstring)."""

    name = "patchcore"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        if not config.members:
            raise ValueError("config.members is empty: PatchCore needs at least one backbone.")
        self.names = tuple(config.members.keys())

    @property
    def total_steps(self) -> int:
        return 0

    def check_inputs(self) -> list[str]:
        problems = super().check_inputs()
        category = self.config.data.category
        if scoring(self.config) not in pc.SCORINGS:
            problems.append(
                f"config.patchcore.scoring={scoring(self.config)!r}: use one of "
                f"{', '.join(pc.SCORINGS)}."
            )
        if normalisation(self.config) not in NORMALISATIONS:
            problems.append(
                f"config.patchcore.normalisation={normalisation(self.config)!r}: use one of "
                f"{', '.join(NORMALISATIONS)}."
            )
        if self.config.data.get("tile_size", 0) and (
            len(self.names) > 1 and normalisation(self.config) == "minmax_over_evaluated_set"
        ):
            problems.append(
                "config.patchcore.normalisation='minmax_over_evaluated_set' with "
                "config.data.tile_size: each image's tiles are scored apart, so the min-max "
                "would be per image; use normalisation='train_standardise' or tile_size=0."
            )
        for name in self.names:
            member = self.config.members[name]
            field = f"config.members.{name}"
            if member.kind == "imagenet" and member.weights:
                if not pathlib.Path(member.weights).is_dir():
                    problems.append(
                        f"{field}.weights={member.weights!r}: no converted weights there "
                        "(python -m launch.convert_weights --torchvision=<pth> "
                        f"--out={member.weights})."
                    )
            elif member.kind == "run" and member.workdir:
                run = member_workdir(member, category)
                if not (run / checkpoints.CONFIG_FILE).is_file():
                    problems.append(
                        f"{field}.workdir={member.workdir!r}: {run} is not a training run of "
                        f"category {category!r} (train it with python -m launch.train "
                        f"--config=configs/cutpaste_wdam.py --workdir={run})."
                    )
                elif problem := member_category_problem(name, member, category):
                    problems.append(problem)
            elif member.kind not in ("imagenet", "run"):
                problems.append(f"{field}.kind={member.kind!r}: use 'imagenet' or 'run'.")
            elif not member.allow_random_init:
                what = "weights" if member.kind == "imagenet" else "workdir"
                problems.append(f"{field}.{what} is empty: PatchCore needs a trained backbone.")
        return problems

    def create_model(self, *, abstract: bool = False) -> PatchCoreNet:
        category = self.config.data.category
        if abstract:  # shapes only, to restore the checkpoint's copy of the backbones into

            def build():
                members = {}
                for name in self.names:
                    member = self.config.members[name]
                    depths, base_width = _member_shape(name, member, category)
                    members[name] = wide_resnet.WideResNet50_2(
                        wdam_layers=tuple(member.wdam_layers),
                        num_classes=None,
                        depths=depths,
                        base_width=base_width,
                        rngs=nnx.Rngs(0),
                    )
                return PatchCoreNet(members)

            model = nnx.eval_shape(build)
            fill_untrained(model, 0.0)  # WDAM's sub-band weights (a diagnostic)
            return model
        return PatchCoreNet(
            {n: load_member(n, self.config.members[n], category) for n in self.names}
        )

    # ---- features, fit, score

    def _feature_fn(self, backbone: wide_resnet.WideResNet50_2):
        """A jit-compiled ``images [B, S, S, 3] -> patch features [B, S/8, S/8, D]``, built once
        per backbone (prediction scores many chunks with the same one).

        Only layer2 and layer3 are used, so XLA drops layer4."""
        cache = self.__dict__.setdefault("_feature_fns", {})
        if id(backbone) not in cache:  # the backbone is kept alive beside its function
            cache[id(backbone)] = (backbone, self._build_feature_fn(backbone))
        return cache[id(backbone)][1]

    def _build_feature_fn(self, backbone: wide_resnet.WideResNet50_2):
        cfg = self.config.patchcore
        graphdef, state = nnx.split(backbone)

        @jax.jit
        def features(state, images):
            out = nnx.merge(graphdef, state, copy=True)(images, train=False)
            return pc.patch_features(
                out["layer2"],
                out["layer3"],
                patch_size=cfg.patch_size,
                pretrain_dim=cfg.pretrain_dim,
                target_dim=cfg.target_dim,
            )

        return lambda images: features(state, jnp.asarray(images))

    def _features(self, backbone, images: np.ndarray, *, what: str) -> np.ndarray:
        progress = Progress(what, len(images), unit="images")
        (feats,) = pipeline.map_batches(
            self._feature_fn(backbone),
            images,
            batch_size=self.config.score.eval_batch_size,
            progress=progress,
        )
        return feats

    def _search_bank(self, bank: np.ndarray, index: dict[str, np.ndarray] | None):
        """What :func:`patchcore.score_patches` searches: the sharded bank (brute force), the
        pruned index (``patchcore.knn_index``; built once per bank when ``index`` is None), or
        the bank itself."""
        if self.config.patchcore.shard_bank:
            return sharded.ShardedBank(bank, sharded.bank_mesh())
        if not knn_index(self.config):
            return jnp.asarray(bank)
        cache = self.__dict__.setdefault("_pruned_banks", {})
        if id(bank) not in cache:  # the bank is kept alive beside its index
            pruned = (
                pindex.PrunedBank.build(bank)
                if index is None
                else pindex.PrunedBank.from_arrays(bank, index)
            )
            cache[id(bank)] = (bank, pruned)
        return cache[id(bank)][1]

    def _score_member(
        self,
        bank: np.ndarray,
        feats: np.ndarray,
        size: tuple[int, int],
        index: dict[str, np.ndarray] | None = None,
    ):
        cfg = self.config.patchcore
        bank = self._search_bank(bank, index)
        return pipeline.map_batches(
            lambda f: pc.score_patches(
                bank,
                f,
                image_size=size,
                scoring=scoring(self.config),
                num_neighbors=cfg.num_neighbors,
                sigma=cfg.sigma,
            ),
            feats,
            batch_size=self.config.score.eval_batch_size,
        )

    def fit(self, model: PatchCoreNet, train_images: np.ndarray, *, step: int) -> Fitted:
        """Each member's coreset bank ``<name>.bank`` [M, D], with ``patchcore.knn_index`` its
        search index (``<name>.index.center``, ``.directions``, ``.codes``, ``.residual``,
        ``.order``) and, for an ensemble, its score statistics on normal training images
        (``<name>.image_mean``, ...)."""
        del step
        cfg, category = self.config.patchcore, self.config.data.category
        key = jax.random.key(self.config.seed)
        train_images = self._bounded(train_images)
        fitted: Fitted = {}
        for index, name in enumerate(self.names):
            what = f"{category}/{name}"
            feats = self._features(model.member(name), train_images, what=what + " features")
            flat = feats.reshape(-1, feats.shape[-1])
            n = max(1, min(len(flat), round(cfg.coreset_ratio * len(flat))))
            logging.info("%s: coreset of %d of %d patch features", what, n, len(flat))
            progress = Progress(what + " coreset", n, unit="picks")
            coreset = (
                functools.partial(sharded.greedy_coreset, mesh=sharded.bank_mesh())
                if cfg.shard_bank
                else pc.greedy_coreset
            )
            idx = coreset(
                jax.random.fold_in(key, index),
                flat,
                n,
                proj_dim=cfg.proj_dim,
                on_progress=lambda done, total, p=progress: p.update(done),
            )
            bank = flat[np.asarray(idx)]
            fitted[f"{name}.bank"] = bank
            index = pindex.build_arrays(bank) if knn_index(self.config) else None
            fitted.update({f"{name}.index.{k}": v for k, v in (index or {}).items()})
            if len(self.names) > 1:
                calib = feats[: cfg.calibration_images]
                stats = pc.normalisation_stats(
                    *self._score_member(bank, calib, train_images.shape[1:3], index)
                )
                fitted.update({f"{name}.{k}": np.float64(stats[k]) for k in STAT_KEYS})
        return fitted

    def _bounded(self, train_images: np.ndarray) -> np.ndarray:
        """A seeded subset of the training images (tiles) holding at most
        ``patchcore.fit_max_patches`` patches (``(S / 8)^2`` per image, layer2's grid), so the
        features of thousands of tiles are never all held; all of them when it is 0."""
        limit = int(self.config.patchcore.get("fit_max_patches", 0) or 0)
        per_image = (train_images.shape[1] // 8) * (train_images.shape[2] // 8)
        keep = max(1, limit // max(per_image, 1))
        if not limit or keep >= len(train_images):
            return train_images
        logging.info(
            "patchcore.fit_max_patches=%d: %d of %d training images", limit, keep, len(train_images)
        )
        rng = np.random.default_rng([self.config.seed, 0xF17])
        return train_images[np.sort(rng.choice(len(train_images), keep, replace=False))]

    def score(
        self, model: PatchCoreNet, fitted: Fitted, images: np.ndarray, *, step: int
    ) -> ImageScores:
        del step
        category = self.config.data.category
        members = []
        for name in self.names:
            feats = self._features(model.member(name), images, what=f"{category}/{name} scoring")
            bank, index = fitted[f"{name}.bank"], index_arrays(fitted, name)
            members.append(self._score_member(bank, feats, images.shape[1:3], index))
        if len(members) == 1:
            return ImageScores(*members[0])
        kind = normalisation(self.config)
        if kind == "minmax_over_evaluated_set":
            scores, maps = pc.minmax_ensemble_scores(members)
        elif kind == "train_standardise":
            stats = [{k: float(fitted[f"{n}.{k}"]) for k in STAT_KEYS} for n in self.names]
            scores, maps = pc.ensemble_scores(members, stats)
        else:
            raise ConfigError(
                f"config.patchcore.normalisation={kind!r}: use one of {', '.join(NORMALISATIONS)}."
            )
        return ImageScores(np.asarray(scores), np.asarray(maps))

    def inference_fn(self, model: PatchCoreNet, fitted: Fitted, *, step: int):
        """:meth:`score` as one pure function (for export): each member's features on the
        batch, then the kNN scoring image by image (``lax.map``, so the batch size can be
        symbolic: the kNN's query chunks need a static count), then the ensemble combination.
        The image score's reweighting finds ``N_b(m*)`` by a sort instead of ``lax.top_k``
        (:func:`_reweighted_score`): ``top_k`` serialises as a StableHLO composite that
        TensorFlow's older StableHLO cannot read."""
        del step
        cfg, kind = self.config.patchcore, scoring(self.config)
        members = []
        for name in self.names:
            graphdef, state = nnx.split(model.member(name))
            members.append((graphdef, state, jnp.asarray(fitted[f"{name}.bank"], jnp.float32)))
        stats = (
            [{k: float(fitted[f"{n}.{k}"]) for k in STAT_KEYS} for n in self.names]
            if len(self.names) > 1
            else None
        )

        def fn(images):
            size = tuple(images.shape[1:3])
            outputs = []
            for graphdef, state, bank in members:
                out = nnx.merge(graphdef, state, copy=True)(images, train=False)
                feats = jax.vmap(
                    lambda l2, l3: pc.patch_features(
                        l2[None], l3[None], patch_size=cfg.patch_size,
                        pretrain_dim=cfg.pretrain_dim, target_dim=cfg.target_dim,
                    )[0]
                )(out["layer2"], out["layer3"])  # fmt: skip

                def one(f, bank=bank):
                    h, w, d = f.shape
                    dist, index = pc.knn_search(bank, f.reshape(h * w, d), k=1)
                    patch = pc.patch_scores(dist[:, 0], scoring=kind)
                    if kind == "official":
                        score = jnp.max(patch)
                    else:
                        score = _reweighted_score(
                            bank, f.reshape(h * w, d), dist[:, 0], index[:, 0], cfg.num_neighbors
                        )
                    maps = pc.anomaly_maps(patch.reshape(1, h, w), image_size=size, sigma=cfg.sigma)
                    return score, maps[0]

                outputs.append(jax.lax.map(one, feats))
            if stats is None:
                return outputs[0]
            return pc.ensemble_scores(outputs, stats)

        return fn

    def backbone(self, model: PatchCoreNet, *, step: int):
        del step
        return model.member(self.names[0])
