"""PatchCore resized vs tiled on the high-resolution demo category ``fabric_2k`` (issue 28).

Both rows are ``configs/patchcore.py:demo`` (a randomly initialised, reduced WideResNet: no
weights exist here) on ``fabric_2k`` (2048 x 2048, defects 16-48 px across):

- ``resized``: every image resized to ``data.image_size`` (256), as every paper config does;
- ``tiled``: ``data.tile_size = tile_stride = 256`` (64 tiles per image at the original
  resolution, each seen at 256 px); the bank from a seeded subset of the training tiles
  (``patchcore.fit_max_patches``).

I-AUROC, P-AUROC and PRO are computed at the original resolution (2048 x 2048 masks), time per
test image is scoring only (features, kNN, maps, stitching; after one warm-up image), and peak
host memory is ``getrusage(RUSAGE_SELF).ru_maxrss`` of a fresh subprocess per row (it includes
the interpreter, JAX and the loaded splits). ``memory`` scores one 2448 x 2048 image with the
tiled run in a fresh subprocess: the peak resident set while scoring (``VmHWM`` reset after
fitting through ``/proc/self/clear_refs``, Linux) and that peak above the resident set before.

  PYTHONPATH=. python benchmarks/tiling_comparison.py --root=workdirs/demo_data
  PYTHONPATH=. python benchmarks/tiling_comparison.py --root=workdirs/demo_data --row=tiled

The first run generates ``fabric_2k`` under ``--root`` (~1 minute).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _vm_hwm_mb() -> float:
    """The process's peak resident set since the last reset (``/proc/self/clear_refs``)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(row: str, args):
    from configs import patchcore

    config = patchcore.get_config("demo")
    config.data.root = args.root
    config.data.category = "fabric_2k"
    config.data.image_size = 256
    config.data.holdout_fraction = 0.0
    config.score.eval_batch_size = 16
    for member in config.members.values():
        member.depths, member.base_width = (1, 1, 1, 1), args.base_width
    config.patchcore.target_dim = config.patchcore.pretrain_dim = args.dim
    if row != "resized":
        config.data.tile_size = config.data.tile_stride = 256
        config.patchcore.fit_max_patches = args.max_patches
    return config


def _fitted(config):
    from wdam_jax.methods import registry

    method = registry.method_class(config.method)(config)
    model = method.create_model()
    return method, model, method.fit(model, method.train_images(), step=0)


def run_row(row: str, args) -> dict:
    from wdam_jax import metrics
    from wdam_jax.data import sources, tiling

    config = _config(row, args)
    start = time.perf_counter()
    method, model, fitted = _fitted(config)
    fit_s = time.perf_counter() - start
    if row == "memory":
        image = np.random.default_rng(0).random((2048, 2448, 3), dtype=np.float32)
        method.score_images(model, fitted, image[None, :256, :256], step=0)  # compile
        before = _rss_mb()
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM: fit's peak is not ours
            f.write("5")
        start = time.perf_counter()
        out = method.score_images(model, fitted, image[None], step=0)
        return {
            "row": row,
            "image": "2448x2048 (W x H)",
            "tiles": len(tiling.grid(2048, 2448, size=256, stride=256)),
            "map": list(out.maps.shape[1:]),
            "seconds": round(time.perf_counter() - start, 2),
            "rss_before_mb": round(before, 1),
            "peak_while_scoring_mb": round(_vm_hwm_mb(), 1),
            "peak_above_before_mb": round(_vm_hwm_mb() - before, 1),
        }
    test = sources.load_split(config.data, split="test")
    method.score_images(model, fitted, test.images[:1], step=0)  # compile
    start = time.perf_counter()
    scores = method.score_images(model, fitted, test.images, step=0)
    per_image = (time.perf_counter() - start) / len(test)
    originals = [np.asarray(g, bool) for g in test.original_masks]
    found = metrics.evaluate_category(scores.image_scores, scores.maps, originals, test.labels)
    return {
        "row": row,
        "test_images": len(test),
        "map": list(scores.maps.shape[1:]),
        "i_auroc": round(100 * found["i_auroc"], 1),
        "p_auroc": round(100 * found["p_auroc"], 1),
        "pro": round(100 * found["pro"], 1),
        "fit_s": round(fit_s, 1),
        "s_per_image": round(per_image, 3),
        "peak_host_mb": round(_peak_mb(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="workdirs/demo_data")
    parser.add_argument("--row", choices=("resized", "tiled", "memory", "all"), default="all")
    parser.add_argument("--base_width", type=int, default=16, help="reduced WideResNet width")
    parser.add_argument("--dim", type=int, default=128, help="patchcore pretrain/target dim")
    parser.add_argument("--max_patches", type=int, default=65536, help="fit_max_patches")
    args = parser.parse_args()
    if args.row != "all":
        print(json.dumps(run_row(args.row, args)), flush=True)
        return
    from wdam_jax.data import demo

    demo.ensure_large_demo_data(f"{args.root}", seed=0)  # once, before the timed rows
    rows = []
    for row in ("resized", "tiled", "memory"):
        cmd = [sys.executable, __file__, f"--row={row}", f"--root={args.root}",
               f"--base_width={args.base_width}", f"--dim={args.dim}",
               f"--max_patches={args.max_patches}"]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    table = [
        "| run | I-AUROC | P-AUROC | PRO | s / image | peak host MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows[:2]:
        table.append(
            f"| {r['row']} | {r['i_auroc']} | {r['p_auroc']} | {r['pro']} | "
            f"{r['s_per_image']} | {r['peak_host_mb']} |"
        )
    print("\n".join(table))


if __name__ == "__main__":
    main()
