"""CutPaste's scoring (Sec. 4.2): Gaussian densities of the embedding (the image score) and of the
per-location features (the pixel map), fitted in numpy float64 to the normal training features
and scored by one jnp function (:func:`scoring_fn`) on every path: evaluation, prediction,
validation curves and export.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from wdam_jax.components import gaussian
from wdam_jax.filters import gaussian_blur
from wdam_jax.models.cutpaste import CutPasteNet

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
