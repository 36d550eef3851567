"""Scores images with an exported ``model.onnx``, checked against its ``metadata.json``.

Needs only numpy and onnxruntime: ``launch.export`` copies this file into the export folder
(``onnx_scorer.py``), so a line PC runs it without this repository::

    import onnx_scorer
    scorer = onnx_scorer.OnnxScorer("export")          # the folder launch.export wrote
    image_scores, maps = scorer(images)                # [B, S, S, 3] float32 RGB in [0, 1]
    anomalous = scorer.decide(image_scores)            # score >= the stored image threshold

Each problem with the artefact or the input is one :class:`OnnxArtefactError` whose message names
it and the fix: a ``model.onnx`` that is not the one this ``metadata.json`` was written with
(another run's, or another export's of the same run), a truncated or unreadable file, images of
the wrong shape, dtype or range. This module imports nothing from ``wdam_jax``
(``tests/test_onnx_export.py`` runs it where ``wdam_jax`` cannot be imported).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
RUN_ID_KEY = "wdam_jax.run_id"  # the model's metadata_props: which run and step it holds
RUN_KEY = "wdam_jax.run"
RANGE_SLACK = 1e-3  # resampling overshoot a host resize may leave outside [0, 1]


class OnnxArtefactError(ValueError):
    """The export folder's ``model.onnx`` or the images given to it cannot be scored."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnnxScorer:
    """``model.onnx`` of an export folder in an onnxruntime session, with its input contract.

    Args:
      folder: the folder ``launch.export`` wrote (``model.onnx`` and ``metadata.json``).
      providers: onnxruntime execution providers (default: CPU).
      model_file: the ONNX file inside ``folder`` (a quantised copy, say).
      threads: onnxruntime intra-op threads (default: onnxruntime's choice).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        model_file: str = MODEL_FILE,
        threads: int | None = None,
    ):
        import onnxruntime

        folder = os.fspath(folder)
        meta_path = os.path.join(folder, METADATA_FILE)
        self.path = os.path.join(folder, model_file)
        try:
            with open(meta_path) as f:
                self.metadata: dict[str, Any] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise OnnxArtefactError(
                f"{meta_path} cannot be read ({e}): keep the metadata.json launch.export wrote "
                f"beside {model_file}, or export again (python -m launch.export)."
            ) from e
        onnx_meta = self.metadata.get("onnx")
        if not onnx_meta:
            raise OnnxArtefactError(
                f"{meta_path} describes no ONNX model (written by an export without ONNX): "
                "export again with python -m launch.export --onnx."
            )
        if model_file == MODEL_FILE:
            self._check_file(onnx_meta)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                self.path, options, providers=list(providers)
            )
        except Exception as e:  # onnxruntime raises its own classes for a corrupt file
            raise OnnxArtefactError(
                f"{self.path} cannot be loaded by onnxruntime ({type(e).__name__}: "
                f"{str(e)[:300]}): the file is damaged; copy it again from the export, or export "
                "again (python -m launch.export)."
            ) from e
        props = self.session.get_modelmeta().custom_metadata_map
        if props.get(RUN_ID_KEY) != onnx_meta["run_id"]:
            raise OnnxArtefactError(
                f"{self.path} holds run {props.get(RUN_KEY, 'unknown')!r} (run id "
                f"{props.get(RUN_ID_KEY)}), but {meta_path} describes run "
                f"{self.metadata.get('workdir')!r} step {self.metadata.get('step')} (run id "
                f"{onnx_meta['run_id']}): its thresholds do not apply. Keep each export's "
                "model.onnx and metadata.json together (copy the whole folder)."
            )
        shape = self.metadata["input"]["shape"]
        self.input_name = self.metadata["input"]["name"]
        self.image_size = int(shape[1])
        self.thresholds = self.metadata.get("thresholds")

    def _check_file(self, onnx_meta: dict[str, Any]) -> None:
        if not os.path.isfile(self.path):
            raise OnnxArtefactError(
                f"{self.path} is missing: copy the export folder whole, or export again "
                "(python -m launch.export)."
            )
        size, expected = os.path.getsize(self.path), int(onnx_meta["bytes"])
        if size < expected:
            raise OnnxArtefactError(
                f"{self.path} is truncated: {size} of {expected} bytes (an interrupted copy or "
                "download); copy it again from the export folder."
            )
        if size != expected or _sha256(self.path) != onnx_meta["sha256"]:
            raise OnnxArtefactError(
                f"{self.path} is not the model.onnx {self.metadata.get('workdir')!r} step "
                f"{self.metadata.get('step')} was exported with (its size or SHA-256 differs from "
                "metadata.json's): it comes from another run or export, and the thresholds in "
                "metadata.json do not apply to it. Keep each export's model.onnx and "
                "metadata.json together (copy the whole folder)."
            )

    def check_images(self, images: Any) -> np.ndarray:
        """``images`` as the graph's float32 input, or an :class:`OnnxArtefactError` naming
        what is wrong with them and the preprocessing that makes them right."""
        s = self.image_size
        how = self.metadata["input"]["host_preprocessing"]
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            hint = " (channels first: the model takes NHWC)" if images.shape[1:2] == (3,) else ""
            raise OnnxArtefactError(
                f"images have shape {images.shape}{hint}; the model takes [B, {s}, {s}, 3] "
                f"(NHWC, RGB): {how}."
            )
        if images.dtype == np.uint8 or (images.size and float(np.nanmax(images)) > 1 + RANGE_SLACK):
            raise OnnxArtefactError(
                f"images range up to {float(np.nanmax(images)):g} ({images.dtype}); the model "
                f"takes float32 in [0, 1]: {how}."
            )
        images = images.astype(np.float32, copy=False)
        if images.size and not np.isfinite(images).all():
            raise OnnxArtefactError("images hold NaN or infinite values; the model takes [0, 1].")
        if images.size and float(images.min()) < -RANGE_SLACK:
            raise OnnxArtefactError(
                f"images go down to {float(images.min()):g}; the model takes float32 in [0, 1] "
                f"(not mean/std normalised: the graph normalises): {how}."
            )
        return images

    def __call__(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(image_scores [B], maps [B, C, C])`` for ``images`` ``[B, S, S, 3]``."""
        scores, maps = self.session.run(None, {self.input_name: self.check_images(images)})
        return scores, maps

    def decide(self, image_scores: np.ndarray) -> np.ndarray:
        """``score >= threshold`` with the export's stored image threshold."""
        if not self.thresholds:
            raise OnnxArtefactError(
                "this export has no stored thresholds (exported with --allow_no_thresholds): "
                "evaluate the run (python -m launch.evaluate) and export again, or compare the "
                "raw scores with a threshold of your own."
            )
        return np.asarray(image_scores) >= self.thresholds["image"]["threshold"]
