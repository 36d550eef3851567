"""The paper configs (no ``:demo``) keep the paper's backbone and hyperparameters.

The demo (``:demo``) trains a reduced WideResNet from scratch at 128 px with its own schedule and
scoring; nothing of that may leak into the MVTec / VisA configs. Each check compares a config with
the paper (Sec. 4.2) or with the numbers its own docstring states, parsed from the docstring, so
editing one without the other fails here.
"""

import re

import pytest

from configs import cutpaste, cutpaste_fm, cutpaste_fmas, cutpaste_wdam, patchcore, patchcore_wdam
from configs import wdam_layers as wdam_layers_config
from wdam_jax.models.wide_resnet import BASE_WIDTH, DEPTHS

# (module, get_config argument, expected anomaly source, FM, WDAM layers): Table 3 and Table 8.
CUTPASTE_ROWS = [
    (cutpaste, None, "cutpaste", False, ()),
    (cutpaste_fmas, None, "fmas", False, ()),
    (cutpaste_fm, None, "fmas", True, ()),
    (cutpaste_wdam, None, "fmas", True, (1,)),
    *[
        (wdam_layers_config, str(n), "fmas", True, (n,) if n else ())
        for n in wdam_layers_config.LAYERS
    ],
]
IDS = [f"{m.__name__.split('.')[-1]}:{a}" for m, a, *_ in CUTPASTE_ROWS]


def _docstring_numbers(text: str) -> dict[str, float]:
    """The schedule numbers ``configs/cutpaste.py``'s docstring states."""
    flat = " ".join(text.split())
    adam = re.findall(r"Adam (\d*\.\d+)", flat)
    return {
        "stage1_lr": float(re.search(r"SGD (\d*\.\d+)", flat).group(1)),
        "stage2_lr": float(adam[0]),
        "stage3_lr": float(adam[1]),
        "batch_size": int(re.search(r"batch (\d+) normal images", flat).group(1)),
        "stage1_epochs": float(re.search(r'gives "(\d+) epochs"', flat).group(1)),
        "stage23_epochs": tuple(
            float(e) for e in re.search(r"(\d+) and (\d+) epochs", flat).groups()
        ),
    }


def test_docstring_numbers_are_parsed():
    numbers = _docstring_numbers(cutpaste.__doc__)
    assert numbers == {
        "stage1_lr": 0.03,
        "stage2_lr": 0.01,
        "stage3_lr": 0.001,
        "batch_size": 32,
        "stage1_epochs": 500.0,
        "stage23_epochs": (333.0, 167.0),
    }


@pytest.mark.parametrize("module, arg, source, fm, wdam", CUTPASTE_ROWS, ids=IDS)
def test_cutpaste_paper_config(module, arg, source, fm, wdam):
    config = module.get_config(arg)
    # Backbone: the full WideResNet50-2, initialised from ImageNet (Sec. 4.2).
    assert tuple(config.model.depths) == DEPTHS == (3, 4, 6, 3)
    assert config.model.base_width == BASE_WIDTH == 64
    assert config.model.pretrained, "paper configs start from ImageNet weights"
    assert tuple(config.model.head_dims) == (512,) * 8 + (128,)  # CutPaste's projection head
    assert tuple(config.model.wdam_layers) == wdam
    # Data and the ablated components of the row.
    assert config.data.dataset == "mvtec"
    assert config.data.image_size == 256
    assert config.data.anomaly_source == source
    assert config.augment.foreground_mask is fm
    assert tuple(config.augment.scar_width) == (2.0, 16.0)  # CutPaste's, at 256 x 256
    assert tuple(config.augment.scar_length) == (10.0, 25.0)
    assert tuple(config.augment.cutpaste_area_ratio) == (0.02, 0.15)
    # Schedule: as the base config's docstring says.
    t = config.train
    stated = _docstring_numbers(cutpaste.__doc__)
    assert t.stage1_lr == stated["stage1_lr"]
    assert t.stage2_lr == stated["stage2_lr"]
    assert t.stage3_lr == stated["stage3_lr"]
    assert t.batch_size == stated["batch_size"]
    assert t.momentum == 0.9
    # Stage lengths in epochs of the category's training set (the paper: "500 epochs" of SGD).
    assert tuple(t.stage_epochs) == (stated["stage1_epochs"], *stated["stage23_epochs"])
    assert (t.stage1_steps, t.stage2_steps, t.stage3_steps, t.epoch_size) == (0, 0, 0, 0)
    # Scoring (Sec. 4.2): CutPaste's Gaussian density on the pooled features, pixel map from
    # layer4, features as they are.
    s = config.score
    assert s.image_score == "gde"
    assert s.embedding == "pooled"
    assert tuple(s.pixel_layers) == ("layer4",)
    assert s.normalize is False


def test_published_cutpaste_is_the_sgd_stage_alone():
    """Table 3's first column: CutPaste's own schedule (see configs/cutpaste.py)."""
    t = cutpaste.get_config("published").train
    assert tuple(t.stage_epochs) == (500.0, 0.0, 0.0) and t.stage1_lr == 0.03
    demo = cutpaste.get_config("published,demo").train
    full = cutpaste.get_config("demo").train
    assert (demo.stage1_steps, demo.stage2_steps, demo.stage3_steps) == (
        full.stage1_steps + full.stage2_steps + full.stage3_steps,
        0,
        0,
    )


@pytest.mark.parametrize("module", [patchcore, patchcore_wdam])
def test_patchcore_paper_config(module):
    config = module.get_config()
    assert config.data.dataset == "mvtec"
    for member in config.members.values():
        # The full WideResNet50-2, never a random one: members come from weights or a run.
        assert tuple(member.depths) == DEPTHS and member.base_width == BASE_WIDTH
        assert member.allow_random_init is False
    assert config.members.plain.kind == "imagenet"
    p = config.patchcore
    assert (p.patch_size, p.coreset_ratio, p.num_neighbors, p.sigma) == (3, 0.1, 9, 4.0)
    assert p.scoring == "official"  # patchcore-inspection: max of squared L2 distances
    if module is patchcore:  # "resize to 256, centre crop 224"
        assert (config.data.image_size, config.data.crop_size) == (256, 224)
    else:  # "Input 256 x 256 (no crop)"; the WDAM member is a CutPaste + WDAM run
        assert (config.data.image_size, config.data.crop_size) == (256, 0)
        assert config.members.wdam.kind == "run"
        assert tuple(config.members.wdam.wdam_layers) == (1,)
