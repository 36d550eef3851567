"""Complexity report of WideResNet50-2 with and without WDAM (paper Table 9).

    python -m launch.complexity                       # 256x256, WDAM in layer1, batch 1 and 8
    python -m launch.complexity --wdam_layers=1,2 --image_size=224

Prints parameters (count and MiB), FLOPs from XLA's cost analysis and the median forward latency
at each batch size, with the overhead ratios. Paper (PyTorch, RTX A6000): 67.40 -> 67.59 "MB",
29.92 -> 29.94 GFLOPs, 5.71 -> 7.35 ms.
"""

from absl import flags
from flax import nnx

from launch import cli
from wdam_jax import complexity
from wdam_jax.models.wide_resnet import WideResNet50_2

_SIZE = flags.DEFINE_integer("image_size", 256, "Input height and width.")
_LAYERS = flags.DEFINE_list("wdam_layers", ["1"], "Layers with Bottleneck* in the WDAM model.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes for the latency.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed forwards per batch size (median).")


def main(argv):
    del argv
    layers = tuple(int(v) for v in _LAYERS.value)
    batches = tuple(int(v) for v in _BATCHES.value)
    results = {}
    for name, wdam_layers in (("WRN50-2", ()), (f"+WDAM{list(layers)}", layers)):
        model = WideResNet50_2(wdam_layers=wdam_layers, rngs=nnx.Rngs(0))
        results[name] = complexity.measure(
            model, image_size=_SIZE.value, batch_sizes=batches, repeats=_REPEATS.value
        )
        print(f"measured {name}", flush=True)
    print(f"\nWideResNet50-2 at {_SIZE.value}x{_SIZE.value}, jit-compiled inference forward:\n")
    print(complexity.table(results, baseline="WRN50-2"))


if __name__ == "__main__":
    cli.run(main, config_flag=None)
