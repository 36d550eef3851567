r"""A GPU user's first figures in one command: every headline ratio of this project, device named.

  pip install -e .[cuda,bench]                    # jax's CUDA 12 plugin beside jax[cpu]
  python benchmarks/gpu_first_hour.py             # on the GPU: about 5 minutes
  python benchmarks/gpu_first_hour.py --tiny      # tiny sizes: checks that it runs (CPU too)

Runs, each in its own process (so one failure or a missing reference does not stop the rest) and
under ``--limit`` seconds, the benchmarks the figures in WORKSPACE.md come from:

1. kNN: the pruned exact search vs faiss ``IndexFlatL2`` (on the GPU where this faiss has GPU
   support) and brute force, real PatchCore features (``bench_knn_index.py``);
2. WDAM(layer1) overhead over the plain WRN50-2 forward (``bench_wdam_overhead.py``);
3. WRN50-2 forward, JAX vs torchvision (``bench_wrn_vs_torch.py``; torch on CUDA if it has it);
4. PatchCore ms per image vs anomalib ``PatchcoreModel`` (``bench_patchcore_inference.py``);
5. CutPaste train steps/s vs PyTorch (``bench_train_step.py``).

It prints the device first (JAX's backend and device kind, torch's CUDA device, faiss's GPUs),
then each benchmark's own output and a summary line per benchmark. The figures are the
benchmarks' own ratios; paste them with the device's name into WORKSPACE.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent

# name -> (script, full arguments, tiny arguments)
RUNS = {
    "kNN vs faiss (pruned exact search)": (
        "bench_knn_index.py",
        ["--sizes", "20k", "--repeats", "5"],
        ["--quick", "--sizes", "20k", "--repeats", "1", "--test-images", "1"],
    ),
    "WDAM overhead": ("bench_wdam_overhead.py", [], ["--quick"]),
    "WRN50-2 vs torchvision": (
        "bench_wrn_vs_torch.py",
        ["--batch_size", "32"],
        ["--image_size", "64", "--batch_size", "1", "--repeats", "2"],
    ),
    "PatchCore ms/image vs anomalib": ("bench_patchcore_inference.py", [], ["--quick"]),
    "train steps/s vs PyTorch": (
        "bench_train_step.py",
        ["--image_size=256", "--batch_size=32", "--steps=20"],
        ["--image_size=64", "--batch_size=1", "--steps=2", "--warmup=2"],
    ),
}


def describe_device() -> str:
    """One line naming JAX's, torch's and faiss's devices."""
    import jax

    dev = jax.devices()[0]
    parts = [f"jax {jax.__version__} backend={jax.default_backend()} device={dev.device_kind}"
             f" x{jax.device_count()}"]  # fmt: skip
    try:
        import torch

        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
        parts.append(f"torch {torch.__version__} ({cuda})")
    except ImportError:
        parts.append("torch absent")
    try:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        parts.append(f"faiss {faiss.__version__} ({gpus} GPUs)")
    except ImportError:
        parts.append("faiss absent (pip install -e .[bench])")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke run)")
    parser.add_argument("--only", default="", help="comma-separated substrings of the names")
    parser.add_argument("--limit", type=int, default=240, help="seconds per benchmark")
    args = parser.parse_args()
    print(f"DEVICE {describe_device()}", flush=True)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    summary = []
    for name, (script, full, tiny) in RUNS.items():
        if args.only and not any(s and s in name for s in args.only.split(",")):
            continue
        argv = [sys.executable, str(BENCH / script), *(tiny if args.tiny else full)]
        if args.tiny and script == "bench_knn_index.py":
            argv += ["--cache", "workdirs/gpu_first_hour_tiny"]
        print(f"\n=== {name}: {' '.join(argv[1:])}", flush=True)
        start = time.perf_counter()
        try:
            run = subprocess.run(argv, cwd=REPO, env=env, timeout=args.limit, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
            out, rc = run.stdout, run.returncode
        except subprocess.TimeoutExpired as e:  # its output so far; stdout may be bytes here
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc = "timeout"
        lines = [ln for ln in out.splitlines() if "!!!!" not in ln and "WARNING" not in ln]
        print("\n".join(lines[-25:]), flush=True)
        summary.append(f"{name}: exit {rc} in {time.perf_counter() - start:.0f} s")
    print("\nSUMMARY (" + describe_device() + ")")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
