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

Files: the network in :mod:`wdam_jax.models.cutpaste`; the training data and batches in
:mod:`.data`; the densities and the scoring function in :mod:`.scoring`; the method's hooks here.
"""

from __future__ import annotations

import functools
import math
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from wdam_jax import batch_norm
from wdam_jax.components.scoring import Scorer, extract_features
from wdam_jax.data import anomaly_sources, datasets
from wdam_jax.data.sources import load_split
from wdam_jax.errors import ConfigError
from wdam_jax.methods.base import Fitted, Method
from wdam_jax.methods.cutpaste.data import (  # noqa: F401  (the method's public names)
    ANOMALY,
    CLASS_NAMES,
    NORMAL,
    SCAR,
    TrainData,
    load_train_data,
    make_batch,
)
from wdam_jax.methods.cutpaste.scoring import (  # noqa: F401
    IMAGE_SCORES,
    ScoreSettings,
    _train_forward,
    fit_densities,
    l2_normalize,
    pixel_features,
    score_features,
    scoring_fn,
    smooth_maps,
    whitened_densities,
)
from wdam_jax.models.cutpaste import (  # noqa: F401
    NUM_CLASSES,
    CutPasteNet,
    GatedWDAM,
    ProjectionLayer,
    WdamGate,
    create_model,
    set_wdam_gate,
    wdam_labels,
)
from wdam_jax.models.wide_resnet import WideResNet50_2
from wdam_jax.optim import staged

EPOCH_UNITS = ("pass", "cutpaste")
CUTPASTE_EPOCH_STEPS = 256  # CutPaste's epoch: 256 parameter updates
VAL_ACCURACY_BATCHES = 4  # fresh training-task batches behind val/accuracy_*


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
            """GDE scores, the configured image scores and the maps, from one scoring pass.
            Tiled (``data.tile_size``): whole images tile by tile, the configured score only
            (the GDE scores are then None)."""
            if self.config.data.get("tile_size", 0):
                tiled = self.score_images(model, fitted, images, step=step)
                return None, tiled.image_scores, tiled.maps
            gde_scores, maps = gde(images, batch_size=s.eval_batch_size)
            if s.image_score == "gde":
                return gde_scores, gde_scores, maps
            return gde_scores, maps.reshape(len(maps), -1).max(axis=1), maps  # "map_max"

        test = self.test_split
        gde_scores, image_scores, maps = scores(test.images)
        out = {
            "test/i_auroc": metrics.auroc(image_scores, test.labels),
            "test/p_auroc": metrics.pixel_auroc(maps, test.masks),
        }
        if gde_scores is not None:
            out["test/gde_i_auroc"] = metrics.auroc(gde_scores, test.labels)
        if self.validation_set is not None:
            images, masks = self.validation_set
            labels = masks.any(axis=(1, 2))
            gde_scores, image_scores, maps = scores(images)
            i_auroc = metrics.auroc(image_scores, labels)
            p_auroc = metrics.auroc(maps.reshape(-1), masks.reshape(-1))
            if gde_scores is not None:
                out["val/gde_i_auroc"] = metrics.auroc(gde_scores, labels)
            out |= {
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
