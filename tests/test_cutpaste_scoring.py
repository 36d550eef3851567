"""CutPaste's scoring functions (``score.*``), against scikit-learn and by construction."""

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from wdam_jax.methods import cutpaste


def test_l2_normalize_gives_unit_rows():
    x = np.random.default_rng(0).normal(size=(5, 4, 7)) * 30
    np.testing.assert_allclose(np.linalg.norm(cutpaste.l2_normalize(x), axis=-1), 1.0, rtol=1e-12)


def test_pixel_features_concatenates_at_the_first_layers_resolution():
    rng = np.random.default_rng(1)
    fine = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    coarse = np.full((2, 4, 4, 5), 2.5, np.float32)  # constant: bilinear upsampling keeps it
    out = cutpaste.pixel_features({"layer2": fine, "layer3": coarse}, ("layer2", "layer3"))
    assert out.shape == (2, 8, 8, 8)
    np.testing.assert_array_equal(out[..., :3], fine)
    np.testing.assert_allclose(out[..., 3:], 2.5, rtol=1e-6)


def _data(n=40, d=6, h=3):
    rng = np.random.default_rng(2)
    embed = rng.normal(size=(n, d))
    pixel = rng.normal(size=(n, h, h, d))
    return embed, pixel


def _fit_and_score(embed, pixel, **kwargs):
    """Fitted on the first 30 images, scored on the other 10 (the jnp scoring path)."""
    fitted = cutpaste.fit_densities(embed[:30], pixel[:30], normalize=False)
    densities = cutpaste.whitened_densities(fitted)
    return cutpaste.score_features(
        densities, embed[30:], pixel[30:], normalize=False, size=6, **kwargs
    )


def test_gde_image_score_matches_sklearn_ledoit_wolf():
    embed, pixel = _data()
    scores, maps = _fit_and_score(embed, pixel, image_score="gde", sigma=0.0)
    reference = np.sqrt(LedoitWolf().fit(embed[:30]).mahalanobis(embed[30:]))
    np.testing.assert_allclose(scores, reference, rtol=1e-6)
    assert maps.shape == (10, 6, 6)


def test_map_max_scores_each_image_by_its_maps_maximum():
    embed, pixel = _data()
    pixel[35, 1, 2] += 25.0  # one strongly anomalous location
    scores, maps = _fit_and_score(embed, pixel, image_score="map_max", sigma=1.0)
    np.testing.assert_allclose(scores, maps.reshape(10, -1).max(axis=1))
    assert np.argmax(scores) == 5


def test_unknown_image_score_is_an_error():
    embed, pixel = _data()
    fitted = cutpaste.fit_densities(embed, pixel, normalize=False)
    with pytest.raises(ValueError, match=r"score\.image_score"):
        cutpaste.score_features(
            cutpaste.whitened_densities(fitted),
            embed,
            pixel,
            normalize=False,
            image_score="max",
            size=6,
            sigma=0.0,
        )
