"""CutPaste with FMAS, FM and WDAM (paper Sec. 3.3 and 4.2; Tables 3, 7, 8).

The network is WideResNet50-2 (WDAM Bottleneck* in ``model.wdam_layers``), CutPaste's projection
head (``Linear -> BatchNorm -> ReLU`` per entry of ``model.head_dims``) on the pooled features and
a 3-way classifier: 0 = normal, 1 = anomaly source (CutPaste, or an FMAS sample), 2 = CutPaste-scar.
``augment.foreground_mask`` (FM) confines the scar class to the foreground mask, as the paper
(Sec. 4.3: "constraining CutPaste's scar anomalies to object regions only");
``augment.fm_confines_cutpaste`` also confines the CutPaste patches (a wider reading).

Training stages (Sec. 4.2), explicit config fields; steps are cumulative in this order:

1. ``train.stage1_steps``: CutPaste as published. SGD, momentum ``train.momentum``, learning rate
   ``train.stage1_lr`` (0.03) with cosine decay to 0 over the stage; the anomaly class is CutPaste.
2. ``train.stage2_steps``: Adam, learning rate ``train.stage2_lr`` (0.01); the anomaly class is
   ``data.anomaly_source`` ("fmas" for the +FMAS rows).
3. ``train.stage3_steps``: the same Adam at ``train.stage3_lr`` (0.001); WDAM enters here.

Our reading of "switching to Adam with an initial learning rate of 0.01 that is subsequently
reduced to 0.001 upon WDAM incorporation": synthetic anomalies come in with Adam at 0.01, and WDAM
comes in with the drop to 0.001. Before stage 3 a WDAM's output is multiplied by a gate of 0, so
Bottleneck* is exactly the plain bottleneck (``ReLU(X + 0) = X`` for the post-ReLU X) and WDAM gets
no gradient; from stage 3 the gate is 1. The architecture, the state and the compiled step are
the same in every stage. Every Table 3 row runs the same three stages, so the rows differ only in
the ablated component (the paper does not give stage lengths; they are config).

Scoring (Sec. 4.2): the image score is the Mahalanobis distance of an image's embedding
(``score.embedding``: the pooled backbone features, or the head's output) to a Gaussian fitted to
the normal training embeddings with Ledoit-Wolf shrinkage, as CutPaste. The pixel map is the
per-location Mahalanobis distance of the ``score.pixel_layers`` features (the paper: layer4;
several layers are concatenated at the first one's resolution) to the normal training features
at that location (per-location mean, one shrinkage covariance pooled over locations: a [D, D]
matrix per location would not fit for D = 2048), bilinearly upsampled to the input and
Gaussian-smoothed (``score.pixel_sigma``). ``score.normalize`` L2-normalises features before both
fits (CutPaste's reference code); ``score.image_score = "map_max"`` scores an image by its map's
maximum instead (PaDiM, PatchCore). ``docs/cutpaste_demo_diagnosis.md`` measures these choices.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import pathlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from wdam_jax import batch_norm
from wdam_jax.components import gaussian
from wdam_jax.components.scoring import Scorer, extract_features, fill_untrained
from wdam_jax.data import anomaly_sources, augment, datasets, pipeline
from wdam_jax.data.sources import load_split
from wdam_jax.errors import ConfigError
from wdam_jax.filters import gaussian_blur
from wdam_jax.methods.base import Fitted, Method
from wdam_jax.models.wide_resnet import (
    BASE_WIDTH,
    DEPTHS,
    WideResNet50_2,
    fill_random,
    load_pretrained,
    network_name,
)
from wdam_jax.optim import staged

NUM_CLASSES = 3
EPOCH_UNITS = ("pass", "cutpaste")
CUTPASTE_EPOCH_STEPS = 256  # CutPaste's epoch: 256 parameter updates
VAL_ACCURACY_BATCHES = 4  # fresh training-task batches behind val/accuracy_*
NORMAL, ANOMALY, SCAR = 0, 1, 2
CLASS_NAMES = ("normal", "anomaly source", "scar")


# --------------------------------------------------------------------------------------------
# Model.


class WdamGate(nnx.Variable):
    """1.0 while WDAM is part of the network, 0.0 before its stage. Set from the step."""


class GatedWDAM(nnx.Module):
    """A WDAM whose output is multiplied by a gate (see the module docstring)."""

    def __init__(self, wdam: nnx.Module):
        self.wdam = wdam
        self.gate = WdamGate(jnp.ones([], jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.gate[...].astype(x.dtype) * self.wdam(x)


def wdam_labels(params) -> object:
    """``"wdam"`` for the parameters of a WDAM module, ``"network"`` for the others (same tree)."""

    def label(path, _):
        keys = [getattr(k, "key", None) for k in path]
        return "wdam" if "wdam" in keys else "network"

    return jax.tree_util.tree_map_with_path(label, params)


def set_wdam_gate(model: nnx.Module, on: jax.Array | bool) -> None:
    """Turns every :class:`GatedWDAM` of ``model`` on (1) or off (0)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, WdamGate):
            node.set_value(jnp.asarray(on, jnp.float32))


class ProjectionLayer(nnx.Module):
    """CutPaste's head layer: ``ReLU(BatchNorm(Linear(x)))``."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(cin, cout, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return jax.nn.relu(self.bn(self.linear(x), use_running_average=not train))


class CutPasteNet(nnx.Module):
    """Backbone + projection head + 3-way classifier (Fig. 5a).

    Args:
      backbone: a :class:`WideResNet50_2` without classifier.
      head_dims: widths of the projection head's layers (CutPaste: 512 x 8, then 128).
      rngs: initialisation keys of the head and classifier.
    """

    def __init__(self, backbone: WideResNet50_2, *, head_dims: Sequence[int], rngs: nnx.Rngs):
        self.backbone = backbone
        dims = (backbone.num_features, *head_dims)
        self.head = nnx.List(
            [ProjectionLayer(a, b, rngs=rngs) for a, b in itertools.pairwise(dims)]
        )
        self.classifier = nnx.Linear(dims[-1], NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """``[B, H, W, 3]`` in [0, 1] -> the backbone's named features plus ``embedding``
        ``[B, head_dims[-1]]`` and ``logits`` ``[B, 3]``."""
        features = self.backbone(x, train=train)
        h = features["pooled"]
        for layer in self.head:
            h = layer(h, train=train)
        return {**features, "embedding": h, "logits": self.classifier(h).astype(jnp.float32)}


def _dtype(name: str):
    dtypes = {"float32": None, "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise ValueError(f"config.model.dtype={name!r}; use one of {sorted(dtypes)}.")
    return dtypes[name]


def create_model(
    model_config: ml_collections.ConfigDict, *, seed: int, abstract: bool = False
) -> CutPasteNet:
    """The CutPaste network, ImageNet-initialised when ``model_config.pretrained`` is set.

    Args:
      model_config: ``config.model``.
      seed: initialisation seed (head, classifier, WDAM, and the backbone without weights).
      abstract: shapes only (to restore a checkpoint into).
    """

    def build():
        backbone = WideResNet50_2(
            wdam_layers=tuple(model_config.wdam_layers),
            num_classes=None,
            wdam_reduction=model_config.wdam_reduction,
            dtype=_dtype(model_config.dtype),
            depths=tuple(model_config.depths),
            base_width=model_config.base_width,
            rngs=nnx.Rngs(0),
        )
        return CutPasteNet(backbone, head_dims=tuple(model_config.head_dims), rngs=nnx.Rngs(0))

    reduced = tuple(model_config.depths) != DEPTHS or model_config.base_width != BASE_WIDTH
    if reduced and model_config.pretrained:
        raise ValueError(
            f"config.model.pretrained={model_config.pretrained!r} holds WideResNet50-2 weights but "
            f"config.model.depths={tuple(model_config.depths)}, base_width="
            f"{model_config.base_width} is a reduced member; set --config.model.pretrained= "
            f"(train from scratch) or restore depths={DEPTHS}, base_width={BASE_WIDTH}."
        )
    model = nnx.eval_shape(build)
    if not abstract:
        fill_random(model, np.random.default_rng([seed, 7]))
        if model_config.pretrained:
            model.backbone = load_pretrained(
                model_config.pretrained,
                wdam_layers=tuple(model_config.wdam_layers),
                wdam_reduction=model_config.wdam_reduction,
                dtype=_dtype(model_config.dtype),
                seed=seed,
            )
        else:
            logging.warning(
                "\n%s\nWARNING: config.model.pretrained is empty: training a %s FROM "
                "SCRATCH (random init). The paper starts from ImageNet weights; convert them with "
                "`python -m launch.convert_weights --torchvision=wide_resnet50_2-<hash>.pth "
                "--out=weights/wrn50_2_imagenet` and set --config.model.pretrained to that folder"
                " (with config.model.depths=(3, 4, 6, 3), base_width=64).\n%s",
                "=" * 100,
                network_name(model_config.depths, model_config.base_width),
                "=" * 100,
            )
    for index in model.backbone.wdam_layers:
        for block in getattr(model.backbone, f"layer{index}"):
            block.wdam = GatedWDAM(block.wdam)
    if abstract:
        fill_untrained(model, 1.0)  # gates on, WDAM diagnostics: restored runs set them
    return model


# --------------------------------------------------------------------------------------------
# Gaussian densities (CutPaste's image score, and the pixel map): fitted in numpy float64 on the
# training features, scored by one jnp function (:func:`score_features`) on every path.


def smooth_maps(maps: jax.Array, *, size: int, sigma: float) -> jax.Array:
    """Bilinear upsampling of ``[N, h, w]`` distance maps to ``[N, size, size]``, then a Gaussian
    blur of ``sigma`` pixels (0 disables; scipy's ``reflect`` mode, :func:`filters.gaussian_blur`).
    """
    maps = jnp.asarray(maps, jnp.float32)
    up = jax.vmap(lambda m: jax.image.resize(m, (size, size), "bilinear"))(maps)
    return gaussian_blur(up, sigma=sigma) if sigma > 0 else up


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """``x / ||x||`` over the last axis (``[..., D] -> [..., D]``), as CutPaste's reference code
    does to embeddings before the Gaussian fit (numpy float64; :func:`score_features` does the
    same in jnp)."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pixel_features(features: Mapping[str, jax.Array], layers: Sequence[str]) -> jax.Array:
    """The feature maps of ``layers`` concatenated at the resolution of the first one.

    Args:
      features: name -> ``[N, h_i, w_i, D_i]`` maps (the backbone's named features).
      layers: e.g. ``("layer2", "layer3")``; later layers are bilinearly upsampled to the first's
        ``[h, w]`` (PaDiM's choice of combining scales).

    Returns:
      ``[N, h, w, sum D_i]`` float32.
    """
    first = jnp.asarray(features[layers[0]], jnp.float32)
    n, h, w, _ = first.shape
    maps = [first]
    for name in layers[1:]:
        x = jnp.asarray(features[name], jnp.float32)
        maps.append(jax.image.resize(x, (n, h, w, x.shape[-1]), "bilinear"))
    return jnp.concatenate(maps, axis=-1)


IMAGE_SCORES = ("gde", "map_max")


def fit_densities(
    embeddings: np.ndarray, pixel_feats: np.ndarray, *, normalize: bool
) -> dict[str, np.ndarray]:
    """The Gaussians of the image score and of the pixel map, fitted to normal training images.

    Args:
      embeddings: ``[N, E]`` image embeddings (``score.embedding``).
      pixel_feats: ``[N, h, w, D]`` (:func:`pixel_features`).
      normalize: L2-normalise embeddings and per-location features first (``score.normalize``).

    Returns:
      ``image_mean`` ``[E]``, ``image_precision`` ``[E, E]``, ``pixel_mean`` ``[h, w, D]``,
      ``pixel_precision`` ``[D, D]`` (the method contract's ``Fitted``).
    """
    if normalize:
        embeddings, pixel_feats = l2_normalize(embeddings), l2_normalize(pixel_feats)
    image = gaussian.fit_gaussian(embeddings)
    pixel = gaussian.fit_gaussian(pixel_feats, location_axes=(1, 2))
    return {
        "image_mean": image.mean,
        "image_precision": image.precision,
        "pixel_mean": pixel.mean,
        "pixel_precision": pixel.precision,
    }


def whitened_densities(fitted: Mapping[str, np.ndarray]) -> dict[str, tuple[jax.Array, ...]]:
    """:func:`fit_densities`' Gaussians as ``{"image", "pixel"}: (mean, W)`` for
    :func:`score_features` (:func:`wdam_jax.components.gaussian.whiten`)."""
    return {
        "image": gaussian.whiten(fitted["image_mean"], fitted["image_precision"]),
        "pixel": gaussian.whiten(fitted["pixel_mean"], fitted["pixel_precision"]),
    }


def score_features(
    densities: Mapping[str, tuple[jax.Array, ...]],
    embeddings: jax.Array,
    pixel_feats: jax.Array,
    *,
    normalize: bool,
    image_score: str,
    size: int,
    sigma: float,
) -> tuple[jax.Array, jax.Array]:
    """Image scores and anomaly maps from features (traceable: the one scoring computation).

    Args:
      densities: :func:`whitened_densities` of the fitted Gaussians.
      embeddings: ``[N, E]``; pixel_feats: ``[N, h, w, D]``.
      normalize: as for the fit.
      image_score: ``"gde"``: Mahalanobis distance of the embedding (CutPaste, the paper);
        ``"map_max"``: maximum of the anomaly map (PaDiM / PatchCore's image score).
      size: side of the input images; sigma: Gaussian smoothing of the map, in pixels.

    Returns:
      ``image_scores`` ``[N]`` and ``maps`` ``[N, size, size]``, float32.
    """
    if image_score not in IMAGE_SCORES:
        raise ValueError(f"config.score.image_score={image_score!r}; use one of {IMAGE_SCORES}.")
    embeddings = jnp.asarray(embeddings, jnp.float32)
    pixel_feats = jnp.asarray(pixel_feats, jnp.float32)
    if normalize:
        embeddings, pixel_feats = _l2_normalize(embeddings), _l2_normalize(pixel_feats)
    maps = smooth_maps(
        gaussian.mahalanobis(pixel_feats, *densities["pixel"]), size=size, sigma=sigma
    )
    if image_score == "map_max":
        return jnp.max(maps.reshape(maps.shape[0], -1), axis=1), maps
    return gaussian.mahalanobis(embeddings, *densities["image"]), maps


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    """The ``config.score`` fields the scoring function depends on (hashable: one compile)."""

    embedding: str
    pixel_layers: tuple[str, ...]
    normalize: bool
    image_score: str
    sigma: float

    @classmethod
    def of(cls, score: ml_collections.ConfigDict, **overrides) -> ScoreSettings:
        fields = dict(
            embedding=score.embedding,
            pixel_layers=tuple(score.pixel_layers),
            normalize=bool(score.normalize),
            image_score=score.image_score,
            sigma=float(score.pixel_sigma),
        )
        return cls(**{**fields, **overrides})


@functools.lru_cache(maxsize=8)
def scoring_fn(graphdef, settings: ScoreSettings):
    """``(args, images) -> (image_scores, maps)`` for a :class:`~components.scoring.Scorer`,
    ``args = (network state, whitened densities)``: the inference forward, the named features
    and :func:`score_features`."""
    if settings.image_score not in IMAGE_SCORES:
        raise ValueError(
            f"config.score.image_score={settings.image_score!r}; use one of {IMAGE_SCORES}."
        )

    def fn(args, images):
        state, densities = args
        out = nnx.merge(graphdef, state, copy=True)(images, train=False)
        return score_features(
            densities,
            out[settings.embedding],
            pixel_features(out, settings.pixel_layers),
            normalize=settings.normalize,
            image_score=settings.image_score,
            size=images.shape[1],
            sigma=settings.sigma,
        )

    return fn


def _train_forward(model: CutPasteNet, x: jax.Array) -> None:
    """The training-mode forward whose BatchNorm statistics :meth:`CutPaste.fit` re-estimates."""
    model(x, train=True)


# --------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class TrainData:
    """Normal training images and what the augmentations need.

    Attributes:
      images: ``[N, S, S, 3]`` float32 in [0, 1].
      foreground: ``[N, S, S]`` bool foreground masks (FM), or None.
      fmas: ``[M, S, S, 3]`` FMAS samples of this category, or None.
    """

    images: np.ndarray
    foreground: np.ndarray | None
    fmas: np.ndarray | None


def load_train_data(config: ml_collections.ConfigDict) -> TrainData:
    """The train split plus foreground masks (FM) and FMAS samples (``data.anomaly_source``)."""
    data = config.data
    if config.augment.foreground_mask and not data.foreground_root:
        raise ValueError(
            "config.augment.foreground_mask (FM) needs config.data.foreground_root: the folder "
            "of <category>/train/good/<stem>.png masks written by the FMAS mask stage "
            "(python -m launch.synthesize)."
        )
    split = load_split(data, split="train")
    foreground = None
    if config.augment.foreground_mask:
        foreground = datasets.load_foreground_masks(
            data.foreground_root, split, image_size=data.image_size
        )
    fmas = None
    if data.anomaly_source == "fmas":
        from wdam_jax.data import fmas_records

        # Only this category's records are decoded (all of MVTec at 256 px is ~3 GB).
        fmas, _, _ = fmas_records.load_fmas_arrays(
            data.fmas_records, image_size=data.image_size, category=data.category
        )
    elif data.anomaly_source != "cutpaste":
        raise ValueError(
            f"config.data.anomaly_source={data.anomaly_source!r}; use 'cutpaste' or 'fmas'."
        )
    return TrainData(images=split.images, foreground=foreground, fmas=fmas)


def make_batch(
    data: TrainData,
    step: int,
    *,
    batch_size: int,
    seed: int,
    source: str,
    augment_config: ml_collections.ConfigDict,
    part: int = 0,
    parts: int = 1,
) -> dict[str, np.ndarray]:
    """Part ``part`` of ``parts`` of batch ``step`` of the 3-way task, a pure function of
    ``(seed, step)`` (see :meth:`wdam_jax.methods.base.Method.batch`).

    Each of the part's ``b = batch_size / parts`` normal images yields itself (class 0), an
    anomaly-source image (class 1: CutPaste of it, or an FMAS sample drawn at random) and a scar
    of it (class 2).

    Returns:
      ``image`` ``[3b, S, S, 3]`` float32 (normals, then anomalies, then scars) and ``label``
      ``[3b]`` int32.
    """
    a = augment_config
    positions, idx = pipeline.part_indices(
        step,
        num_examples=len(data.images),
        batch_size=batch_size,
        seed=seed,
        part=part,
        parts=parts,
    )
    views: list[list[np.ndarray]] = [[], [], []]
    for i, j in zip(positions, idx, strict=True):
        rng = np.random.default_rng([seed, step, i])
        image = data.images[j]
        fg = data.foreground[j] if data.foreground is not None else None
        if source == "fmas":
            anomaly = data.fmas[int(rng.integers(len(data.fmas)))]
        else:
            confine = a.get("fm_confines_cutpaste", False)
            anomaly = augment.cutpaste(
                rng, image, **augment.cutpaste_options(a), fg_mask=fg if confine else None
            )
        scar = augment.cutpaste_scar(
            rng,
            image,
            **augment.scar_options(a),
            fg_mask=fg,
        )
        for view, x in zip(views, (image, anomaly, scar), strict=True):
            view.append(np.asarray(x, np.float32))
    images = np.concatenate([np.stack(v) for v in views])
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), len(idx))
    return {"image": images, "label": labels}


# --------------------------------------------------------------------------------------------
# The method.


class CutPaste(Method):
    """The CutPaste method (see the module docstring).

    Args:
      config: the experiment config (``configs/cutpaste*.py``).
    """

    name = "cutpaste"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        t = config.train
        epochs = tuple(t.get("stage_epochs", ()))
        if epochs and t.get("epoch_size", 0) == 0:
            if len(epochs) != 3 or min(epochs) < 0:
                raise ConfigError(
                    f"config.train.stage_epochs={epochs}: give three lengths >= 0 (stages 1, 2, "
                    "3), or () to use config.train.stage{1,2,3}_steps."
                )
            steps = (t.stage1_steps, t.stage2_steps, t.stage3_steps)
            if any(steps):
                raise ConfigError(
                    f"config.train.stage_epochs={epochs} and config.train.stage{{1,2,3}}_steps="
                    f"{steps} both set the stage lengths: clear one, e.g. "
                    "--config.train.stage_epochs=() to count in steps."
                )
        elif config.model.wdam_layers and t.stage3_steps <= 0:
            raise ValueError(
                f"config.model.wdam_layers={tuple(config.model.wdam_layers)} but WDAM enters in "
                "stage 3 and config.train.stage3_steps=0; set train.stage3_steps > 0."
            )
        elif min(t.stage1_steps, t.stage2_steps, t.stage3_steps) < 0:
            raise ValueError("config.train.stage{1,2,3}_steps must be >= 0.")
        # All three 0: the untrained network, fitted and scored as validate scores step 0 (the
        # baseline a trained run is read against, configs/experiments/study_cutpaste_demo.py).

    def resolve_schedule(self) -> None:
        """Stage lengths given in epochs (``train.stage_epochs``) become steps of this category's
        training set, written into ``train.stage{1,2,3}_steps`` with ``train.epoch_size`` (the
        number of normal training images), so the run's saved config states the steps it ran and
        a later ``evaluate`` or ``predict`` does not need the data to know them.
        ``train.epoch_unit="pass"``: one epoch is a pass over the normal training images at
        ``train.batch_size`` per step, ``steps = ceil(epochs * epoch_size / batch_size)``;
        ``"cutpaste"``: CutPaste's epoch of 256 parameter updates, ``steps = 256 * epochs``
        whatever the category's size (``docs/design.md`` compares the two readings)."""
        t = self.config.train
        if not tuple(t.get("stage_epochs", ())) or t.get("epoch_size", 0):
            return
        unit = t.get("epoch_unit", "pass")
        if unit not in EPOCH_UNITS:
            raise ConfigError(
                f"config.train.epoch_unit={unit!r}; use 'pass' (one pass over the training "
                f"images) or 'cutpaste' ({CUTPASTE_EPOCH_STEPS} updates, CutPaste's epoch)."
            )
        size = len(self.train_data.images)
        if unit == "cutpaste":
            steps = [math.ceil(e * CUTPASTE_EPOCH_STEPS) for e in t.stage_epochs]
        else:
            steps = [math.ceil(e * size / t.batch_size) for e in t.stage_epochs]
        with self.config.unlocked():
            t.epoch_size = size
            t.stage1_steps, t.stage2_steps, t.stage3_steps = steps
        logging.info(
            "Stage lengths %s epochs of %d training images at batch %d = %s steps.",
            tuple(t.stage_epochs),
            size,
            t.batch_size,
            steps,
        )
        if self.config.model.wdam_layers and steps[2] <= 0:
            raise ConfigError(
                f"config.model.wdam_layers={tuple(self.config.model.wdam_layers)} but WDAM enters "
                f"in stage 3 and config.train.stage_epochs={tuple(t.stage_epochs)} gives it 0 "
                "steps; give stage 3 a length > 0."
            )
        if sum(steps) <= 0:
            raise ConfigError(
                f"config.train.stage_epochs={tuple(t.stage_epochs)}: nothing to train."
            )

    @functools.cached_property
    def stage_starts(self) -> tuple[int, int, int]:
        """The first step of each stage (stage lengths in epochs are resolved first)."""
        self.resolve_schedule()
        t = self.config.train
        return (0, t.stage1_steps, t.stage1_steps + t.stage2_steps)

    @property
    def wdam_start(self) -> int:
        return self.stage_starts[2]

    @property
    def total_steps(self) -> int:
        t = self.config.train
        return self.stage_starts[2] + t.stage3_steps

    @functools.cached_property
    def train_data(self) -> TrainData:
        return load_train_data(self.config)

    def train_images(self) -> np.ndarray:
        return self.train_data.images

    def check_inputs(self) -> list[str]:
        """The data, plus the ImageNet weights, the foreground masks (FM) and the FMAS records
        when the config uses them; each problem says how to provide or disable the input."""
        config = self.config
        problems = super().check_inputs()
        pretrained = config.model.pretrained
        if pretrained and not pathlib.Path(pretrained).is_dir():
            problems.append(
                f"config.model.pretrained={pretrained!r}: no converted WideResNet50-2 weights "
                "there. Convert torchvision's file with python -m launch.convert_weights "
                f"--torchvision=wide_resnet50_2-32ee1156.pth --out={pretrained}, or train from "
                "scratch with --config.model.pretrained= (empty)."
            )
        source = config.data.anomaly_source
        if source not in ("cutpaste", "fmas"):
            problems.append(f"config.data.anomaly_source={source!r}: use 'cutpaste' or 'fmas'.")
        if source == "fmas":
            from wdam_jax.data import fmas_records

            try:
                fmas_records.resolve_files(config.data.fmas_records)
            except datasets.DatasetError:
                problems.append(
                    f"config.data.fmas_records={config.data.fmas_records!r} matches no FMAS "
                    "TFRecord shard. Synthesise them with python -m launch.synthesize "
                    "--config=configs/fmas_mvtec.py, or use CutPaste as the anomaly source: "
                    "--config.data.anomaly_source=cutpaste."
                )
        if config.augment.foreground_mask:
            problems += self._check_foreground()
        if not problems:
            self.resolve_schedule()  # the saved config then states the steps of each stage
        return problems

    def _check_foreground(self) -> list[str]:
        data = self.config.data
        disable = "or turn FM off with --config.augment.foreground_mask=False."
        if not data.foreground_root:
            return [
                "config.augment.foreground_mask=True needs config.data.foreground_root (masks "
                f"written by python -m launch.synthesize), {disable}"
            ]
        train_dir = pathlib.Path(data.root) / data.category / "train" / "good"
        if data.dataset in ("demo", "tfds", "folder") or not train_dir.is_dir():
            return []  # the demo writes its own masks; a missing folder is reported already
        images = datasets.list_images(train_dir)
        missing = [
            p
            for p in images
            if not datasets.foreground_mask_path(
                data.foreground_root, str(p.relative_to(data.root))
            ).is_file()
        ]
        if not missing:
            return []
        first = datasets.foreground_mask_path(
            data.foreground_root, str(missing[0].relative_to(data.root))
        )
        return [
            f"{len(missing)} of {len(images)} foreground masks are missing under "
            f"config.data.foreground_root={data.foreground_root!r} (first: {first}). Write them "
            f"with python -m launch.synthesize (its mask stage), {disable}"
        ]

    def create_model(self, *, abstract: bool = False) -> CutPasteNet:
        return create_model(self.config.model, seed=self.config.seed, abstract=abstract)

    def optimizer(self) -> optax.GradientTransformation:
        """Stage 1: SGD + momentum, cosine from ``stage1_lr``; stages 2-3: one Adam whose learning
        rate drops from ``stage2_lr`` to ``stage3_lr`` when WDAM enters. L2 weight decay
        ``train.weight_decay`` (CutPaste's) in both. Optional for stage 1: a linear warm-up
        from 0 over ``train.warmup_steps`` and the gradient clipped to global norm
        ``train.clip_norm`` (0: off), which keep the first steps of a network trained from
        scratch from overwriting its random features (``docs/cutpaste_demo_diagnosis.md``).

        WDAM's parameters are not part of the network before stage 3, so they get no update at
        all there (no weight decay either: with decay, Adam would shrink them towards 0 from
        their initialisation) and their own Adam starts fresh when WDAM enters.
        """
        self.resolve_schedule()
        t = self.config.train
        warmup = min(int(t.get("warmup_steps", 0)), max(0, t.stage1_steps - 1))
        stage1_lr = optax.cosine_decay_schedule(t.stage1_lr, max(1, t.stage1_steps))
        if warmup:
            stage1_lr = optax.warmup_cosine_decay_schedule(
                0.0, t.stage1_lr, warmup, max(1, t.stage1_steps)
            )
        sgd = optax.chain(
            optax.add_decayed_weights(t.weight_decay),
            optax.sgd(stage1_lr, momentum=t.momentum),
        )
        if t.get("clip_norm", 0.0):
            sgd = optax.chain(optax.clip_by_global_norm(t.clip_norm), sgd)
        adam_lr = lambda count: jnp.where(count < t.stage2_steps, t.stage2_lr, t.stage3_lr)
        adam = optax.chain(optax.add_decayed_weights(t.weight_decay), optax.adam(adam_lr))
        network = staged([sgd, adam], [t.stage1_steps])
        if not self.config.model.wdam_layers:
            return network
        wdam_adam = optax.chain(optax.add_decayed_weights(t.weight_decay), optax.adam(t.stage3_lr))
        wdam = staged([optax.set_to_zero(), wdam_adam], [self.wdam_start])
        return optax.multi_transform({"network": network, "wdam": wdam}, wdam_labels)

    def anomaly_source(self, step: int) -> str:
        """Stage 1 replicates CutPaste; later stages use ``data.anomaly_source``."""
        return "cutpaste" if step < self.stage_starts[1] else self.config.data.anomaly_source

    def batch(self, step: int, *, part: int = 0, parts: int = 1) -> dict[str, np.ndarray]:
        return make_batch(
            self.train_data,
            step,
            batch_size=self.config.train.batch_size,
            seed=self.config.seed,
            source=self.anomaly_source(step),
            augment_config=self.config.augment,
            part=part,
            parts=parts,
        )

    def loss(
        self, model: CutPasteNet, batch: Mapping[str, jax.Array], *, step: jax.Array, key
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Cross-entropy of the 3-way classification (key unused: augmentation is host-side)."""
        del key
        wdam_on = step >= self.wdam_start
        set_wdam_gate(model, wdam_on)
        wdam_on = wdam_on & bool(self.config.model.wdam_layers)  # reported: WDAM in the network
        logits = model(batch["image"], train=True)["logits"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"accuracy": accuracy, "wdam_on": wdam_on.astype(jnp.float32)}

    # ---- scoring

    def backbone(self, model: CutPasteNet, *, step: int) -> WideResNet50_2:
        """The backbone as trained at ``step``, with plain WDAM modules (or none before stage 3)."""
        backbone = model.backbone
        active = step > self.wdam_start
        for index in backbone.wdam_layers:
            for block in getattr(backbone, f"layer{index}"):
                block.wdam = block.wdam.wdam if active else None
        if not active:
            backbone.wdam_layers = ()
        return backbone

    def _scoring_model(self, model: CutPasteNet, fitted: Fitted, *, step: int) -> CutPasteNet:
        """The network as it scores at ``step``: WDAM gated as trained, and the BatchNorm
        statistics re-estimated by :meth:`fit` (if ``score.bn_batches``) in place of the
        running ones."""
        set_wdam_gate(model, step > self.wdam_start)
        return batch_norm.apply_batch_stats(model, fitted)

    def precise_batch_stats(self, model: CutPasteNet, *, step: int) -> Fitted:
        """Every BatchNorm's statistics over ``score.bn_batches`` batches of the training task
        on the method's training data (normal images, their anomaly-source and scar views; seed
        ``config.seed + 2``, never a training batch), weights frozen
        (:mod:`wdam_jax.batch_norm`). Empty if ``score.bn_batches`` is 0: inference mode then
        uses the running statistics."""
        count = int(self.config.score.get("bn_batches", 0))
        if not count:
            return {}
        set_wdam_gate(model, step > self.wdam_start)
        batches = (
            make_batch(
                self.train_data,
                k,
                batch_size=self.config.train.batch_size,
                seed=self.config.seed + 2,
                source=self.anomaly_source(step),
                augment_config=self.config.augment,
            )["image"]
            for k in range(count)
        )
        return batch_norm.precise_batch_stats(model, batches, call=_train_forward)

    def _features(self, model: CutPasteNet, images: np.ndarray, *, step: int):
        """``(embeddings [N, E], pixel features [N, h, w, D])`` of ``images``, inference mode
        (``model`` as :meth:`_scoring_model` gives it): what :meth:`fit` fits."""
        s = self.config.score
        set_wdam_gate(model, step > self.wdam_start)
        layers = tuple(s.pixel_layers)
        names = tuple(dict.fromkeys((s.embedding, *layers)))
        features = extract_features(model, images, names=names, batch_size=s.eval_batch_size)
        return features[s.embedding], np.asarray(pixel_features(features, layers))

    def fit(self, model: CutPasteNet, train_images: np.ndarray, *, step: int) -> Fitted:
        """The Gaussians of :func:`fit_densities` on the normal training images: of the
        embeddings (image score) and of the ``score.pixel_layers`` features per location."""
        stats = self.precise_batch_stats(model, step=step)
        scoring = self._scoring_model(model, stats, step=step)
        embed, pixel = self._features(scoring, train_images, step=step)
        return {**stats, **fit_densities(embed, pixel, normalize=self.config.score.normalize)}

    def scorer(
        self, model: CutPasteNet, fitted: Fitted, *, step: int, image_score: str | None = None
    ) -> Scorer:
        """The network as it scores at ``step`` (:meth:`_scoring_model`) and the whitened
        Gaussians, through :func:`scoring_fn`: the inference forward, the per-location
        Mahalanobis map (bilinear upsampling, Gaussian blur) and the image score
        (``score.image_score``, or ``image_score``)."""
        graphdef, state = nnx.split(self._scoring_model(model, fitted, step=step))
        overrides = {"image_score": image_score} if image_score else {}
        settings = ScoreSettings.of(self.config.score, **overrides)
        return Scorer(scoring_fn(graphdef, settings), (state, whitened_densities(fitted)))

    @functools.cached_property
    def test_split(self) -> datasets.Split:
        return load_split(self.config.data, split="test")

    @functools.cached_property
    def validation_set(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(images [2V, S, S, 3], masks [2V, S, S])``: the V held-out normal training images
        (``data.holdout_fraction``; never trained on or fitted to) and each with a Perlin-noise
        anomaly (:func:`wdam_jax.data.anomaly_sources.perlin_validation_set`: another family
        than the training task's), or None without a holdout split."""
        if not self.config.data.get("holdout_fraction", 0.0):
            return None
        held = load_split(self.config.data, split="holdout").images
        return anomaly_sources.perlin_validation_set(held, seed=self.config.seed)

    def validate(self, model: CutPasteNet, *, step: int) -> dict[str, float]:
        """Learning-curve scalars, logged every ``train.eval_every`` steps.

        ``test/*`` are computed on the TEST split: a diagnostic curve (does training help
        detection?), never used to select a checkpoint or a hyperparameter. ``test/gde_i_auroc``
        is CutPaste's image score (Gaussian on ``score.embedding``) whatever
        ``score.image_score`` is; ``test/i_auroc`` is the configured image score and
        ``test/p_auroc`` the pixel AUROC at the model's input resolution. ``val/*_auroc`` are
        the same on :attr:`validation_set` (held-out normal images and synthetic anomalies of
        another family than the training task's): what demo settings are chosen on, and
        ``val/mean_auroc`` what ``train.select_metric`` can keep the best checkpoint by.
        ``val/accuracy_*`` is the per-class 3-way accuracy in inference mode (with the
        statistics :meth:`fit` re-estimates) on ``VAL_ACCURACY_BATCHES`` fixed batches of
        fresh augmentations of the training images (seed ``config.seed + 1``), to compare with
        the training accuracy.
        Every score here is the one :meth:`fit` + :meth:`score` give.
        """
        from wdam_jax import metrics

        s = self.config.score
        fitted = self.fit(model, self.train_data.images, step=step)
        gde = self.scorer(model, fitted, step=step, image_score="gde")

        def scores(images):
            """GDE scores, the configured image scores and the maps, from one scoring pass."""
            gde_scores, maps = gde(images, batch_size=s.eval_batch_size)
            if s.image_score == "gde":
                return gde_scores, gde_scores, maps
            return gde_scores, maps.reshape(len(maps), -1).max(axis=1), maps  # "map_max"

        test = self.test_split
        gde_scores, image_scores, maps = scores(test.images)
        out = {
            "test/gde_i_auroc": metrics.auroc(gde_scores, test.labels),
            "test/i_auroc": metrics.auroc(image_scores, test.labels),
            "test/p_auroc": metrics.pixel_auroc(maps, test.masks),
        }
        if self.validation_set is not None:
            images, masks = self.validation_set
            labels = masks.any(axis=(1, 2))
            gde_scores, image_scores, maps = scores(images)
            i_auroc = metrics.auroc(image_scores, labels)
            p_auroc = metrics.auroc(maps.reshape(-1), masks.reshape(-1))
            out |= {
                "val/gde_i_auroc": metrics.auroc(gde_scores, labels),
                "val/i_auroc": i_auroc,
                "val/p_auroc": p_auroc,
                "val/mean_auroc": (i_auroc + p_auroc) / 2,
            }
        scoring = self._scoring_model(model, fitted, step=step)
        batches = [
            make_batch(
                self.train_data,
                k,
                batch_size=self.config.train.batch_size,
                seed=self.config.seed + 1,
                source=self.anomaly_source(step),
                augment_config=self.config.augment,
            )
            for k in range(VAL_ACCURACY_BATCHES)
        ]
        labels = np.concatenate([b["label"] for b in batches])
        logits = extract_features(
            scoring,
            np.concatenate([b["image"] for b in batches]),
            names=("logits",),
            batch_size=s.eval_batch_size,
        )["logits"]
        predicted = logits.argmax(-1)
        out["val/accuracy"] = float(np.mean(predicted == labels))
        for label, name in zip((NORMAL, ANOMALY, SCAR), ("normal", "anomaly", "scar"), strict=True):
            chosen = labels == label
            out[f"val/accuracy_{name}"] = float(np.mean(predicted[chosen] == label))
        return out
