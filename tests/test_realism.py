"""Table 2 (``launch.realism``, ``synthesis/realism.py``): FID against an independent Frechet
distance (``scipy.linalg.sqrtm`` on the feature statistics), all-pairs LPIPS against the
``lpips`` package's own forward pass, the command end to end, and the missing-weights error.

The Inception network is torch-fidelity's architecture with explicitly random weights (He-normal
convolutions, so the features are not vanishingly small), saved to a file and read back by the
command's own loading code: no real weights are needed or downloaded.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import skimage.data
from PIL import Image

from synthesis import realism, selector, tfrecord, writer

REPO = Path(__file__).resolve().parents[1]


def random_inception_weights(path: Path, *, seed: int) -> Path:
    """torch-fidelity's InceptionV3 with He-normal random weights, saved as a state dict."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    # The constructor always loads a file; keep its own (random) initialisation instead.
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(empty))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                std = math.sqrt(2.0 / module.weight[0].numel())
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "w.pth", seed=0)


def crops(photo: np.ndarray, count: int, *, size: int = 48, seed: int) -> np.ndarray:
    """``count`` random ``size`` crops of a grey photograph, as uint8 RGB."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        y, x = rng.integers(0, photo.shape[0] - size, 2)
        out.append(np.repeat(photo[y : y + size, x : x + size, None], 3, axis=-1))
    return np.stack(out).astype(np.uint8)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), the sample covariances (N - 1)."""
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real)


def test_fid_matches_an_independent_frechet_distance(inception_weights):
    # The first Inception layer (64 features): the 2048-feature layer differs only in how far
    # the forward pass goes, and its 2048 x 2048 eigen / sqrtm problems take minutes on 2 cores.
    count = 4
    fid = realism.FID(inception_weights, features=64, batch_size=4)
    seen = []  # what the network returned, call by call, through the command's own path
    fid.network.register_forward_hook(lambda m, i, out: seen.append(out.double().numpy()))
    real = crops(skimage.data.brick(), count, seed=1)
    sets = {
        "grass": crops(skimage.data.grass(), count, seed=2),
        "gravel": crops(skimage.data.gravel(), count, seed=3),
        "real again": real.copy(),
    }
    fid.set_real(real)
    real_features = np.concatenate(seen)
    ours, independent = {}, {}
    for name, images in sets.items():
        seen.clear()
        ours[name] = fid(images, what=name)
        independent[name] = frechet_distance(real_features, np.concatenate(seen))
    assert np.concatenate(seen) == pytest.approx(real_features, rel=1e-5)  # real features again
    for name in ("grass", "gravel"):
        assert ours[name] == pytest.approx(independent[name], rel=2e-3), name
        assert ours[name] > 0
    assert abs(ours["grass"] - ours["gravel"]) > 0.05 * ours["grass"]
    assert abs(ours["real again"]) < 1e-3 * ours["grass"]
    assert abs(independent["real again"]) < 1e-3 * ours["grass"]


def test_missing_or_wrong_inception_weights_are_named(tmp_path):
    missing = tmp_path / "weights" / realism.INCEPTION_FILE
    with pytest.raises(FileNotFoundError) as err:
        realism.FID(missing)
    assert str(missing) in str(err.value) and realism.INCEPTION_URL in str(err.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(realism.WeightsError, match="not a PyTorch state dict"):
        realism.FID(garbage)
    import torch

    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(realism.WeightsError, match="not torch-fidelity's InceptionV3"):
        realism.FID(other)


def test_all_pairs_lpips_equals_the_package_forward():
    import torch

    model = selector.load_lpips(net="alex", backbone_weights="random", device="cpu", seed=0)
    a = crops(skimage.data.brick(), 3, size=64, seed=4)
    b = np.concatenate([crops(skimage.data.grass(), 3, size=64, seed=5), a[:1]])
    features = realism.LPIPSFeatures(model, batch_size=2)
    ea, weights = features.embed(a)
    eb, _ = features.embed(b)
    ours = features.pairwise(ea, eb, weights)

    def tensor(x):
        return torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)

    with torch.inference_mode():
        package = np.array([[float(model(tensor(x[None]), tensor(y[None]))) for y in b] for x in a])
    np.testing.assert_allclose(ours, package, rtol=1e-4, atol=1e-6)
    assert ours[0, 3] == pytest.approx(0.0, abs=1e-6) and ours[1:, :3].min() > 0.01


def test_lpips_summary_reads_the_matrices_as_documented():
    to_real = np.array([[0.1, 0.3], [0.2, 0.6]])
    within = np.array([[0.0, 0.5], [0.5, 0.0]])
    summary = realism.lpips_summary(to_real, within, same_set=False)
    assert summary == pytest.approx({"lpips": 0.3, "lpips_nearest": 0.15, "lpips_diversity": 0.5})
    real = realism.lpips_summary(within, within, same_set=True)  # image-to-itself pairs left out
    assert real == pytest.approx({"lpips": 0.5, "lpips_nearest": 0.5, "lpips_diversity": 0.5})


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.fixture
def tiny_dataset(tmp_path) -> dict[str, Path]:
    """``widget`` in the MVTec layout (3 normal, 3 defect, 1 good test image) and FMAS records:
    2 samples of widget, 1 of another category."""
    root = tmp_path / "data"
    for i, x in enumerate(crops(skimage.data.brick(), 3, size=80, seed=6)):
        _save(root / "widget/train/good" / f"{i:03d}.png", x)
    for i, x in enumerate(crops(skimage.data.gravel(), 3, size=80, seed=7)):
        _save(root / "widget/test" / ("crack" if i < 2 else "hole") / f"{i:03d}.png", x)
    _save(root / "widget/test/good/000.png", np.zeros((80, 80, 3), np.uint8))
    records = []
    for i, x in enumerate(crops(skimage.data.grass(), 3, size=80, seed=8)):
        category = "widget" if i < 2 else "other"
        records.append(
            writer.make_example(
                image=x,
                mask=np.ones((80, 80), bool),
                source=f"{category}/train/good/{i:03d}.png",
                category=category,
                prompt="p",
                negative_prompt="n",
                prompt_source="library:generic",
                seed=i,
                cfg=5.0,
                strength=0.5,
                lpips=0.1,
                tau=0.13,
            )
        )
    tfrecord.write_records(tmp_path / "fmas-0.tfrecord", records)
    return {"real": root / "widget/test", "records": tmp_path / "fmas-*.tfrecord"}


def test_table_2_is_computed_in_process(tiny_dataset, inception_weights, tmp_path, capsys):
    """The library computation behind ``launch.realism`` (its flags are the fields)."""
    from configs import cutpaste as cutpaste_config
    from configs import draem as draem_config
    from wdam_jax.analysis import realism as realism_lib

    out = tmp_path / "out"
    realism_lib.compute(
        realism_lib.RealismInputs(
            real=[str(tiny_dataset["real"])],
            out=str(out),
            cutpaste_augment=cutpaste_config.get_config().augment,
            draem_augment=draem_config.get_config().augment,
            fmas_records=str(tiny_dataset["records"]),
            texture_dir="procedural",
            inception_weights=str(inception_weights),
            fid_features=64,
            lpips_backbone="random",
            image_size=64,
        )
    )
    result = capsys.readouterr()
    document = json.loads((out / "realism.json").read_text())
    rows = {r["source"]: r for r in document["rows"]}
    assert list(rows) == ["real", "fmas", "cutpaste", "scar", "draem"]
    assert [rows[s]["images"] for s in rows] == [3, 2, 3, 3, 3]
    assert rows["real"]["fid"] is None
    for source in ("fmas", "cutpaste", "scar", "draem"):
        assert rows[source]["fid"] > 0 and 0 < rows[source]["lpips"] < 1, source
    # Different sets (grass FMAS samples, brick with scars) give different numbers.
    assert rows["fmas"]["lpips"] != pytest.approx(rows["scar"]["lpips"], rel=1e-3)
    csv_lines = (out / "realism.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(realism.COLUMNS) and len(csv_lines) == 6
    assert "| draem |" in (out / "realism.md").read_text()
    assert "| cutpaste |" in result.out
    assert not list(out.glob(".*.tmp"))


def test_missing_inception_weights_stop_the_command_naming_the_file(tiny_dataset, tmp_path):
    missing = tmp_path / "nowhere" / realism.INCEPTION_FILE
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.realism",
            f"--real={tiny_dataset['real']}",
            "--synthetic=cutpaste",
            f"--inception_weights={missing}",
            "--lpips_backbone=random",
            f"--out={tmp_path / 'out'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr and realism.INCEPTION_URL in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
