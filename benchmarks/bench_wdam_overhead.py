"""Forward latency of WRN50-2 + WDAM(layer1) over plain WRN50-2 (target: <= 1.05x).

    python benchmarks/bench_wdam_overhead.py [--image_size=256] [--batch_sizes=1,8]
    python benchmarks/bench_wdam_overhead.py --quick   # small sizes: checks that it runs

Both models hold the same weights (a random torchvision WRN50-2 converted once); they are
jit-compiled for inference and timed round-robin in one process; the ratio is printed per batch
size for each WDAM formulation: the fused one (one 4x4 map per 2x2 block, the default), and the
reference one (dwt2 -> scale -> idwt2) with this backend's default wavelet formulation and with
the paper's conv one.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torchvision

from wdam_jax.complexity import inference_fn, interleaved_medians
from wdam_jax.models.wide_resnet import from_torchvision

# Column name -> (WDAM impl, wavelet method).
FORMULATIONS = {
    "fused": ("fused", "auto"),
    "reference auto": ("reference", "auto"),
    "reference conv": ("reference", "conv"),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--quick", action="store_true", help="64 px, batch 1, 2 repeats: a smoke run, no figure"
    )
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.batch_sizes, args.repeats = 64, "1", 2
    state_dict = torchvision.models.wide_resnet50_2().state_dict()
    plain = from_torchvision(state_dict)
    fns = {"plain": inference_fn(plain)}
    for name, (impl, method) in FORMULATIONS.items():
        model = from_torchvision(state_dict, wdam_layers=(1,))
        for block in model.layer1:
            block.wdam.impl, block.wdam.method = impl, method
        fns[name] = inference_fn(model)
    print(f"backend={jax.default_backend()} image_size={args.image_size}")
    names = list(FORMULATIONS)
    print(
        "| batch | plain (ms) | "
        + " | ".join(f"+WDAM {n} (ms)" for n in names)
        + " | "
        + " | ".join(f"{n} / plain" for n in names)
        + " |"
    )
    print("|---" * (2 + 2 * len(names)) + "|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        shape = (batch, args.image_size, args.image_size, 3)
        x = jnp.asarray(np.random.default_rng(0).uniform(size=shape), jnp.float32)
        t = interleaved_medians(fns, x, repeats=args.repeats)
        cells = [f"{t[n] * 1e3:.1f}" for n in names] + [f"{t[n] / t['plain']:.3f}" for n in names]
        print(f"| {batch} | {t['plain'] * 1e3:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
