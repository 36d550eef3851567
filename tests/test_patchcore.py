"""Tests of the PatchCore functions against numpy / scipy references and their properties."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch
from flax import nnx

from configs import patchcore as patchcore_config
from configs import patchcore_wdam as patchcore_wdam_config
from wdam_jax import checkpoints, filters, metrics, runs
from wdam_jax.errors import ConfigError
from wdam_jax.methods import patchcore as pc
from wdam_jax.methods import patchcore_method
from wdam_jax.models import wide_resnet


def _brute_knn(bank, queries, k):
    d = np.sqrt(
        ((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    )
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


@pytest.mark.parametrize(
    ("num_bank", "num_q", "k", "bank_chunk", "query_chunk"),
    [
        (100, 37, 1, 32, 16),
        (100, 37, 5, 32, 16),
        (64, 10, 3, 64, 64),
        (7, 5, 7, 3, 2),
        (50, 9, 1, 128, 4),
    ],
)
def test_knn_matches_brute_force(num_bank, num_q, k, bank_chunk, query_chunk):
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((num_bank, 24)).astype(np.float32)
    queries = rng.standard_normal((num_q, 24)).astype(np.float32)
    dist, idx = pc.knn_search(bank, queries, k=k, bank_chunk=bank_chunk, query_chunk=query_chunk)
    ref_d, ref_i = _brute_knn(bank, queries, k)
    chex.assert_shape(dist, (num_q, k))
    np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    np.testing.assert_allclose(
        np.asarray(pc.knn_scores(bank, queries, k=k)), ref_d, rtol=1e-4, atol=1e-4
    )


def test_knn_exact_match_distance_is_zero():
    rng = np.random.default_rng(1)
    # A large common offset (as ReLU features have) must not cost precision: the bank is centred.
    bank = rng.standard_normal((40, 16)).astype(np.float32) + 100.0
    dist = pc.knn_scores(bank, bank[::3], k=1)
    assert np.all(np.asarray(dist) >= 0)
    np.testing.assert_allclose(np.asarray(dist), 0.0, atol=2e-3)


def test_coreset_unique_deterministic_and_covers():
    rng = np.random.default_rng(0)
    # Clustered data, as patch features are: random selection misses small clusters.
    centres = rng.standard_normal((30, 256)) * 5
    feats = (centres[rng.integers(0, 30, 2000)] + rng.standard_normal((2000, 256))).astype(
        np.float32
    )
    key = jax.random.key(0)
    n = 60
    picks = np.asarray(pc.greedy_coreset(key, feats, n, steps_per_call=25))
    chex.assert_shape(picks, (n,))
    assert len(np.unique(picks)) == n
    np.testing.assert_array_equal(picks, np.asarray(pc.greedy_coreset(key, jnp.asarray(feats), n)))
    assert not np.array_equal(picks, np.asarray(pc.greedy_coreset(jax.random.key(1), feats, n)))
    radius = pc.coverage_radius(feats, picks)
    random_radii = [
        pc.coverage_radius(feats, np.random.default_rng(s).choice(2000, n, replace=False))
        for s in range(5)
    ]
    assert radius <= np.mean(random_radii)
    assert radius <= min(random_radii)


def test_coreset_unique_with_duplicate_rows_and_full_size():
    feats = np.repeat(np.eye(4, 8, dtype=np.float32), 5, axis=0)  # 20 rows, 4 distinct
    picks = np.asarray(pc.greedy_coreset(jax.random.key(3), feats, 20))
    np.testing.assert_array_equal(np.sort(picks), np.arange(20))
    # The first 4 picks are the 4 distinct rows (k-center on duplicates).
    assert len({tuple(feats[i]) for i in picks[:4]}) == 4


def _max_intermediate_size(jaxpr):
    """Largest number of elements of any value a jaxpr (or a loop / jit body inside it) makes."""
    size = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            size = max(size, int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                size = max(size, _max_intermediate_size(getattr(inner, "jaxpr", inner)))
    return size


def test_coreset_and_knn_never_form_n_by_n():
    n, d = 4096, 256
    jaxpr = jax.make_jaxpr(pc._coreset_steps)(
        jnp.zeros((n, 128)), jnp.zeros(n), jnp.zeros(n), jnp.zeros(64, jnp.int32),
        jnp.int32(0), jnp.int32(64),
    )  # fmt: skip
    # Inside the loop only [N] vectors are made (the [N, 128] projection is an input).
    assert _max_intermediate_size(jaxpr.jaxpr) == n
    jaxpr = jax.make_jaxpr(lambda b, c, s, q: pc._knn_block(b, c, s, q, k=3, bank_chunk=512))(
        jnp.zeros((n, d)), jnp.zeros(d), jnp.zeros(n), jnp.zeros((256, d))
    )
    # The largest block is one query chunk x one bank chunk, whatever the bank size.
    assert _max_intermediate_size(jaxpr.jaxpr) == 256 * 512


def test_coreset_compiles_once_across_calls():
    pc._coreset_steps.clear_cache()
    feats = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    pc.greedy_coreset(jax.random.key(0), feats, 50, steps_per_call=7)
    pc.greedy_coreset(jax.random.key(1), feats, 50, steps_per_call=7)
    assert pc._coreset_steps._cache_size() == 1


def test_adaptive_pool_matches_torch():
    x = np.random.default_rng(0).standard_normal((3, 1536)).astype(np.float32)
    for out in (1024, 512, 3072, 700):
        ref = torch.nn.functional.adaptive_avg_pool1d(torch.from_numpy(x)[:, None], out)[:, 0]
        np.testing.assert_allclose(
            np.asarray(pc.adaptive_avg_pool_last(x, out)), ref.numpy(), atol=1e-5
        )


def test_patch_features_shapes_and_reference():
    rng = np.random.default_rng(0)
    l2 = rng.standard_normal((2, 8, 8, 32)).astype(np.float32)
    l3 = rng.standard_normal((2, 4, 4, 64)).astype(np.float32)
    feats = pc.patch_features(l2, l3, pretrain_dim=48, target_dim=40)
    chex.assert_shape(feats, (2, 8, 8, 40))
    chex.assert_type(feats, jnp.float32)
    # Reference with torch ops: zero-padded 3x3 average, bilinear (align_corners=False) upsampling.
    t2 = torch.nn.functional.avg_pool2d(torch.from_numpy(l2).permute(0, 3, 1, 2), 3, 1, 1)
    t3 = torch.nn.functional.avg_pool2d(torch.from_numpy(l3).permute(0, 3, 1, 2), 3, 1, 1)
    t3 = torch.nn.functional.interpolate(t3, size=(8, 8), mode="bilinear", align_corners=False)
    per = [
        torch.nn.functional.adaptive_avg_pool1d(
            t.permute(0, 2, 3, 1).reshape(-1, 1, t.shape[1]), 48
        )
        for t in (t2, t3)
    ]
    ref = torch.nn.functional.adaptive_avg_pool1d(torch.cat(per, dim=-1), 40).reshape(2, 8, 8, 40)
    np.testing.assert_allclose(np.asarray(feats), ref.numpy(), atol=1e-5)


def test_gaussian_blur_matches_scipy():
    x = np.random.default_rng(0).random((2, 40, 33)).astype(np.float32)
    ref = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4.0) for m in x])
    np.testing.assert_allclose(np.asarray(filters.gaussian_blur(x, sigma=4.0)), ref, atol=1e-5)
    maps = pc.anomaly_maps(x[:, :8, :8], image_size=(32, 32))
    chex.assert_shape(maps, (2, 32, 32))
    # Maps smaller than the kernel radius (16 px) reflect more than once, as scipy does.
    small = x[:, :5, :7]
    ref = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4.0) for m in small])
    np.testing.assert_allclose(np.asarray(filters.gaussian_blur(small, sigma=4.0)), ref, atol=1e-5)
    ref = np.stack([scipy.ndimage.gaussian_filter(m, sigma=1.5, truncate=3.0) for m in x])
    got = filters.gaussian_blur(x, sigma=1.5, truncate=3.0)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


@pytest.mark.parametrize("num_queries", [1, 7, 2049, 6272])
def test_knn_search_query_chunks_cover_every_query(num_queries):
    rng = np.random.default_rng(num_queries)
    bank = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((num_queries, 16)).astype(np.float32)
    dist, index = pc.knn_search(bank, queries, k=1, query_chunk=2048, bank_chunk=64)
    full = ((queries[:, None, :] - bank[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(index)[:, 0], full.argmin(1))
    np.testing.assert_allclose(np.asarray(dist)[:, 0], np.sqrt(full.min(1)), rtol=1e-4, atol=1e-4)


def test_reweighting_matches_numpy():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((50, 8)).astype(np.float32)
    feats = rng.standard_normal((3, 20, 8)).astype(np.float32)
    dist, idx = pc.knn_search(bank, feats.reshape(-1, 8), k=1)
    dist, idx = np.asarray(dist).reshape(3, 20), np.asarray(idx).reshape(3, 20)
    got = np.asarray(pc.reweighted_image_scores(bank, feats, dist, idx, num_neighbors=4))
    for b in range(3):
        j = dist[b].argmax()
        m_test, m_star = feats[b, j], bank[idx[b, j]]
        support = np.argsort(np.linalg.norm(bank - m_star, axis=1))[:4]
        d = np.linalg.norm(bank[support] - m_test, axis=1)
        w = 1 - np.exp(d[0]) / np.exp(d).sum()
        np.testing.assert_allclose(got[b], w * dist[b, j], rtol=1e-4)
    # b = 1: the unweighted maximum.
    np.testing.assert_allclose(
        np.asarray(pc.reweighted_image_scores(bank, feats, dist, idx, num_neighbors=1)), dist.max(1)
    )
    # Large distances do not overflow.
    big = np.asarray(pc.reweighted_image_scores(bank * 1e3, feats * 1e3, dist * 1e3, idx))
    assert np.all(np.isfinite(big))


def _reference_map(patch, size, sigma=4.0):
    """patchcore-inspection's ``RescaleSegmentor``: torch bilinear upsampling (align_corners=False),
    then ``scipy.ndimage.gaussian_filter``; ``patch`` ``[h, w]``."""
    up = torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(patch, np.float32))[None, None], size=size, mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()  # fmt: skip
    return scipy.ndimage.gaussian_filter(up, sigma=sigma)


@pytest.mark.parametrize("scoring", pc.SCORINGS)
def test_score_patches_matches_its_reference_formula(scoring):
    """Scoring "official": max patch score of SQUARED L2 distances (faiss IndexFlatL2 and
    PatchMaker.score), maps from the squared distances; "anomalib": w s* on Euclidean distances,
    Euclidean maps. Both written here in numpy from brute-force distances, the maps as the
    official code makes them."""
    rng = np.random.default_rng(3)
    bank = rng.standard_normal((60, 8)).astype(np.float32)
    feats = rng.standard_normal((3, 6, 6, 8)).astype(np.float32)
    scores, maps = pc.score_patches(
        bank, feats, image_size=(24, 24), scoring=scoring, num_neighbors=4
    )
    flat = feats.reshape(3, 36, 8).astype(np.float64)
    sq = ((flat[:, :, None, :] - bank[None, None].astype(np.float64)) ** 2).sum(-1)  # [3, 36, 60]
    nearest_sq, nearest = sq.min(-1), sq.argmin(-1)
    for b in range(3):
        if scoring == "official":
            patch, expected = nearest_sq[b], nearest_sq[b].max()
        else:
            patch = np.sqrt(nearest_sq[b])
            j = patch.argmax()
            m_test, m_star = flat[b, j], bank[nearest[b, j]].astype(np.float64)
            support = np.argsort(((bank - m_star) ** 2).sum(1))[:4]
            d = np.sqrt(((bank[support] - m_test) ** 2).sum(1))
            expected = (1 - np.exp(d[0]) / np.exp(d).sum()) * patch[j]
        np.testing.assert_allclose(float(scores[b]), expected, rtol=1e-4)
        ref = _reference_map(patch.reshape(6, 6), (24, 24))
        np.testing.assert_allclose(np.asarray(maps[b]), ref, rtol=1e-4, atol=1e-4 * ref.max())
    with pytest.raises(ValueError, match="scoring='max'"):
        pc.score_patches(bank, feats, image_size=(24, 24), scoring="max")


def test_scoring_default_is_official_and_old_runs_keep_anomalib():
    for module in (patchcore_config, patchcore_wdam_config):
        config = module.get_config()
        assert patchcore_method.scoring(config) == "official"
        del config.patchcore["scoring"]  # a run recorded before the field existed
        assert patchcore_method.scoring(config) == "anomalib"


def test_identical_training_images_score_zero_and_bank_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    train = np.tile(rng.standard_normal((1, 6, 6, 16)).astype(np.float32), (4, 1, 1, 1))
    flat = train.reshape(-1, 16)
    # 36 distinct patches x 4 images: a 40-row k-center coreset covers every distinct patch.
    picks = pc.greedy_coreset(jax.random.key(0), flat, 40)
    bank = flat[np.asarray(picks)]
    scores, maps = pc.score_patches(bank, train[:2], image_size=(24, 24))
    np.testing.assert_allclose(np.asarray(scores), 0.0, atol=1e-2)
    np.testing.assert_allclose(np.asarray(maps), 0.0, atol=1e-2)
    test = train[:2] + rng.standard_normal(train[:2].shape).astype(np.float32)
    scores, maps = pc.score_patches(bank, test, image_size=(24, 24))
    assert np.all(np.asarray(scores) > 0.5)
    path = pc.save_bank(tmp_path / "bank", bank, image_mean=1.5, member="plain")
    bank2, meta = pc.load_bank(path)
    assert meta == {"image_mean": 1.5, "member": "plain"}
    scores2, maps2 = pc.score_patches(bank2, test, image_size=(24, 24))
    np.testing.assert_array_equal(np.asarray(scores2), np.asarray(scores))
    np.testing.assert_array_equal(np.asarray(maps2), np.asarray(maps))
    with pytest.raises(FileNotFoundError, match="fit first"):
        pc.load_bank(tmp_path / "missing.npz")


def test_ensemble_standardises_members():
    s1, m1 = np.array([1.0, 3.0]), np.ones((2, 4, 4))
    s2, m2 = np.array([10.0, 30.0]), np.full((2, 4, 4), 5.0)
    st1 = {"image_mean": 1.0, "image_std": 1.0, "pixel_mean": 0.0, "pixel_std": 1.0}
    st2 = {"image_mean": 10.0, "image_std": 10.0, "pixel_mean": 0.0, "pixel_std": 5.0}
    scores, maps = pc.ensemble_scores([(s1, m1), (s2, m2)], [st1, st2])
    np.testing.assert_allclose(np.asarray(scores), [0.0, 2.0])
    np.testing.assert_allclose(np.asarray(maps), 1.0)
    stats = pc.normalisation_stats(s2, m2)
    assert stats["image_mean"] == 20.0 and stats["pixel_std"] == 0.0


class _TinyBackbone(nnx.Module):
    """Two strided convolutions standing in for WRN50-2's layer2 / layer3 (strides 8 and 16)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv2 = nnx.Conv(3, 8, (8, 8), strides=(8, 8), rngs=rngs)
        self.conv3 = nnx.Conv(8, 16, (2, 2), strides=(2, 2), rngs=rngs)

    def __call__(self, x, *, train=False):
        layer2 = jax.nn.relu(self.conv2(x))
        return {"layer2": layer2, "layer3": jax.nn.relu(self.conv3(layer2))}


def _tiny_method(**patchcore):
    config = patchcore_config.get_config("demo")
    config.patchcore.update(patchcore)
    return patchcore_method.PatchCore(config)


def test_end_to_end_fit_and_score_tiny_model():
    rng = np.random.default_rng(0)
    method = _tiny_method(pretrain_dim=16, target_dim=16, coreset_ratio=0.25)
    method.config.score.eval_batch_size = 4
    base = rng.random((1, 32, 32, 3)).astype(np.float32)
    train_images = np.clip(base + 0.01 * rng.standard_normal((6, 32, 32, 3)), 0, 1).astype(
        np.float32
    )
    test_images = np.concatenate([train_images[:2], train_images[:2]])
    masks = np.zeros((4, 32, 32), bool)
    test_images[2:, 8:16, 8:16] = 1.0 - test_images[2:, 8:16, 8:16]  # a defect
    masks[2:, 8:16, 8:16] = True
    model = patchcore_method.PatchCoreNet({"plain": _TinyBackbone(rngs=nnx.Rngs(0))})
    fitted = method.fit(model, train_images, step=0)
    chex.assert_shape(fitted["plain.bank"], (round(0.25 * 6 * 4 * 4), 16))
    scores = method.score(model, fitted, test_images, step=0)
    chex.assert_shape(scores.maps, (4, 32, 32))
    assert scores.image_scores[2:].min() > scores.image_scores[:2].max()
    result = metrics.evaluate_category(
        scores.image_scores, scores.maps, list(masks), np.array([0, 0, 1, 1])
    )
    assert result["i_auroc"] == 1.0


def test_configs_build_and_backbone_errors():
    for module in (patchcore_config, patchcore_wdam_config):
        for arg in (None, "demo"):
            config = module.get_config(arg)
            assert set(config.members) >= {"plain"} and config.method == "patchcore"
    wdam = patchcore_wdam_config.get_config()
    assert wdam.members.wdam.kind == "run" and tuple(wdam.members.wdam.wdam_layers) == (1,)
    assert wdam.data.image_size == 256 and not wdam.data.crop_size
    with pytest.raises(ValueError, match=r"members\.plain\.weights"):
        patchcore_method.load_member("plain", patchcore_config.get_config().members.plain, "a")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        member = wdam.members.wdam
        member.workdir = "/nonexistent/cutpaste_run"
        patchcore_method.load_member("wdam", member, "bottle")


def _fake_runs(tmp_path, categories):
    """Finished run directories: a recorded config and the backbone the loop writes at the end
    (a tiny random WideResNet, seeded by the category's position, so a loaded backbone tells
    which run it came from). Returns ``{category: conv1 kernel}``."""
    kernels = {}
    for seed, category in enumerate(categories):
        run = tmp_path / f"run_{category}"
        run.mkdir()
        (run / "config.json").write_text(
            json.dumps(
                {"model": {"depths": [1, 1, 1, 1], "base_width": 8}, "data": {"category": category}}
            )
        )
        backbone = wide_resnet.create(
            seed=seed, num_classes=None, depths=(1, 1, 1, 1), base_width=8
        )
        np.savez(run / checkpoints.BACKBONE_FILE, **wide_resnet.to_torchvision(backbone))
        kernels[category] = np.asarray(backbone.conv1.kernel[...])
    return kernels


def _conv1(model):
    return np.asarray(model.conv1.kernel[...])


def test_run_member_wdam_layers_must_match(tmp_path):
    _fake_runs(tmp_path, ["bottle"])
    member = patchcore_wdam_config.get_config().members.wdam
    member.workdir = str(tmp_path / "run_{category}")
    with pytest.raises(ValueError, match=r"WDAM in layers \(\), the config says \(1,\)"):
        patchcore_method.load_member("wdam", member, "bottle")
    member.wdam_layers = ()
    assert patchcore_method.load_member("wdam", member, "bottle").wdam_layers == ()


def test_a_run_without_its_backbone_names_the_command_that_writes_it(tmp_path):
    _fake_runs(tmp_path, ["bottle"])
    (tmp_path / "run_bottle" / checkpoints.BACKBONE_FILE).unlink()
    member = patchcore_wdam_config.get_config().members.wdam
    member.workdir = str(tmp_path / "run_{category}")
    member.wdam_layers = ()
    with pytest.raises(FileNotFoundError, match=r"no trained backbone.*python -m launch.train"):
        patchcore_method.load_member("wdam", member, "bottle")


def test_each_category_uses_its_own_finetuned_run(tmp_path):
    kernels = _fake_runs(tmp_path, ["bottle", "cable"])
    member = patchcore_wdam_config.get_config().members.wdam
    member.workdir = str(tmp_path / "run_{category}")
    member.wdam_layers = ()
    a = patchcore_method.load_member("wdam", member, "bottle")
    b = patchcore_method.load_member("wdam", member, "cable")
    np.testing.assert_array_equal(_conv1(a), kernels["bottle"])
    np.testing.assert_array_equal(_conv1(b), kernels["cable"])
    assert not np.array_equal(kernels["bottle"], kernels["cable"])


def test_a_member_run_of_another_category_is_refused(tmp_path):
    """A member path written by hand without {category} names one category's run for all."""
    kernels = _fake_runs(tmp_path, ["bottle"])
    config = patchcore_wdam_config.get_config()
    config.data.category = "cable"
    config.members.wdam.workdir = str(tmp_path / "run_bottle")
    config.members.wdam.wdam_layers = ()
    config.members.plain.allow_random_init = True
    with pytest.raises(ConfigError, match=r"run of category 'bottle', but this PatchCore run is "
                       r"for 'cable'.*\{category\}"):  # fmt: skip
        patchcore_method.load_member("wdam", config.members.wdam, "cable")
    problems = patchcore_method.PatchCore(config).check_inputs()
    assert any("run of category 'bottle'" in p for p in problems), problems
    # The same path for its own category is accepted.
    member = patchcore_method.load_member("wdam", config.members.wdam, "bottle")
    np.testing.assert_array_equal(_conv1(member), kernels["bottle"])


def _minmax_reference(members):
    """The official ensemble (patchcore-inspection run_patchcore.py), in numpy."""
    scores = np.array([s for s, _ in members], np.float64)
    lo, hi = scores.min(axis=-1).reshape(-1, 1), scores.max(axis=-1).reshape(-1, 1)
    scores = np.mean((scores - lo) / (hi - lo), axis=0)
    segs = np.array([m for _, m in members], np.float64)
    lo = segs.reshape(len(segs), -1).min(axis=-1).reshape(-1, 1, 1, 1)
    hi = segs.reshape(len(segs), -1).max(axis=-1).reshape(-1, 1, 1, 1)
    return scores, np.mean((segs - lo) / (hi - lo), axis=0)


def test_minmax_over_evaluated_set_matches_numpy():
    rng = np.random.default_rng(0)
    members = [(rng.gamma(2.0, 3.0, 5), rng.gamma(1.0, 10.0, (5, 6, 6))) for _ in range(2)]
    scores, maps = pc.minmax_ensemble_scores(members)
    ref_scores, ref_maps = _minmax_reference(members)
    np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(maps), ref_maps, rtol=1e-5, atol=1e-6)


def test_ensemble_normalisation_option_through_the_method(demo_data_root, tmp_path):
    """A two-member ensemble scored with each ``patchcore.normalisation``: the official protocol
    equals the numpy min-max of the members' own scores; the default is the training-image
    standardisation; an unknown value is named before anything runs."""
    from test_contract import tiny_config

    from wdam_jax import train
    from wdam_jax.data import sources
    from wdam_jax.methods import registry

    config = tiny_config("patchcore", demo_data_root)
    config.members.second = patchcore_config.member("imagenet")
    config.members.second.update(
        {"depths": (1, 1, 1, 1), "base_width": 8, "allow_random_init": True, "seed": 1}
    )
    assert config.patchcore.normalisation == "train_standardise"
    train.train(config, tmp_path / "run")
    run = runs.restore(tmp_path / "run")
    images = sources.load_split(config.data, split="test").images[:6]

    def method(normalisation=None):
        c = config.copy_and_resolve_references()
        c.patchcore.normalisation = normalisation or c.patchcore.normalisation
        return registry.get_method(c)

    singles = []
    for name in ("plain", "second"):
        c = config.copy_and_resolve_references()
        c.members = {name: config.members[name]}
        out = registry.get_method(c).score(run.model, run.fitted, images, step=0)
        singles.append((out.image_scores, out.maps))
    official = method("minmax_over_evaluated_set").score(run.model, run.fitted, images, step=0)
    ref_scores, ref_maps = _minmax_reference(singles)
    np.testing.assert_allclose(official.image_scores, ref_scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(official.maps, ref_maps, rtol=1e-4, atol=1e-5)
    default = method().score(run.model, run.fitted, images, step=0)
    stats = [
        {k: float(run.fitted[f"{n}.{k}"]) for k in patchcore_method.STAT_KEYS}
        for n in ("plain", "second")
    ]
    std_scores, _ = pc.ensemble_scores(singles, stats)
    np.testing.assert_allclose(default.image_scores, np.asarray(std_scores), rtol=1e-4)
    assert not np.allclose(default.image_scores, official.image_scores)
    problems = method("minmax").check_inputs()
    assert any("patchcore.normalisation='minmax'" in p for p in problems)


@pytest.mark.parametrize("boundary, mode", [("reflect", "reflect"), ("zero", "constant")])
def test_gaussian_matrix_matches_scipy_correlate(boundary, mode):
    from wdam_jax import filters

    signal = np.random.default_rng(1).random(13)
    offsets = tuple(range(-5, 5))  # an even window: DRAEM's offsets for window 10
    matrix = filters.gaussian_matrix(13, sigma=1.5, offsets=offsets, boundary=boundary)
    taps = np.exp(-0.5 * (np.asarray(offsets) / 1.5) ** 2)
    ref = scipy.ndimage.correlate1d(signal, taps / taps.sum(), mode=mode)
    np.testing.assert_allclose(matrix @ signal, ref, atol=1e-6)
    with pytest.raises(ValueError, match="boundary"):
        filters.gaussian_matrix(13, sigma=1.5, offsets=offsets, boundary="wrap")
