"""JAX WRN50-2 inference forward against torchvision's (target: ratio JAX / torch <= 1.0).

    python benchmarks/bench_wrn_vs_torch.py [--image_size=256] [--batch_size=8] [--threads=N]

Same weights, batch, size and thread count (torch.set_num_threads; XLA's CPU client uses the
machine's cores); both timed round-robin in one process. On a GPU both run on the GPU.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

from wdam_jax.complexity import inference_fn, interleaved_medians
from wdam_jax.models.wide_resnet import from_torchvision


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tv = torchvision.models.wide_resnet50_2().eval().to(device)
    jax_forward = inference_fn(from_torchvision(tv.state_dict()))
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    images = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
    x_jax = jnp.asarray(images)
    x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)

    def torch_forward(_):
        with torch.inference_mode():
            out = tv(x_torch)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    t = interleaved_medians(
        {"jax": lambda _: jax_forward(x_jax), "torch": torch_forward}, None, repeats=args.repeats
    )
    print(
        f"backend={jax.default_backend()} torch_device={device} threads={args.threads} "
        f"batch={args.batch_size} size={args.image_size}"
    )
    print("| JAX (ms) | torchvision (ms) | JAX / torch |")
    print("|---|---|---|")
    print(f"| {t['jax'] * 1e3:.1f} | {t['torch'] * 1e3:.1f} | {t['jax'] / t['torch']:.3f} |")


if __name__ == "__main__":
    main()
