"""CutPaste with FMAS, FM and WDAM (paper Sec. 3.3 and 4.2; Tables 3, 7, 8).

The network is WideResNet50-2 (WDAM Bottleneck* in ``model.wdam_layers``), CutPaste's projection
head (``Linear -> BatchNorm -> ReLU`` per entry of ``model.head_dims``) on the pooled features and
a 3-way classifier: 0 = normal, 1 = anomaly source (CutPaste, or an FMAS sample), 2 = CutPaste-scar.
``augment.foreground_mask`` (FM) confines scar and CutPaste to the foreground mask.

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
per-location Mahalanobis distance of the ``score.pixel_layer`` (layer4) features to the normal
training features at that location (per-location mean, one shrinkage covariance pooled over
locations: a [D, D] matrix per location would not fit for D = 2048), bilinearly upsampled to the
input and Gaussian-smoothed (``score.pixel_sigma``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.ndimage
from absl import logging
from flax import nnx

from wdam_jax.data import augment, datasets, pipeline
from wdam_jax.data.sources import load_split
from wdam_jax.methods.base import Fitted, ImageScores, Method
from wdam_jax.models.wide_resnet import (
    BASE_WIDTH,
    DEPTHS,
    WideResNet50_2,
    fill_random,
    load_pretrained,
)
from wdam_jax.optim import staged

NUM_CLASSES = 3
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
                "\n%s\nWARNING: config.model.pretrained is empty: training WideResNet50-2 FROM "
                "SCRATCH (random init). The paper starts from ImageNet weights; convert them with "
                "`python -m launch.convert_weights --torchvision=wide_resnet50_2-<hash>.pth "
                "--out=weights/wrn50_2_imagenet` and set --config.model.pretrained to that folder."
                "\n%s",
                "=" * 100,
                "=" * 100,
            )
    for index in model.backbone.wdam_layers:
        for block in getattr(model.backbone, f"layer{index}"):
            block.wdam = GatedWDAM(block.wdam)
    if abstract:
        # Variables outside the train state (gates, WDAM diagnostics) need concrete values.
        for _, var in nnx.iter_graph(model):
            if isinstance(var, nnx.Variable) and not isinstance(var, nnx.Param | nnx.BatchStat):
                value = var.get_value()
                var.set_value(jnp.ones(value.shape, value.dtype))
    return model


# --------------------------------------------------------------------------------------------
# Gaussian density estimation (CutPaste's image score, and the pixel map).


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage intensity of centred samples (Ledoit & Wolf, 2004).

    The same estimator as ``sklearn.covariance.ledoit_wolf_shrinkage``:
    ``shrunk = (1 - s) * S + s * mu * I`` with ``S`` the empirical covariance and
    ``mu = trace(S) / D``.

    Args:
      x: ``[N, D]`` samples, already centred.

    Returns:
      The shrinkage ``s`` in [0, 1].
    """
    x = np.asarray(x, np.float64)
    n, d = x.shape
    x2 = x**2
    trace_terms = x2.sum(axis=0) / n
    mu = trace_terms.sum() / d
    beta_ = np.sum(x2.T @ x2)
    delta_ = np.sum((x.T @ x) ** 2) / n**2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace_terms.sum() + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """A Gaussian density: ``mean`` ``[..., D]`` (broadcast over locations) and ``precision``
    ``[D, D]``."""

    mean: np.ndarray
    precision: np.ndarray

    def mahalanobis(self, x: np.ndarray) -> np.ndarray:
        """``sqrt((x - mean)^T P (x - mean))`` over the last axis: ``[..., D] -> [...]``."""
        centred = np.asarray(x, np.float64) - self.mean
        sq = np.einsum("...i,ij,...j->...", centred, self.precision, centred)
        return np.sqrt(np.maximum(sq, 0.0))


def fit_gaussian(x: np.ndarray, *, location_axes: Sequence[int] = ()) -> Gaussian:
    """Fits a Gaussian with Ledoit-Wolf shrinkage covariance.

    Args:
      x: ``[N, ..., D]`` normal features.
      location_axes: axes of ``x`` (after the first) that keep their own mean, e.g. ``(1, 2)``
        for ``[N, h, w, D]`` feature maps; the covariance is pooled over samples and locations.

    Returns:
      The :class:`Gaussian`; ``mean`` has shape ``[D]`` or ``[h, w, D]``.
    """
    x = np.asarray(x, np.float64)
    keep = set(location_axes)
    reduce_axes = tuple(a for a in range(x.ndim - 1) if a not in keep)
    mean = x.mean(axis=reduce_axes, keepdims=True)
    centred = (x - mean).reshape(-1, x.shape[-1])
    s = ledoit_wolf_shrinkage(centred)
    emp = centred.T @ centred / centred.shape[0]
    mu = np.trace(emp) / emp.shape[0]
    cov = (1.0 - s) * emp + s * mu * np.eye(emp.shape[0])
    return Gaussian(mean=mean.reshape(mean.shape[len(reduce_axes) :]), precision=_pinvh(cov))


def _pinvh(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    keep = w > w.max() * cov.shape[0] * np.finfo(np.float64).eps
    return (v[:, keep] / w[keep]) @ v[:, keep].T


def smooth_maps(maps: np.ndarray, *, size: int, sigma: float) -> np.ndarray:
    """Bilinear upsampling of ``[N, h, w]`` distance maps to ``[N, size, size]``, then a Gaussian
    blur of ``sigma`` pixels (0 disables)."""
    maps = np.asarray(maps, np.float32)
    up = np.asarray(
        jax.image.resize(jnp.asarray(maps), (maps.shape[0], size, size), "bilinear"), np.float32
    )
    if sigma > 0:
        up = scipy.ndimage.gaussian_filter(up, sigma=(0, sigma, sigma), mode="reflect")
    return up


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

        images, _, sources = fmas_records.load_fmas_arrays(
            data.fmas_records, image_size=data.image_size
        )
        mine = [i for i, s in enumerate(sources) if s.split("/")[0] == data.category]
        if not mine:
            raise datasets.DatasetError(
                f"The FMAS records {data.fmas_records!r} hold no sample of category "
                f"{data.category!r} (sources: {sorted({s.split('/')[0] for s in sources})}). Run "
                "python -m launch.synthesize for it, or fix config.data.fmas_records."
            )
        fmas = images[mine]
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
) -> dict[str, np.ndarray]:
    """Batch ``step`` of the 3-way task, a pure function of ``(seed, step)``.

    Each of the ``batch_size`` normal images yields itself (class 0), an anomaly-source image
    (class 1: CutPaste of it, or an FMAS sample drawn at random) and a scar of it (class 2).

    Returns:
      ``image`` ``[3B, S, S, 3]`` float32 (normals, then anomalies, then scars) and ``label``
      ``[3B]`` int32.
    """
    a = augment_config
    idx = pipeline.batch_indices(
        step, num_examples=len(data.images), batch_size=batch_size, seed=seed
    )
    views: list[list[np.ndarray]] = [[], [], []]
    for i, j in enumerate(idx):
        rng = np.random.default_rng([seed, step, i])
        image = data.images[j]
        fg = data.foreground[j] if data.foreground is not None else None
        if source == "fmas":
            anomaly = data.fmas[int(rng.integers(len(data.fmas)))]
        else:
            anomaly = augment.cutpaste(
                rng,
                image,
                area_ratio=tuple(a.cutpaste_area_ratio),
                aspect_ratio=tuple(tuple(r) for r in a.cutpaste_aspect_ratio),
                color_jitter=a.color_jitter,
                fg_mask=fg,
            )
        scar = augment.cutpaste_scar(
            rng,
            image,
            width=tuple(a.scar_width),
            length=tuple(a.scar_length),
            rotation=tuple(a.scar_rotation),
            color_jitter=a.color_jitter,
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
        self.stage_starts = (0, t.stage1_steps, t.stage1_steps + t.stage2_steps)
        self._total_steps = t.stage1_steps + t.stage2_steps + t.stage3_steps
        self.wdam_start = self.stage_starts[2]
        if config.model.wdam_layers and t.stage3_steps <= 0:
            raise ValueError(
                f"config.model.wdam_layers={tuple(config.model.wdam_layers)} but WDAM enters in "
                "stage 3 and config.train.stage3_steps=0; set train.stage3_steps > 0."
            )
        if self._total_steps <= 0:
            raise ValueError("config.train.stage{1,2,3}_steps add up to 0; nothing to train.")

    @property
    def total_steps(self) -> int:
        return self._total_steps

    @functools.cached_property
    def train_data(self) -> TrainData:
        return load_train_data(self.config)

    def train_images(self) -> np.ndarray:
        return self.train_data.images

    def create_model(self, *, abstract: bool = False) -> CutPasteNet:
        return create_model(self.config.model, seed=self.config.seed, abstract=abstract)

    def optimizer(self) -> optax.GradientTransformation:
        """Stage 1: SGD + momentum, cosine from ``stage1_lr``; stages 2-3: one Adam whose learning
        rate drops from ``stage2_lr`` to ``stage3_lr`` when WDAM enters. L2 weight decay
        ``train.weight_decay`` (CutPaste's) in both.

        WDAM's parameters are not part of the network before stage 3, so they get no update at
        all there (no weight decay either: with decay, Adam would shrink them towards 0 from
        their initialisation) and their own Adam starts fresh when WDAM enters.
        """
        t = self.config.train
        sgd = optax.chain(
            optax.add_decayed_weights(t.weight_decay),
            optax.sgd(
                optax.cosine_decay_schedule(t.stage1_lr, max(1, t.stage1_steps)),
                momentum=t.momentum,
            ),
        )
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

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return make_batch(
            self.train_data,
            step,
            batch_size=self.config.train.batch_size,
            seed=self.config.seed,
            source=self.anomaly_source(step),
            augment_config=self.config.augment,
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

    def _features(self, model: CutPasteNet, images: np.ndarray, *, step: int):
        """``(embeddings [N, E], maps [N, h, w, D])`` of ``images`` in inference mode."""
        set_wdam_gate(model, step > self.wdam_start)
        graphdef, state = nnx.split(model)
        embedding, layer = self.config.score.embedding, self.config.score.pixel_layer

        @jax.jit
        def forward(state, x):
            out = nnx.merge(graphdef, state, copy=True)(x, train=False)
            return out[embedding].astype(jnp.float32), out[layer].astype(jnp.float32)

        return pipeline.map_batches(
            lambda x: forward(state, x), images, batch_size=self.config.score.eval_batch_size
        )

    def fit(self, model: CutPasteNet, train_images: np.ndarray, *, step: int) -> Fitted:
        """The Gaussian densities of the normal training images: of the embeddings (image score)
        and of the ``score.pixel_layer`` features per location (pixel map)."""
        embeddings, maps = self._features(model, train_images, step=step)
        image, pixel = fit_gaussian(embeddings), fit_gaussian(maps, location_axes=(1, 2))
        return {
            "image_mean": image.mean,
            "image_precision": image.precision,
            "pixel_mean": pixel.mean,
            "pixel_precision": pixel.precision,
        }

    def score(
        self, model: CutPasteNet, fitted: Fitted, images: np.ndarray, *, step: int
    ) -> ImageScores:
        """Mahalanobis image scores and smoothed per-location Mahalanobis maps (see the module)."""
        image = Gaussian(fitted["image_mean"], fitted["image_precision"])
        pixel = Gaussian(fitted["pixel_mean"], fitted["pixel_precision"])
        embeddings, maps = self._features(model, images, step=step)
        maps = smooth_maps(
            pixel.mahalanobis(maps), size=images.shape[1], sigma=self.config.score.pixel_sigma
        )
        return ImageScores(image.mahalanobis(embeddings), maps)
