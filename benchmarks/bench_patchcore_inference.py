"""PatchCore inference per image: this project's scoring path vs anomalib's ``PatchcoreModel``.

  python benchmarks/bench_patchcore_inference.py                 # 224 px, batch 8, bank 16384
  python benchmarks/bench_patchcore_inference.py --breakdown     # + features / scoring apart
  python benchmarks/bench_patchcore_inference.py --quick         # bank 1024, 1 repeat: it runs

Both sides get the same random-init torchvision ``wide_resnet50_2`` weights (loaded into
anomalib's timm extractor; converted by ``from_torchvision`` for JAX), the same test images and
the same memory bank rows. Ours is :meth:`PatchCore.score` (``configs/patchcore.py`` with
``patchcore.scoring = "anomalib"``: the jitted backbone + ``patch_features``, then
``score_patches``: kNN, reweighted image score, bilinear upsampling and Gaussian map);
anomalib's is ``PatchcoreModel.forward`` in eval mode. Threads:
``torch.set_num_threads(--threads)``; XLA's CPU client uses the machine's cores (as the other
benchmarks). Timed round-robin in one process, medians of ``--repeats`` after a warm-up call.

The two define the patch feature differently (a documented design difference, not a bug):
anomalib concatenates the 3x3-averaged layer2 (512) and upsampled layer3 (1024) into
``D = 1536``; this project follows the official PatchCore and pools channels to 1024 (layer2
kept, layer3 channel pairs averaged), so our kNN runs over 1024 dimensions, anomalib's over 1536.
That is an exact linear map ``ours = anomalib @ P``, so the bank is built once from anomalib's
embeddings of random training images (a random subset of rows: the coreset is not part of
inference) and ours is ``bank @ P``: the same patches. anomalib's maps upsample the patch scores
by nearest neighbour and blur with torch "reflect" borders; ours upsample bilinearly and pad
symmetrically (scipy's "reflect"), so maps are compared by correlation only.

Checks before any timing (exit 1 when one fails):
  1. our patch features == anomalib's embedding @ P (relative error < 1e-4, as
     tests/test_wide_resnet.py for the backbone alone);
  2. our scoring (``score_patches``) fed anomalib's 1536-d embedding and bank gives anomalib's
     image scores and patch kNN distances (relative error < 1e-3);
  3. the timed path (``PatchCore.score``) equals ``score_patches`` on anomalib's embedding @ P and
     bank @ P (relative error < 1e-3, scores and maps).
Relative error = max |ours - reference| / max |reference|.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")

LAYER2_CHANNELS = 512  # WRN50-2 layer2; layer3 has 1024
FEATURE_TOL = 1e-4
SCORE_TOL = 1e-3


def anomalib_to_ours(embedding: np.ndarray) -> np.ndarray:
    """anomalib's ``[..., 1536]`` patch embedding as this project's ``[..., 1024]`` feature.

    ``patch_features(pretrain_dim=1024, target_dim=1024)`` repeats each layer2 channel twice
    (512 -> 1024 bins), keeps layer3's 1024, then averages neighbouring pairs of the 2048: the
    layer2 channels themselves, then the means of layer3 channel pairs.
    """
    layer2 = embedding[..., :LAYER2_CHANNELS]
    layer3 = embedding[..., LAYER2_CHANNELS:]
    pairs = layer3.reshape(*layer3.shape[:-1], layer3.shape[-1] // 2, 2).mean(axis=-1)
    return np.concatenate([layer2, pairs], axis=-1)


def exact_distances(queries: np.ndarray, bank: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``||queries[i] - bank[index[i]]||`` in float64."""
    diff = queries.astype(np.float64) - bank[np.asarray(index)].astype(np.float64)
    return np.sqrt(np.sum(diff * diff, axis=-1))


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def build_anomalib(state_dict):
    """``PatchcoreModel`` on torchvision's weights (its bank is set later), in eval mode."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(
        layers=["layer2", "layer3"], backbone="wide_resnet50_2", pre_trained=False, num_neighbors=9
    )
    timm_net = model.feature_extractor.feature_extractor
    missing = set(timm_net.state_dict()) - set(state_dict)
    if missing:
        raise RuntimeError(f"anomalib's extractor has keys torchvision lacks: {sorted(missing)}")
    timm_net.load_state_dict({k: state_dict[k] for k in timm_net.state_dict()})
    return model.eval()


def anomalib_embedding(model, x):
    """``[B * h * w, 1536]`` patch embeddings, as ``PatchcoreModel.forward`` makes them."""
    import torch

    with torch.inference_mode():
        features = model.feature_extractor(x)
        features = {layer: model.feature_pooler(f) for layer, f in features.items()}
        return model.reshape_embedding(model.generate_embedding(features))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bank", type=int, default=None, help="memory bank rows (16384)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per side (5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true", help="also time features / scoring")
    parser.add_argument(
        "--inference-fn", action="store_true", help="also time PatchCore.inference_fn (export)"
    )
    parser.add_argument("--quick", action="store_true", help="bank 1024, 1 repeat (a smoke run)")
    parser.add_argument(
        "--brute-force", action="store_true", help="patchcore.knn_index=False (the plain kNN)"
    )
    args = parser.parse_args()
    bank_rows = args.bank or (1024 if args.quick else 16384)
    repeats = args.repeats or (1 if args.quick else 5)

    import jax
    import jax.numpy as jnp
    import torch
    import torchvision

    from configs import patchcore as patchcore_config
    from wdam_jax.complexity import interleaved_medians
    from wdam_jax.methods import patchcore as pc
    from wdam_jax.methods.patchcore_method import PatchCore, PatchCoreNet
    from wdam_jax.models.wide_resnet import IMAGENET_MEAN, IMAGENET_STD, from_torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    state_dict = torchvision.models.wide_resnet50_2().eval().state_dict()
    anomalib = build_anomalib(state_dict)
    config = patchcore_config.get_config()
    config.score.eval_batch_size = args.batch_size
    config.patchcore.scoring = "anomalib"  # compared with anomalib's scores below
    config.patchcore.knn_index = not args.brute_force
    cfg = config.patchcore
    if (cfg.pretrain_dim, cfg.target_dim, cfg.patch_size) != (1024, 1024, 3):
        raise SystemExit("configs/patchcore.py changed its feature dims: update anomalib_to_ours")
    method = PatchCore(config)
    net = PatchCoreNet({"plain": from_torchvision(state_dict)})

    rng = np.random.default_rng(args.seed)
    size, batch = args.image_size, args.batch_size
    side = size // 8  # layer2's grid
    train_images = -(-bank_rows // (side * side))
    images = rng.uniform(size=(train_images + batch, size, size, 3)).astype(np.float32)
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    # anomalib's torch model expects normalised NCHW (its Lightning pre-processor normalises);
    # ours normalises inside the network.
    nchw = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
    train_x, test_x = nchw[:train_images], nchw[train_images:]
    test_images = images[train_images:]

    rows = torch.cat([anomalib_embedding(anomalib, train_x[i : i + batch])
                      for i in range(0, train_images, batch)])  # fmt: skip
    pick = np.sort(rng.choice(len(rows), bank_rows, replace=False))
    bank_anomalib = rows[torch.from_numpy(pick)].contiguous()
    anomalib.memory_bank = bank_anomalib
    bank_ours = anomalib_to_ours(bank_anomalib.numpy())
    fitted = {"plain.bank": bank_ours}
    print(
        f"backend={jax.default_backend()} torch threads={torch.get_num_threads()} "
        f"cpus={os.cpu_count()} image={size} batch={batch} bank={bank_rows} "
        f"(anomalib D={bank_anomalib.shape[1]}, ours D={bank_ours.shape[1]}) repeats={repeats} "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    # ---- correctness
    failed = []

    def check(name: str, err: float, tol: float) -> None:
        ok = err < tol
        failed.extend([] if ok else [name])
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: relative error {err:.2e} (tolerance {tol:g})")

    print("correctness:", flush=True)
    emb = anomalib_embedding(anomalib, test_x)
    emb_hwd = emb.numpy().reshape(batch, side, side, -1)
    ours_feats = np.asarray(method._feature_fn(net.member("plain"))(test_images))
    check("1. features vs anomalib embedding @ P", relative_error(
        ours_feats, anomalib_to_ours(emb_hwd)), FEATURE_TOL)  # fmt: skip

    with torch.inference_mode():
        ref = anomalib(test_x)
        ref_dist, ref_index = anomalib.nearest_neighbors(emb, n_neighbors=1)
    ref_scores, ref_maps = ref.pred_score.numpy(), ref.anomaly_map.numpy()[:, 0]
    scores_1536, maps_1536 = pc.score_patches(
        bank_anomalib.numpy(), emb_hwd, image_size=(size, size), scoring=cfg.scoring,
        num_neighbors=cfg.num_neighbors, sigma=cfg.sigma,
    )  # fmt: skip
    dist_1536, index_1536 = pc.knn_search(bank_anomalib.numpy(), emb.numpy(), k=1)
    check("2. kNN patch distances, anomalib's D=1536 inputs", relative_error(
        dist_1536[:, 0], ref_dist.numpy().reshape(-1)), SCORE_TOL)  # fmt: skip
    ref_index = ref_index.numpy().reshape(-1)
    exact = {  # each side's reported distance against the float64 distance to its own neighbour
        name: relative_error(d, exact_distances(emb.numpy(), bank_anomalib.numpy(), i))
        for name, d, i in (
            ("ours", dist_1536[:, 0], index_1536[:, 0]),
            ("anomalib", ref_dist.numpy().reshape(-1), ref_index),
        )
    }
    print(
        f"  info same nearest bank row for {np.mean(np.asarray(index_1536[:, 0]) == ref_index):.4f}"
        f" of the patches; distance error vs float64: ours {exact['ours']:.1e}, anomalib "
        f"{exact['anomalib']:.1e}"
    )
    check("2. image scores, anomalib's D=1536 inputs", relative_error(
        scores_1536, ref_scores), SCORE_TOL)  # fmt: skip
    corr = np.corrcoef(np.asarray(maps_1536).ravel(), ref_maps.ravel())[0, 1]
    print(
        f"  info maps, anomalib's D=1536 inputs: correlation {corr:.5f}, relative error "
        f"{relative_error(maps_1536, ref_maps):.2e} (nearest vs bilinear upsampling, borders)"
    )

    ours = method.score(net, fitted, test_images, step=0)
    e2e_scores, e2e_maps = pc.score_patches(
        bank_ours, anomalib_to_ours(emb_hwd), image_size=(size, size),
        scoring=cfg.scoring, num_neighbors=cfg.num_neighbors, sigma=cfg.sigma,
    )  # fmt: skip
    check("3. PatchCore.score scores vs score_patches(emb @ P, bank @ P)", relative_error(
        ours.image_scores, e2e_scores), SCORE_TOL)  # fmt: skip
    check("3. PatchCore.score maps vs score_patches(emb @ P, bank @ P)", relative_error(
        ours.maps, e2e_maps), SCORE_TOL)  # fmt: skip
    print(
        f"  info image scores, ours (D=1024) {np.round(ours.image_scores[:4], 3)} ... vs "
        f"anomalib (D=1536) {np.round(ref_scores[:4], 3)} ... (different features: not compared)"
    )
    fns = {
        "ours": lambda: method.score(net, fitted, test_images, step=0),
        "anomalib": lambda: anomalib_forward(anomalib, test_x),
    }
    if args.inference_fn:
        export = jax.jit(method.inference_fn(net, fitted, step=0))
        test_j = jnp.asarray(test_images)
        export_scores, export_maps = export(test_j)
        check("inference_fn scores vs PatchCore.score", relative_error(
            export_scores, ours.image_scores), SCORE_TOL)  # fmt: skip
        check("inference_fn maps vs PatchCore.score", relative_error(
            export_maps, ours.maps), SCORE_TOL)  # fmt: skip
        fns["ours inference_fn"] = lambda: export(test_j)
    if failed:
        print(f"FAILED: {', '.join(failed)}; no timing")
        sys.exit(1)
    if args.breakdown:
        feature_fn = method._feature_fn(net.member("plain"))
        fns["ours features"] = lambda: feature_fn(test_images)
        fns["ours scoring"] = lambda: method._score_member(bank_ours, ours_feats, (size, size))
        fns["anomalib features"] = lambda: anomalib_embedding(anomalib, test_x)

    # ---- timing
    t0 = time.perf_counter()
    times = interleaved_medians({k: (lambda _, f=f: _done(f())) for k, f in fns.items()},
                                None, repeats=repeats)  # fmt: skip
    print(f"timing ({time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}):")
    print("| what | ms / image | batch ms |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t / batch * 1e3:.1f} | {t * 1e3:.0f} |")
    print(f"RATIO anomalib / ours = {times['anomalib'] / times['ours']:.2f}x  (goal >= 2)")
    for _, pruned in method.__dict__.get("_pruned_banks", {}).values():
        s = pruned.last_stats
        print(
            f"kNN index (patchcore.knn_index): bank fraction needed per query "
            f"{s['needed_fraction']:.4f}, scanned {s['scanned_fraction']:.4f}, fallback rate "
            f"{s['fallback_fraction']:.4f}"
        )


def anomalib_forward(model, x) -> None:
    import torch

    with torch.inference_mode():
        model(x)


def _done(out) -> None:
    """Waits for JAX outputs; numpy and torch results are already complete."""
    import jax

    jax.block_until_ready([o for o in jax.tree.leaves(out) if isinstance(o, jax.Array)])


if __name__ == "__main__":
    main()
