"""Every config builds and runs one real train step on the demo data; the end-to-end run; config
errors.

The step runs on a reduced member of the WideResNet family (one bottleneck per layer, base width
8: same blocks, same WDAM placement, same named features) at 32 px, so each compile takes seconds;
the full WRN50-2 is checked against torchvision in ``test_wide_resnet.py``. Configs whose model
and train settings are equal after the test's overrides share one compiled step and one initial
state; each config still runs it on its own batch (its own data, FM, anomaly source).
"""

import io
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import cutpaste, cutpaste_fm, cutpaste_fmas, cutpaste_wdam, wdam_layers
from wdam_jax import checkpoints, evaluate, runs, train
from wdam_jax import state as state_lib
from wdam_jax.data import demo, sources
from wdam_jax.data.tf_setup import import_tensorflow
from wdam_jax.methods import cutpaste as cutpaste_method
from wdam_jax.models import wide_resnet
from wdam_jax.models.wide_resnet import WideResNet50_2
from wdam_jax.wdam import WDAM

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = [
    (module, arg)
    for module in (cutpaste, cutpaste_fmas, cutpaste_fm, cutpaste_wdam)
    for arg in (None, "demo")
] + [(wdam_layers, arg) for arg in ("demo", *(f"{n}" for n in wdam_layers.LAYERS))]
CONFIGS += [(wdam_layers, f"{n},demo") for n in wdam_layers.LAYERS]
IDS = [f"{m.__name__.split('.')[-1]}:{a}" for m, a in CONFIGS]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_fmas_shard(path: pathlib.Path, dataset_root: pathlib.Path, category: str, n: int = 3):
    """A TFRecord shard in the FMAS schema (docs/design.md) of ``n`` darkened training images."""
    tf = import_tensorflow()
    feature = lambda **kw: tf.train.Feature(**kw)
    bytes_ = lambda v: feature(bytes_list=tf.train.BytesList(value=[v]))
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(n):
            source = f"{category}/train/good/{i:03d}.png"
            image = np.asarray(Image.open(dataset_root / source).convert("RGB")) // 2
            mask = np.zeros(image.shape[:2], np.uint8)
            mask[10:30, 10:30] = 255
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image/encoded": bytes_(_png(image)),
                        "mask/encoded": bytes_(_png(mask)),
                        "image/source": bytes_(source.encode()),
                        "image/category": bytes_(category.encode()),
                        "fmas/prompt": bytes_(b"a scratch"),
                        "fmas/negative_prompt": bytes_(b""),
                        "fmas/seed": feature(int64_list=tf.train.Int64List(value=[i])),
                        **{
                            k: feature(float_list=tf.train.FloatList(value=[0.5]))
                            for k in ("fmas/cfg", "fmas/strength", "fmas/lpips", "fmas/tau")
                        },
                    }
                )
            )
            writer.write(example.SerializeToString())


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("demo_data")
    dataset = demo.ensure_demo_data(
        root, seed=sources.DEMO_SEED, image_size=sources.DEMO_SOURCE_SIZE
    )
    write_fmas_shard(root / "fmas-0.tfrecord", dataset, "washer")
    return root


SIZE = 32


def small(config, root: pathlib.Path, *, stages=(1, 1, 1)):
    """The test's overrides: demo data, 32 px, a tiny WideResNet member, one image per class,
    short stages."""
    config.data.dataset = "demo"
    config.data.root = str(root)
    config.data.category = "washer"
    config.data.image_size = SIZE
    config.model.depths = (1, 1, 1, 1)
    config.model.base_width = 8
    config.model.head_dims = (16, 16)
    config.data.foreground_root = str(root / demo.FOREGROUND_DIR)
    config.data.fmas_records = str(root / "fmas-*.tfrecord")
    config.model.pretrained = ""
    config.train.batch_size = 1
    config.train.stage_epochs = ()
    config.train.stage1_steps, config.train.stage2_steps, config.train.stage3_steps = stages
    config.score.eval_batch_size = 8
    return config


@pytest.mark.parametrize("module,arg", CONFIGS, ids=IDS)
def test_config_builds_and_is_locked(module, arg):
    config = module.get_config(arg)
    config.lock()
    with pytest.raises(AttributeError):
        config.train.bogus = 1
    method = cutpaste_method.CutPaste(config)
    t = config.train
    if t.stage_epochs:  # in epochs of the training set: resolved when the run reads its data
        assert sum(t.stage_epochs) > 0
        assert config.model.wdam_layers == () or t.stage_epochs[2] > 0
    else:
        assert method.total_steps > 0
        assert config.model.wdam_layers == () or t.stage3_steps > 0
    if arg and "demo" in arg:
        assert config.data.dataset == "demo" and not config.model.pretrained


def test_table_rows_differ_in_one_component():
    rows = [m.get_config() for m in (cutpaste, cutpaste_fmas, cutpaste_fm, cutpaste_wdam)]
    assert [r.data.anomaly_source for r in rows] == ["cutpaste", "fmas", "fmas", "fmas"]
    assert [r.augment.foreground_mask for r in rows] == [False, False, True, True]
    assert [r.model.wdam_layers for r in rows] == [(), (), (), (1,)]
    assert [wdam_layers.get_config(f"{n}").model.wdam_layers for n in range(5)] == [
        (),
        (1,),
        (2,),
        (3,),
        (4,),
    ]
    with pytest.raises(ValueError, match="use one of"):
        wdam_layers.get_config("5")


# Grouped by model so that configs sharing a compiled step run one after the other; only the
# current group's step and initial state (~1 GB with optimiser state) are kept.
STEP_CONFIGS = sorted(CONFIGS, key=lambda c: c[0].get_config(c[1]).model.wdam_layers)
STEP_IDS = [f"{m.__name__.split('.')[-1]}:{a}" for m, a in STEP_CONFIGS]
_COMPILED: dict[str, tuple] = {}


def _step_key(config) -> str:
    """What the compiled step depends on: the model, the optimiser and stages, the seed."""
    t = config.train
    optimiser = [getattr(t, f) for f in sorted(t.keys()) if "stage" in f or f.endswith("lr")]
    fields = [config.model.to_dict(), optimiser, t.momentum, t.weight_decay, t.batch_size]
    return json.dumps([*fields, config.seed], default=str)


@pytest.mark.parametrize("module,arg", STEP_CONFIGS, ids=STEP_IDS)
def test_one_train_step(module, arg, demo_root):
    config = small(module.get_config(arg), demo_root)
    method = train.get_method(config)
    mesh = state_lib.data_mesh()
    key = _step_key(config)
    if key not in _COMPILED:
        _COMPILED.clear()
        graphdef, rest, tx, state = state_lib.init_state(method, config)
        step_fn = train.compile_train_step(graphdef, rest, method.loss, tx, mesh)
        _COMPILED[key] = (step_fn, jax.device_get(state))
    step_fn, host_state = _COMPILED[key]
    batch = method.batch(0)
    assert batch["image"].shape == (3, SIZE, SIZE, 3)
    state, metrics = step_fn(jax.device_put(host_state), train.shard_batch(batch, mesh))
    assert int(state["step"]) == 1
    assert np.isfinite(float(metrics["loss"]))
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
        jax.device_get(state["params"]),
        host_state["params"],
    )
    assert any(jax.tree.leaves(changed))


def test_train_evaluate_restore_backbone_end_to_end(demo_root, tmp_path):
    # WDAM in from step 0 (stages 0/0/2), so the restored backbone carries trained WDAMs.
    config = small(cutpaste_wdam.get_config("demo"), demo_root, stages=(0, 0, 2))
    config.train.checkpoint_every = 10
    results = evaluate.train_and_evaluate(config, tmp_path)
    row = results["washer"]
    assert {"i_auroc", "p_auroc", "pro"} <= set(row)
    assert all(0.0 <= v <= 1.0 for v in row.values())
    outdir = tmp_path / "eval" / "step_2"
    assert {"metrics.json", "metrics.md", "metrics.csv", "heatmaps.png", "scores.npz"} <= {
        p.name for p in outdir.iterdir()
    }
    # The backbone the loop wrote at the end, read as PatchCore's run members read it.
    backbone = wide_resnet.from_torchvision(
        wide_resnet.read_state_dict(tmp_path / checkpoints.BACKBONE_FILE), wdam_layers=(1,)
    )
    assert isinstance(backbone, WideResNet50_2) and backbone.wdam_layers == (1,)
    assert all(type(block.wdam) is WDAM for block in backbone.layer1)
    assert all(block.wdam is None for block in backbone.layer2)
    run = runs.restore(tmp_path)
    assert run.step == 2
    np.testing.assert_array_equal(
        np.asarray(backbone.layer1[0].wdam.fc1.kernel[...]),
        np.asarray(run.model.backbone.layer1[0].wdam.wdam.fc1.kernel[...]),
    )


def test_unknown_config_field_is_rejected_by_the_launcher(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.train",
            "--config=configs/cutpaste.py:demo",
            f"--workdir={tmp_path}",
            "--config.train.bogus_field=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "bogus_field" in out.stderr
    assert not (tmp_path / checkpoints.CHECKPOINT_DIR).exists()
