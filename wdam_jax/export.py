"""Exports a trained run's full inference function as artefacts that load without this repository.

``python -m launch.export --workdir=W --out=E`` calls :func:`export` and writes:

- ``E/model.stablehlo``: ``jax.export`` serialised StableHLO of ``images -> (image_scores,
  maps)`` with the network, the fitted statistics (PatchCore's memory bank, CutPaste's Gaussian
  densities) as constants; load it with ``jax.export.deserialize(bytearray(data)).call(images)``
  in a Python with ``jax`` and ``flatbuffers`` (jax does not install flatbuffers, and
  ``deserialize`` needs it);
- ``E/saved_model/``: the same function as a TensorFlow SavedModel (``jax2tf``, native
  serialisation) for TF Serving; signature ``serving_default``: ``images`` ->
  ``{"image_scores", "maps"}``;
- ``E/model.onnx``: the same function as ONNX (opset 17, dynamic batch ``batch``; converted from
  its jaxpr by :mod:`wdam_jax.onnx_export`), input ``images``, outputs ``image_scores`` and
  ``maps``; ``E/onnx_scorer.py`` (a copy of :mod:`wdam_jax.onnx_scorer`, numpy and onnxruntime
  only) loads it, checks it is the file ``metadata.json`` describes (size, SHA-256, run id) and
  checks the images' shape and range;
- ``E/metadata.json``: the input contract (shape with a symbolic batch ``b``, dtype, range,
  layout, the host preprocessing to apply before), the outputs, the run (method, step,
  workdir) and the decision thresholds with their rule and the normalisation (from
  ``thresholds.json``), and ``loading``: for each artefact the packages to install and the
  Python that loads and calls it (:func:`loading_instructions`; ``tests/test_predict.py`` runs
  them in a process that can import nothing else). Thresholds and normalisation are metadata
  beside the graph, not in it:
  the graph returns raw scores, and a service decides with ``score >= threshold`` and normalises
  with ``sigmoid((score - threshold) / scale)`` where it can see and change them (anomalib
  #3033 hid them inside the export).

The exported function's input is an image already resized to ``config.data.image_size`` (PIL
bilinear with antialiasing, as :func:`wdam_jax.data.datasets.resize_image`: decoding and that
resize are host work a service does with its own image library); the centre crop
(``config.data.crop_size``), the model and the scoring are in the graph. The batch dimension is
symbolic: one artefact serves any batch size.

A run without stored thresholds (never evaluated, or evaluated at another step) is refused, as an
artefact without a decision rule; ``allow_no_thresholds`` (``--allow_no_thresholds``) exports it
with ``"thresholds": null``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from wdam_jax import onnx_scorer, runlock, runs, thresholds
from wdam_jax.data import datasets, tiling
from wdam_jax.errors import MissingFileError

STABLEHLO_FILE = "model.stablehlo"
SAVED_MODEL_DIR = "saved_model"
METADATA_FILE = "metadata.json"
ONNX_FILE = onnx_scorer.MODEL_FILE
SCORER_FILE = "onnx_scorer.py"


def inference_function(run: runs.Restored) -> tuple[Callable, int]:
    """The run's full inference function and its input side.

    Returns:
      ``(fn, image_size)``: ``fn(images [B, image_size, image_size, 3] float32 in [0, 1]) ->
      (image_scores [B], maps [B, C, C])`` with ``C`` the crop size (or ``image_size``).
    """
    data = run.config.data
    size, crop = data.image_size, data.get("crop_size", 0) or None
    offset, side = datasets.crop_box(size, crop)
    score = run.method.inference_fn(run.model, run.fitted, step=run.step)

    def fn(images):
        images = jnp.asarray(images, jnp.float32)[:, offset : offset + side, offset : offset + side]
        scores, maps = score(images)
        return scores.astype(jnp.float32), maps.astype(jnp.float32)

    return fn, size


def _input_spec(size: int) -> jax.ShapeDtypeStruct:
    (batch,) = jax.export.symbolic_shape("b")
    return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)


def stored_thresholds(workdir: pathlib.Path, step: int) -> dict[str, Any] | None:
    """The run's ``thresholds.json`` if it is that of checkpoint ``step``, else None."""
    try:
        return thresholds.stored(workdir, step=step)
    except FileNotFoundError:  # MissingFileError too: not evaluated, or at another step
        return None


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _pinned(name: str, version: str) -> str:
    return f"{name}=={version}" if version else name


def loading_instructions() -> dict[str, dict[str, Any]]:
    """How to load each artefact without this repository: ``{"stablehlo", "saved_model",
    "onnx"}`` ->
    ``{"packages": pip requirements, "python": code}``. The code runs in the export folder with
    ``images`` a float32 ``[B, S, S, 3]`` array already preprocessed (``input.host_preprocessing``)
    and leaves ``image_scores`` ``[B]`` and ``maps`` ``[B, C, C]``."""
    tf_version = _version("tensorflow") or _version("tensorflow-cpu")
    return {
        "stablehlo": {
            "packages": [
                _pinned("jax", jax.__version__),
                _pinned("flatbuffers", _version("flatbuffers")),
            ],
            "note": (
                "jax.export.deserialize needs flatbuffers, which jax does not install; a newer "
                "jax reads the artefact within jax.export's compatibility window."
            ),
            "python": (
                "import jax\n"
                f"with open({STABLEHLO_FILE!r}, 'rb') as f:\n"
                "    exported = jax.export.deserialize(bytearray(f.read()))\n"
                "image_scores, maps = exported.call(images)\n"
            ),
        },
        "saved_model": {
            "packages": [_pinned("tensorflow", tf_version)],
            "note": "tensorflow-cpu of the same version serves as well; TF Serving loads the "
            "folder as it is (signature serving_default).",
            "python": (
                "import tensorflow as tf\n"
                f"serving = tf.saved_model.load({SAVED_MODEL_DIR!r}).signatures['serving_default']"
                "\nout = serving(images=tf.constant(images))\n"
                "image_scores, maps = out['image_scores'].numpy(), out['maps'].numpy()\n"
            ),
        },
        "onnx": {
            "packages": [
                _pinned("onnxruntime", _version("onnxruntime")),
                _pinned("numpy", np.__version__),
            ],
            "note": (
                f"{SCORER_FILE} checks the model against this file and the images' shape and "
                f"range; without it: onnxruntime.InferenceSession({ONNX_FILE!r}).run(None, "
                "{'images': images}) (OpenVINO and TensorRT read the same file)."
            ),
            "python": (
                "import importlib.util\n"
                f"spec = importlib.util.spec_from_file_location('onnx_scorer', {SCORER_FILE!r})\n"
                "onnx_scorer = importlib.util.module_from_spec(spec)\n"
                "spec.loader.exec_module(onnx_scorer)\n"
                "scorer = onnx_scorer.OnnxScorer('.')\n"
                "image_scores, maps = scorer(images)\n"
            ),
        },
    }


def metadata(
    run: runs.Restored,
    workdir: pathlib.Path,
    size: int,
    *,
    saved_model: bool = True,
    onnx: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``metadata.json``: input and output contract, the run, thresholds and normalisation, and
    how to load each artefact written (``onnx``: :func:`export_onnx`'s description, or None)."""
    data = run.config.data
    side = data.get("crop_size", 0) or size
    stored = stored_thresholds(workdir, run.step)
    if stored is None:
        logging.warning("%s has no thresholds for step %d: the export has no decision rule "
                        "(\"thresholds\": null).", workdir, run.step)  # fmt: skip
    loading = loading_instructions()
    if not saved_model:
        del loading["saved_model"]
    if onnx is None:
        del loading["onnx"]
    tiles = tiling.from_config(data)
    if tiles is not None:  # the function scores tiles; the service tiles and stitches
        tiled = {
            **tiles.as_json(),
            "inputs_are": "tiles of one image, cut as 'grid' says",
            "thresholds_apply_to": "the stitched map and the image score from it, not to one "
            "tile's outputs",
        }
    return {
        "method": run.config.method,
        "step": run.step,
        "workdir": str(workdir),
        "input": {
            "name": "images",
            "shape": ["b", size, size, 3],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "layout": "NHWC, RGB",
            "host_preprocessing": (
                f"decode to RGB, resize to {size}x{size} with PIL bilinear (antialiased), "
                "divide by 255"
                if tiles is None
                else "decode to RGB at the original resolution, divide by 255, cut into tiles "
                "and resize each as 'tiling' says"
            ),
            "in_graph_preprocessing": f"centre crop to {side}x{side}" if side != size else None,
        },
        "outputs": {
            "image_scores": {"shape": ["b"], "dtype": "float32", "higher": "more anomalous"},
            "maps": {"shape": ["b", side, side], "dtype": "float32"},
        },
        "tiling": None if tiles is None else tiled,
        "decision": thresholds.DECISION,
        "normalisation": thresholds.NORMALISATION,
        "thresholds": None
        if stored is None
        else {level: stored[level] for level in thresholds.LEVELS},
        "loading": loading,
        "jax_version": jax.__version__,
        **({"onnx": onnx} if onnx is not None else {}),
    }


def export_stablehlo(fn: Callable, size: int, path: pathlib.Path) -> pathlib.Path:
    """Serialises ``fn`` with ``jax.export`` for a symbolic batch size."""
    exported = jax.export.export(jax.jit(fn))(_input_spec(size))
    path.write_bytes(exported.serialize())
    return path


def export_saved_model(fn: Callable, size: int, path: pathlib.Path) -> pathlib.Path:
    """Writes ``fn`` as a TF SavedModel through ``jax2tf`` (batch dimension ``None``)."""
    from jax.experimental import jax2tf

    from wdam_jax.data.tf_setup import import_tensorflow

    tf = import_tensorflow()
    converted = jax2tf.convert(fn, polymorphic_shapes=["(b, _, _, _)"], with_gradient=False)

    def serve(images):
        scores, maps = converted(images)
        return {"image_scores": scores, "maps": maps}

    module = tf.Module()
    module.serve = tf.function(
        serve,
        autograph=False,
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")],
    )
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def run_id(run: runs.Restored, workdir: pathlib.Path) -> str:
    """A short digest naming the run and checkpoint an ONNX model was exported from."""
    text = f"{workdir.resolve()}\n{run.step}\n{run.config.to_json_best_effort(sort_keys=True)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def export_onnx(
    fn: Callable, size: int, path: pathlib.Path, *, run: str, run_id: str
) -> dict[str, Any]:
    """Writes ``fn`` as ONNX (:func:`wdam_jax.onnx_export.to_onnx`) with ``run`` and ``run_id``
    in its ``metadata_props``, and :mod:`wdam_jax.onnx_scorer` beside it.

    Returns:
      ``metadata.json``'s ``"onnx"``: file, bytes, SHA-256, opset, run id, inputs and outputs.
    """
    from wdam_jax import onnx_export

    props = {onnx_scorer.RUN_ID_KEY: run_id, onnx_scorer.RUN_KEY: run}
    model = onnx_export.to_onnx(fn, (1, size, size, 3), metadata=props)
    data = model.SerializeToString()
    path.write_bytes(data)
    shutil.copyfile(onnx_scorer.__file__, path.parent / SCORER_FILE)
    batch = onnx_export.BATCH
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
              for o in model.graph.output}  # fmt: skip
    return {
        "file": path.name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "opset": onnx_export.OPSET,
        "run_id": run_id,
        "inputs": {"images": {"shape": [batch, size, size, 3], "dtype": "float32"}},
        "outputs": {name: {"shape": shape, "dtype": "float32"} for name, shape in shapes.items()},
        "preprocessing": "as input.host_preprocessing; the crop is in the graph",
        "scorer": SCORER_FILE,
        "onnxruntime_version": _version("onnxruntime"),
        "onnx_version": _version("onnx"),
    }


def export(
    workdir: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    step: int | None = None,
    saved_model: bool = True,
    onnx: bool = True,
    allow_no_thresholds: bool = False,
    overwrite: bool = False,
) -> dict[str, pathlib.Path]:
    """Exports the run in ``workdir`` (newest or ``step``'s checkpoint) into ``out``.

    ``out`` is written whole or not at all (:func:`wdam_jax.runlock.publish`): it must be new,
    empty, or (with ``overwrite``) a previous export, which is then replaced whole; a folder
    holding other files, or one another process is exporting into, is refused untouched.

    Args:
      workdir: a trained and evaluated run directory.
      out: the export folder.
      step: checkpoint step (default: the newest).
      saved_model: also write the TF SavedModel.
      onnx: also write ``model.onnx`` and ``onnx_scorer.py``.
      allow_no_thresholds: export a run without stored thresholds for that step (metadata
        ``"thresholds": null``) instead of refusing it.
      overwrite: replace a previous export in ``out``.

    Returns:
      ``{"stablehlo", "metadata"[, "saved_model"][, "onnx"]}`` paths.

    Raises:
      MissingFileError: no thresholds for the step and not ``allow_no_thresholds``; nothing is
        written.
    """
    workdir = pathlib.Path(workdir)
    written = {METADATA_FILE, STABLEHLO_FILE, SAVED_MODEL_DIR, ONNX_FILE, SCORER_FILE}
    owns = runlock.written_by(METADATA_FILE, written)
    kind = dict(owns=owns, overwrite=overwrite, kind="export")
    out = runlock.check_output(out, **kind)  # before the slow part: a wrong --out fails at once
    run = runs.restore(workdir, step=step)
    if not allow_no_thresholds and stored_thresholds(workdir, run.step) is None:
        raise MissingFileError(
            f"{workdir} has no stored thresholds for step {run.step} ({thresholds.THRESHOLDS_FILE} "
            "is missing or from another step): the export would have no decision rule. Run "
            "python -m launch.evaluate "
            f"--workdir={workdir}{'' if step is None else f' --step={step}'} first (it stores "
            "them), or pass --allow_no_thresholds to export raw scores only. Nothing was written."
        )
    fn, size = inference_function(run)
    with runlock.publish(out, **kind) as staging:
        export_stablehlo(fn, size, staging / STABLEHLO_FILE)
        if saved_model:
            export_saved_model(fn, size, staging / SAVED_MODEL_DIR)
        described = None
        if onnx:
            name = f"{workdir} step {run.step} ({run.config.method})"
            ident = run_id(run, workdir)
            described = export_onnx(fn, size, staging / ONNX_FILE, run=name, run_id=ident)
        document = metadata(run, workdir, size, saved_model=saved_model, onnx=described)
        text = json.dumps(document, indent=2, default=_json_default) + "\n"
        (staging / METADATA_FILE).write_text(text)
    paths = {"stablehlo": out / STABLEHLO_FILE, "metadata": out / METADATA_FILE}
    if saved_model:
        paths["saved_model"] = out / SAVED_MODEL_DIR
    if onnx:
        paths["onnx"] = out / ONNX_FILE
    logging.info("Exported %s (step %d) to %s.", workdir, run.step, out)
    return paths


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
