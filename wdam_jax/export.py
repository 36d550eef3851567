"""Exports a trained run's full inference function as artefacts that load without this repository.

``python -m launch.export --workdir=W --out=E`` calls :func:`export` and writes:

- ``E/model.stablehlo``: ``jax.export`` serialised StableHLO of ``images -> (image_scores,
  maps)`` with the network, the fitted statistics (PatchCore's memory bank, CutPaste's Gaussian
  densities) as constants; load it with ``jax.export.deserialize(bytearray(data)).call(images)``;
- ``E/saved_model/``: the same function as a TensorFlow SavedModel (``jax2tf``, native
  serialisation) for TF Serving; signature ``serving_default``: ``images`` ->
  ``{"image_scores", "maps"}``;
- ``E/metadata.json``: the input contract (shape with a symbolic batch ``b``, dtype, range,
  layout, the host preprocessing to apply before), the outputs, the run (method, step,
  workdir) and the decision thresholds with their rule and the normalisation (from
  ``thresholds.json``). Thresholds and normalisation are metadata beside the graph, not in it:
  the graph returns raw scores, and a service decides with ``score >= threshold`` and normalises
  with ``sigmoid((score - threshold) / scale)`` where it can see and change them (anomalib
  #3033 hid them inside the export).

The exported function's input is an image already resized to ``config.data.image_size`` (PIL
bilinear with antialiasing, as :func:`wdam_jax.data.datasets.resize_image`: decoding and that
resize are host work a service does with its own image library); the centre crop
(``config.data.crop_size``), the model and the scoring are in the graph. The batch dimension is
symbolic: one artefact serves any batch size.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from wdam_jax import runlock, thresholds
from wdam_jax import train as train_lib
from wdam_jax.data import datasets

STABLEHLO_FILE = "model.stablehlo"
SAVED_MODEL_DIR = "saved_model"
METADATA_FILE = "metadata.json"


def inference_function(run: train_lib.Restored) -> tuple[Callable, int]:
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


def metadata(run: train_lib.Restored, workdir: pathlib.Path, size: int) -> dict[str, Any]:
    """``metadata.json``: input and output contract, the run, thresholds and normalisation."""
    data = run.config.data
    side = data.get("crop_size", 0) or size
    try:
        stored = thresholds.stored(workdir, step=run.step)
    except FileNotFoundError:
        logging.warning("%s has no thresholds for step %d: run launch.evaluate first for them "
                        "to be in the export's metadata.", workdir, run.step)  # fmt: skip
        stored = None
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
            ),
            "in_graph_preprocessing": f"centre crop to {side}x{side}" if side != size else None,
        },
        "outputs": {
            "image_scores": {"shape": ["b"], "dtype": "float32", "higher": "more anomalous"},
            "maps": {"shape": ["b", side, side], "dtype": "float32"},
        },
        "decision": thresholds.DECISION,
        "normalisation": thresholds.NORMALISATION,
        "thresholds": None
        if stored is None
        else {level: stored[level] for level in thresholds.LEVELS},
        "jax_version": jax.__version__,
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


def export(
    workdir: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    step: int | None = None,
    saved_model: bool = True,
    overwrite: bool = False,
) -> dict[str, pathlib.Path]:
    """Exports the run in ``workdir`` (newest or ``step``'s checkpoint) into ``out``.

    ``out`` is written whole or not at all (:func:`wdam_jax.runlock.publish`): it must be new,
    empty, or (with ``overwrite``) a previous export, which is then replaced whole; a folder
    holding other files, or one another process is exporting into, is refused untouched.

    Returns:
      ``{"stablehlo", "metadata"[, "saved_model"]}`` paths.
    """
    workdir = pathlib.Path(workdir)
    owns = runlock.written_by(METADATA_FILE, {METADATA_FILE, STABLEHLO_FILE, SAVED_MODEL_DIR})
    kind = dict(owns=owns, overwrite=overwrite, kind="export")
    out = runlock.check_output(out, **kind)  # before the slow part: a wrong --out fails at once
    run = train_lib.restore(workdir, step=step)
    fn, size = inference_function(run)
    with runlock.publish(out, **kind) as staging:
        export_stablehlo(fn, size, staging / STABLEHLO_FILE)
        if saved_model:
            export_saved_model(fn, size, staging / SAVED_MODEL_DIR)
        document = metadata(run, workdir, size)
        text = json.dumps(document, indent=2, default=_json_default) + "\n"
        (staging / METADATA_FILE).write_text(text)
    paths = {"stablehlo": out / STABLEHLO_FILE, "metadata": out / METADATA_FILE}
    if saved_model:
        paths["saved_model"] = out / SAVED_MODEL_DIR
    logging.info("Exported %s (step %d) to %s.", workdir, run.step, out)
    return paths


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
