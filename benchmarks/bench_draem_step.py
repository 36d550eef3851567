"""DRAEM training-step throughput: the jit-compiled JAX step vs the same step in PyTorch.

  python benchmarks/bench_draem_step.py                  # the demo's network: 64 px, widths 16
  python benchmarks/bench_draem_step.py --image_size=256 --recon_width=128 --disc_width=64  # GPU

Both sides run one optimisation step of DRAEM: the reconstructive auto-encoder and the
discriminative U-Net (JAX: ``wdam_jax.models.draem``; PyTorch: the same layers written below),
in training mode (BatchNorm batch statistics), the loss ``L2 + (1 - SSIM) + focal`` (11 x 11
Gaussian SSIM, focal gamma 2 on the softmax) and Adam, on the same batch, with the same number of
CPU threads, in the same process, timed round-robin so load drifts hit both alike. Parameter
counts are checked equal. Images/s are medians over ``--steps`` timed steps after ``--warmup``
(JAX's compile is excluded and reported apart). The ratio printed last is JAX / PyTorch
images/s (> 1: JAX faster).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from wdam_jax.methods.draem import focal_loss, ssim_map
from wdam_jax.models.draem import Draem


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--recon_width", type=int, default=16)
    p.add_argument("--disc_width", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p.parse_args()


# --------------------------------------------------------------------------------------------
# PyTorch: DRAEM's two sub-networks (same layers as wdam_jax/models/draem.py) and loss.


def _cbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _double(cin: int, mid: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*_cbr(cin, mid), *_cbr(mid, cout))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *_cbr(cin, cout)
    )


class TorchReconstructive(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w]
        self.blocks = nn.ModuleList(
            _double(a, b, b) for a, b in zip([3, *widths[:-1]], widths, strict=True)
        )
        self.ups = nn.ModuleList(
            [_up(8 * w, 8 * w), _up(4 * w, 4 * w), _up(2 * w, 2 * w), _up(w, w)]
        )
        self.dbs = nn.ModuleList(
            [_double(8 * w, 8 * w, 4 * w), _double(4 * w, 4 * w, 2 * w), _double(2 * w, 2 * w, w),
             _double(w, w, w)]
        )  # fmt: skip
        self.out = nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(F.max_pool2d(x, 2) if i else x)
        for up, db in zip(self.ups, self.dbs, strict=True):
            x = db(up(x))
        return self.out(x)


class TorchDiscriminative(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
        self.blocks = nn.ModuleList(
            _double(a, b, b) for a, b in zip([6, *widths[:-1]], widths, strict=True)
        )
        stages = [(8, 8, 8), (8, 4, 8), (4, 2, 4), (2, 1, 2), (1, 1, 1)]  # up in, out, skip
        self.ups = nn.ModuleList(_up(a * w, b * w) for a, b, _ in stages)
        self.dbs = nn.ModuleList(_double((b + s) * w, b * w, b * w) for _, b, s in stages)
        self.out = nn.Conv2d(w, 2, 3, padding=1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.blocks):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        for up, db, skip in zip(self.ups, self.dbs, skips[-2::-1], strict=True):
            x = db(torch.cat([up(x), skip], dim=1))
        return self.out(x)


def _torch_ssim(x, y, window: int = 11, sigma: float = 1.5):
    c = x.shape[1]
    g = torch.exp(-((torch.arange(window) - window // 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()
    blur = lambda v: F.conv2d(v, kernel, padding=window // 2, groups=c)
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def _torch_focal(probs, target, gamma: float = 2.0, smooth: float = 1e-5):
    onehot = torch.stack([1 - target, target], dim=1).clamp(smooth, 1 - smooth)
    pt = (onehot * probs).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


# --------------------------------------------------------------------------------------------


def _jax_step(args, batch):
    model = Draem(recon_width=args.recon_width, disc_width=args.disc_width, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-4)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, rest, opt_state, batch):
        def objective(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            out = m(batch["augmented"], train=True)
            rec = out["reconstruction"]
            probs = jax.nn.softmax(out["logits"], axis=-1)
            loss = (
                jnp.mean((rec - batch["image"]) ** 2)
                + 1.0
                - jnp.mean(ssim_map(rec, batch["image"]))
                + focal_loss(probs, batch["mask"], gamma=2.0)
            )
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        (loss, new_rest), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, loss

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    state = [params, rest, tx.init(params)]
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

    def run():
        state[0], state[1], state[2], loss = step(*state, jbatch)
        return loss

    start = time.perf_counter()
    jax.block_until_ready(run())
    return run, n_params, time.perf_counter() - start


def _torch_step(args, batch):
    recon, disc = TorchReconstructive(args.recon_width), TorchDiscriminative(args.disc_width)
    params = [*recon.parameters(), *disc.parameters()]
    opt = torch.optim.Adam(params, lr=1e-4)
    to = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
    image, augmented = to(batch["image"]), to(batch["augmented"])
    mask = torch.from_numpy(batch["mask"])

    def run():
        rec = recon(augmented)
        probs = torch.softmax(disc(torch.cat([rec, augmented], dim=1)), dim=1)
        loss = (
            F.mse_loss(rec, image)
            + 1.0
            - _torch_ssim(rec, image).mean()
            + _torch_focal(probs, mask)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return run, sum(p.numel() for p in params)


def main():
    args = _parse()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    image = rng.random(shape, np.float32)
    mask = (rng.random(shape[:3]) < 0.1).astype(np.float32)
    augmented = np.where(mask[..., None] > 0, rng.random(shape, np.float32), image)
    batch = {"image": image, "augmented": augmented, "mask": mask}
    jax_run, jax_params, compile_s = _jax_step(args, batch)
    torch_run, torch_params = _torch_step(args, batch)
    if jax_params != torch_params:
        raise SystemExit(f"Parameter counts differ: JAX {jax_params}, PyTorch {torch_params}.")
    fns = {"jax": lambda: jax.block_until_ready(jax_run()), "torch": torch_run}
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(args.steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ips = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    print(
        f"backend={jax.default_backend()} threads={args.threads} batch={args.batch_size} "
        f"size={args.image_size} widths={args.recon_width}/{args.disc_width} "
        f"params={jax_params} jax_compile={compile_s:.1f}s load={os.getloadavg()[0]:.2f}"
    )
    print("| JAX (img/s) | PyTorch (img/s) | JAX / PyTorch |")
    print("|---|---|---|")
    print(f"| {ips['jax']:.2f} | {ips['torch']:.2f} | {ips['jax'] / ips['torch']:.3f} |")


if __name__ == "__main__":
    main()
