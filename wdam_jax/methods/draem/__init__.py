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

Files: the networks in :mod:`wdam_jax.models.draem`; the losses in :mod:`.losses`; the data
and sample synthesis in :mod:`.data`; the scoring function in :mod:`.scoring`; the hooks here.
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

from wdam_jax import metrics
from wdam_jax.components.scoring import Scorer, fill_untrained
from wdam_jax.data import datasets, pipeline
from wdam_jax.data.sources import load_split
from wdam_jax.methods.base import Batch, Fitted, Method
from wdam_jax.methods.draem.data import ANOMALY_SOURCES, DraemData, synthesize  # noqa: F401
from wdam_jax.methods.draem.losses import FOCAL_SMOOTH, focal_loss, ssim_map  # noqa: F401
from wdam_jax.methods.draem.scoring import pooled_max, scoring_fn  # noqa: F401
from wdam_jax.models.draem import Draem as DraemNet
from wdam_jax.models.draem import fill_random

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
            fill_random(model, np.random.default_rng([self.config.seed, 7]))
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
        scores = self.score_images(model, {}, test.images, step=step)
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
