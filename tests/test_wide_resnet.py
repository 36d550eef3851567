"""WideResNet50-2 against torchvision (the reference) with the same random weights."""

import re

import chex
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import torchvision
from flax import nnx

from launch import convert_weights
from wdam_jax.models import wide_resnet
from wdam_jax.models.wide_resnet import (
    from_torchvision,
    load_pretrained,
    save_pretrained,
    to_torchvision,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    model = torchvision.models.wide_resnet50_2().eval()
    # Non-trivial BatchNorm statistics, so inference mode is really exercised.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture(scope="module")
def flax_model(torch_model):
    return from_torchvision(torch_model.state_dict())


def _torch_features(model, images: np.ndarray) -> dict[str, np.ndarray]:
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) - MEAN) / STD
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        out = {"stem": x}
        for index in range(1, 5):
            x = getattr(model, f"layer{index}")(x)
            out[f"layer{index}"] = x
        out["pooled"] = torch.flatten(model.avgpool(x), 1)
        out["logits"] = model.fc(out["pooled"])
    return {
        k: v.numpy().transpose(0, 2, 3, 1) if v.ndim == 4 else v.numpy() for k, v in out.items()
    }


def _forward(model, images):
    return nnx.jit(lambda m, x: m(x, train=False))(model, jnp.asarray(images))


@pytest.mark.parametrize("size", [224, 256])
def test_every_named_feature_matches_torchvision(torch_model, flax_model, size):
    images = np.random.default_rng(size).uniform(size=(2, size, size, 3)).astype(np.float32)
    ours = _forward(flax_model, images)
    reference = _torch_features(torch_model, images)
    assert set(ours) == set(reference)
    for name, ref in reference.items():
        got = np.asarray(ours[name])
        chex.assert_shape(got, ref.shape)
        relative = np.abs(got - ref).max() / np.abs(ref).max()
        assert relative < 1e-4, f"{name} at {size}: relative error {relative:.2e}"


def test_torchvision_round_trip_is_exact(torch_model, flax_model):
    exported = to_torchvision(flax_model)
    fresh = torchvision.models.wide_resnet50_2()
    fresh.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in exported.items()}
    )
    for name, value in torch_model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(fresh.state_dict()[name].numpy(), value.numpy(), name)


def test_wdam_weights_survive_the_round_trip(torch_model):
    model = from_torchvision(torch_model.state_dict(), wdam_layers=(1,), seed=3)
    exported = to_torchvision(model)
    assert "layer1.2.wdam.fc1.weight" in exported and "layer2.0.wdam.fc1.weight" not in exported
    again = from_torchvision(exported, wdam_layers=(1,), seed=99)
    np.testing.assert_array_equal(
        np.asarray(again.layer1[2].wdam.fc1.kernel.get_value()),
        np.asarray(model.layer1[2].wdam.fc1.kernel.get_value()),
    )


def test_wrong_state_dict_is_a_clear_error():
    resnet18 = torchvision.models.resnet18().state_dict()
    with pytest.raises(ValueError, match="not a torchvision wide_resnet50_2"):
        from_torchvision(resnet18)


def test_convert_weights_cli_writes_a_loadable_checkpoint(tmp_path, torch_model, flax_model):
    pth = tmp_path / "wrn.pth"
    torch.save(torch_model.state_dict(), pth)
    out = convert_weights.convert(pth, tmp_path / "ckpt")
    restored = load_pretrained(out, wdam_layers=(1,))
    images = np.random.default_rng(0).uniform(size=(1, 64, 64, 3)).astype(np.float32)
    expected = _forward(flax_model, images)
    # WDAM is fresh in `restored`, so compare the layers before it and the plain-model logits.
    np.testing.assert_allclose(_forward(restored, images)["stem"], expected["stem"], rtol=1e-6)
    plain = load_pretrained(out)
    np.testing.assert_allclose(_forward(plain, images)["logits"], expected["logits"], rtol=1e-5)


def test_convert_weights_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_weights.convert(tmp_path / "missing.pth", tmp_path / "out")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch state_dict"):
        convert_weights.convert(corrupt, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"launch\.convert_weights"):
        load_pretrained(tmp_path / "nowhere")


def _small_state(value: float) -> dict[str, np.ndarray]:
    """A few torchvision-named arrays: enough for save_pretrained, far smaller than WRN50-2."""
    return {
        "conv1.weight": np.full((4, 3, 7, 7), value, np.float32),
        "bn1.running_mean": np.full((4,), value, np.float32),
        "layer1.0.conv1.weight": np.full((2, 4, 1, 1), value, np.float32),
    }


def _restore(directory) -> dict[str, np.ndarray]:
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(directory)
    return {
        "conv1.weight": tree["conv1"]["weight"],
        "bn1.running_mean": tree["bn1"]["running_mean"],
        "layer1.0.conv1.weight": tree["layer1"]["0"]["conv1"]["weight"],
    }


def _assert_same_weights(model_a, model_b):
    a, b = to_torchvision(model_a), to_torchvision(model_b)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], name)


def test_convert_weights_refuses_a_folder_it_did_not_write(tmp_path):
    weights = tmp_path / "weights"  # --out=weights where the other models live
    sam = weights / "sam" / "sam_vit_h_4b8939.pth"
    sd = weights / "stable-diffusion-inpainting" / "model_index.json"
    for path, data in ((sam, b"sam weights"), (sd, b"{}")):
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
    pth = tmp_path / "tiny.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, pth)
    with pytest.raises(FileExistsError, match=re.escape(str(weights))) as err:
        save_pretrained(_small_state(1.0), weights)
    assert "nothing was written or deleted" in str(err.value)
    # The command fails on the folder before reading the .pth (which is not even a WRN50-2).
    with pytest.raises(FileExistsError, match=re.escape(f"--out={weights / 'wrn50_2_imagenet'}")):
        convert_weights.convert(pth, weights)
    assert sam.read_bytes() == b"sam weights" and sd.read_bytes() == b"{}"
    assert sorted(p.name for p in weights.rglob("*")) == sorted(
        ["sam", "sam_vit_h_4b8939.pth", "stable-diffusion-inpainting", "model_index.json"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth", "weights"]
    with pytest.raises(FileExistsError, match="is a file"):
        save_pretrained(_small_state(1.0), pth)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth", "weights"]


def test_save_pretrained_replaces_a_previous_conversion(tmp_path, flax_model):
    out = tmp_path / "ckpt"
    out.mkdir()  # an empty folder is accepted as well
    save_pretrained(_small_state(1.0), out)
    save_pretrained(_small_state(2.0), out)
    for name, value in _restore(out).items():
        np.testing.assert_array_equal(value, _small_state(2.0)[name], name)
    save_pretrained(to_torchvision(flax_model), out)
    _assert_same_weights(load_pretrained(out), flax_model)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folder left behind


def test_failed_write_keeps_the_previous_conversion(tmp_path, flax_model, monkeypatch):
    out = tmp_path / "ckpt"
    save_pretrained(to_torchvision(flax_model), out)
    real_save = ocp.StandardCheckpointer.save

    def save_part_then_fail(self, directory, item, *args, **kwargs):
        # Whatever folder the writer was given gets a partial checkpoint, then the disk fills.
        real_save(self, directory, {"conv1": {"weight": np.zeros(1, np.float32)}}, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_part_then_fail)
    with pytest.raises(OSError, match="No space left on device"):
        save_pretrained(_small_state(3.0), out)
    monkeypatch.undo()
    _assert_same_weights(load_pretrained(out), flax_model)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_train_mode_updates_batch_statistics_of_a_reduced_member():
    # A reduced member of the family: same blocks and WDAM placement, fewer blocks and channels.
    model = wide_resnet.create(
        wdam_layers=(1,), num_classes=None, depths=(1, 2, 1, 1), base_width=16
    )
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [1, 2, 1, 1]
    assert model.num_features == 16 * 8 * 4  # layer4 planes x expansion
    before = np.asarray(model.bn1.mean.get_value())
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
    features = nnx.jit(lambda m, x: m(x, train=True))(model, images)
    assert "logits" not in features
    chex.assert_shape(features["stem"], (2, 8, 8, 16))
    chex.assert_shape(features["layer1"], (2, 8, 8, 64))
    chex.assert_shape(features["layer4"], (2, 1, 1, 512))
    assert not np.allclose(before, np.asarray(model.bn1.mean.get_value()))
    chex.assert_shape(model.layer1[0].wdam.subband_weights.get_value(), (2, 4))
