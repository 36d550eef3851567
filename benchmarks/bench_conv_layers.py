"""Where the DRAEM train step loses to PyTorch on a CPU: every 3x3 convolution shape of the demo
network, forward and forward + backward, XLA (``lax.conv_general_dilated``) against PyTorch
(oneDNN), same inputs, same threads, in one process.

  python benchmarks/bench_conv_layers.py          # the demo's shapes: 64 px, batch 8, width 16
  python benchmarks/bench_conv_layers.py --width=32 --image_size=128

``benchmarks/bench_draem_step.py`` times the whole step; this script splits it by layer shape so
that a change to the convolution path (an XLA flag, another formulation) can be judged per shape.
Times are medians of ``--repeats`` calls after one warm-up call (JAX's compile excluded); JAX's
includes its dispatch (~0.1 ms), which matters only for the smallest shapes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from jax import lax


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _conv(x, w):
    return lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _shapes(size: int, w: int) -> list[tuple[int, int, int]]:
    """(spatial size, in, out) of the distinct 3x3 convolutions of DRAEM's two sub-networks."""
    shapes = {(size, 3, w), (size, 6, w), (size, w, w), (size, 2 * w, w)}
    s, c = size, w
    for mult in (2, 4, 8, 8, 8):
        s //= 2
        shapes |= {(s, c, w * mult), (s, w * mult, w * mult), (s, 2 * w * mult, w * mult)}
        c = w * mult
    return sorted((shape for shape in shapes if shape[0] >= 1), reverse=True)


def _row(rng, args, size: int, cin: int, cout: int, fwd, both) -> list[float]:
    """Median ms of JAX forward, torch forward, JAX forward + backward, torch forward + backward."""
    x = rng.standard_normal((args.batch_size, size, size, cin), np.float32)
    w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    jx, jw = jnp.asarray(x), jnp.asarray(w)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_()

    def torch_both():
        tx.grad = tw.grad = None
        F.conv2d(tx, tw, padding=1).sum().backward()

    return [
        _median_ms(lambda: jax.block_until_ready(fwd(jx, jw)), args.repeats),
        _median_ms(lambda: F.conv2d(tx.detach(), tw.detach(), padding=1), args.repeats),
        _median_ms(lambda: jax.block_until_ready(both(jx, jw)), args.repeats),
        _median_ms(torch_both, args.repeats),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    fwd = jax.jit(_conv)
    both = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(_conv(x, w)), argnums=(0, 1)))
    print(
        f"backend={jax.default_backend()} threads={args.threads} batch={args.batch_size} "
        f"load={os.getloadavg()[0]:.2f}"
    )
    print("| size | in -> out | JAX fwd ms | torch fwd ms | JAX fwd+bwd ms | torch fwd+bwd ms |")
    print("|---:|---|---:|---:|---:|---:|")
    totals = np.zeros(4)
    for size, cin, cout in _shapes(args.image_size, args.width):
        row = _row(rng, args, size, cin, cout, fwd, both)
        totals += row
        print(f"| {size} | {cin} -> {cout} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    print("| **sum** | | " + " | ".join(f"**{v:.1f}**" for v in totals) + " |")
    print(
        f"JAX / torch time: forward {totals[0] / totals[1]:.2f}x, "
        f"forward + backward {totals[2] / totals[3]:.2f}x (> 1: JAX slower)"
    )


if __name__ == "__main__":
    main()
