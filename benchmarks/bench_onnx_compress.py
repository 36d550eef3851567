"""Smaller ONNX models, measured: FP16 and INT8 against the FP32 ``model.onnx`` (off by default).

  python benchmarks/bench_onnx_compress.py                  # the demo PatchCore, fitted here
  python benchmarks/bench_onnx_compress.py --workdir=W      # a trained, evaluated run instead

For each variant of the exported function (:func:`wdam_jax.export.inference_function` converted
by :func:`wdam_jax.onnx_export.to_onnx`): its size, ms per image in onnxruntime (CPU, medians of
``--repeats`` round-robin after a warm-up, batch ``--batch-size``), and I-AUROC / P-AUROC on the
demo test split (or the run's own test split), with the largest image-score change against FP32.

- FP32: ``launch.export``'s ``model.onnx``.
- FP16: ``onnxruntime.transformers.float16.convert_float_to_float16`` (``keep_io_types``: the
  input and outputs stay float32, so the same ``onnx_scorer.py`` runs it).
- INT8: ``onnxruntime.quantization.quantize_dynamic`` (weights int8, activations quantised per
  call; no calibration data).

The default model is the demo config of PatchCore (``configs/patchcore.py:demo``: random-init
WRN50-2, its bank fitted on the demo training images), whose scores mean something without any
training; ``--workdir`` measures any method's trained run. Neither variant is written by
``launch.export``: they are measured here, to be chosen knowingly.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def build(args, root: pathlib.Path):
    """``(fn, image_size, test split)`` of the run in ``--workdir`` or the fitted demo PatchCore."""
    from wdam_jax import export, runs
    from wdam_jax.data import sources

    if args.workdir:
        run = runs.restore(args.workdir)
    else:
        from configs import patchcore
        from wdam_jax.methods import registry

        config = patchcore.get_config("demo")
        config.data.root = str(root)
        method = registry.get_method(config)
        model = method.create_model()
        fitted = method.fit(model, method.train_images(), step=0)
        run = runs.Restored(method, model, 0, fitted)
    fn, size = export.inference_function(run)
    return fn, size, sources.load_split(run.config.data, split="test")


def variants(model_bytes: bytes, folder: pathlib.Path) -> dict[str, pathlib.Path]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.float16 import convert_float_to_float16

    paths = {
        "FP32": folder / "fp32.onnx",
        "FP16": folder / "fp16.onnx",
        "INT8": folder / "int8.onnx",
    }
    paths["FP32"].write_bytes(model_bytes)
    fp16 = convert_float_to_float16(onnx.load_from_string(model_bytes), keep_io_types=True)
    onnx.save(fp16, paths["FP16"])
    quantize_dynamic(paths["FP32"], paths["INT8"], weight_type=QuantType.QInt8)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="a trained run (default: demo PatchCore)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import onnxruntime
    from bench_onnx import session, time_all

    from wdam_jax import metrics, onnx_export
    from wdam_jax.data import demo, sources

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        demo.ensure_demo_data(tmp / "demo", seed=sources.DEMO_SEED,
                              image_size=sources.DEMO_SOURCE_SIZE)  # fmt: skip
        fn, size, test = build(args, tmp / "demo")
        paths = variants(onnx_export.to_onnx(fn, (1, size, size, 3)).SerializeToString(), tmp)
        sessions = {name: session(str(p), args.threads) for name, p in paths.items()}
        outputs = {}
        for name, ort in sessions.items():
            parts = [ort.run(None, {"images": test.images[i : i + args.batch_size]})
                     for i in range(0, len(test.images), args.batch_size)]  # fmt: skip
            outputs[name] = tuple(np.concatenate([p[k] for p in parts]) for k in (0, 1))
        batch = test.images[: args.batch_size]
        times = time_all({n: (lambda s=s: s.run(None, {"images": batch}))
                          for n, s in sessions.items()}, args.repeats)  # fmt: skip
        sizes = {name: p.stat().st_size / 2**20 for name, p in paths.items()}
    what = args.workdir or "demo PatchCore (random-init WRN50-2, bank fitted on the demo)"
    print(f"{what}: {len(test.images)} test images, {size} px, onnxruntime "
          f"{onnxruntime.__version__}, threads {args.threads}, under load (load average "
          f"{os.getloadavg()[0]:.1f})")  # fmt: skip
    print("| model | MiB | ms / image | I-AUROC | P-AUROC | max score change vs FP32 |")
    print("|---|---|---|---|---|---|")
    ref = outputs["FP32"][0]
    for name, (scores, maps) in outputs.items():
        i_auroc = metrics.auroc(scores, test.labels)
        p_auroc = metrics.pixel_auroc(maps, test.masks)
        change = float(np.abs(scores - ref).max() / np.abs(ref).max())
        print(f"| {name} | {sizes[name]:.1f} | {times[name] / len(batch) * 1e3:.1f} | "
              f"{100 * i_auroc:.1f} | {100 * p_auroc:.1f} | {change:.1e} |")  # fmt: skip
    for name in ("FP16", "INT8"):
        print(f"RATIO {name}: FP32 time / {name} time = {times['FP32'] / times[name]:.2f}x, "
              f"size {sizes['FP32'] / sizes[name]:.2f}x smaller")  # fmt: skip


if __name__ == "__main__":
    main()
