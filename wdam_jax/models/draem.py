"""DRAEM's two sub-networks in Flax NNX (Zavrtanik et al., ICCV 2021), with optional WDAM blocks.

The architecture is the official DRAEM code's (``model_unet.py``):

- :class:`ReconstructiveSubNetwork`: an encoder of five blocks of two ``3x3 conv -> BatchNorm ->
  ReLU`` (widths ``w, 2w, 4w, 8w, 8w``, ``w = 128``) with 2x2 max-pooling between blocks, and a
  decoder without skip connections (four ``bilinear x2 upsample -> conv-BN-ReLU`` + two
  conv-BN-ReLU stages, then a 3x3 conv to 3 channels).
- :class:`DiscriminativeSubNetwork`: a U-Net of six encoder blocks (``w, 2w, 4w, 8w, 8w, 8w``,
  ``w = 64``) and five upsampling stages with skip connections, on the image concatenated with
  its reconstruction (6 channels), to 2 logits per pixel.

Submodule names mirror the official code's (``encoder.block1.conv1``, ``decoder.up1``,
``encoder_segment``, ``decoder_segment.db_b``, ``fin_out``) so a weight conversion from its
checkpoints is a name mapping.

WDAM (paper Sec. 4.2, "integrated after the first three blocks in DRAEM's five-block
architecture"): after each encoder block named in ``wdam_blocks`` of the reconstructive network,
``X' = ReLU(X + WDAM(X))`` (eq. 9 applied to the block's output X). X is post-ReLU, so with all
sub-band weights 0 the block is the plain one.

Upsampling is bilinear with ``align_corners=True`` as the official code. At sizes that are not a
multiple of 16 (reconstructive) or 32 (discriminative) the official network fails (its decoder
output no longer matches the input); here each upsampling goes to the size of the encoder
feature map it mirrors, which is exactly ``x2`` at those multiples, so every size works.

Inputs are NHWC images in [0, 1], used as they are (DRAEM does not normalise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wdam_jax.wdam import WDAM

RECON_WIDTH = 128  # the official ReconstructiveSubNetwork's base_width
DISC_WIDTH = 64  # the official DiscriminativeSubNetwork's base_channels
NUM_ENCODER_BLOCKS = 5


def _bn(channels: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    # torch momentum 0.1 on the new statistic == flax momentum 0.9 on the running one.
    return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)


def _conv3x3(cin: int, cout: int, *, rngs: nnx.Rngs) -> nnx.Conv:
    # torch Conv2d(kernel_size=3, padding=1) with its default bias.
    return nnx.Conv(cin, cout, kernel_size=(3, 3), padding=((1, 1), (1, 1)), rngs=rngs)


def _max_pool(x: jax.Array) -> jax.Array:
    """torch ``MaxPool2d(2)``: 2x2 windows, stride 2, odd sizes floored."""
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` linear interpolation weights with ``align_corners=True``."""
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
    frac = pos - lo
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] += 1.0 - frac
    if n_in > 1:
        m[np.arange(n_out), lo + 1] += frac
    return m


def upsample_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of ``[B, h, w, C]`` to ``[B, H, W, C]`` with ``align_corners=True``
    (torch ``nn.Upsample(mode="bilinear", align_corners=True)``), as two small matmuls."""
    mh = jnp.asarray(_align_corners_matrix(x.shape[1], size[0]), x.dtype)
    mw = jnp.asarray(_align_corners_matrix(x.shape[2], size[1]), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", mh, x)
    return jnp.einsum("pw,bowc->bopc", mw, x)


class ConvBNReLU(nnx.Module):
    """``ReLU(BatchNorm(Conv3x3(x)))``."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.conv = _conv3x3(cin, cout, rngs=rngs)
        self.bn = _bn(cout, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


class DoubleConv(nnx.Module):
    """Two :class:`ConvBNReLU`: ``cin -> mid -> cout`` (an encoder block, or a decoder ``db``)."""

    def __init__(self, cin: int, mid: int, cout: int, *, rngs: nnx.Rngs):
        self.conv1 = ConvBNReLU(cin, mid, rngs=rngs)
        self.conv2 = ConvBNReLU(mid, cout, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.conv2(self.conv1(x, train=train), train=train)


class Up(nnx.Module):
    """Bilinear upsampling to ``size`` (``x2`` at the official sizes), then ConvBNReLU."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.conv = ConvBNReLU(cin, cout, rngs=rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int], *, train: bool) -> jax.Array:
        return self.conv(upsample_bilinear(x, size), train=train)


class EncoderReconstructive(nnx.Module):
    """Five blocks (widths ``w, 2w, 4w, 8w, 8w``), max-pool between them; WDAM after the blocks
    in ``wdam_blocks``. Returns the five block outputs (after WDAM where present)."""

    def __init__(
        self,
        cin: int,
        width: int,
        *,
        wdam_blocks: Sequence[int],
        wdam_reduction: int,
        rngs: nnx.Rngs,
    ):
        widths = (width, 2 * width, 4 * width, 8 * width, 8 * width)
        ins = (cin, *widths[:-1])
        self.wdam_blocks = tuple(sorted(set(wdam_blocks)))
        for i, (a, b) in enumerate(zip(ins, widths, strict=True), start=1):
            setattr(self, f"block{i}", DoubleConv(a, b, b, rngs=rngs))
            wdam = WDAM(b, reduction=wdam_reduction, rngs=rngs) if i in self.wdam_blocks else None
            setattr(self, f"wdam{i}", wdam)

    def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
        outs = []
        for i in range(1, NUM_ENCODER_BLOCKS + 1):
            if i > 1:
                x = _max_pool(x)
            x = getattr(self, f"block{i}")(x, train=train)
            wdam = getattr(self, f"wdam{i}")
            if wdam is not None:
                x = jax.nn.relu(x + wdam(x))  # eq. 9 on the block's output
            outs.append(x)
        return outs


class DecoderReconstructive(nnx.Module):
    """No skips: four ``up -> db`` stages (``8w -> 4w -> 2w -> w -> w``), a conv to ``cout``."""

    def __init__(self, width: int, cout: int, *, rngs: nnx.Rngs):
        w = width
        self.up1 = Up(8 * w, 8 * w, rngs=rngs)
        self.db1 = DoubleConv(8 * w, 8 * w, 4 * w, rngs=rngs)
        self.up2 = Up(4 * w, 4 * w, rngs=rngs)
        self.db2 = DoubleConv(4 * w, 4 * w, 2 * w, rngs=rngs)
        self.up3 = Up(2 * w, 2 * w, rngs=rngs)
        self.db3 = DoubleConv(2 * w, 2 * w, w, rngs=rngs)
        self.up4 = Up(w, w, rngs=rngs)
        self.db4 = DoubleConv(w, w, w, rngs=rngs)
        self.fin_out = _conv3x3(w, cout, rngs=rngs)

    def __call__(self, b5: jax.Array, sizes: Sequence[tuple[int, int]], *, train: bool):
        """``b5`` and the spatial sizes of encoder blocks 4, 3, 2, 1 (the upsampling targets)."""
        x = b5
        for i, size in enumerate(sizes, start=1):
            x = getattr(self, f"up{i}")(x, size, train=train)
            x = getattr(self, f"db{i}")(x, train=train)
        return self.fin_out(x)


class ReconstructiveSubNetwork(nnx.Module):
    """DRAEM's reconstructive auto-encoder: ``[B, H, W, 3] -> [B, H, W, 3]``.

    Args:
      width: base width ``w`` (128 in DRAEM; smaller for CPU demos and tests).
      wdam_blocks: encoder blocks (1..5) followed by ``ReLU(X + WDAM(X))``; the paper: (1, 2, 3).
      wdam_reduction: the WDAM MLP reduction ratio r.
      rngs: initialisation keys.
    """

    def __init__(
        self,
        *,
        width: int = RECON_WIDTH,
        wdam_blocks: Sequence[int] = (),
        wdam_reduction: int = 16,
        rngs: nnx.Rngs,
    ):
        unknown = sorted(set(wdam_blocks) - set(range(1, NUM_ENCODER_BLOCKS + 1)))
        if unknown:
            raise ValueError(f"wdam_blocks must be drawn from 1..5, got {tuple(wdam_blocks)}.")
        self.encoder = EncoderReconstructive(
            3, width, wdam_blocks=wdam_blocks, wdam_reduction=wdam_reduction, rngs=rngs
        )
        self.decoder = DecoderReconstructive(width, 3, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        blocks = self.encoder(x, train=train)
        sizes = [b.shape[1:3] for b in blocks[-2::-1]]
        return self.decoder(blocks[-1], sizes, train=train)


class EncoderDiscriminative(nnx.Module):
    """Six blocks (``w, 2w, 4w, 8w, 8w, 8w``), max-pool between them; returns all six outputs."""

    def __init__(self, cin: int, width: int, *, rngs: nnx.Rngs):
        widths = (width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width)
        for i, (a, b) in enumerate(zip((cin, *widths[:-1]), widths, strict=True), start=1):
            setattr(self, f"block{i}", DoubleConv(a, b, b, rngs=rngs))

    def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
        outs = []
        for i in range(1, 7):
            x = getattr(self, f"block{i}")(_max_pool(x) if i > 1 else x, train=train)
            outs.append(x)
        return outs


class DecoderDiscriminative(nnx.Module):
    """U-Net decoder: ``up`` then concatenation with the mirrored encoder block, then ``db``."""

    def __init__(self, width: int, cout: int, *, rngs: nnx.Rngs):
        w = width
        # (name, up in, up out = db out, skip width)
        self._stages = (
            ("b", 8, 8, 8),
            ("1", 8, 4, 8),
            ("2", 4, 2, 4),
            ("3", 2, 1, 2),
            ("4", 1, 1, 1),
        )
        for name, cin, cout_, skip in self._stages:
            setattr(
                self, f"up{'_' if name == 'b' else ''}{name}", Up(cin * w, cout_ * w, rngs=rngs)
            )
            db = DoubleConv((cout_ + skip) * w, cout_ * w, cout_ * w, rngs=rngs)
            setattr(self, f"db{'_' if name == 'b' else ''}{name}", db)
        self.fin_out = _conv3x3(w, cout, rngs=rngs)

    def __call__(self, blocks: Sequence[jax.Array], *, train: bool) -> jax.Array:
        x = blocks[-1]
        for (name, *_), skip in zip(self._stages, blocks[-2::-1], strict=True):
            sep = "_" if name == "b" else ""
            x = getattr(self, f"up{sep}{name}")(x, skip.shape[1:3], train=train)
            x = getattr(self, f"db{sep}{name}")(jnp.concatenate([x, skip], axis=-1), train=train)
        return self.fin_out(x)


class DiscriminativeSubNetwork(nnx.Module):
    """DRAEM's discriminative U-Net: ``[B, H, W, cin] -> [B, H, W, cout]`` logits.

    Args:
      width: base width ``w`` (64 in DRAEM).
      cin: input channels (6: the image and its reconstruction).
      cout: output channels (2: normal / anomalous logits).
      rngs: initialisation keys.
    """

    def __init__(self, *, width: int = DISC_WIDTH, cin: int = 6, cout: int = 2, rngs: nnx.Rngs):
        self.encoder_segment = EncoderDiscriminative(cin, width, rngs=rngs)
        self.decoder_segment = DecoderDiscriminative(width, cout, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.decoder_segment(self.encoder_segment(x, train=train), train=train)


class Draem(nnx.Module):
    """Both sub-networks: reconstruct the (possibly anomalous) image, then segment anomalies from
    the image and its reconstruction.

    Args:
      recon_width: base width of the reconstructive network (128 in DRAEM).
      disc_width: base width of the discriminative network (64 in DRAEM).
      wdam_blocks: reconstructive encoder blocks followed by WDAM (the paper: (1, 2, 3)).
      wdam_reduction: the WDAM MLP reduction ratio r.
      rngs: initialisation keys.
    """

    def __init__(
        self,
        *,
        recon_width: int = RECON_WIDTH,
        disc_width: int = DISC_WIDTH,
        wdam_blocks: Sequence[int] = (),
        wdam_reduction: int = 16,
        rngs: nnx.Rngs,
    ):
        self.reconstructive = ReconstructiveSubNetwork(
            width=recon_width, wdam_blocks=wdam_blocks, wdam_reduction=wdam_reduction, rngs=rngs
        )
        self.discriminative = DiscriminativeSubNetwork(width=disc_width, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """``[B, H, W, 3]`` in [0, 1] -> ``reconstruction`` ``[B, H, W, 3]``, ``logits``
        ``[B, H, W, 2]`` and ``anomaly`` ``[B, H, W]`` (softmax probability of class 1).

        The discriminative network sees ``concat(reconstruction, x)`` in that order, as DRAEM.
        """
        reconstruction = self.reconstructive(x, train=train)
        logits = self.discriminative(jnp.concatenate([reconstruction, x], axis=-1), train=train)
        anomaly = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]
        return {"reconstruction": reconstruction, "logits": logits, "anomaly": anomaly}


def fill_random(model: nnx.Module, rng: np.random.Generator) -> None:
    """DRAEM's ``weights_init`` drawn with numpy (no XLA compile per parameter shape).

    Convolutions: weight ``N(0, 0.02)``, bias torch's default ``U(+-1/sqrt(fan_in))``; BatchNorm:
    scale ``N(1, 0.02)``, bias 0, running mean 0 and variance 1; WDAM's linear layers (which
    DRAEM's init does not touch): torch's default ``U(+-1/sqrt(fan_in))`` for weight and bias.
    """

    def put(var: nnx.Variable, value: np.ndarray) -> None:
        var.set_value(jnp.asarray(value, var.get_value().dtype))

    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Conv):
            shape = node.kernel.get_value().shape
            put(node.kernel, rng.normal(0.0, 0.02, shape))
            bound = 1.0 / math.sqrt(shape[0] * shape[1] * shape[2])
            put(node.bias, rng.uniform(-bound, bound, shape[-1]))
        elif isinstance(node, nnx.BatchNorm):
            n = node.scale.get_value().shape
            put(node.scale, rng.normal(1.0, 0.02, n))
            put(node.bias, np.zeros(n))
            put(node.mean, np.zeros(n))
            put(node.var, np.ones(n))
        elif isinstance(node, nnx.Linear):
            shape = node.kernel.get_value().shape
            bound = 1.0 / math.sqrt(shape[0])
            put(node.kernel, rng.uniform(-bound, bound, shape))
            put(node.bias, rng.uniform(-bound, bound, shape[-1]))
