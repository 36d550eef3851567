"""dwt2 + idwt2 round trip against a device copy of the same tensor (the bandwidth floor).

    python benchmarks/bench_wavelet.py [--shape=8,64,64,256] [--repeats=20]

Times, in one process, jit-compiled: a copy of x, the round trip idwt2(dwt2(x)) in the paper's
conv formulation and in the space-to-depth (reshape) one, in float32 and bfloat16, and prints
their ratios to the copy. The default shape is WRN50-2's layer1 output for a batch of 8 at 256x256,
where the paper puts WDAM.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from wdam_jax.complexity import median_latency
from wdam_jax.wavelet import dwt2, idwt2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8,64,64,256")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"backend={jax.default_backend()} devices={jax.devices()} shape={shape}")
    print(
        "| dtype | copy (ms) | conv round trip (ms) | reshape round trip (ms) "
        "| conv / copy | reshape / copy | conv / reshape |"
    )
    print("|---|---|---|---|---|---|---|")
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)
        copy = jax.jit(jnp.copy)
        times = {"copy": median_latency(copy, x, repeats=args.repeats)}
        for method in ("conv", "reshape"):
            fn = jax.jit(lambda x, m=method: idwt2(*dwt2(x, method=m), size=x.shape[1:3], method=m))
            np.testing.assert_allclose(  # Exactness, so the timing compares equal results.
                np.asarray(fn(x), np.float32), np.asarray(x, np.float32), atol=5e-2
            )
            times[method] = median_latency(fn, x, repeats=args.repeats)
        print(
            f"| {jnp.dtype(dtype).name} | {times['copy'] * 1e3:.2f} | {times['conv'] * 1e3:.2f} "
            f"| {times['reshape'] * 1e3:.2f} | {times['conv'] / times['copy']:.2f} "
            f"| {times['reshape'] / times['copy']:.2f} | {times['conv'] / times['reshape']:.2f} |"
        )


if __name__ == "__main__":
    main()
