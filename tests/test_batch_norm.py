"""Precise BatchNorm statistics (wdam_jax/batch_norm.py) against numpy and the training-mode
forward."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wdam_jax import batch_norm


class _Net(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(4, 5, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(5, momentum=0.9, rngs=rngs)

    def __call__(self, x, *, train):
        h = nnx.relu(self.bn1(self.conv(x), use_running_average=not train))
        return self.bn2(self.conv2(h), use_running_average=not train)


def _train_forward(model, x):
    model(x, train=True)


def _batches(n, size=6):
    rng = np.random.default_rng(0)
    return [rng.normal(1.0, 2.0, (size, 8, 8, 3)).astype(np.float32) for _ in range(n)]


def test_first_layer_statistics_are_those_of_all_rows():
    model = _Net()
    batches = _batches(3)
    stats = batch_norm.precise_batch_stats(model, batches, call=_train_forward)
    conv = np.concatenate([np.asarray(model.conv(jnp.asarray(b))) for b in batches])
    rows = conv.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(stats[batch_norm.PREFIX + "bn1.mean"], rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        stats[batch_norm.PREFIX + "bn1.var"], rows.var(0), rtol=1e-4, atol=1e-6
    )
    # The model passed in keeps its own (initial) running statistics.
    np.testing.assert_array_equal(np.asarray(model.bn1.mean.get_value()), np.zeros(4))


def test_one_batch_makes_inference_mode_equal_training_mode():
    model = _Net()
    (batch,) = _batches(1)
    stats = batch_norm.precise_batch_stats(model, [batch], call=_train_forward)
    scoring = batch_norm.apply_batch_stats(model, stats)
    train_out = np.asarray(nnx.clone(model)(jnp.asarray(batch), train=True))
    np.testing.assert_allclose(
        np.asarray(scoring(jnp.asarray(batch), train=False)), train_out, rtol=1e-4, atol=2e-4
    )
    # Running statistics 0 / 1 (the initial network) do not normalise: far from training mode.
    assert np.abs(np.asarray(model(jnp.asarray(batch), train=False)) - train_out).max() > 0.5


def test_no_statistics_keep_the_model_and_wrong_ones_are_an_error():
    model = _Net()
    assert batch_norm.apply_batch_stats(model, {"bank": np.zeros(3)}) is model
    with pytest.raises(ValueError, match="another architecture"):
        batch_norm.apply_batch_stats(model, {batch_norm.PREFIX + "other.mean": np.zeros(4)})
