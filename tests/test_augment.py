"""CutPaste, CutPaste-scar and DRAEM anomalies: geometry ranges, determinism, FM confinement."""

import math

import numpy as np
import pytest

from wdam_jax.data import augment

S = 96


@pytest.fixture
def image():
    return np.random.default_rng(123).random((S, S, 3)).astype(np.float32)


@pytest.fixture
def disk():
    yy, xx = np.mgrid[0:S, 0:S]
    return np.hypot(yy - 60, xx - 40) < 18  # off-centre object, ~11% of the image


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_cutpaste_area_and_aspect_ratio_in_range(image):
    areas, aspects = [], []
    for seed in range(150):
        out, mask = augment.cutpaste_with_mask(np.random.default_rng(seed), image)
        h, w = _bbox(mask)
        assert mask.sum() == h * w  # one full rectangle without a foreground mask
        areas.append(h * w / S**2)
        aspects.append(w / h)
        assert out.dtype == np.float32 and out.shape == image.shape
        np.testing.assert_array_equal(out[~mask], image[~mask])
    # Integer rounding of each side moves area and aspect by at most ~1 pixel per side.
    assert 0.02 * 0.85 <= min(areas) and max(areas) <= 0.15 * 1.15
    assert 0.3 * 0.85 <= min(aspects) and max(aspects) <= 3.3 * 1.15
    # Both aspect intervals are used and the area range is covered.
    assert min(aspects) < 0.6 and max(aspects) > 2.0
    assert min(areas) < 0.04 and max(areas) > 0.12


def test_cutpaste_pastes_a_patch_of_the_same_image(image):
    out, mask = augment.cutpaste_with_mask(np.random.default_rng(5), image, color_jitter=0.0)
    h, w = _bbox(mask)
    ys, xs = np.nonzero(mask)
    patch = out[ys.min() : ys.min() + h, xs.min() : xs.min() + w]
    found = any(
        np.array_equal(image[y : y + h, x : x + w], patch)
        for y in range(S - h + 1)
        for x in range(S - w + 1)
    )
    assert found


def test_cutpaste_is_deterministic_given_the_generator(image):
    a = augment.cutpaste(np.random.default_rng(9), image)
    b = augment.cutpaste(np.random.default_rng(9), image)
    c = augment.cutpaste(np.random.default_rng(10), image)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    s1 = augment.cutpaste_scar(np.random.default_rng(9), image)
    s2 = augment.cutpaste_scar(np.random.default_rng(9), image)
    np.testing.assert_array_equal(s1, s2)


def test_color_jitter_changes_the_patch_within_bounds(image):
    patch = image[:20, :20]
    jittered = augment.jitter_colors(np.random.default_rng(0), patch, 0.1)
    assert jittered.shape == patch.shape and not np.array_equal(jittered, patch)
    assert 0.0 <= jittered.min() and jittered.max() <= 1.0
    np.testing.assert_array_equal(augment.jitter_colors(np.random.default_rng(0), patch, 0), patch)


def test_scar_width_length_and_rotation(image):
    for seed in range(60):
        _, mask = augment.cutpaste_scar_with_mask(
            np.random.default_rng(seed), image, rotation=(0, 0)
        )
        h, w = _bbox(mask)
        assert 2 <= w <= 16 and 10 <= h <= 25 and mask.sum() == h * w
    for seed in range(60):
        rng = np.random.default_rng(seed)
        out, mask = augment.cutpaste_scar_with_mask(rng, image, rotation=(30, 45))
        # Rotation keeps the area (nearest-neighbour, within rounding) ...
        assert 2 * 10 * 0.6 <= mask.sum() <= 16 * 25 * 1.4
        np.testing.assert_array_equal(out[~mask], image[~mask])
    # ... and a rotated thin scar's box is wider than the scar itself.
    _, flat = augment.cutpaste_scar_with_mask(
        np.random.default_rng(1), image, width=(4, 4), length=(24, 24), rotation=(0, 0)
    )
    _, tilted = augment.cutpaste_scar_with_mask(
        np.random.default_rng(1), image, width=(4, 4), length=(24, 24), rotation=(45, 45)
    )
    assert _bbox(flat) == (24, 4)
    th, tw = _bbox(tilted)
    assert th == pytest.approx((24 + 4) / math.sqrt(2), abs=2)
    assert tw == pytest.approx((24 + 4) / math.sqrt(2), abs=2)


@pytest.mark.parametrize(
    "fn", [augment.cutpaste_with_mask, augment.cutpaste_scar_with_mask], ids=["cutpaste", "scar"]
)
def test_foreground_confinement(fn, image, disk):
    for seed in range(80):
        out, mask = fn(np.random.default_rng(seed), image, fg_mask=disk)
        assert mask.any(), seed
        assert not (mask & ~disk).any()
        np.testing.assert_array_equal(out[~disk], image[~disk])
    with pytest.raises(ValueError, match="empty"):
        fn(np.random.default_rng(0), image, fg_mask=np.zeros((S, S), bool))
    with pytest.raises(ValueError, match="shape"):
        fn(np.random.default_rng(0), image, fg_mask=np.ones((S, S + 1), bool))


# ---------------------------------------------------------------------------- DRAEM


def _draem_rand_perlin_2d_np(shape, res, angles):
    """DRAEM's rand_perlin_2d_np (perlin.py), with its random angles passed in."""

    def lerp_np(x, y, w):
        return (y - x) * w + x

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0 : res[0] : delta[0], 0 : res[1] : delta[1]].transpose(1, 2, 0) % 1
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile_grads(slice1, slice2):
        g = gradients[slice1[0] : slice1[1], slice2[0] : slice2[1]]
        return np.repeat(np.repeat(g, d[0], axis=0), d[1], axis=1)

    def dot(grad, shift):
        g = grid[: shape[0], : shape[1]]
        return (np.stack((g[..., 0] + shift[0], g[..., 1] + shift[1]), axis=-1) * grad).sum(-1)

    n00 = dot(tile_grads([0, -1], [0, -1]), [0, 0])
    n10 = dot(tile_grads([1, None], [0, -1]), [-1, 0])
    n01 = dot(tile_grads([0, -1], [1, None]), [0, -1])
    n11 = dot(tile_grads([1, None], [1, None]), [-1, -1])
    t = fade(grid[: shape[0], : shape[1]])
    return math.sqrt(2) * lerp_np(
        lerp_np(n00, n10, t[..., 0]), lerp_np(n01, n11, t[..., 0]), t[..., 1]
    )


@pytest.mark.parametrize("res", [(1, 1), (2, 8), (16, 4), (32, 32)])
def test_perlin_matches_draem_reference(res):
    shape = (64, 64)
    ours = augment.perlin_noise_2d(np.random.default_rng(3), shape, res)
    angles = 2 * math.pi * np.random.default_rng(3).random((res[0] + 1, res[1] + 1))
    np.testing.assert_allclose(ours, _draem_rand_perlin_2d_np(shape, res, angles), atol=1e-5)
    assert ours.dtype == np.float32 and np.abs(ours).max() <= math.sqrt(2)


def test_perlin_any_shape():
    noise = augment.perlin_noise_2d(np.random.default_rng(0), (50, 37), (4, 8))
    assert noise.shape == (50, 37) and np.isfinite(noise).all() and noise.std() > 0.05


def test_draem_anomaly_blend_and_mask(image):
    source = np.random.default_rng(1).random((40, 56, 3)).astype(np.float32)
    resized_source = None
    n_anomalous = 0
    for seed in range(30):
        out, mask = augment.draem_anomaly(
            np.random.default_rng(seed), image, source, augment_source=False, no_anomaly_prob=0.0
        )
        assert out.dtype == np.float32 and mask.dtype == bool and mask.shape == (S, S)
        np.testing.assert_array_equal(out[~mask], image[~mask])
        if not mask.any():
            continue
        n_anomalous += 1
        if resized_source is None:
            import skimage.transform

            resized_source = skimage.transform.resize(source, (S, S), order=1, anti_aliasing=True)
        # out = beta * I + (1 - beta) * A inside the mask, one beta in [0, 0.8] per image.
        a, i, o = resized_source[mask], image[mask], out[mask]
        beta = np.sum((o - a) * (i - a)) / np.sum((i - a) ** 2)
        assert -1e-4 <= beta <= 0.8 + 1e-4
        np.testing.assert_allclose(o, beta * i + (1 - beta) * a, atol=1e-4)
    assert n_anomalous > 20


def test_draem_anomaly_no_anomaly_and_foreground(image, disk):
    source = np.random.default_rng(1).random((S, S, 3)).astype(np.float32)
    out, mask = augment.draem_anomaly(np.random.default_rng(0), image, source, no_anomaly_prob=1.0)
    np.testing.assert_array_equal(out, image)
    assert not mask.any()
    hits = 0
    for seed in range(20):
        out, mask = augment.draem_anomaly(
            np.random.default_rng(seed), image, source, no_anomaly_prob=0.0, fg_mask=disk
        )
        assert not (mask & ~disk).any()
        np.testing.assert_array_equal(out[~disk], image[~disk])
        hits += mask.any()
    assert hits > 5
    a = augment.draem_anomaly(np.random.default_rng(4), image, source)
    b = augment.draem_anomaly(np.random.default_rng(4), image, source)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_anomaly_source_augmentation_in_range(image):
    for seed in range(10):
        out = augment.augment_anomaly_source(np.random.default_rng(seed), image)
        assert out.shape == image.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("width", [1, 2, 3])
def test_thin_rotated_scar_keeps_its_area(image, width):
    # Scars scaled down to small inputs are 1-3 pixels wide; a nearest-neighbour rotation that
    # puts the input's edges at pixel centres dropped most of them (a 1 x 7 scar at 5 degrees
    # kept 0 pixels, i.e. a "scar" example identical to its normal image).
    for seed in range(40):
        length = 3 + seed % 8
        _, mask = augment.cutpaste_scar_with_mask(
            np.random.default_rng(seed),
            image,
            width=(width, width),
            length=(length, length),
            rotation=(-45, 45),
        )
        assert 0.5 * width * length <= mask.sum() <= 1.8 * width * length + 2, (seed, length)


def test_augmentation_options_read_the_config_and_keep_defaults_where_absent():
    from configs import cutpaste as cutpaste_config
    from configs import draem as draem_config

    a = cutpaste_config.get_config().augment
    assert augment.cutpaste_options(a) == {
        "area_ratio": tuple(a.cutpaste_area_ratio),
        "aspect_ratio": tuple(tuple(r) for r in a.cutpaste_aspect_ratio),
        "color_jitter": a.color_jitter,
    }
    scar = augment.scar_options(a, scale=0.25)
    assert scar["width"] == tuple(max(1.0, v * 0.25) for v in a.scar_width)
    assert scar["rotation"] == tuple(a.scar_rotation)
    d = draem_config.get_config().augment
    assert augment.draem_options(d) == {
        "scale_exponents": tuple(d.perlin_scale_exponents),
        "threshold": d.perlin_threshold,
        "max_beta": d.max_beta,
    }
    assert augment.cutpaste_options(None) == augment.draem_options(None) == {}
    # The same draw as the explicit call.
    image = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    explicit = augment.cutpaste_scar(
        np.random.default_rng(1), image, width=tuple(a.scar_width), length=tuple(a.scar_length),
        rotation=tuple(a.scar_rotation), color_jitter=a.color_jitter,
    )  # fmt: skip
    np.testing.assert_array_equal(
        augment.cutpaste_scar(np.random.default_rng(1), image, **augment.scar_options(a)), explicit
    )
