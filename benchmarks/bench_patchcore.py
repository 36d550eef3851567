"""PatchCore benchmarks: coreset vs anomalib KCenterGreedy, kNN vs faiss, peak memory.

Each sub-command measures the reference in the same process on the same features and prints the
ratio. Features are synthetic unless ``--features`` names an ``.npy`` file of real patch features:
a mixture of clusters in a 32-dimensional latent space mapped to ``D`` dimensions by a random
linear map and a ReLU (non-negative and clustered, like WRN50-2 patch features).

  python benchmarks/bench_patchcore.py coreset --rows 200000 --anomalib-picks 300
  python benchmarks/bench_patchcore.py radius --rows 20000
  python benchmarks/bench_patchcore.py knn --bank 20000 --queries 1024
  python benchmarks/bench_patchcore.py memory --rows 200000

Memory: each phase runs in a fresh subprocess; the delta is the process's peak resident set after
the phase (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its current resident set just before it
(``/proc/self/statm``), i.e. the phase's own peak above what the process already held
(interpreter, JAX, and the input features).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's per-pick progress bar


STAGE = ["start"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def start_watchdog(limit_gb: float) -> None:
    """Exits the process if its resident set exceeds ``limit_gb`` (shared machines: no OOM kill)."""

    def watch() -> None:
        while True:
            if _rss_mb() > limit_gb * 1024:
                print(f"WATCHDOG: RSS {_rss_mb():.0f} MB > {limit_gb} GB in {STAGE[0]}", flush=True)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def synthetic_features(rows: int, dim: int, *, seed: int = 0, clusters: int = 2000) -> np.ndarray:
    """Clustered non-negative features ``[rows, dim]`` float32, generated in chunks."""
    rng = np.random.default_rng(seed)
    latent_dim = 32
    centres = rng.standard_normal((clusters, latent_dim)).astype(np.float32) * 2.0
    weights = rng.dirichlet(np.full(clusters, 0.5))
    mixing = rng.standard_normal((latent_dim, dim)).astype(np.float32) / np.sqrt(latent_dim)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 16384):
        n = min(16384, rows - start)
        z = centres[rng.choice(clusters, n, p=weights)]
        z += 0.3 * rng.standard_normal((n, latent_dim)).astype(np.float32)
        x = z @ mixing + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
        out[start : start + n] = np.maximum(x, 0.0)
    return out


def load_features(args: argparse.Namespace) -> np.ndarray:
    if args.features:
        feats = np.load(args.features, mmap_mode="r")
        return np.ascontiguousarray(feats[: args.rows], np.float32)
    return synthetic_features(args.rows, args.dim, seed=args.seed)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _anomalib_coreset(feats_t, n: int, seed: int):
    import torch
    from anomalib.models.components.sampling import KCenterGreedy

    torch.manual_seed(seed)  # anomalib draws its first centre from torch's global RNG
    sampler = KCenterGreedy(embedding=feats_t, sampling_ratio=n / feats_t.shape[0])
    sampler.coreset_size = n
    return sampler


def cmd_coreset(args: argparse.Namespace) -> None:
    """Full JAX coreset vs anomalib per-pick rate over a bounded number of picks."""
    import jax
    import jax.numpy as jnp
    import torch

    from wdam_jax.methods.patchcore import greedy_coreset

    torch.set_num_threads(os.cpu_count() or 1)
    feats = load_features(args)
    n = int(args.ratio * feats.shape[0])
    print(
        f"features {feats.shape} float32, coreset {n} rows ({args.ratio:.0%}), "
        f"backend {jax.default_backend()}, torch threads {torch.get_num_threads()}"
    )

    # anomalib: time the projection alone, then a bounded number of picks.
    feats_t = torch.from_numpy(feats)
    sampler = _anomalib_coreset(feats_t, n, args.seed)
    t0 = time.perf_counter()
    sampler.model.fit(feats_t)
    sampler.model.transform(feats_t)
    t_proj = time.perf_counter() - t0
    picks = min(args.anomalib_picks, n)
    sampler = _anomalib_coreset(feats_t, picks, args.seed)
    t0 = time.perf_counter()
    sampler.select_coreset_idxs()
    t_bounded = time.perf_counter() - t0
    rate = (picks - 1) / max(t_bounded - t_proj, 1e-9)
    t_anomalib = t_proj + (n - 1) / rate
    print(
        f"anomalib KCenterGreedy: projection {t_proj:.1f} s, {picks} picks in {t_bounded:.1f} s "
        f"-> {rate:.1f} picks/s; EXTRAPOLATED full {n} picks: {t_anomalib:.0f} s"
    )
    del sampler

    key = jax.random.key(args.seed)
    t0 = time.perf_counter()
    last = [t0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            print(f"  jax coreset {done}/{total} ({done / (now - t0):.0f} picks/s)", flush=True)
            last[0] = now

    dtype = {"float16": jnp.float16, "float32": jnp.float32}[args.dtype]
    idx = np.asarray(greedy_coreset(key, feats, n, dtype=dtype, on_progress=progress))
    t_jax = time.perf_counter() - t0
    print(
        f"jax greedy_coreset: {n} picks in {t_jax:.1f} s (incl. projection and compile), "
        f"{n / t_jax:.0f} picks/s, unique {len(np.unique(idx)) == n}"
    )
    print(f"RATIO anomalib(extrapolated) / jax = {t_anomalib / t_jax:.1f}x  (target >= 10x)")


def cmd_radius(args: argparse.Namespace) -> None:
    """Coverage radius and time of both, run fully, on a size where anomalib finishes."""
    import jax
    import jax.numpy as jnp
    import torch

    from wdam_jax.methods.patchcore import coverage_radius, greedy_coreset

    torch.set_num_threads(os.cpu_count() or 1)
    feats = load_features(args)
    n = int(args.ratio * feats.shape[0])
    feats_t = torch.from_numpy(feats)
    print(f"features {feats.shape}, coreset {n} rows ({args.ratio:.0%}), seeds {args.seeds}")
    STAGE[0] = "compile"
    np.asarray(greedy_coreset(jax.random.key(0), feats, n))  # compile outside the timing
    names = ("anomalib", "jax_f16", "jax_f32", "random")
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        sel, times = {}, {}
        STAGE[0] = f"anomalib seed {seed}"
        t0 = time.perf_counter()
        sel["anomalib"] = _anomalib_coreset(feats_t, n, seed).select_coreset_idxs()
        times["anomalib"] = time.perf_counter() - t0
        for name, dtype in (("jax_f16", jnp.float16), ("jax_f32", jnp.float32)):
            STAGE[0] = f"{name} seed {seed}"
            t0 = time.perf_counter()
            sel[name] = np.asarray(greedy_coreset(jax.random.key(seed), feats, n, dtype=dtype))
            times[name] = time.perf_counter() - t0
        sel["random"] = np.random.default_rng(seed).choice(feats.shape[0], n, replace=False)
        STAGE[0] = f"radius seed {seed}"
        radii = {k: coverage_radius(feats, sel[k]) for k in names}
        rows.append(radii)
        print(
            f"seed {seed} (peak RSS {_maxrss_mb():.0f} MB): radius "
            + "  ".join(f"{k} {radii[k]:.4f}" for k in names)
            + " | time "
            + "  ".join(f"{k} {t:.2f} s" for k, t in times.items())
        )
    mean = {k: statistics.mean(r[k] for r in rows) for k in names}
    print(
        "MEAN radius "
        + ", ".join(f"{k} {v:.4f} ({v / mean['anomalib'] - 1:+.1%})" for k, v in mean.items())
        + "  (relative to anomalib; target within 5%)"
    )


def cmd_knn(args: argparse.Namespace) -> None:
    """jnp chunked kNN vs faiss IndexFlatL2 on the same bank and queries."""
    import faiss
    import jax

    from wdam_jax.methods.patchcore import knn_search

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(args.seed + 1)
    feats = synthetic_features(args.bank + args.queries, args.dim, seed=args.seed)
    perm = rng.permutation(len(feats))
    bank, queries = feats[perm[: args.bank]], feats[perm[args.bank :]]
    print(
        f"bank {bank.shape}, queries {queries.shape}, k={args.k}, backend "
        f"{jax.default_backend()}, faiss threads {faiss.omp_get_max_threads()}"
    )
    index = faiss.IndexFlatL2(args.dim)
    index.add(bank)
    bank_j = jax.device_put(bank)

    def run_faiss():
        return index.search(queries, args.k)

    def run_jax():
        d, i = knn_search(bank_j, queries, k=args.k)
        return jax.block_until_ready((d, i))

    times = {"faiss": [], "jax": []}
    run_jax()  # compile
    for _ in range(args.repeats):
        for name, fn in (("faiss", run_faiss), ("jax", run_jax)):
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "faiss":
                ref_d, ref_i = out
            else:
                our_d, our_i = (np.asarray(a) for a in out)
    t_faiss, t_jax = (statistics.median(times[k]) for k in ("faiss", "jax"))
    agree = float(np.mean(ref_i == our_i))
    err = float(np.max(np.abs(np.sqrt(np.maximum(ref_d, 0)) - our_d)))
    print(
        f"faiss IndexFlatL2 {t_faiss * 1e3:.0f} ms, jax knn_search {t_jax * 1e3:.0f} ms "
        f"(median of {args.repeats}); index agreement {agree:.4f}, max |d diff| {err:.2e}"
    )
    print(f"RATIO faiss / jax = {t_faiss / t_jax:.2f}x  (target >= 1)")


def cmd_memory(args: argparse.Namespace) -> None:
    """Peak RSS of fit (coreset + bank) and of scoring, each in a fresh subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("fit", "score"):
            cmd = [
                sys.executable,
                __file__,
                "_phase",
                phase,
                "--rows",
                str(args.rows),
                "--dim",
                str(args.dim),
                "--ratio",
                str(args.ratio),
                "--tmp",
                tmp,
                "--test-images",
                str(args.test_images),
                "--seed",
                str(args.seed),
            ]
            if args.features:
                cmd += ["--features", args.features]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"{phase}: " + ", ".join(f"{k} {v}" for k, v in result.items()))


def cmd_phase(args: argparse.Namespace) -> None:
    import jax

    from wdam_jax.methods import patchcore as pc

    bank_path = os.path.join(args.tmp, "bank.npz")
    side = 32  # one 256x256 image gives 32x32 layer2 patches
    if args.phase == "fit":
        feats = load_features(args)
        n = int(args.ratio * feats.shape[0])
        jax.block_until_ready(jax.numpy.zeros(1))
        before = _rss_mb()
        t0 = time.perf_counter()
        idx = np.asarray(pc.greedy_coreset(jax.random.key(args.seed), feats, n))
        pc.save_bank(bank_path, feats[idx])
        result = {
            "rows": feats.shape[0],
            "bank": n,
            "features_MB": round(feats.nbytes / 2**20),
            "rss_before_MB": round(before),
            "peak_rss_after_MB": round(_maxrss_mb()),
            "delta_MB": round(_maxrss_mb() - before),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    else:
        bank, _ = pc.load_bank(bank_path)
        test = synthetic_features(args.test_images * side * side, args.dim, seed=args.seed + 7)
        test = test.reshape(args.test_images, side, side, args.dim)
        jax.block_until_ready(jax.numpy.zeros(1))
        before = _rss_mb()
        t0 = time.perf_counter()
        scores, maps = [], []
        for start in range(0, args.test_images, 8):
            s, m = pc.score_patches(bank, test[start : start + 8], image_size=(256, 256))
            scores.append(np.asarray(s))
            maps.append(np.asarray(m))
        result = {
            "bank": bank.shape[0],
            "test_images": args.test_images,
            "queries": args.test_images * side * side,
            "rss_before_MB": round(before),
            "peak_rss_after_MB": round(_maxrss_mb()),
            "delta_MB": round(_maxrss_mb() - before),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("coreset", "radius", "knn", "memory", "_phase"):
        p = sub.add_parser(name)
        p.add_argument("--rows", type=int, default=200_000)
        p.add_argument("--dim", type=int, default=1024)
        p.add_argument("--ratio", type=float, default=0.1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--features", default="", help=".npy of real [N, D] patch features")
        p.add_argument("--max-rss-gb", type=float, default=8.0, help="abort above this RSS")
        if name == "coreset":
            p.add_argument("--anomalib-picks", type=int, default=300)
            p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
        if name == "radius":
            p.add_argument("--seeds", type=int, default=1)
            p.add_argument("--first-seed", type=int, default=0)
        if name == "knn":
            p.add_argument("--bank", type=int, default=20_000)
            p.add_argument("--queries", type=int, default=1024)
            p.add_argument("--k", type=int, default=1)
            p.add_argument("--repeats", type=int, default=5)
        if name in ("memory", "_phase"):
            p.add_argument("--test-images", type=int, default=100)
        if name == "_phase":
            p.add_argument("phase", choices=("fit", "score"))
            p.add_argument("--tmp", required=True)
    args = parser.parse_args()
    start_watchdog(args.max_rss_gb)
    {
        "coreset": cmd_coreset,
        "radius": cmd_radius,
        "knn": cmd_knn,
        "memory": cmd_memory,
        "_phase": cmd_phase,
    }[args.command](args)


if __name__ == "__main__":
    main()
