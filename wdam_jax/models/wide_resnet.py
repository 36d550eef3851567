"""WideResNet50-2 in Flax NNX, with optional WDAM bottlenecks (paper Sec. 3.3, eq. 9; Fig. 5).

The architecture is torchvision's ``wide_resnet50_2`` (Bottleneck v1.5 with the stride on the 3x3
conv, expansion 4, width_per_group 128, layers [3, 4, 6, 3]). Submodule names mirror torchvision's
(``conv1``, ``bn1``, ``layer1[0].conv2``, ``layer2[0].downsample``, ``fc``) so weight conversion is
a name mapping (:func:`from_torchvision`, :func:`to_torchvision`).

Inputs are NHWC images in [0, 1]; ImageNet normalisation happens inside the model so synthetic
anomalies and real images share one range.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from wdam_jax import runlock
from wdam_jax.errors import MissingFileError, UserError
from wdam_jax.wdam import WDAM

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (planes, blocks, stride)
DEPTHS = tuple(blocks for _, blocks, _ in STAGES)  # WRN50-2: (3, 4, 6, 3)
BASE_WIDTH = 64  # stem channels and layer1's planes
EXPANSION = 4
WIDTH_FACTOR = 2  # width_per_group 128 / 64
FEATURES = ("stem", "layer1", "layer2", "layer3", "layer4", "pooled", "logits")

# torchvision's init: kaiming normal, fan_out, for convs.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def network_name(depths: Sequence[int], base_width: int) -> str:
    """What a log line calls the network built: ``"WideResNet50-2"`` for the full one, else
    ``"reduced WideResNet (1,1,1,1)/32"`` (bottlenecks per layer / base width)."""
    if tuple(depths) == DEPTHS and base_width == BASE_WIDTH:
        return "WideResNet50-2"
    return f"reduced WideResNet ({','.join(map(str, depths))})/{base_width}"


def _conv(cin: int, cout: int, kernel: int, stride: int, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    # Explicit symmetric padding: XLA's "SAME" pads (0, 1) at stride 2 where torch pads (1, 1).
    pad = kernel // 2
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_conv_init,
        dtype=dtype,
        rngs=rngs,
    )


def _bn(channels: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # torch momentum 0.1 on the new statistic == flax momentum 0.9 on the running one.
    return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


class Downsample(nnx.Module):
    """The projection shortcut; torchvision's ``downsample.0`` (conv) and ``downsample.1`` (bn)."""

    def __init__(self, cin: int, cout: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.conv = _conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs)
        self.bn = _bn(cout, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.bn(self.conv(x), use_running_average=not train)


class Bottleneck(nnx.Module):
    """torchvision's Bottleneck; with ``wdam=True`` it is the paper's Bottleneck* (eq. 9).

    Bottleneck* appends ``X' = ReLU(X + WDAM(X))`` to the block's output X. With all sub-band
    weights 0 it is the plain bottleneck; with all weights 1 it returns ``ReLU(2 X)``.
    """

    def __init__(
        self,
        cin: int,
        planes: int,
        *,
        stride: int,
        wdam: bool,
        wdam_reduction: int,
        dtype,
        rngs: nnx.Rngs,
    ):
        width = planes * WIDTH_FACTOR
        cout = planes * EXPANSION
        self.conv1 = _conv(cin, width, 1, 1, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(width, dtype=dtype, rngs=rngs)
        self.conv2 = _conv(width, width, 3, stride, dtype=dtype, rngs=rngs)
        self.bn2 = _bn(width, dtype=dtype, rngs=rngs)
        self.conv3 = _conv(width, cout, 1, 1, dtype=dtype, rngs=rngs)
        self.bn3 = _bn(cout, dtype=dtype, rngs=rngs)
        needs_projection = stride != 1 or cin != cout
        self.downsample = (
            Downsample(cin, cout, stride, dtype=dtype, rngs=rngs) if needs_projection else None
        )
        self.wdam = WDAM(cout, reduction=wdam_reduction, rngs=rngs) if wdam else None

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        frozen = not train
        out = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=frozen))
        out = jax.nn.relu(self.bn2(self.conv2(out), use_running_average=frozen))
        out = self.bn3(self.conv3(out), use_running_average=frozen)
        identity = x if self.downsample is None else self.downsample(x, train=train)
        out = jax.nn.relu(out + identity)
        if self.wdam is not None:
            out = jax.nn.relu(out + self.wdam(out))  # eq. 9
        return out


class WideResNet50_2(nnx.Module):
    """WideResNet50-2 returning named features.

    Args:
      wdam_layers: which of layers 1..4 use Bottleneck* (the paper's choice is ``(1,)``).
      num_classes: size of the ``fc`` classifier; ``None`` drops it (and the ``logits`` feature).
      wdam_reduction: the WDAM MLP reduction ratio r.
      dtype: computation dtype (e.g. ``jnp.bfloat16`` on GPU); parameters stay float32.
      depths: bottlenecks per layer; WRN50-2's ``(3, 4, 6, 3)`` by default.
      base_width: stem channels and layer1's ``planes`` (64 in WRN50-2); layer ``i`` has
        ``base_width * 2**(i-1)`` planes, width factor 2 and expansion 4 as WRN50-2.
      rngs: parameter initialisation keys.

    The defaults are WideResNet50-2. Smaller ``depths`` / ``base_width`` give a reduced member of
    the same family (same block, same Bottleneck* and WDAM, same named features) for tests and
    CPU demos; only the default architecture converts to and from torchvision's weights.
    """

    def __init__(
        self,
        *,
        wdam_layers: Sequence[int] = (),
        num_classes: int | None = 1000,
        wdam_reduction: int = 16,
        dtype: Any = None,
        depths: Sequence[int] = DEPTHS,
        base_width: int = BASE_WIDTH,
        rngs: nnx.Rngs,
    ):
        unknown = sorted(set(wdam_layers) - {1, 2, 3, 4})
        if unknown:
            raise ValueError(f"wdam_layers must be drawn from 1..4, got {tuple(wdam_layers)}.")
        depths = tuple(int(d) for d in depths)
        if len(depths) != len(STAGES) or min(depths) < 1 or base_width < 1:
            raise ValueError(
                f"depths must be 4 positive block counts and base_width positive, got "
                f"depths={depths}, base_width={base_width}."
            )
        self.wdam_layers = tuple(sorted(set(wdam_layers)))
        self.dtype = dtype
        self.depths = depths
        self.base_width = int(base_width)
        self.conv1 = _conv(3, base_width, 7, 2, dtype=dtype, rngs=rngs)
        self.bn1 = _bn(base_width, dtype=dtype, rngs=rngs)
        cin = base_width
        for index, ((_, _, stride), blocks) in enumerate(zip(STAGES, depths, strict=True), start=1):
            planes = base_width * 2 ** (index - 1)
            layer = []
            for block in range(blocks):
                layer.append(
                    Bottleneck(
                        cin,
                        planes,
                        stride=stride if block == 0 else 1,
                        wdam=index in self.wdam_layers,
                        wdam_reduction=wdam_reduction,
                        dtype=dtype,
                        rngs=rngs,
                    )
                )
                cin = planes * EXPANSION
            setattr(self, f"layer{index}", nnx.List(layer))
        self.num_features = cin  # channels of layer4 and of ``pooled`` (2048 for WRN50-2)
        self.fc = nnx.Linear(cin, num_classes, rngs=rngs) if num_classes else None

    def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """Runs the network.

        Args:
          x: ``[B, H, W, 3]`` images in [0, 1].
          train: BatchNorm uses batch statistics and updates its running ones when True.

        Returns:
          ``stem`` ``[B, H/4, W/4, 64]`` (after the max-pool), ``layer1`` .. ``layer4``
          (``[B, H/4, W/4, 256]`` .. ``[B, H/32, W/32, 2048]``), ``pooled`` ``[B, 2048]`` and,
          with a classifier, ``logits`` ``[B, num_classes]``.
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"WideResNet50_2 expects [B, H, W, 3] images, got {x.shape}.")
        mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
        std = jnp.asarray(IMAGENET_STD, x.dtype)
        x = (x - mean) / std
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        x = lax.reduce_window(
            x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
        )
        features = {"stem": x}
        for index in range(1, len(STAGES) + 1):
            for block in getattr(self, f"layer{index}"):
                x = block(x, train=train)
            features[f"layer{index}"] = x
        features["pooled"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.fc is not None:
            features["logits"] = self.fc(features["pooled"])
        return features


def fill_random(model: nnx.Module, rng: np.random.Generator) -> None:
    """Draws ``model``'s variables with numpy, from the distributions of its initialisers.

    Convolutions: torchvision's kaiming normal (fan_out); linear layers: flax's lecun normal
    (truncated at 2 std, fan_in); BatchNorm: scale 1, bias 0, mean 0, var 1. Drawing with numpy
    avoids one XLA compile per parameter shape (15-60 s for WRN50-2 on a CPU).
    """
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        shape, dtype = var.get_value().shape, var.get_value().dtype
        leaf = str(path[-1])
        if leaf == "kernel" and len(shape) == 4:
            std = np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
            value = rng.normal(0.0, std, shape)
        elif leaf == "kernel" and len(shape) == 2:
            std = np.sqrt(1.0 / shape[0]) / 0.87962566103423978
            value = np.clip(rng.normal(0.0, 1.0, shape), -2.0, 2.0) * std
        elif leaf in ("scale", "var"):
            value = np.ones(shape)
        else:  # biases, running means, diagnostics
            value = np.zeros(shape)
        var.set_value(jnp.asarray(value, dtype))


def create(*, seed: int = 0, **kwargs: Any) -> WideResNet50_2:
    """A randomly initialised ``WideResNet50_2(**kwargs)``, built abstractly and drawn with numpy
    (:func:`fill_random`): the same distributions as eager construction, without one XLA compile
    per parameter shape (seconds instead of 15-35 s on a CPU)."""
    model = nnx.eval_shape(lambda: WideResNet50_2(**kwargs, rngs=nnx.Rngs(0)))
    fill_random(model, np.random.default_rng([seed, 11]))
    return model


# --------------------------------------------------------------------------------------------
# torchvision <-> Flax conversion: a name mapping over the flat state.

_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_MODULE_TO_TORCH = {"downsample.conv": "downsample.0", "downsample.bn": "downsample.1"}


def _torch_name(path: Sequence[Any]) -> str:
    """``('layer1', 0, 'downsample', 'conv', 'kernel')`` -> ``'layer1.0.downsample.0.weight'``."""
    *modules, leaf = (str(getattr(p, "key", p)) for p in path)
    name = ".".join(modules)
    for flax_name, torch_name in _MODULE_TO_TORCH.items():
        name = name.replace(flax_name, torch_name)
    return f"{name}.{_LEAF_TO_TORCH[leaf]}"


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # conv HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:  # linear [in, out] -> [out, in]
        return value.T
    return value


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    return value


def _flat_variables(model: nnx.Module):
    """Yields ``(torch_name, variable)`` for every parameter and batch statistic of ``model``."""
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, (nnx.Param, nnx.BatchStat)):
            yield _torch_name(path), variable


def _as_numpy(value: Any) -> np.ndarray:
    # Duck-typed so this module never imports torch: torch tensors have .detach().cpu().numpy().
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`WideResNet50_2` arguments a torchvision-named state_dict was exported from.

    Read from the names and shapes alone: ``depths`` (bottlenecks per layer), ``base_width``
    (``conv1``'s output channels), ``wdam_layers`` (layers holding ``layerN.i.wdam.*`` weights)
    and ``wdam_reduction`` (WDAM's ``4C / hidden``; 16 without WDAM weights). torchvision's
    ImageNet weights give ``(3, 4, 6, 3)``, 64, ``()``.
    """
    if "conv1.weight" not in state_dict:  # not a ResNet: from_torchvision names what is missing
        return dict(depths=DEPTHS, base_width=BASE_WIDTH, wdam_layers=(), wdam_reduction=16)
    blocks = {tuple(k.split(".")[:2]) for k in state_dict if k.startswith("layer")}
    depths = tuple(sum(1 for layer, _ in blocks if layer == f"layer{i}") for i in range(1, 5))
    wdam_keys = sorted(k for k in state_dict if ".wdam.fc1.weight" in k)
    reduction = 16
    if wdam_keys:
        hidden, four_c = _as_numpy(state_dict[wdam_keys[0]]).shape
        reduction = four_c // hidden
    return dict(
        depths=depths,
        base_width=int(_as_numpy(state_dict["conv1.weight"]).shape[0]),
        wdam_layers=tuple(sorted({int(k.split(".")[0][len("layer") :]) for k in wdam_keys})),
        wdam_reduction=reduction,
    )


def from_torchvision(
    state_dict: Mapping[str, Any],
    *,
    wdam_layers: Sequence[int] = (),
    wdam_reduction: int = 16,
    dtype: Any = None,
    seed: int = 0,
) -> WideResNet50_2:
    """Builds a :class:`WideResNet50_2` holding the weights of a torchvision state_dict.

    Args:
      state_dict: torchvision ``wide_resnet50_2().state_dict()`` (torch tensors or numpy arrays),
        e.g. from ``torch.load(path, weights_only=True)``, or :func:`to_torchvision`'s output
        (of a reduced network too: depths and width are read by :func:`architecture`).
      wdam_layers: layers that get Bottleneck*; WDAM weights absent from ``state_dict`` (ImageNet
        weights have none) keep their fresh initialisation from ``seed``.
      seed: initialisation seed for whatever the state_dict does not hold.

    Returns:
      The model; the classifier is kept when ``state_dict`` has ``fc.weight``.

    Raises:
      ValueError: when keys are missing, unexpected, or of the wrong shape.
    """
    has_fc = "fc.weight" in state_dict
    num_classes = int(_as_numpy(state_dict["fc.weight"]).shape[0]) if has_fc else None
    shape = architecture(state_dict)
    # Shapes only (a real initialisation costs one XLA compile per parameter shape on CPU); every
    # variable is then filled from the state_dict, and only the small WDAMs are initialised.
    model = nnx.eval_shape(
        lambda: WideResNet50_2(
            wdam_layers=wdam_layers,
            num_classes=num_classes,
            wdam_reduction=wdam_reduction,
            dtype=dtype,
            depths=shape["depths"],
            base_width=shape["base_width"],
            rngs=nnx.Rngs(0),
        )
    )
    rngs = nnx.Rngs(seed)
    for index in model.wdam_layers:
        for block in getattr(model, f"layer{index}"):
            shape = block.wdam
            block.wdam = WDAM(shape.channels, reduction=shape.reduction, rngs=rngs)
    used, missing, wrong_shape = set(), [], []
    for name, variable in _flat_variables(model):
        if name not in state_dict:
            if ".wdam." not in name:
                missing.append(name)
            continue
        value = _from_torch_layout(_as_numpy(state_dict[name]).astype(np.float32))
        if value.shape != variable.get_value().shape:
            wrong_shape.append(f"{name}: {value.shape} != {variable.get_value().shape}")
            continue
        variable.set_value(jnp.asarray(value))
        used.add(name)
    unexpected = sorted(
        k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            "The state_dict is not a torchvision wide_resnet50_2 one "
            f"(wdam_layers={tuple(wdam_layers)}): missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), wrong shape {wrong_shape[:5]}. "
            "Export it with torchvision.models.wide_resnet50_2(...).state_dict()."
        )
    return model


def to_torchvision(model: WideResNet50_2) -> dict[str, np.ndarray]:
    """Exports ``model`` as a torchvision-named state_dict of numpy arrays.

    The result loads strictly into ``torchvision.models.wide_resnet50_2()`` (after
    ``torch.from_numpy``) for a model without WDAM; WDAM weights are exported as
    ``layerN.i.wdam.fc{1,2}.{weight,bias}``.
    """
    state = {}
    for name, variable in _flat_variables(model):
        state[name] = _to_torch_layout(np.asarray(variable.get_value(), np.float32))
        if name.endswith(".running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    return state


def _is_converted_checkpoint(directory: pathlib.Path) -> bool:
    """Whether ``directory`` holds an orbax checkpoint of torchvision-named ResNet weights."""
    import orbax.checkpoint as ocp

    # orbax writes this file last; without it the folder is not a (finished) orbax checkpoint,
    # and asking orbax for metadata would only log warnings.
    if not (directory / "_CHECKPOINT_METADATA").is_file():
        return False
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.metadata(directory).item_metadata.tree
    except Exception:  # orbax raises several types for foreign or damaged folders.
        return False
    return isinstance(tree, Mapping) and {"conv1", "layer1"} <= set(tree)


_OUTPUT = dict(
    owns=_is_converted_checkpoint,
    kind="converted WideResNet checkpoint",
    suggest="wrn50_2_imagenet",
)


def check_output_folder(directory: str | pathlib.Path) -> pathlib.Path:
    """Refuses an output folder that :func:`save_pretrained` must not replace.

    Args:
      directory: the checkpoint folder to be written.

    Returns:
      ``directory`` as an absolute path.

    Raises:
      FileExistsError: ``directory`` is a file, or a non-empty folder that does not hold a
        previous conversion (e.g. ``weights/`` beside the SAM and Stable Diffusion weights).
    """
    return runlock.check_output(directory, **_OUTPUT)


def save_pretrained(state_dict: Mapping[str, Any], directory: str | pathlib.Path) -> pathlib.Path:
    """Writes a torchvision-named state_dict as an orbax checkpoint that configs can name.

    The checkpoint is written into a temporary sibling folder and moved to ``directory`` only
    once complete (:func:`wdam_jax.runlock.publish`), so a previous conversion there is replaced
    only by a finished one and is left as it was when writing fails.

    Args:
      state_dict: torchvision names to arrays (torch tensors or numpy).
      directory: a new or empty folder, or one holding a previous conversion.

    Returns:
      ``directory`` as an absolute path.

    Raises:
      FileExistsError: see :func:`check_output_folder`.
    """
    import orbax.checkpoint as ocp

    directory = check_output_folder(directory)
    tree: dict[str, Any] = {}
    for name, value in state_dict.items():
        node = tree
        *parents, leaf = name.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = _as_numpy(value)
    with runlock.publish(directory, **_OUTPUT) as staging:
        staging.rmdir()  # orbax makes the folder it saves into
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging, tree)
    return directory


def load_pretrained(
    directory: str | pathlib.Path,
    *,
    wdam_layers: Sequence[int] = (),
    wdam_reduction: int = 16,
    dtype: Any = None,
    seed: int = 0,
) -> WideResNet50_2:
    """Builds the model from a checkpoint written by ``python -m launch.convert_weights`` (or a
    trained run's ``backbone`` folder, :func:`wdam_jax.runs.write_backbone`)."""
    return from_torchvision(
        read_pretrained(directory),
        wdam_layers=wdam_layers,
        wdam_reduction=wdam_reduction,
        dtype=dtype,
        seed=seed,
    )


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A torchvision-named state_dict from a ``.npz`` file (a trained run's ``backbone.npz``,
    :func:`wdam_jax.runs.write_backbone`) or a :func:`save_pretrained` folder."""
    path = pathlib.Path(path)
    if path.is_dir():
        return read_pretrained(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise MissingFileError(f"No WideResNet weights at {path}.") from None
    except (OSError, ValueError) as e:  # truncated or not an npz
        raise UserError(
            f"{path} is not a readable .npz of WideResNet weights ({e}); write it again (a "
            "run's backbone.npz: re-run its python -m launch.train command after deleting it)."
        ) from None


def read_pretrained(directory: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The torchvision-named state_dict that :func:`save_pretrained` wrote to ``directory``."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        raise MissingFileError(
            f"No converted WideResNet50-2 weights at {directory}. Create them with "
            "`python -m launch.convert_weights --torchvision=wide_resnet50_2-<hash>.pth "
            f"--out={directory}` (the .pth is torchvision's IMAGENET1K_V1/V2 file)."
        )
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(directory)
    return {
        ".".join(str(getattr(k, "key", k)) for k in path): np.asarray(value)
        for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
