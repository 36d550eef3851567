"""The shared training loop: staged optimiser, exact resume, non-finite loss, traces, logs, and
data parallelism on two forced host devices (in a subprocess)."""

import glob
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from wdam_jax import checkpoints, optim, runs, train
from wdam_jax.methods.base import ImageScores, Method

REPO = pathlib.Path(__file__).resolve().parents[1]


class ToyNet(nnx.Module):
    """conv -> BatchNorm -> ReLU -> mean pool -> linear: has params and batch statistics."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, kernel_size=(3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x, *, train: bool):
        h = jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))
        return self.fc(h.mean(axis=(1, 2)))


class ToyMethod(Method):
    """A small method that uses every hook of :class:`wdam_jax.methods.base.Method`."""

    name = "toy"

    def __init__(self, config, *, nan_at: int | None = None):
        super().__init__(config)
        self.nan_at = nan_at
        self.traces = 0
        self.validated: list[int] = []

    @property
    def total_steps(self):
        return self.config.train.steps

    def create_model(self, *, abstract: bool = False):
        build = lambda: ToyNet(rngs=nnx.Rngs(self.config.seed))
        return nnx.eval_shape(build) if abstract else build()

    def optimizer(self):
        return optim.staged([optax.sgd(0.1, momentum=0.9), optax.adam(0.01)], [3])

    def batch(self, step: int, *, part: int = 0, parts: int = 1):
        rng = np.random.default_rng([self.config.seed, step])
        rows = slice(part * 4 // parts, (part + 1) * 4 // parts)
        return {
            "image": rng.random((4, 8, 8, 3), dtype=np.float32)[rows],
            "label": rng.integers(0, 3, 4).astype(np.int32)[rows],
        }

    def loss(self, model, batch, *, step, key):
        self.traces += 1
        # The key makes the result depend on the folded-in step, as dropout would.
        x = batch["image"] + 0.01 * jax.random.normal(key, batch["image"].shape)
        logits = model(x, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        if self.nan_at is not None:
            loss = jnp.where(step == self.nan_at, jnp.nan, loss)
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    def check_inputs(self):
        return []

    def validate(self, model, *, step):
        self.validated.append(step)
        return {"val/score": float(step)}

    def train_images(self):
        return np.random.default_rng(0).random((5, 8, 8, 3), dtype=np.float32)

    def fit(self, model, train_images, *, step):
        return {"mean_logit": np.asarray(model(jnp.asarray(train_images), train=False)).mean(0)}

    def score(self, model, fitted, images, *, step):
        logits = np.asarray(model(jnp.asarray(images), train=False))
        maps = np.broadcast_to(logits[:, :1, None], (len(images), *images.shape[1:3]))
        return ImageScores(np.abs(logits - fitted["mean_logit"]).sum(-1), maps)


def toy_config(steps: int = 6) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.method = "toy"
    config.seed = 3
    config.train = ml_collections.ConfigDict()
    config.train.steps = steps
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.train.keep_checkpoints = 2
    config.train.eval_every = 0
    return config


def _params(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state["params"]))]


def test_staged_switches_transforms_and_counts_per_stage():
    tx = optim.staged([optax.sgd(1.0), optax.scale(-10.0), optax.sgd(0.5)], [2, 2])
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    grads = {"w": jnp.full(2, 0.5)}
    seen = []
    for _ in range(4):
        updates, state = tx.update(grads, state, params)
        seen.append(float(updates["w"][0]))
    # Steps 0-1: sgd(1.0); the empty second stage is skipped; steps 2-3: sgd(0.5).
    np.testing.assert_allclose(seen, [-0.5, -0.5, -0.25, -0.25])
    assert int(state.count) == 4


def test_staged_adam_starts_fresh_after_sgd():
    tx = optim.staged([optax.sgd(0.1), optax.adam(0.01)], [3])
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    grads = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    for _ in range(4):
        updates, state = tx.update(grads, state, params)
    # The first Adam step of a fresh optimiser is -lr * sign(g) (bias-corrected).
    np.testing.assert_allclose(updates["w"], -0.01 * np.sign(grads["w"]), rtol=1e-4)


def test_resume_is_exact(tmp_path):
    config = toy_config(steps=6)
    _, full = train.train(config, tmp_path / "full", method=ToyMethod(config))
    # Killed during step 4 (checkpoints every 2 steps: the newest is step 2, step 3 is lost),
    # then the same call again.
    train.train(config, tmp_path / "resumed", method=ToyMethod(config), stop_at=3)
    manager = checkpoints.checkpoint_manager(tmp_path / "resumed")
    assert sorted(manager.all_steps()) == [2, 3]
    manager.delete(3)
    assert manager.latest_step() == 2
    manager.close()
    _, resumed = train.train(config, tmp_path / "resumed", method=ToyMethod(config))
    assert int(resumed["step"]) == int(full["step"]) == 6
    for a, b in zip(_params(full), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(full["opt_state"]), jax.tree.leaves(resumed["opt_state"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_is_traced_once_and_logs_are_written(tmp_path):
    config = toy_config(steps=4)
    method = ToyMethod(config)
    train.train(config, tmp_path, method=method)
    assert method.traces == 1
    assert json.loads((tmp_path / checkpoints.CONFIG_FILE).read_text())["train"]["steps"] == 4
    from wdam_jax.data.tf_setup import import_tensorflow

    tf = import_tensorflow()
    tags = set()
    for path in glob.glob(str(tmp_path / train.TENSORBOARD_DIR / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update((v.tag, event.step) for v in event.summary.value)
    assert {("loss", 4), ("accuracy", 2), ("grad_norm", 1)} <= tags


def test_non_finite_loss_stops_with_the_step(tmp_path):
    config = toy_config(steps=6)
    with pytest.raises(FloatingPointError, match=r"at step 3 .*checkpoint at step 2"):
        train.train(config, tmp_path, method=ToyMethod(config, nan_at=3))


def test_restore_needs_a_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"launch\.train"):
        runs.restore(tmp_path)


def test_fitted_statistics_are_checkpointed_with_the_final_state(tmp_path):
    config = toy_config(steps=4)
    model, _ = train.train(config, tmp_path, method=ToyMethod(config))
    run = runs.restore(tmp_path, config=config, method=ToyMethod(config))
    assert run.step == 4
    expected = ToyMethod(config).fit(model, ToyMethod(config).train_images(), step=4)
    np.testing.assert_allclose(run.fitted["mean_logit"], expected["mean_logit"], rtol=1e-6)
    # An earlier checkpoint holds no fitted item: restore fits from its model instead.
    early = runs.restore(tmp_path, step=2, config=config, method=ToyMethod(config))
    assert early.step == 2 and set(early.fitted) == {"mean_logit"}
    assert not np.allclose(early.fitted["mean_logit"], run.fitted["mean_logit"])


def test_validate_runs_every_eval_every_steps_and_at_step_0(tmp_path):
    config = toy_config(steps=5)
    config.train.eval_every = 2
    method = ToyMethod(config)
    train.train(config, tmp_path, method=method)
    assert method.validated == [0, 2, 4, 5]
    log = runs.read_train_log(tmp_path)
    assert [s for s, _ in log["val/score"]] == [0, 2, 4, 5]
    assert [s for s, _ in log["loss"]] == [1, 2, 4, 5]


class PeakMethod(ToyMethod):
    """A validation score that peaks at step 4."""

    def validate(self, model, *, step):
        return {"val/score": -abs(step - 4.0), "val/other": float(step)}


def test_best_checkpoint_is_kept_beside_the_newest_and_survives_a_resume(tmp_path):
    config = toy_config(steps=8)
    config.train.eval_every = 2
    config.train.keep_checkpoints = 1
    config.train.select_metric = "val/score"
    workdir = tmp_path / "run"
    train.train(config, workdir, method=PeakMethod(config), stop_at=6)
    train.train(config, workdir, method=PeakMethod(config))  # resumed: steps 6, 8 score lower
    record = json.loads((workdir / checkpoints.BEST_RECORD).read_text())
    assert record == {"metric": "val/score", "value": 0.0, "step": 4}
    best = runs.restore(workdir, config=config, method=PeakMethod(config), best=True)
    latest = runs.restore(workdir, config=config, method=PeakMethod(config))
    assert (best.step, latest.step) == (4, 8)
    # The best checkpoint is the state at step 4, with its fitted statistics.
    _, at4 = train.train(config, tmp_path / "to4", method=PeakMethod(config), stop_at=4)
    best_params = [np.asarray(x) for x in jax.tree.leaves(nnx.state(best.model, nnx.Param))]
    for a, b in zip(best_params, _params(at4), strict=True):
        np.testing.assert_array_equal(a, b)
    expected = PeakMethod(config).fit(best.model, PeakMethod(config).train_images(), step=4)
    np.testing.assert_allclose(best.fitted["mean_logit"], expected["mean_logit"], rtol=1e-6)
    # A run without select_metric keeps no best checkpoint, and says so when asked for one.
    config.train.select_metric = ""
    train.train(config, tmp_path / "plain", method=PeakMethod(config))
    with pytest.raises(checkpoints.NoCheckpointError, match="select_metric"):
        runs.restore(tmp_path / "plain", config=config, method=PeakMethod(config), best=True)


def test_changed_config_is_refused_naming_the_fields(tmp_path):
    config = toy_config(steps=4)
    train.train(config, tmp_path, method=ToyMethod(config), stop_at=2)
    changed = toy_config(steps=4)
    changed.seed = 4
    changed.train.log_every = 1  # harmless: allowed without a flag
    with pytest.raises(checkpoints.ConfigMismatchError, match=r"seed: 3 -> 4") as e:
        train.train(changed, tmp_path, method=ToyMethod(changed))
    assert "log_every" not in str(e.value)
    saved = json.loads((tmp_path / checkpoints.CONFIG_FILE).read_text())
    assert saved["seed"] == 3  # the recorded config is untouched
    harmless = toy_config(steps=4)
    harmless.train.log_every = 1
    train.train(harmless, tmp_path, method=ToyMethod(harmless))
    assert json.loads((tmp_path / checkpoints.CONFIG_FILE).read_text())["train"]["log_every"] == 1
    train.train(changed, tmp_path, method=ToyMethod(changed), allow_config_change=True)
    assert json.loads((tmp_path / checkpoints.CONFIG_FILE).read_text())["seed"] == 4
    assert json.loads((tmp_path / "config.1.json").read_text())["seed"] == 3


def test_truncated_config_is_a_clear_error(tmp_path):
    config = toy_config(steps=2)
    train.train(config, tmp_path, method=ToyMethod(config))
    (tmp_path / checkpoints.CONFIG_FILE).write_text('{"seed": ')
    with pytest.raises(checkpoints.ConfigMismatchError, match=r"config\.json is unreadable"):
        train.train(config, tmp_path, method=ToyMethod(config))


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    path = checkpoints.atomic_write_text(tmp_path / "a.json", "old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_unknown_method_is_a_clear_error():
    config = toy_config()
    config.method = "nope"
    with pytest.raises(ValueError, match=r"config\.method=.nope."):
        train.get_method(config)


_DP_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from test_train import ToyMethod, toy_config, _params
from wdam_jax import checkpoints, optim, train
from wdam_jax.methods.base import ImageScores, Method
config = toy_config(steps=3)
_, state = train.train(config, {workdir!r}, method=ToyMethod(config))
leaf = jax.tree.leaves(state["params"])[0]
print(json.dumps({{
    "devices": jax.device_count(),
    "param_devices": len(leaf.sharding.device_set),
    "replicated": bool(leaf.sharding.is_fully_replicated),
    "params": [p.ravel().tolist() for p in _params(state)],
}}))
"""


def _run_dp(workdir: pathlib.Path, devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
    script = _DP_SCRIPT.format(tests=str(REPO / "tests"), workdir=str(workdir))
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_data_parallel_on_two_host_devices_matches_one(tmp_path):
    two = _run_dp(tmp_path / "two", 2)
    one = _run_dp(tmp_path / "one", 1)
    assert two["devices"] == 2 and two["param_devices"] == 2 and two["replicated"]
    assert one["devices"] == 1
    # BatchNorm statistics and gradients are over the global batch: the same model either way.
    for a, b in zip(one["params"], two["params"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_not_divisible_by_devices_is_a_clear_error():
    two_device_mesh = types.SimpleNamespace(devices=np.empty(2, object))
    with pytest.raises(ValueError, match="not divisible by the 2 devices"):
        train.shard_batch({"image": np.zeros((3, 2), np.float32)}, two_device_mesh)
