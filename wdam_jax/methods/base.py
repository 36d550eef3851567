"""The method contract: what every method (CutPaste, PatchCore, DRAEM, ...) gives the shared loop.

A method is a class built as ``cls(config)`` and registered by name in
:mod:`wdam_jax.methods.registry`. The loop (:mod:`wdam_jax.train`) and the evaluation
(:mod:`wdam_jax.evaluate`) only ever talk to a method through this class, so adding a method never
edits either of them. ``docs/design.md`` walks through adding one.

Life of a run, and which hook is called where:

1. ``create_model()`` builds the network at step 0 (``abstract=True``: shapes only, to restore a
   checkpoint into). Its ``nnx.Param`` and ``nnx.BatchStat`` variables are the trained state.
2. For ``step`` in ``[0, total_steps)``: ``batch(step, part=, parts=)`` (host, numpy, a pure
   function of ``(config.seed, step)``; ``parts > 1`` in a multi-host run) and ``loss(model,
   batch, step=, key=)`` (traced, jit-compiled) with ``optimizer()``. Every
   ``config.train.eval_every`` steps the loop calls ``validate(model, step=)`` and logs what it
   returns. A gradient-free method has ``total_steps == 0``.
3. After the last step, ``fit(model, train_images, step=)`` computes statistics of the normal
   training images that scoring needs (PatchCore's memory bank, CutPaste's Gaussian density);
   they are checkpointed with the final state (orbax item ``fitted``).
4. ``scorer(model, fitted, step=)`` gives the method's scoring as one pure JAX function and its
   arrays (:class:`~wdam_jax.components.scoring.Scorer`). ``score`` runs it over batches
   (evaluation, prediction, validation curves) and ``inference_fn`` closes it over its arrays
   (export): one scoring path, so the exported model scores as the evaluated one. A method
   whose score needs host work (PatchCore's ensemble over the evaluated set) overrides
   ``score`` and ``inference_fn`` instead.

Everything a method returns is numpy on the host; everything it receives from the loop is the
model (an ``nnx.Module``) and arrays.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from wdam_jax.components.scoring import Scorer
from wdam_jax.data import sources, tiling

Batch = dict[str, np.ndarray]
# Statistics fitted on normal training images after training (name -> array), e.g. PatchCore's
# ``bank`` [M, D] or CutPaste's Gaussian ``mean`` [D] / ``precision`` [D, D].
Fitted = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ImageScores:
    """What :meth:`Method.score` returns for ``N`` images of size ``S x S``.

    Attributes:
      image_scores: ``[N]`` float, higher is more anomalous.
      maps: ``[N, S, S]`` float anomaly maps at the model's input resolution (the evaluation
        resizes them to each ground truth's original resolution); from a tiled
        :meth:`Method.score_images`, ``[N, H, W]`` at the original resolution.
    """

    image_scores: np.ndarray
    maps: np.ndarray

    def __post_init__(self):
        n = len(self.image_scores)
        if np.ndim(self.image_scores) != 1 or np.ndim(self.maps) != 3 or len(self.maps) != n:
            raise ValueError(
                f"ImageScores: need image_scores [N] and maps [N, S, S], got "
                f"{np.shape(self.image_scores)} and {np.shape(self.maps)}."
            )


class Method(abc.ABC):
    """Base class of every method; see the module docstring for when each hook runs.

    Subclasses set ``name`` (the registry key, ``config.method``) and implement the abstract
    members. The hooks with a body here are optional: the default is what a method without that
    stage needs.

    Config fields the loop reads (every method's config has them): ``method``, ``seed``,
    ``data.*`` (see :func:`wdam_jax.data.sources.load_split`), ``train.batch_size``,
    ``train.log_every``, ``train.checkpoint_every``, ``train.keep_checkpoints``,
    ``train.eval_every`` (0: never), ``score.eval_batch_size``, ``score.num_figures``.
    """

    name: ClassVar[str]

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # ---- inputs

    def check_inputs(self) -> list[str]:
        """Problems with the run's inputs (data, weights, synthetic data, ...), found before any
        model is built; each names the config field and the value that fixes or disables it.
        The loop reports all of them at once. Default: the data source's checks."""
        return sources.check(self.config.data)

    # ---- training

    @property
    @abc.abstractmethod
    def total_steps(self) -> int:
        """Number of gradient steps of the run (0 for a gradient-free method)."""

    @abc.abstractmethod
    def create_model(self, *, abstract: bool = False) -> nnx.Module:
        """The model at step 0, initialised from ``config.seed``; shapes only if ``abstract``.

        Variables other than ``nnx.Param`` / ``nnx.BatchStat`` must be concrete either way."""

    def optimizer(self) -> optax.GradientTransformation:
        """The optimiser over the model's ``nnx.Param`` state. Default: no updates (for a
        gradient-free method, which has no steps)."""
        return optax.set_to_zero()

    def batch(self, step: int, *, part: int = 0, parts: int = 1) -> Batch:
        """Part ``part`` of ``parts`` of batch ``step``: name -> ``[rows, ...]`` numpy arrays.

        The ``train.batch_size`` examples of the step are split into ``parts`` equal contiguous
        blocks (:func:`wdam_jax.data.pipeline.part_indices`) and only block ``part``'s rows are
        built: a multi-host run has each process build its own. Each example's rows are a pure
        function of ``(seed, step, example index)``, so the parts together hold the rows of the
        whole batch (``parts=1``) whatever ``parts`` is; a loss that is a mean over rows is
        therefore the same (up to summation order).
        """
        raise NotImplementedError(f"{type(self).__name__} has no training steps.")

    def loss(
        self, model: nnx.Module, batch: Mapping[str, jax.Array], *, step: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss and scalar metrics of one batch, the model in training mode (traced)."""
        raise NotImplementedError(f"{type(self).__name__} has no training steps.")

    def validate(self, model: nnx.Module, *, step: int) -> dict[str, float]:
        """Scalars logged every ``config.train.eval_every`` steps (e.g. validation AUROC).

        Must not change the model. Default: nothing."""
        del model, step
        return {}

    # ---- scoring

    def train_images(self) -> np.ndarray:
        """The normal training images ``[N, S, S, 3]`` that :meth:`fit` sees (default: the train
        split of ``config.data`` through the shared loader)."""
        return sources.load_split(self.config.data, split="train").images

    def fit(self, model: nnx.Module, train_images: np.ndarray, *, step: int) -> Fitted:
        """Statistics of the normal training images ``[N, S, S, 3]`` that :meth:`score` needs.

        Default: none (the model alone scores)."""
        del model, train_images, step
        return {}

    def scorer(self, model: nnx.Module, fitted: Fitted, *, step: int) -> Scorer:
        """The method's scoring as one pure function and its arrays (:class:`Scorer`): what
        :meth:`score` (evaluation, prediction, validation) and :meth:`inference_fn` (export)
        both run, so the exported model scores as the evaluated one by construction.

        Args:
          model: the model restored at ``step``.
          fitted: what :meth:`fit` returned for it.
          step: the step the model was trained to (a method may change its network by stage).
        """
        del model, fitted, step
        raise NotImplementedError(
            f"Method {self.name!r} has no scorer: implement Method.scorer (a pure JAX form of "
            "its scoring), or override score (and inference_fn to export it)."
        )

    def score(
        self, model: nnx.Module, fitted: Fitted, images: np.ndarray, *, step: int
    ) -> ImageScores:
        """Image scores and anomaly maps of ``images`` ``[N, S, S, 3]`` in [0, 1], preprocessed
        as the training images (``config.data.image_size``). Default: :meth:`scorer` over
        batches of ``score.eval_batch_size``."""
        run = self.scorer(model, fitted, step=step)
        return ImageScores(*run(images, batch_size=self.config.score.eval_batch_size))

    def score_images(
        self, model: nnx.Module, fitted: Fitted, images: np.ndarray, *, step: int
    ) -> ImageScores:
        """Scores of whole images: :meth:`score` without tiling; with ``data.tile_size`` set,
        each image ``[H, W, 3]`` at its original resolution is cut into tiles
        (:mod:`wdam_jax.data.tiling`), its tiles go through :meth:`score` (in its fixed-size
        batches: one image's tiles at a time, never a whole-image feature tensor), and the tile
        maps are stitched back to ``[H, W]``. What evaluation, thresholds, prediction and
        validation call; a method implements only :meth:`score` / :meth:`scorer`.

        Returns:
          ``ImageScores`` with maps ``[N, H, W]`` (tiled) or ``[N, S, S]`` (not tiled).
        """
        tiles = tiling.from_config(self.config.data)
        if tiles is None:
            return self.score(model, fitted, images, step=step)
        scores, maps = [], []
        for image in images:
            corners = tiling.grid(*image.shape[:2], size=tiles.size, stride=tiles.stride)
            cut = tiling.cut(image, corners, size=tiles.size, input_size=tiles.input_size)
            out = self.score(model, fitted, cut, step=step)
            stitched = tiling.stitch(out.maps, corners, size=tiles.size, shape=image.shape[:2])
            scores.append(tiling.image_score(stitched, out.image_scores, how=tiles.image_score))
            maps.append(stitched)
        return ImageScores(np.asarray(scores, np.float32), np.stack(maps))

    def inference_fn(
        self, model: nnx.Module, fitted: Fitted, *, step: int
    ) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
        """:meth:`score` as one pure JAX function, for export (``jax.export``, TF).

        Returns a jittable ``images [B, S, S, 3] -> (image_scores [B], maps [B, S, S])`` with the
        model and the fitted statistics closed over as constants, equal to :meth:`score` within
        1e-5 and traceable with a symbolic batch size ``B`` (``jax.export.symbolic_shape``).
        Default: :meth:`scorer`'s function (a method without one cannot be exported).
        """
        return self.scorer(model, fitted, step=step).inference_fn()

    # ---- optional extras

    def backbone(self, model: nnx.Module, *, step: int) -> nnx.Module | None:
        """The feature backbone as trained at ``step`` (for PatchCore's ensemble), or None."""
        del model, step
        return None


def describe(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A short, human-readable identity of a run (method + where WDAM sits), for tables and
    figures: ``cutpaste+wdam1``, ``draem+wdam123``, ``patchcore``."""
    model = config.get("model", ml_collections.ConfigDict())
    wdam = tuple(model.get("wdam_layers", ()) or model.get("wdam_blocks", ()) or ())
    label = config.method + (f"+wdam{''.join(map(str, wdam))}" if wdam else "")
    return {"method": config.method, "wdam_layers": wdam, "label": label}
