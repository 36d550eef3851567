"""CutPaste's network (Fig. 5a): WideResNet50-2 with gated WDAM Bottleneck*, CutPaste's
projection head and a 3-way classifier (:mod:`wdam_jax.methods.cutpaste` trains it).

Before stage 3 a WDAM's output is multiplied by a gate of 0 (:class:`GatedWDAM`), so Bottleneck*
is exactly the plain bottleneck and WDAM gets no gradient; from stage 3 the gate is 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wdam_jax.components.scoring import fill_untrained
from wdam_jax.models.wide_resnet import (
    BASE_WIDTH,
    DEPTHS,
    WideResNet50_2,
    fill_random,
    load_pretrained,
    network_name,
)

NUM_CLASSES = 3

# --------------------------------------------------------------------------------------------
# Model.


class WdamGate(nnx.Variable):
    """1.0 while WDAM is part of the network, 0.0 before its stage. Set from the step."""


class GatedWDAM(nnx.Module):
    """A WDAM whose output is multiplied by a gate (see the module docstring)."""

    def __init__(self, wdam: nnx.Module):
        self.wdam = wdam
        self.gate = WdamGate(jnp.ones([], jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.gate[...].astype(x.dtype) * self.wdam(x)


def wdam_labels(params) -> object:
    """``"wdam"`` for the parameters of a WDAM module, ``"network"`` for the others (same tree)."""

    def label(path, _):
        keys = [getattr(k, "key", None) for k in path]
        return "wdam" if "wdam" in keys else "network"

    return jax.tree_util.tree_map_with_path(label, params)


def set_wdam_gate(model: nnx.Module, on: jax.Array | bool) -> None:
    """Turns every :class:`GatedWDAM` of ``model`` on (1) or off (0)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, WdamGate):
            node.set_value(jnp.asarray(on, jnp.float32))


class ProjectionLayer(nnx.Module):
    """CutPaste's head layer: ``ReLU(BatchNorm(Linear(x)))``."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(cin, cout, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return jax.nn.relu(self.bn(self.linear(x), use_running_average=not train))


class CutPasteNet(nnx.Module):
    """Backbone + projection head + 3-way classifier (Fig. 5a).

    Args:
      backbone: a :class:`WideResNet50_2` without classifier.
      head_dims: widths of the projection head's layers (CutPaste: 512 x 8, then 128).
      rngs: initialisation keys of the head and classifier.
    """

    def __init__(self, backbone: WideResNet50_2, *, head_dims: Sequence[int], rngs: nnx.Rngs):
        self.backbone = backbone
        dims = (backbone.num_features, *head_dims)
        self.head = nnx.List(
            [ProjectionLayer(a, b, rngs=rngs) for a, b in itertools.pairwise(dims)]
        )
        self.classifier = nnx.Linear(dims[-1], NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """``[B, H, W, 3]`` in [0, 1] -> the backbone's named features plus ``embedding``
        ``[B, head_dims[-1]]`` and ``logits`` ``[B, 3]``."""
        features = self.backbone(x, train=train)
        h = features["pooled"]
        for layer in self.head:
            h = layer(h, train=train)
        return {**features, "embedding": h, "logits": self.classifier(h).astype(jnp.float32)}


def _dtype(name: str):
    dtypes = {"float32": None, "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise ValueError(f"config.model.dtype={name!r}; use one of {sorted(dtypes)}.")
    return dtypes[name]


def create_model(
    model_config: ml_collections.ConfigDict, *, seed: int, abstract: bool = False
) -> CutPasteNet:
    """The CutPaste network, ImageNet-initialised when ``model_config.pretrained`` is set.

    Args:
      model_config: ``config.model``.
      seed: initialisation seed (head, classifier, WDAM, and the backbone without weights).
      abstract: shapes only (to restore a checkpoint into).
    """

    def build():
        backbone = WideResNet50_2(
            wdam_layers=tuple(model_config.wdam_layers),
            num_classes=None,
            wdam_reduction=model_config.wdam_reduction,
            dtype=_dtype(model_config.dtype),
            depths=tuple(model_config.depths),
            base_width=model_config.base_width,
            rngs=nnx.Rngs(0),
        )
        return CutPasteNet(backbone, head_dims=tuple(model_config.head_dims), rngs=nnx.Rngs(0))

    reduced = tuple(model_config.depths) != DEPTHS or model_config.base_width != BASE_WIDTH
    if reduced and model_config.pretrained:
        raise ValueError(
            f"config.model.pretrained={model_config.pretrained!r} holds WideResNet50-2 weights but "
            f"config.model.depths={tuple(model_config.depths)}, base_width="
            f"{model_config.base_width} is a reduced member; set --config.model.pretrained= "
            f"(train from scratch) or restore depths={DEPTHS}, base_width={BASE_WIDTH}."
        )
    model = nnx.eval_shape(build)
    if not abstract:
        fill_random(model, np.random.default_rng([seed, 7]))
        if model_config.pretrained:
            model.backbone = load_pretrained(
                model_config.pretrained,
                wdam_layers=tuple(model_config.wdam_layers),
                wdam_reduction=model_config.wdam_reduction,
                dtype=_dtype(model_config.dtype),
                seed=seed,
            )
        else:
            logging.warning(
                "\n%s\nWARNING: config.model.pretrained is empty: training a %s FROM "
                "SCRATCH (random init). The paper starts from ImageNet weights; convert them with "
                "`python -m launch.convert_weights --torchvision=wide_resnet50_2-<hash>.pth "
                "--out=weights/wrn50_2_imagenet` and set --config.model.pretrained to that folder"
                " (with config.model.depths=(3, 4, 6, 3), base_width=64).\n%s",
                "=" * 100,
                network_name(model_config.depths, model_config.base_width),
                "=" * 100,
            )
    for index in model.backbone.wdam_layers:
        for block in getattr(model.backbone, f"layer{index}"):
            block.wdam = GatedWDAM(block.wdam)
    if abstract:
        fill_untrained(model, 1.0)  # gates on, WDAM diagnostics: restored runs set them
    return model
