"""The pruned exact kNN (``patchcore_index.PrunedBank``) against brute force (``knn_search``).

Brute force is the reference: the pruned search must return its indices (ties to the lowest
index) and its distances. Where two rows are within float32 rounding of the same distance the
two searches may legitimately disagree on which is nearer; :func:`_assert_same` then accepts
either row and checks the distance. Inputs built from small integers are exact in float32, so
there every index must match.
"""

import chex
import numpy as np
import pytest
from flax import nnx
from test_patchcore import _TinyBackbone

from configs import patchcore as patchcore_config
from wdam_jax.methods import patchcore as pc
from wdam_jax.methods import patchcore_index as pindex
from wdam_jax.methods import patchcore_method


def _assert_same(bank, queries, pruned, *, exact=False):
    d, i = (np.asarray(a) for a in pruned.knn_search(queries, k=1))
    d_ref, i_ref = (np.asarray(a) for a in pc.knn_search(bank, queries, k=min(2, len(bank))))
    chex.assert_shape((d, i), (len(queries), 1))
    assert d.dtype == np.float32 and i.dtype == np.int32
    scale = np.sum(np.square(np.asarray(queries, np.float64) - bank.mean(0)), axis=1)
    scale = scale + np.max(np.sum(np.square(bank - bank.mean(0)), axis=1))
    # Squared distances by the norm expansion are exact to ~sqrt(D) eps of the norms (not of the
    # distance), in brute force as here: compare squared distances against that scale.
    tol = 1e-5 * scale
    if len(bank) > 1 and not exact:
        near_tie = (np.square(d_ref[:, 1]) - np.square(d_ref[:, 0])) < tol
    else:
        near_tie = np.zeros(len(queries), bool)
    np.testing.assert_array_equal(i[~near_tie, 0], i_ref[~near_tie, 0])
    d2, d2_ref = np.square(d[:, 0].astype(np.float64)), np.square(d_ref[:, 0].astype(np.float64))
    assert np.all(np.abs(d2 - d2_ref) <= tol), np.max(np.abs(d2 - d2_ref) / tol)
    true = np.sum(np.square(np.asarray(queries, np.float64) - bank[i[:, 0]]), axis=1)
    assert np.all(np.abs(true - d2_ref) <= tol), np.max(np.abs(true - d2_ref) / tol)
    return pruned.last_stats


def _structured(rng, rows, dim=256, rank=12, clusters=30):
    """Low-rank clustered non-negative rows with a little full-rank noise (CNN-feature-like)."""
    centres = 3.0 * rng.normal(size=(clusters, rank))
    latent = centres[rng.integers(0, clusters, rows)] + rng.normal(size=(rows, rank))
    mix = rng.normal(size=(rank, dim))
    return (np.maximum(latent @ mix, 0) + 0.05 * rng.normal(size=(rows, dim))).astype(np.float32)


def test_structured_bank_equals_brute_force_and_skips_most_of_it():
    rng = np.random.default_rng(0)
    data = _structured(rng, 5000)
    bank, queries = data[:4000], data[4000:]
    pruned = pindex.PrunedBank.build(bank)
    stats = _assert_same(bank, queries, pruned)
    assert stats["fallback_fraction"] == 0.0
    assert stats["needed_fraction"] < 0.2  # the bound does prune here
    assert stats["scanned_fraction"] <= 1.0


def test_duplicated_rows_and_queries_on_the_bank_pick_the_lowest_index():
    rng = np.random.default_rng(1)
    base = np.round(4 * _structured(rng, 300, dim=64))  # few distinct distances: many ties
    bank = np.concatenate([base, base[::-1], base[:50]]).astype(np.float32)
    queries = np.concatenate([base[:200], base[:100] + 1.0]).astype(np.float32)
    pruned = pindex.PrunedBank.build(bank)
    _assert_same(bank, queries, pruned, exact=True)
    # Row j, 599 - j and 600 + j are bitwise equal, so their distances tie exactly.
    _, i = pruned.knn_search(base[:50], k=1)
    np.testing.assert_array_equal(np.asarray(i)[:, 0], np.arange(50))


def test_exact_ties_between_distinct_rows_go_to_the_lowest_index():
    rng = np.random.default_rng(2)
    dim = 16
    points = rng.integers(-8, 9, size=(200, dim)).astype(np.float32) * 2
    # Each query is the midpoint of two rows: exactly equidistant, in float32 too.
    pairs = rng.integers(0, 200, size=(300, 2))
    queries = (points[pairs[:, 0]] + points[pairs[:, 1]]) / 2
    pruned = pindex.PrunedBank.build(points)
    _assert_same(points, queries, pruned, exact=True)


def test_queries_far_from_the_bank():
    rng = np.random.default_rng(3)
    bank = _structured(rng, 2000, dim=128)
    direction = rng.normal(size=(64, 128)).astype(np.float32)
    far = bank.mean(0) + 1e3 * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    pruned = pindex.PrunedBank.build(bank)
    _assert_same(bank, far.astype(np.float32), pruned)
    _assert_same(bank, (bank[:64] * 50).astype(np.float32), pruned)


def test_unstructured_bank_scans_more_and_stays_correct():
    rng = np.random.default_rng(4)
    bank = rng.normal(size=(3000, 128)).astype(np.float32)
    queries = rng.normal(size=(1200, 128)).astype(np.float32)
    pruned = pindex.PrunedBank.build(bank)
    stats = _assert_same(bank, queries, pruned)
    # Gaussian rows in 128-d: no bound can skip much, so the search falls back to brute force,
    # and after 8 such chunks stops computing the bounds (the last 176 queries).
    assert stats["needed_fraction"] > 0.5 and stats["fallback_fraction"] == 1.0


@pytest.mark.parametrize("rows,dim", [(1, 8), (5, 8), (127, 32), (129, 40), (300, 300)])
def test_tiny_banks_and_narrow_features(rows, dim):
    rng = np.random.default_rng(rows)
    bank = rng.normal(size=(rows, dim)).astype(np.float32)
    queries = rng.normal(size=(37, dim)).astype(np.float32)
    pruned = pindex.PrunedBank.build(bank)
    assert pruned.directions.shape == (dim, min(63, dim))
    _assert_same(bank, queries, pruned)
    d, i = pruned.knn_search(np.zeros((0, dim), np.float32))
    chex.assert_shape((d, i), (0, 1))


def test_bound_is_a_lower_bound_and_saved_arrays_give_the_same_search():
    rng = np.random.default_rng(5)
    bank = _structured(rng, 700, dim=96)
    queries = _structured(rng, 50, dim=96)
    arrays = pindex.build_arrays(bank)
    directions = arrays["directions"].astype(np.float64)
    np.testing.assert_allclose(directions.T @ directions, np.eye(directions.shape[1]), atol=1e-6)
    assert sorted(arrays["order"]) == list(range(700))
    codes, residual = (np.asarray(a, np.float64) for a in pindex._codes(
        queries, arrays["center"], arrays["directions"]))  # fmt: skip
    lb = np.sum(np.square(codes[:, None] - arrays["codes"][None]), axis=2)
    lb += np.square(residual[:, None] - arrays["residual"][None])
    true = np.sum(np.square(queries[:, None].astype(np.float64) - bank[arrays["order"]]), axis=2)
    assert np.all(lb <= true * (1 + 1e-5) + 1e-3)
    loaded = pindex.PrunedBank.from_arrays(bank, arrays)
    a, b = loaded.knn_search(queries), pindex.PrunedBank.build(bank).knn_search(queries)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    # A centre saved by another backend (its mean rounded differently) still loads and searches
    # exactly: the codes keep the saved centre, the distances use this backend's mean.
    shifted = {**arrays, "center": arrays["center"] * np.float32(1 + 3e-7)}
    _assert_same(bank, queries, pindex.PrunedBank.from_arrays(bank, shifted))
    with pytest.raises(ValueError, match="another bank"):
        pindex.PrunedBank.from_arrays(bank[:-1] + 1, {**arrays})
    # k > 1 (the reweighting's N_b(m*)) is brute force's own answer.
    np.testing.assert_array_equal(
        np.asarray(loaded.knn_search(queries, k=5)[1]),
        np.asarray(pc.knn_search(bank, queries, k=5)[1]),
    )


@pytest.mark.parametrize("scoring", ["official", "anomalib"])
def test_patchcore_fit_and_score_equal_with_and_without_the_index(scoring):
    rng = np.random.default_rng(6)
    images = rng.random((12, 64, 64, 3)).astype(np.float32)
    model = patchcore_method.PatchCoreNet({"plain": _TinyBackbone(rngs=nnx.Rngs(0))})
    out = {}
    for on in (False, True):
        config = patchcore_config.get_config("demo")
        config.patchcore.update(
            pretrain_dim=16, target_dim=16, coreset_ratio=0.5, knn_index=on, scoring=scoring
        )
        method = patchcore_method.PatchCore(config)
        fitted = method.fit(model, images[:8], step=0)
        assert ("plain.index.codes" in fitted) == on
        out[on] = (fitted, method.score(model, fitted, images[8:], step=0))
        if on:  # a run fitted without the index (an old checkpoint) builds it on load
            old = {"plain.bank": fitted["plain.bank"].copy()}
            again = patchcore_method.PatchCore(config).score(model, old, images[8:], step=0)
            np.testing.assert_array_equal(again.image_scores, out[on][1].image_scores)
    np.testing.assert_array_equal(out[False][0]["plain.bank"], out[True][0]["plain.bank"])
    np.testing.assert_allclose(out[True][1].image_scores, out[False][1].image_scores, rtol=1e-6)
    np.testing.assert_allclose(out[True][1].maps, out[False][1].maps, rtol=1e-5, atol=1e-6)
