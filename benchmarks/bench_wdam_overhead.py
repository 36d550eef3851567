"""Forward latency of WRN50-2 + WDAM(layer1) over plain WRN50-2 (target: <= 1.05x).

    python benchmarks/bench_wdam_overhead.py [--image_size=256] [--batch_sizes=1,8]

Both models hold the same weights (a random torchvision WRN50-2 converted once); they are
jit-compiled for inference and timed round-robin in one process; the ratio is printed per batch
size, for the default wavelet formulation of this backend and for the paper's conv one.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torchvision

from wdam_jax.complexity import inference_fn, interleaved_medians
from wdam_jax.models.wide_resnet import from_torchvision


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    state_dict = torchvision.models.wide_resnet50_2().state_dict()
    plain = from_torchvision(state_dict)
    fns = {"plain": inference_fn(plain)}
    for method in ("auto", "conv"):
        model = from_torchvision(state_dict, wdam_layers=(1,))
        for block in model.layer1:
            block.wdam.method = method
        fns[f"wdam[{method}]"] = inference_fn(model)
    print(f"backend={jax.default_backend()} image_size={args.image_size}")
    print(
        "| batch | plain (ms) | +WDAM auto (ms) | +WDAM conv (ms) | auto / plain | conv / plain |"
    )
    print("|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        shape = (batch, args.image_size, args.image_size, 3)
        x = jnp.asarray(np.random.default_rng(0).uniform(size=shape), jnp.float32)
        t = interleaved_medians(fns, x, repeats=args.repeats)
        print(
            f"| {batch} | {t['plain'] * 1e3:.1f} | {t['wdam[auto]'] * 1e3:.1f} "
            f"| {t['wdam[conv]'] * 1e3:.1f} | {t['wdam[auto]'] / t['plain']:.3f} "
            f"| {t['wdam[conv]'] / t['plain']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
