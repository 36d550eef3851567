r"""The pruned exact kNN (``patchcore_index.PrunedBank``) vs faiss ``IndexFlatL2`` and brute force.

  python benchmarks/bench_knn_index.py                  # 20k bank (10 % coreset) and 200k bank
  python benchmarks/bench_knn_index.py --sizes 20k      # the 20k bank only
  python benchmarks/bench_knn_index.py --quick          # 8 train images per category: a smoke run

Banks and queries are real PatchCore features (``PatchCore._features``: layer2 + layer3 of the
demo config's WideResNet50-2, randomly initialised: no ImageNet weights exist on this machine) of
generated MVTec-layout images (``wdam_jax.data.demo``: the four demo categories at 224 px, more
training images than the demo's 30). The 200k bank is every training patch (64 images x 4
categories x 28 x 28 = 200,704 rows: one MVTec category's patch count); the 20k bank is the
project's own 10 % greedy coreset of it (``patchcore.greedy_coreset``); the queries are the patches
of test images of the same categories (good and defective). Features and banks are cached under
``--cache`` so reruns skip the extraction and the coreset.

In one process, alternating, median of ``--repeats``: faiss ``IndexFlatL2.search`` (squared L2,
k=1), brute force (``patchcore.knn_search``) and the pruned search. It checks that the pruned
search returns brute force's indices (exit 1 otherwise) and prints the ratios, the fraction of
the bank the proven bound needs and the fraction actually scanned, the fallback rate, the build
time, and how the time grows from the 20k to the 200k bank.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

SIZE = 224


def generated_images(category: str, count: int, *, split: int, defects: bool) -> np.ndarray:
    """``count`` demo images of ``category`` at 224 px in [0, 1] (defective every other one when
    ``defects``), from the demo generator's per-image streams."""
    from wdam_jax.data import demo

    cat_id = demo.DEMO_CATEGORIES.index(category)
    out = []
    for i in range(count):
        rng = np.random.default_rng([0, cat_id, split, i])
        img, fg = demo.make_clean_image(rng, category, image_size=SIZE)
        if defects and i % 2:
            img, _ = demo.add_defect(rng, img, fg, demo.DEFECT_TYPES[i // 2 % 5])
        out.append(img)
    return np.stack(out).astype(np.float32) / 255.0


def real_features(cache: pathlib.Path, train_per_category: int, test_per_category: int):
    """``(train patches [N, 1024], test patches [Q, 1024])`` of the four demo categories."""
    from configs import patchcore as patchcore_config
    from wdam_jax.data import demo
    from wdam_jax.methods.patchcore_method import PatchCore

    path = cache / f"features_{train_per_category}_{test_per_category}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["train"], data["test"]
    method = PatchCore(patchcore_config.get_config("demo"))
    backbone = method.create_model().member("plain")
    train, test = [], []
    for category in demo.DEMO_CATEGORIES:
        images = generated_images(category, train_per_category, split=10, defects=False)
        train.append(method._features(backbone, images, what=f"{category} train"))
        images = generated_images(category, test_per_category, split=11, defects=True)
        test.append(method._features(backbone, images, what=f"{category} test"))
    train = np.concatenate(train).reshape(-1, 1024)
    test = np.concatenate(test).reshape(-1, 1024)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, train=train, test=test)
    return train, test


def coreset_bank(cache: pathlib.Path, feats: np.ndarray, ratio: float) -> np.ndarray:
    import jax

    from wdam_jax.methods import patchcore as pc

    n = round(ratio * len(feats))
    path = cache / f"coreset_{len(feats)}_{n}.npy"
    if path.is_file():
        return np.load(path)
    t0 = time.perf_counter()
    picks = pc.greedy_coreset(jax.random.key(0), feats, n)
    bank = feats[np.asarray(picks)]
    print(f"coreset {n} of {len(feats)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    np.save(path, bank)
    return bank


def bench(name: str, bank: np.ndarray, queries: np.ndarray, repeats: int) -> dict[str, float]:
    import faiss
    import jax

    from wdam_jax.methods import patchcore as pc
    from wdam_jax.methods.patchcore_index import PrunedBank

    bank_j = jax.device_put(bank)
    t0 = time.perf_counter()
    pruned = PrunedBank.build(bank_j)
    build_s = time.perf_counter() - t0
    index, where, resources = faiss.IndexFlatL2(bank.shape[1]), "CPU", None
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:  # a GPU faiss: compare on the GPU
        resources = faiss.StandardGpuResources()
        index, where = faiss.index_cpu_to_gpu(resources, 0, index), "GPU"
    index.add(bank)
    fns = {
        "faiss": lambda: index.search(queries, 1),
        "brute": lambda: jax.block_until_ready(pc.knn_search(bank_j, queries, k=1)),
        "pruned": lambda: jax.block_until_ready(pruned.knn_search(queries, k=1)),
    }
    outs = {k: fn() for k, fn in fns.items()}  # compile
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t)
    t = {k: statistics.median(v) for k, v in times.items()}
    brute_i, pruned_i = np.asarray(outs["brute"][1]), np.asarray(outs["pruned"][1])
    same = float(np.mean(brute_i == pruned_i))
    diff = float(np.max(np.abs(np.asarray(outs["brute"][0]) - np.asarray(outs["pruned"][0]))))
    faiss_same = float(np.mean(outs["faiss"][1] == pruned_i))
    s = pruned.last_stats
    print(
        f"{name}: bank {bank.shape[0]} x {bank.shape[1]}, {len(queries)} queries, median of "
        f"{repeats}, load average {os.getloadavg()[0]:.1f}, jax {jax.devices()[0].device_kind}\n"
        f"  faiss IndexFlatL2 ({where}) {t['faiss'] * 1e3:.0f} ms, "
        f"brute force {t['brute'] * 1e3:.0f} ms, "
        f"pruned {t['pruned'] * 1e3:.0f} ms (index built in {build_s:.1f} s)\n"
        f"  RATIO faiss / pruned = {t['faiss'] / t['pruned']:.2f}x, brute / pruned = "
        f"{t['brute'] / t['pruned']:.2f}x (target >= 2x faiss at 20k)\n"
        f"  blocks bounded row by row {s['bounded_fraction']:.4f}, "
        f"bank fraction the bound needs per query {s['needed_fraction']:.4f}, scanned per "
        f"query {s['scanned_fraction']:.4f}, fallback rate {s['fallback_fraction']:.4f}\n"
        f"  same index as brute force {same:.4f} (max |d diff| {diff:.1e}), as faiss "
        f"{faiss_same:.4f}",
        flush=True,
    )
    if same < 1.0:
        near = np.asarray(outs["brute"][0])[brute_i != pruned_i]
        print(f"  FAIL: {np.sum(brute_i != pruned_i)} indices differ (distances {near[:5]})")
        raise SystemExit(1)
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20k,200k", help="banks to run: 20k, 200k")
    parser.add_argument("--train-images", type=int, default=64, help="per category")
    parser.add_argument("--test-images", type=int, default=2, help="per category (x 784 patches)")
    parser.add_argument("--big-queries", type=int, default=1568, help="queries at 200k")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio of the 20k bank")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default="workdirs/bench_knn_index")
    parser.add_argument("--quick", action="store_true", help="8 train images per category")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    train_images = 8 if args.quick else args.train_images
    cache = pathlib.Path(args.cache)
    train, test = real_features(cache, train_images, args.test_images)
    print(f"features: train {train.shape}, test {test.shape}", flush=True)
    sizes = args.sizes.split(",")
    results = {}
    if "20k" in sizes:
        bank = coreset_bank(cache, train, args.ratio)
        results["20k"] = (len(bank), bench("coreset bank", bank, test, args.repeats))
    if "200k" in sizes:
        queries = test[: args.big_queries]
        results["200k"] = (len(train), bench("full bank", train, queries, args.repeats))
        if "20k" in results:  # the same queries on both banks, for the growth
            small = coreset_bank(cache, train, args.ratio)
            t_small = bench("coreset bank, 200k's queries", small, queries, args.repeats)
            big = results["200k"][1]
            growth = {k: big[k] / t_small[k] for k in big}
            print(
                f"GROWTH {len(small)} -> {len(train)} rows ({len(train) / len(small):.1f}x), the "
                f"same {len(queries)} queries: time x{growth['brute']:.1f} brute force, "
                f"x{growth['pruned']:.1f} pruned, x{growth['faiss']:.1f} faiss"
            )


if __name__ == "__main__":
    main()
