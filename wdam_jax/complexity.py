"""Model complexity: parameters, XLA FLOPs and forward latency (paper Table 9)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` leaves) of ``model``."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def inference_fn(model: nnx.Module) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A jit-compiled inference forward ``x -> features`` with the model state closed over."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x, train=False)

    return lambda x: forward(state, x)


def xla_flops(model: nnx.Module, input_shape: tuple[int, ...]) -> float:
    """FLOPs of one inference forward as XLA's cost analysis counts them (2 per multiply-add)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, train=False))
    compiled = forward.lower(state, jax.ShapeDtypeStruct(input_shape, jnp.float32)).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # Older jax returns one dict per device.
        analysis = analysis[0]
    return float(analysis["flops"])


def median_latency(fn: Callable[..., object], *args: object, repeats: int) -> float:
    """Median wall time in seconds of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def interleaved_medians(
    fns: dict[str, Callable[..., object]], *args: object, repeats: int
) -> dict[str, float]:
    """Median seconds of each ``fn(*args)``, timed round-robin so load drifts hit all alike."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


@dataclasses.dataclass(frozen=True)
class Complexity:
    params: int
    flops: float
    latency_s: dict[int, float]  # batch size -> median seconds

    @property
    def params_mib(self) -> float:
        return self.params * 4 / 2**20


def measure(
    model: nnx.Module, *, image_size: int, batch_sizes: tuple[int, ...], repeats: int
) -> Complexity:
    """Parameters, per-image FLOPs and median latency of ``model`` at ``image_size``."""
    fn = inference_fn(model)
    latency = {}
    for batch in batch_sizes:
        x = jnp.asarray(
            np.random.default_rng(batch).uniform(size=(batch, image_size, image_size, 3)),
            jnp.float32,
        )
        latency[batch] = median_latency(fn, x, repeats=repeats)
    flops = xla_flops(model, (1, image_size, image_size, 3))
    return Complexity(params=count_params(model), flops=flops, latency_s=latency)


def table(results: dict[str, Complexity], *, baseline: str) -> str:
    """A markdown table of ``results`` with overhead ratios against ``baseline``."""
    base = results[baseline]
    batches = sorted(base.latency_s)
    header = ["model", "params (M)", "params (MiB fp32)", "GFLOPs"]
    header += [f"latency b{b} (ms)" for b in batches] + [f"x{baseline} b{b}" for b in batches]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, c in results.items():
        row = [name, f"{c.params / 1e6:.3f}", f"{c.params_mib:.2f}", f"{c.flops / 1e9:.3f}"]
        row += [f"{c.latency_s[b] * 1e3:.1f}" for b in batches]
        row += [f"{c.latency_s[b] / base.latency_s[b]:.3f}" for b in batches]
        lines.append("| " + " | ".join(row) + " |")
    ratio_p = results_ratio(results, baseline, lambda c: c.params)
    ratio_f = results_ratio(results, baseline, lambda c: c.flops)
    lines.append("")
    lines.append(f"parameter ratio {ratio_p}, FLOPs ratio {ratio_f} (vs {baseline})")
    return "\n".join(lines)


def results_ratio(results: dict[str, Complexity], baseline: str, key) -> str:
    base = key(results[baseline])
    return ", ".join(f"{name}: {key(c) / base:.4f}" for name, c in results.items())
