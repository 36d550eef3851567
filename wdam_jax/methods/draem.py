"""DRAEM (Zavrtanik et al., 2021) and DRAEM+WDAM (paper Sec. 4.2, Table 5).

Training (as the official ``train_DRAEM.py``): each normal image becomes, with probability
``augment.no_anomaly_prob`` (0.5), itself, otherwise a simulated anomaly (a thresholded Perlin
mask with an augmented texture blended in, :func:`wdam_jax.data.augment.draem_anomaly`); before
that it is rotated with probability ``augment.rotate_prob`` (0.3). The reconstructive network
maps the (possibly anomalous) image back to the normal one, the discriminative network segments
the anomaly from the image and its reconstruction:

    loss = L2(rec, I) + (1 - SSIM(rec, I)) + Focal(softmax(logits), M)

with SSIM on an 11 x 11 Gaussian window (sigma 1.5, zero padding, as DRAEM's ``loss.py``) and the
focal loss with gamma 2 and DRAEM's label smoothing (1e-5). Adam at ``train.lr`` (1e-4) for both
networks, multiplied by ``train.lr_decay`` (0.2) at the ``train.lr_milestones`` fractions (80 %
and 90 %) of the run. A run is ``train.epochs`` epochs of ``ceil(N / batch_size)`` steps over the
``N`` training images (DRAEM: 700 epochs at batch 8, 256 x 256).

``data.anomaly_source``: ``"perlin"`` (DRAEM: textures from ``data.anomaly_source_dir``) or
``"fmas"`` (the FMAS samples of ``data.fmas_records`` replace the Perlin anomalies: an anomalous
sample is an FMAS image with its mask, its reconstruction target the normal image it was made
from; normal samples are unchanged). The paper's Table 5 reports DRAEM + WDAM without FMAS.

Validation ("adding a validation phase", Sec. 4.2): ``data.val_fraction`` of the training images
is held out from training; each is scored as it is (normal) and with one synthetic anomaly drawn
once from ``(seed, image)`` by the training generator, so no test image takes part in model
selection. :meth:`Draem.validate` returns their image and pixel AUROC.

Scoring (as ``test_DRAEM.py``): the pixel map is the softmax anomaly channel; the image score is
the maximum of that channel average-pooled over ``score.pool_size`` (21) pixels, zero padded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from wdam_jax import filters, metrics
from wdam_jax.components.scoring import Scorer, fill_untrained
from wdam_jax.data import augment, datasets, pipeline
from wdam_jax.data.anomaly_sources import TextureBank
from wdam_jax.data.sources import load_split
from wdam_jax.methods.base import Batch, Fitted, Method
from wdam_jax.models.draem import Draem as DraemNet

ANOMALY_SOURCES = ("perlin", "fmas")
FOCAL_SMOOTH = 1e-5  # DRAEM's FocalLoss(smooth=1e-5)

# --------------------------------------------------------------------------------------------
# Losses and scores (pure functions).


def ssim_map(
    x: jax.Array, y: jax.Array, *, window: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> jax.Array:
    """Per-pixel SSIM of ``[B, H, W, C]`` images, Gaussian window, zero padding (DRAEM's ``ssim``).

    ``SSIM = (2 mu_x mu_y + c1)(2 s_xy + c2) / ((mu_x^2 + mu_y^2 + c1)(s_x^2 + s_y^2 + c2))``
    with ``c1 = (0.01 L)^2``, ``c2 = (0.03 L)^2``, ``L = data_range``; moments are the
    ``window x window`` Gaussian-weighted (``sigma``) local means. The separable blur is two
    matmuls with banded matrices: XLA:CPU's depthwise convolution and its gradient were ~20x
    slower (measured 0.99 s vs 0.05 s for the gradient at 8 x 96 x 96 x 3).

    Returns:
      ``[B, H, W, C]``.
    """
    kwargs = dict(sigma=sigma, offsets=tuple(range(-(window // 2), window - window // 2)))
    mh = jnp.asarray(filters.gaussian_matrix(x.shape[1], boundary="zero", **kwargs), x.dtype)
    mw = jnp.asarray(filters.gaussian_matrix(x.shape[2], boundary="zero", **kwargs), x.dtype)
    stack = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)
    moments = jnp.einsum("ph,bhwc,qw->bpqc", mh, stack, mw)
    mx, my, xx, yy, xy = jnp.split(moments, 5, axis=-1)
    vx, vy, cov = xx - mx * mx, yy - my * my, xy - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def focal_loss(probs: jax.Array, target: jax.Array, *, gamma: float = 2.0) -> jax.Array:
    """DRAEM's focal loss on softmax probabilities (Lin et al., 2017; alpha 1, smoothing 1e-5).

    ``p_t = sum_k onehot_k p_k + smooth`` with the one-hot target clipped to
    ``[smooth, 1 - smooth]``; the loss is the mean of ``-(1 - p_t)^gamma log p_t``.

    Args:
      probs: ``[..., K]`` class probabilities.
      target: ``[...]`` integer (or 0/1) class labels.
      gamma: focusing parameter (2 in DRAEM).

    Returns:
      The scalar mean loss.
    """
    k = probs.shape[-1]
    onehot = jax.nn.one_hot(target.astype(jnp.int32), k, dtype=probs.dtype)
    onehot = jnp.clip(onehot, FOCAL_SMOOTH / (k - 1), 1.0 - FOCAL_SMOOTH)
    pt = jnp.sum(onehot * probs, axis=-1) + FOCAL_SMOOTH
    return jnp.mean(-((1.0 - pt) ** gamma) * jnp.log(pt))


def pooled_max(maps: jax.Array, *, pool_size: int = 21) -> jax.Array:
    """DRAEM's image score: max of ``maps`` ``[N, H, W]`` average-pooled over ``pool_size`` x
    ``pool_size`` windows, stride 1, zero padding counted in the average. Returns ``[N]``."""
    pad = pool_size // 2
    summed = jax.lax.reduce_window(
        maps, 0.0, jax.lax.add, (1, pool_size, pool_size), (1, 1, 1),
        ((0, 0), (pad, pad), (pad, pad)),
    )  # fmt: skip
    return jnp.max(summed, axis=(1, 2)) / (pool_size * pool_size)


@functools.lru_cache(maxsize=8)
def scoring_fn(graphdef, pool_size: int):
    """``(state, images) -> (image scores [N], anomaly maps [N, H, W])`` in inference mode, for a
    :class:`~wdam_jax.components.scoring.Scorer` (DRAEM scores with the network alone)."""

    def fn(state, images):
        anomaly = nnx.merge(graphdef, state, copy=True)(images, train=False)["anomaly"]
        return pooled_max(anomaly, pool_size=pool_size), anomaly

    return fn


# --------------------------------------------------------------------------------------------
# Data.


def _fill_random(model: nnx.Module, rng: np.random.Generator) -> None:
    """DRAEM's ``weights_init`` drawn with numpy (no XLA compile per parameter shape).

    Convolutions: weight ``N(0, 0.02)``, bias torch's default ``U(+-1/sqrt(fan_in))``; BatchNorm:
    scale ``N(1, 0.02)``, bias 0, running mean 0 and variance 1; WDAM's linear layers (which
    DRAEM's init does not touch): torch's default ``U(+-1/sqrt(fan_in))`` for weight and bias.
    """

    def put(var: nnx.Variable, value: np.ndarray) -> None:
        var.set_value(jnp.asarray(value, var.get_value().dtype))

    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Conv):
            shape = node.kernel.get_value().shape
            put(node.kernel, rng.normal(0.0, 0.02, shape))
            bound = 1.0 / math.sqrt(shape[0] * shape[1] * shape[2])
            put(node.bias, rng.uniform(-bound, bound, shape[-1]))
        elif isinstance(node, nnx.BatchNorm):
            n = node.scale.get_value().shape
            put(node.scale, rng.normal(1.0, 0.02, n))
            put(node.bias, np.zeros(n))
            put(node.mean, np.zeros(n))
            put(node.var, np.ones(n))
        elif isinstance(node, nnx.Linear):
            shape = node.kernel.get_value().shape
            bound = 1.0 / math.sqrt(shape[0])
            put(node.kernel, rng.uniform(-bound, bound, shape))
            put(node.bias, rng.uniform(-bound, bound, shape[-1]))


class DraemData:
    """The normal training images split into train / validation, and the anomaly sources."""

    def __init__(self, config: ml_collections.ConfigDict):
        data = config.data
        if data.anomaly_source not in ANOMALY_SOURCES:
            raise ValueError(
                f"config.data.anomaly_source={data.anomaly_source!r}; use one of "
                f"{', '.join(ANOMALY_SOURCES)}."
            )
        if not 0.0 <= data.val_fraction < 1.0:
            raise ValueError(f"config.data.val_fraction={data.val_fraction}; use [0, 1).")
        split = load_split(data, split="train")
        n = len(split)
        n_val = round(data.val_fraction * n)
        if data.val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
        order = np.random.default_rng([config.seed, 271828]).permutation(n)
        train_idx, val_idx = np.sort(order[: n - n_val]), np.sort(order[n - n_val :])
        self.images = split.images[train_idx]
        self.val_images = split.images[val_idx]
        self.textures = None
        self.fmas = self.val_fmas = None
        if data.anomaly_source == "perlin":
            self.textures = TextureBank(
                data.anomaly_source_dir, image_size=data.image_size, seed=config.seed
            )
        else:
            self.fmas, self.val_fmas = self._load_fmas(data, split, train_idx, val_idx)

    @staticmethod
    def _load_fmas(data, split: datasets.Split, train_idx, val_idx):
        """FMAS samples ``(image, mask, index of the source image)`` of the train and
        validation images; samples of other images are dropped."""
        from wdam_jax.data import fmas_records

        images, masks, sources = fmas_records.load_fmas_arrays(
            data.fmas_records, image_size=data.image_size
        )
        where = {path: i for i, path in enumerate(split.paths)}
        out = []
        for part in (train_idx, val_idx):
            position = {int(j): k for k, j in enumerate(part)}
            keep = [i for i, s in enumerate(sources) if where.get(s, -1) in position]
            owner = np.asarray([position[where[sources[i]]] for i in keep], np.int64)
            out.append((images[keep], masks[keep], owner))
        parts = zip(out, (train_idx, val_idx), ("training", "validation"), strict=True)
        for (samples, *_), part, name in parts:
            if len(part) and not len(samples):
                raise datasets.DatasetError(
                    f"The FMAS records {data.fmas_records!r} hold no sample made from a {name} "
                    f"image of {data.category!r} (sources must be paths like "
                    f"{split.paths[0]!r}). Run python -m launch.synthesize for this category, "
                    "fix config.data.fmas_records, or set config.data.val_fraction=0."
                )
        return out


def synthesize(
    rng: np.random.Generator,
    image: np.ndarray,
    data: DraemData,
    augment_config: ml_collections.ConfigDict,
    *,
    fmas: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    images: np.ndarray,
    no_anomaly_prob: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample from a normal ``image`` ``[S, S, 3]``.

    Returns:
      ``(target [S, S, 3], input [S, S, 3], mask [S, S] float32)``: the reconstruction target,
      the (possibly anomalous) network input and its anomaly mask.
    """
    a = augment_config
    if rng.random() < a.rotate_prob:
        image = augment.rotate_normal(rng, image, max_angle=a.rotate_angle)
    if fmas is not None:
        if rng.random() < no_anomaly_prob:
            return image, image, np.zeros(image.shape[:2], np.float32)
        k = int(rng.integers(len(fmas[0])))
        target = images[fmas[2][k]]
        return target, fmas[0][k], fmas[1][k].astype(np.float32)
    texture = data.textures.get(int(rng.integers(len(data.textures))))
    anomalous, mask = augment.draem_anomaly(
        rng,
        image,
        texture,
        **augment.draem_options(a),
        no_anomaly_prob=no_anomaly_prob,
    )
    return image, anomalous, mask.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The method.


class Draem(Method):
    """DRAEM / DRAEM+WDAM for the shared loop (see the module docstring).

    Args:
      config: the experiment config (``configs/draem*.py``).
    """

    name = "draem"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        t = config.train
        if t.epochs <= 0 or t.batch_size <= 0:
            raise ValueError(
                f"config.train.epochs={t.epochs}, batch_size={t.batch_size}: both must be > 0."
            )
        if config.data.val_fraction > 0 and t.eval_every <= 0:
            raise ValueError(
                f"config.data.val_fraction={config.data.val_fraction} holds images out for "
                "validation but config.train.eval_every=0 never validates; set eval_every > 0 "
                "or val_fraction=0."
            )

    @functools.cached_property
    def data(self) -> DraemData:
        return DraemData(self.config)

    @property
    def steps_per_epoch(self) -> int:
        """``ceil(N / batch_size)``, as DRAEM's DataLoader (``drop_last=False``)."""
        return math.ceil(len(self.data.images) / self.config.train.batch_size)

    @property
    def total_steps(self) -> int:
        return self.config.train.epochs * self.steps_per_epoch

    def create_model(self, *, abstract: bool = False) -> DraemNet:
        m = self.config.model
        model = nnx.eval_shape(
            lambda: DraemNet(
                recon_width=m.recon_width,
                disc_width=m.disc_width,
                wdam_blocks=tuple(m.wdam_blocks),
                wdam_reduction=m.wdam_reduction,
                rngs=nnx.Rngs(0),
            )
        )
        if not abstract:
            _fill_random(model, np.random.default_rng([self.config.seed, 7]))
        fill_untrained(model, 0.0)  # WDAM's sub-band weights (a diagnostic)
        return model

    def optimizer(self) -> optax.GradientTransformation:
        """Adam, ``train.lr`` times ``train.lr_decay`` at each ``train.lr_milestones`` fraction
        of the run (DRAEM's MultiStepLR at epochs 0.8 E and 0.9 E, here in steps)."""
        t = self.config.train
        boundaries = {int(f * t.epochs) * self.steps_per_epoch: t.lr_decay for f in t.lr_milestones}
        return optax.adam(optax.piecewise_constant_schedule(t.lr, boundaries))

    def batch(self, step: int, *, part: int = 0, parts: int = 1) -> Batch:
        """``image`` (targets), ``augmented`` (inputs) ``[b, S, S, 3]`` and ``mask``
        ``[b, S, S]`` of part ``part`` of ``parts`` (``b = B / parts``); a pure function of
        ``(seed, step)``."""
        t, data = self.config.train, self.data
        positions, idx = pipeline.part_indices(
            step,
            num_examples=len(data.images),
            batch_size=t.batch_size,
            seed=self.config.seed,
            part=part,
            parts=parts,
        )
        samples = [
            synthesize(
                np.random.default_rng([self.config.seed, step, i]),
                data.images[j],
                data,
                self.config.augment,
                fmas=data.fmas,
                images=data.images,
                no_anomaly_prob=self.config.augment.no_anomaly_prob,
            )
            for i, j in zip(positions, idx, strict=True)
        ]
        image, augmented, mask = (
            np.stack(x).astype(np.float32) for x in zip(*samples, strict=True)
        )
        return {"image": image, "augmented": augmented, "mask": mask}

    def loss(
        self, model: DraemNet, batch: Mapping[str, jax.Array], *, step: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``L2 + (1 - SSIM) + Focal`` (key unused: augmentation is host-side)."""
        del step, key
        c = self.config.loss
        out = model(batch["augmented"], train=True)
        rec, target = out["reconstruction"].astype(jnp.float32), batch["image"]
        l2 = jnp.mean((rec - target) ** 2)
        ssim = 1.0 - jnp.mean(ssim_map(rec, target, window=c.ssim_window, sigma=c.ssim_sigma))
        probs = jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)
        focal = focal_loss(probs, batch["mask"], gamma=c.focal_gamma)
        return l2 + ssim + focal, {"l2": l2, "ssim": ssim, "focal": focal}

    # ---- validation

    @functools.cached_property
    def validation_set(self) -> tuple[np.ndarray, np.ndarray]:
        """``(images [2V, S, S, 3], masks [2V, S, S] bool)``: the V held-out images, then each
        with one synthetic anomaly (redrawn, deterministically, until its mask is not empty)."""
        data = self.data
        normals, anomalous, masks = [], [], []
        for v, image in enumerate(data.val_images):
            for attempt in range(100):
                rng = np.random.default_rng([self.config.seed, 314159, v, attempt])
                fmas = data.val_fmas
                _, x, m = synthesize(
                    rng, image, data, self.config.augment, fmas=fmas,
                    images=data.val_images, no_anomaly_prob=0.0,
                )  # fmt: skip
                if m.any():
                    break
            normals.append(image)
            anomalous.append(x)
            masks.append(m > 0.5)
        zeros = np.zeros((len(normals), *data.val_images.shape[1:3]), bool)
        return np.stack(normals + anomalous), np.concatenate([zeros, np.stack(masks)])

    @functools.cached_property
    def test_split(self) -> datasets.Split:
        return load_split(self.config.data, split="test")

    def validate(self, model: DraemNet, *, step: int) -> dict[str, float]:
        """Learning-curve scalars, logged every ``train.eval_every`` steps.

        ``val/*``: image and pixel AUROC (and their mean, the score ``train.select_metric``
        keeps the best checkpoint by) on the held-out training images and their synthetic
        anomalies. ``test/*``: the same on the TEST split at the model's input resolution, a
        diagnostic curve only (does training help detection?), never used to select a
        checkpoint or a hyperparameter.
        """
        out = {}
        if len(self.data.val_images):
            images, masks = self.validation_set
            scores = self.score(model, {}, images, step=step)
            i_auroc = metrics.auroc(scores.image_scores, masks.any(axis=(1, 2)))
            p_auroc = metrics.auroc(scores.maps.reshape(-1), masks.reshape(-1))
            out |= {
                "val/i_auroc": i_auroc,
                "val/p_auroc": p_auroc,
                "val/mean_auroc": (i_auroc + p_auroc) / 2,
            }
        test = self.test_split
        scores = self.score(model, {}, test.images, step=step)
        out["test/i_auroc"] = metrics.auroc(scores.image_scores, test.labels)
        out["test/p_auroc"] = metrics.pixel_auroc(scores.maps, test.masks)
        return out

    # ---- scoring

    def scorer(self, model: DraemNet, fitted: Fitted, *, step: int) -> Scorer:
        """The anomaly channel of the discriminative network and its pooled maximum (see the
        module docstring); no fitted statistics."""
        del fitted, step
        graphdef, state = nnx.split(model)
        return Scorer(scoring_fn(graphdef, self.config.score.pool_size), state)
