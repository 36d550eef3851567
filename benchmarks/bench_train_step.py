"""CutPaste training-step throughput: the jit-compiled JAX step vs the same step in PyTorch.

  python benchmarks/bench_train_step.py                       # 2 CPU threads: 96 px, 4 x 3 images
  python benchmarks/bench_train_step.py --image_size=256 --batch_size=32 --steps=20   # GPU

Both sides run one optimisation step of the 3-way CutPaste classifier: WideResNet50-2 (JAX:
``wdam_jax``'s model; PyTorch: ``torchvision.models.wide_resnet50_2``), CutPaste's projection head
(Linear-BatchNorm-ReLU, 512 x 8 then 128), a 3-way linear classifier, softmax cross-entropy, and
stage 1's optimiser (SGD, lr 0.03, momentum 0.9, weight decay 3e-5), in training mode (BatchNorm
batch statistics), on the same batch (``3 * batch_size`` images of ``image_size`` pixels), with
the same number of CPU threads, in the same process. Images/s are medians over ``--steps`` timed
steps after ``--warmup`` untimed ones (JAX's compile is excluded and reported apart). The ratio
printed last is JAX / PyTorch (> 1: JAX faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image_size", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=4, help="normal images; x3 images per step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--wdam_layers", default="", help="JAX only, e.g. '1' (PyTorch has no WDAM)")
    return p.parse_args()


def _time(fn, *, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_jax(args, images, labels) -> tuple[float, float, str]:
    import jax
    import numpy as np

    from configs import cutpaste as cutpaste_config
    from wdam_jax import state as state_lib
    from wdam_jax import train
    from wdam_jax.methods import cutpaste

    config = cutpaste_config.get_config()
    config.model.pretrained = ""
    config.model.wdam_layers = tuple(int(x) for x in args.wdam_layers.split(",") if x)
    config.train.batch_size = args.batch_size
    config.train.stage1_steps = 10**6  # stay in stage 1 (SGD), as the PyTorch side
    method = cutpaste.CutPaste(config)
    mesh = state_lib.data_mesh()
    graphdef, rest, tx, state = state_lib.init_state(method, config)
    step_fn = train.compile_train_step(graphdef, rest, method.loss, tx, mesh)
    batch = train.shard_batch({"image": images, "label": labels.astype(np.int32)}, mesh)
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    times = _time(step, steps=args.steps, warmup=max(0, args.warmup - 1))
    return statistics.median(times), compile_s, str(jax.devices()[0].device_kind)


def bench_torch(args, images, labels) -> tuple[float, str]:
    import torch
    import torchvision

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = torchvision.models.wide_resnet50_2(weights=None)
    backbone.fc = torch.nn.Identity()
    layers, last = [], 2048
    for width in (512,) * 8 + (128,):
        layers += [torch.nn.Linear(last, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU()]
        last = width
    model = torch.nn.Sequential(backbone, *layers, torch.nn.Linear(last, 3)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=3e-5)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    # Same [0, 1] NHWC batch; the normalisation the JAX model does inside is done here too.
    x = ((torch.from_numpy(images).permute(0, 3, 1, 2) - mean) / std).contiguous().to(device)
    y = torch.from_numpy(labels).long().to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    times = _time(step, steps=args.steps, warmup=args.warmup)
    return statistics.median(times), f"{device} ({torch.get_num_threads()} threads)"


def main() -> None:
    args = _parse()
    import numpy as np

    rng = np.random.default_rng(0)
    n = 3 * args.batch_size
    images = rng.random((n, args.image_size, args.image_size, 3), dtype=np.float32)
    labels = np.repeat(np.arange(3), args.batch_size)
    jax_s, compile_s, jax_device = bench_jax(args, images, labels)
    torch_s, torch_device = bench_torch(args, images, labels)
    print(
        f"CutPaste train step, {n} images of {args.image_size} px, WDAM layers "
        f"{args.wdam_layers or 'none'} (JAX), median of {args.steps} steps:"
    )
    print(
        f"  JAX     ({jax_device}): {jax_s:.3f} s/step, {n / jax_s:.2f} images/s "
        f"(compile {compile_s:.1f} s)"
    )
    print(f"  PyTorch ({torch_device}): {torch_s:.3f} s/step, {n / torch_s:.2f} images/s")
    print(f"  ratio JAX/PyTorch images/s: {torch_s / jax_s:.2f}")


if __name__ == "__main__":
    main()
