"""Decision thresholds and normalised scores, computed at evaluation and stored with the run.

A run's scores are unbounded and on a method-specific scale (a Mahalanobis distance, a kNN
distance). To turn one into a decision on a new image the run stores, per level (``image``: the
image score; ``pixel``: the anomaly map's values), a *threshold* and a *scale*:

- decision: anomalous iff ``score >= threshold`` (the convention of scikit-learn's
  ``precision_recall_curve``);
- normalised score: ``sigmoid((score - threshold) / scale)``, a monotone map onto (0, 1) with the
  threshold at exactly 0.5, so "normalised >= 0.5" is the same decision. ``scale`` is a robust
  spread of the scores of held-out normal images (interquartile range / 1.349, the standard
  deviation of a Gaussian with that IQR): a normal image typically lands well below 0.5, a score
  one normal spread above the threshold at 0.73. Both numbers come from the run's evaluation,
  never from the images being predicted, so one image's normalised score does not depend on the
  other images of a batch (anomalib's min-max over the predicted set does).

Two rules give the threshold (``config.score.threshold_rule``):

- ``"normal_fpr"`` (default; the factory case, normal images only): the ``1 - fpr`` quantile
  (linear interpolation) of the scores of held-out normal images, ``fpr =
  config.score.threshold_fpr``. A held-out image is one that neither training nor ``fit`` saw:
  the ``holdout`` split (``config.data.holdout_fraction`` of the training images, see
  :func:`wdam_jax.data.sources.load_split`), or, for a run without one, the normal images of the
  test split. Scores of *training* images are not used: ``fit`` built its statistics from them
  (PatchCore's bank holds their own patches), so they understate normal variation and the
  threshold would flag normal images. The quantile is never the minimum score: with ``n``
  held-out scores and ``fpr < 1`` it lies above at least ``floor((1 - fpr) (n - 1))`` of them,
  whereas anomalib's adaptive F1 threshold collapses to the minimum when the validation set has
  no anomaly (anomalib #2433).
- ``"f1_max"``: the threshold maximising F1 on a labelled split. The only labelled split of
  MVTec AD, VisA and the demo is the test split, so this threshold is tuned on the images it is
  then evaluated on (anomalib's default too); it is recorded, with its split, for comparison.

Every computed candidate is stored in ``thresholds.json`` with its rule and provenance; the one
``threshold_rule`` names is the one prediction uses unless a manual threshold is given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from wdam_jax import checkpoints, metrics
from wdam_jax.errors import MissingFileError

THRESHOLDS_FILE = "thresholds.json"
EVAL_DIR = "eval"  # <workdir>/eval/step_<n>/: the evaluation reports (wdam_jax.evaluate)
RULES = ("normal_fpr", "f1_max")
LEVELS = ("image", "pixel")
DECISION = "anomalous iff score >= threshold"
NORMALISATION = "normalised = 1 / (1 + exp(-(score - threshold) / scale)); threshold -> 0.5"
DEFAULT_FPR = 0.01


@dataclasses.dataclass(frozen=True)
class Threshold:
    """One level's decision threshold and normalisation.

    Attributes:
      value: the threshold; anomalous iff ``score >= value``.
      scale: the normalisation's spread (> 0).
      rule: ``"normal_fpr"``, ``"f1_max"`` or ``"manual"``.
      details: provenance (split, number of images, target FPR, F1, ...).
    """

    value: float
    scale: float
    rule: str
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        """Scores of any shape -> float32 in (0, 1), the threshold at 0.5 (module docstring)."""
        return normalise(scores, threshold=self.value, scale=self.scale)

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """bool, True = anomalous."""
        return np.asarray(scores) >= self.value

    def as_json(self) -> dict[str, Any]:
        return {"threshold": self.value, "scale": self.scale, "rule": self.rule, **self.details}


def normalise(scores: np.ndarray, *, threshold: float, scale: float) -> np.ndarray:
    """``sigmoid((scores - threshold) / scale)`` as float32, computed without overflow."""
    z = (np.asarray(scores, np.float64) - threshold) / scale
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)


def robust_scale(normal_scores: np.ndarray) -> float:
    """A spread of normal scores: IQR / 1.349, else the standard deviation, else 1e-6 x (1 +
    the largest magnitude), so that the normalisation never divides by zero.

    Args:
      normal_scores: any shape (flattened), finite.
    """
    x = np.asarray(normal_scores, np.float64).reshape(-1)
    q25, q75 = np.quantile(x, [0.25, 0.75])
    for spread in ((q75 - q25) / 1.349, x.std()):
        if spread > 0 and math.isfinite(spread):
            return float(spread)
    return float(1e-6 * (1.0 + np.abs(x).max()))


def normal_fpr_threshold(normal_scores: np.ndarray, *, fpr: float) -> float:
    """The ``1 - fpr`` quantile of held-out normal scores (linear interpolation).

    Args:
      normal_scores: scores of normal images none of which training or ``fit`` saw (any shape,
        flattened: image scores or map pixels); at least 2.
      fpr: the target false-positive rate, in (0, 1).

    Returns:
      The threshold; on these scores the share ``>= threshold`` is about ``fpr`` (at most
      ``fpr + 1 / n``).
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"config.score.threshold_fpr={fpr}: use a false-positive rate in (0, 1).")
    x = np.asarray(normal_scores, np.float64).reshape(-1)
    if x.size < 2:
        raise ValueError(
            f"A false-positive-rate threshold needs at least 2 held-out normal scores, got "
            f"{x.size}; raise config.data.holdout_fraction or add normal test images."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("Held-out normal scores contain NaN or inf; check the model's output.")
    return float(np.quantile(x, 1.0 - fpr))


def rule_supported(num_scores: int, fpr: float) -> bool:
    """Whether ``num_scores`` held-out normal scores can resolve a false-positive rate ``fpr``:
    at least ``1 / fpr`` of them (below that, the ``1 - fpr`` quantile is an interpolation
    between the top scores, and one normal image above it is already a rate above ``fpr``)."""
    return num_scores * fpr >= 1.0 - 1e-9


def _normal_candidate(scores: np.ndarray, *, fpr: float, source: str, n_images: int) -> Threshold:
    value = normal_fpr_threshold(scores, fpr=fpr)
    x = np.asarray(scores).reshape(-1)
    details = {
        "target_fpr": fpr,
        "observed_fpr": float(np.mean(x >= value)),
        "source": source,
        "num_images": n_images,
        "normal_min": float(x.min()),
        "normal_max": float(x.max()),
        # Image level: one score per image; pixel level: every pixel of those images.
        "rule_supported": rule_supported(x.size, fpr),
    }
    if not details["rule_supported"]:
        details["unsupported_because"] = (
            f"{x.size} held-out normal scores cannot resolve target_fpr={fpr} (it needs at "
            f"least {math.ceil(1 / fpr - 1e-9)}); raise config.data.holdout_fraction or "
            "config.score.threshold_fpr"
        )
    return Threshold(value=value, scale=robust_scale(x), rule="normal_fpr", details=details)


_BANNER = "!" * 100
TEST_SPLIT_WARNING = (
    f"\n{_BANNER}\n"
    "The stored {level} threshold of {workdir} ({rule}) was chosen on the TEST SPLIT ({source}):\n"
    "the data the run's metrics are reported on, not images held out for it. Decisions made with\n"
    "it are optimistic. Retrain with --config.data.holdout_fraction=0.1 (normal training images\n"
    "held out of training and fit, which set the threshold instead), or pass a threshold.\n"
    f"{_BANNER}"
)


def deployment_warnings(
    chosen: Mapping[str, Threshold | None], workdir: str | pathlib.Path
) -> list[str]:
    """Warnings about the thresholds a prediction uses (:mod:`wdam_jax.predict`): one chosen on
    the test split (``data.holdout_fraction = 0``, the paper configs' protocol), or one whose
    rule its held-out images cannot support (:func:`rule_supported`). Manual thresholds have
    none.

    Args:
      chosen: ``{"image": Threshold, "pixel": Threshold or None}``.
      workdir: the run directory (named in the messages).

    Returns:
      The messages, also logged as warnings.
    """
    out = []
    for level, t in chosen.items():
        if t is None or t.rule == "manual":
            continue
        source = str(t.details.get("source", ""))
        if source.startswith("test split"):
            out.append(
                TEST_SPLIT_WARNING.format(level=level, workdir=workdir, rule=t.rule, source=source)
            )
        if t.details.get("rule_supported") is False:
            out.append(
                f"The stored {level} threshold of {workdir} does not hold its rule: "
                f"{t.details['unsupported_because']}. Its observed false-positive rate on the "
                f"held-out images was {t.details['observed_fpr']:.3g}, the target "
                f"{t.details['target_fpr']:.3g}."
            )
    for message in out:
        logging.warning(message)
    return out


def calibrate(
    *,
    normal_scores: np.ndarray,
    normal_maps: np.ndarray,
    normal_source: str,
    labelled: Mapping[str, Any] | None = None,
    fpr: float = DEFAULT_FPR,
    rule: str = "normal_fpr",
) -> dict[str, Any]:
    """Every threshold candidate of a run and the selected one per level.

    Args:
      normal_scores: ``[N]`` image scores of held-out normal images.
      normal_maps: ``[N, S, S]`` their anomaly maps (pixel level: every pixel is normal).
      normal_source: where they come from (recorded), e.g. ``"holdout split"``.
      labelled: optional labelled split: ``{"scores" [M], "labels" [M], "maps" list/[M, H, W],
        "masks" (same shapes), "has_pixel_labels" bool, "source" str}``; gives the F1-max
        candidates when it holds anomalies.
      fpr: target false-positive rate of the ``normal_fpr`` rule.
      rule: the rule whose threshold is selected (``"normal_fpr"`` or ``"f1_max"``).

    Returns:
      ``{"image": Threshold, "pixel": Threshold, "candidates": {level: {rule: Threshold}}}``.
    """
    if rule not in RULES:
        raise ValueError(f"config.score.threshold_rule={rule!r}: use one of {', '.join(RULES)}.")
    n = len(normal_scores)
    candidates: dict[str, dict[str, Threshold]] = {
        "image": {"normal_fpr": _normal_candidate(normal_scores, fpr=fpr, source=normal_source,
                                                  n_images=n)},
        "pixel": {"normal_fpr": _normal_candidate(normal_maps, fpr=fpr, source=normal_source,
                                                  n_images=n)},
    }  # fmt: skip
    if labelled is not None and np.any(labelled["labels"]):
        source = labelled["source"]
        f1, value = metrics.f1_max(labelled["scores"], labelled["labels"])
        scale = candidates["image"]["normal_fpr"].scale
        candidates["image"]["f1_max"] = Threshold(
            value, scale, "f1_max", {"f1": f1, "source": source}
        )
        if labelled.get("has_pixel_labels", True):
            f1, value = metrics.pixel_f1_max(labelled["maps"], labelled["masks"])
            scale = candidates["pixel"]["normal_fpr"].scale
            candidates["pixel"]["f1_max"] = Threshold(
                value, scale, "f1_max", {"f1": f1, "source": source}
            )
    selected = {}
    for level in LEVELS:
        if rule not in candidates[level]:
            raise ValueError(
                f"config.score.threshold_rule={rule!r} needs labelled anomalies (with pixel "
                f"masks for the pixel level), which the evaluation split lacks; use "
                "threshold_rule='normal_fpr'."
            )
        selected[level] = candidates[level][rule]
    return {**selected, "candidates": candidates}


def to_json(calibration: Mapping[str, Any], *, step: int, method: str) -> dict[str, Any]:
    """The ``thresholds.json`` document of :func:`calibrate`'s result."""
    return {
        "step": step,
        "method": method,
        "decision": DECISION,
        "normalisation": NORMALISATION,
        **{level: calibration[level].as_json() for level in LEVELS},
        "candidates": {
            level: {r: t.as_json() for r, t in calibration["candidates"][level].items()}
            for level in LEVELS
        },
    }


def write(document: Mapping[str, Any], *, eval_dir: pathlib.Path) -> pathlib.Path:
    """Writes ``eval_dir/thresholds.json`` (atomically: a predictor never reads half a file);
    ``wdam_jax.evaluate.share_thresholds`` copies it to the run's own."""
    return checkpoints.atomic_write_text(
        eval_dir / THRESHOLDS_FILE, json.dumps(document, indent=2) + "\n"
    )


def _threshold(entry: Mapping[str, Any]) -> Threshold:
    details = {k: v for k, v in entry.items() if k not in ("threshold", "scale", "rule")}
    return Threshold(float(entry["threshold"]), float(entry["scale"]), entry["rule"], details)


def read(workdir: str | pathlib.Path, *, step: int) -> dict[str, Threshold]:
    """The stored thresholds of ``workdir``'s checkpoint ``step``: ``{"image", "pixel"}``.

    Raises:
      FileNotFoundError: the run was not evaluated (at this step) since thresholds exist.
    """
    return parse(stored(workdir, step=step))


def parse(document: Mapping[str, Any]) -> dict[str, Threshold]:
    """A ``thresholds.json`` document as ``{"image", "pixel"}`` thresholds."""
    return {level: _threshold(document[level]) for level in LEVELS}


def stored(workdir: str | pathlib.Path, *, step: int) -> dict[str, Any]:
    """The ``thresholds.json`` document of ``workdir``'s checkpoint ``step``: the run's own, or,
    when that one is of another step, the evaluation report's (``eval/step_<step>/``: a run
    evaluated beside its still running training keeps the run's copy for the training).

    Raises:
      FileNotFoundError: the run was not evaluated (at this step) since thresholds exist.
    """
    path = pathlib.Path(workdir) / THRESHOLDS_FILE
    fix = f"run python -m launch.evaluate --workdir={workdir} (it computes and stores them)"
    report = pathlib.Path(workdir) / EVAL_DIR / f"step_{step}" / THRESHOLDS_FILE
    if report.is_file() and not (path.is_file() and json.loads(path.read_text())["step"] == step):
        path = report
    if not path.is_file():
        raise MissingFileError(f"{path} not found: the run has no stored thresholds; {fix}.")
    document = json.loads(path.read_text())
    if document["step"] != step:
        raise MissingFileError(
            f"{path} holds the thresholds of step {document['step']}, the checkpoint is step "
            f"{step}; {fix}."
        )
    return document


def manual(value: float, stored: Threshold | None) -> Threshold:
    """A threshold given at prediction time; the scale is the stored one (the run's normal
    spread), or 1 for a run without stored thresholds."""
    scale = stored.scale if stored is not None else 1.0
    return Threshold(float(value), scale, "manual", {"scale_from": "run" if stored else "none"})
