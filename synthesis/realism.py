"""Table 2: realism of synthetic anomalies against the real anomalous test images (FID, LPIPS).

Reading of the paper (Sec. 3.1, Table 2). The paper compares sets of synthetic anomalous images
(GLASS, RealNet, FMAS) on MVTec AD "for image realism" with two numbers, both "lower values
indicate higher similarity to real images": FID ("the distributional distance between generated
and real images in the feature space of a pretrained Inception network") and LPIPS ("perceptual
similarity based on deep feature embeddings"). The real images are the real anomalies (the test
images of the defect types); the synthetic set holds one anomalous image per normal training
image. A synthetic image has no real counterpart (they come from different normal images), so
LPIPS cannot be a paired distance here; we read it as the expected LPIPS distance between a
synthetic anomalous image and a real anomalous image of the same categories, the mean over all
(synthetic, real) pairs (``lpips``). The paper reports LPIPS for realism only; two more numbers
are reported beside it, clearly not the paper's: ``lpips_nearest``, the mean over synthetic
images of the LPIPS to the closest real image, and ``lpips_diversity``, the mean LPIPS between
two different synthetic images (higher = more diverse, the usual LPIPS diversity measure). The
real set's own row (``real``) gives the floor of ``lpips`` for a set distributed as the real one
(the mean over pairs of two different real images) and its diversity.

FID is torchmetrics' ``FrechetInceptionDistance`` on torch-fidelity's InceptionV3 (the TF FID
network, ``weights-inception-2015-12-05-6726825d.pth``) read from a file given by path: nothing
is downloaded. Images are resized to 299 x 299 by the TF1-compatible bilinear resize of the
reference implementation (``antialias=False``). LPIPS is the ``lpips`` package's network
(:func:`synthesis.selector.load_lpips`; AlexNet by default, its ImageNet backbone read from a
file). Pairwise distances use cached unit-normalised features: with ``a``, ``b`` an image's
normalised features of layer ``l`` and ``w`` the layer's linear weights,
``LPIPS = sum_l mean_hw sum_c w_c (a_c - b_c)**2 = s(a) + s(b) - 2 <w * a, b>`` per layer, so all
pairs are one matrix product (checked against ``lpips.LPIPS.forward`` in
``tests/test_realism.py``).

Nothing here imports jax or ``wdam_jax``: the launcher (``launch/realism.py``) makes the
synthetic images and hands them over as uint8 arrays.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from synthesis.files import atomic_write_text
from synthesis.progress import Progress

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
)
DEFAULT_INCEPTION_WEIGHTS = f"weights/inception/{INCEPTION_FILE}"
FID_FEATURES = (64, 192, 768, 2048)  # torch-fidelity's InceptionV3 feature layers
# Table 2 of the paper (MVTec AD).
PAPER_TABLE2 = {
    "GLASS": {"fid": 177.51, "lpips": 0.280},
    "RealNet": {"fid": 69.64, "lpips": 0.147},
    "FMAS (Ours)": {"fid": 56.99, "lpips": 0.130},
}
COLUMNS = ("source", "images", "fid", "lpips", "lpips_nearest", "lpips_diversity")


class WeightsError(ValueError):
    """A weights file that is there but is not the network it should hold."""


def check_images(images: np.ndarray, *, what: str) -> np.ndarray:
    """``images`` as uint8 ``[N, H, W, 3]``; raises ValueError naming ``what`` otherwise."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{what}: expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}."
        )
    return images


def _nchw(images: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


# --------------------------------------------------------------------------------------------
# FID.


def check_inception_weights(path: Path) -> None:
    """Raises FileNotFoundError (naming the file and its URL) or WeightsError unless ``path`` is
    a PyTorch state dict of torch-fidelity's InceptionV3."""
    if not path.is_file():
        raise FileNotFoundError(
            f"InceptionV3 weights for FID not found: {path} (--inception_weights). Download "
            f"{INCEPTION_URL} (torch-fidelity's conversion of the TF FID network) and put it at "
            f"{path}, or pass --inception_weights=<its path>. Nothing is downloaded at run time."
        )
    import torch

    try:
        # A plain tensor pickle only: torch-fidelity then reads it with weights_only=False.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to unpickle means the same to the user
        raise WeightsError(
            f"{path} (--inception_weights) is not a PyTorch state dict ({type(e).__name__}: "
            f"{e}). Download {INCEPTION_URL} again."
        ) from None
    if not isinstance(state, Mapping) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise WeightsError(
            f"{path} (--inception_weights) is not torch-fidelity's InceptionV3 state dict (no "
            f"Mixed_7c layer). Download {INCEPTION_URL}."
        )


class FID:
    """FID of synthetic sets against one real set whose statistics are kept.

    Args:
      weights: torch-fidelity's InceptionV3 state dict file (:data:`INCEPTION_FILE`).
      features: the Inception layer (2048: the pool features FID is defined on; 64, 192, 768
        are earlier layers, for quick checks only).
      batch_size: images per forward pass.

    Raises:
      FileNotFoundError: ``weights`` is missing (the message names the file and its URL).
      WeightsError: ``weights`` is not that network's state dict.
    """

    def __init__(self, weights: str | Path, *, features: int = 2048, batch_size: int = 16):
        import torch
        from torchmetrics.image.fid import FrechetInceptionDistance

        if features not in FID_FEATURES:
            raise ValueError(f"--fid_features={features}; use one of {FID_FEATURES}.")
        path = Path(weights).expanduser()
        check_inception_weights(path)
        try:
            self.metric = FrechetInceptionDistance(
                feature=features,
                reset_real_features=False,
                normalize=False,
                antialias=False,
                feature_extractor_weights_path=str(path),
            )
        except RuntimeError as e:  # load_state_dict: missing / unexpected keys, wrong shapes
            raise WeightsError(
                f"{path} (--inception_weights) does not fit torch-fidelity's InceptionV3 ({e}). "
                f"Download {INCEPTION_URL}."
            ) from None
        self.batch_size = batch_size
        self._torch = torch

    @property
    def network(self):
        """The Inception feature extractor (a torch module)."""
        return self.metric.inception

    def _update(self, images: np.ndarray, *, real: bool, what: str) -> None:
        images = check_images(images, what=what)
        if len(images) < 2:
            raise ValueError(f"{what}: FID needs at least 2 images, got {len(images)}.")
        progress = Progress(f"FID features of {what}", len(images), unit="images")
        with self._torch.inference_mode():
            for part in _batches(len(images), self.batch_size):
                self.metric.update(_nchw(images[part]), real=real)
                progress.update(part.stop)

    def set_real(self, images: np.ndarray) -> None:
        """The real set (uint8 ``[N, H, W, 3]``), once."""
        if int(self.metric.real_features_num_samples) > 0:
            raise RuntimeError("FID.set_real was already called; build another FID.")
        self._update(images, real=True, what="real")

    def __call__(self, images: np.ndarray, *, what: str = "synthetic") -> float:
        """FID of ``images`` (uint8 ``[N, H, W, 3]``) against the real set."""
        if int(self.metric.real_features_num_samples) == 0:
            raise RuntimeError("FID: call set_real first.")
        self.metric.reset()  # the fake statistics only (reset_real_features=False)
        self._update(images, real=False, what=what)
        n = self.metric.fake_features_sum.numel()
        logging.getLogger(__name__).info("FID of %s: eigenvalues of a %d x %d matrix", what, n, n)
        return float(self.metric.compute())


# --------------------------------------------------------------------------------------------
# LPIPS.


class LPIPSFeatures:
    """All-pairs LPIPS from cached features (see the module docstring).

    Args:
      model: ``lpips.LPIPS`` (:func:`synthesis.selector.load_lpips`), version 0.1, not spatial.
      batch_size: images per forward pass.
    """

    def __init__(self, model, *, batch_size: int = 16):
        import torch

        if not model.lpips or model.spatial or model.version != "0.1":
            raise ValueError("LPIPSFeatures needs lpips.LPIPS(lpips=True, spatial=False, v0.1).")
        self.model, self.batch_size, self._torch = model, batch_size, torch
        self.device = next(model.parameters()).device

    def embed(self, images: np.ndarray, *, what: str = "images"):
        """``(features [N, D] float32, weights [D] float32)``: the unit-normalised features of
        every layer, flattened and concatenated, and each entry's ``w_c / (H_l W_l)``."""
        import lpips

        torch = self._torch
        images = check_images(images, what=what)
        chunks, weights = [], None
        progress = Progress(f"LPIPS features of {what}", len(images), unit="images")
        with torch.inference_mode():
            for part in _batches(len(images), self.batch_size):
                x = _nchw(images[part]).to(self.device, torch.float32) / 127.5 - 1.0
                outs = self.model.net.forward(self.model.scaling_layer(x))
                feats = [lpips.normalize_tensor(o) for o in outs]
                chunks.append(torch.cat([f.flatten(1) for f in feats], dim=1).cpu())
                if weights is None:
                    weights = torch.cat(
                        [
                            (lin.model[-1].weight.reshape(-1) / (f.shape[2] * f.shape[3]))
                            .repeat_interleave(f.shape[2] * f.shape[3])
                            .cpu()
                            for lin, f in zip(self.model.lins, feats, strict=True)
                        ]
                    )
                progress.update(part.stop)
        return torch.cat(chunks), weights

    def pairwise(self, a, b, weights) -> np.ndarray:
        """LPIPS ``[Na, Nb]`` (float64) between embedded sets ``a`` and ``b``."""
        torch = self._torch
        out = np.empty((len(a), len(b)))
        self_b = (b.square() * weights).sum(1).double()
        with torch.inference_mode():
            for part in _batches(len(a), self.batch_size):
                wa = a[part] * weights
                self_a = (wa * a[part]).sum(1).double()
                cross = (wa @ b.T).double()
                out[part] = (self_a[:, None] + self_b[None, :] - 2.0 * cross).numpy()
        return np.maximum(out, 0.0)


def lpips_summary(to_real: np.ndarray, within: np.ndarray, *, same_set: bool) -> dict[str, float]:
    """``lpips``, ``lpips_nearest`` and ``lpips_diversity`` from the distance matrices.

    Args:
      to_real: ``[N, R]`` LPIPS of each image of the set to each real image.
      within: ``[N, N]`` LPIPS between the set's images.
      same_set: the set is the real set (``to_real`` is ``within``): pairs of an image with
        itself are left out.
    """
    n = len(within)
    off = ~np.eye(n, dtype=bool)
    if same_set:
        to_real_pairs = to_real[off]
        nearest = np.where(off, to_real, np.inf).min(axis=1) if n > 1 else np.array([np.nan])
    else:
        to_real_pairs, nearest = to_real.ravel(), to_real.min(axis=1)
    return {
        "lpips": float(to_real_pairs.mean()) if to_real_pairs.size else math.nan,
        "lpips_nearest": float(nearest.mean()),
        "lpips_diversity": float(within[off].mean()) if n > 1 else math.nan,
    }


# --------------------------------------------------------------------------------------------
# The table.


def realism_table(
    real: np.ndarray,
    synthetic: Mapping[str, np.ndarray],
    *,
    fid: FID,
    lpips_features: LPIPSFeatures,
) -> list[dict[str, float | int | str]]:
    """One row per synthetic source (and one for the real set): images, FID, LPIPS numbers.

    Args:
      real: uint8 ``[R, S, S, 3]`` real anomalous images.
      synthetic: source name -> uint8 ``[N, S, S, 3]``.
      fid: an unused :class:`FID` (its real set is set here).
      lpips_features: :class:`LPIPSFeatures`.
    """
    real = check_images(real, what="real")
    fid.set_real(real)
    real_emb, weights = lpips_features.embed(real, what="real")
    real_within = lpips_features.pairwise(real_emb, real_emb, weights)
    rows = [
        {
            "source": "real",
            "images": len(real),
            "fid": math.nan,
            **lpips_summary(real_within, real_within, same_set=True),
        }
    ]
    for name, images in synthetic.items():
        images = check_images(images, what=name)
        emb, _ = lpips_features.embed(images, what=name)
        rows.append(
            {
                "source": name,
                "images": len(images),
                "fid": fid(images, what=name),
                **lpips_summary(
                    lpips_features.pairwise(emb, real_emb, weights),
                    lpips_features.pairwise(emb, emb, weights),
                    same_set=False,
                ),
            }
        )
        del emb
    return rows


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping]) -> str:
    """The rows as a markdown table, then the paper's Table 2 for reference."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "Paper, Table 2 (MVTec AD): " + "; ".join(
        f"{k} FID {v['fid']}, LPIPS {v['lpips']}" for k, v in PAPER_TABLE2.items()
    )]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(
    rows: Sequence[Mapping], outdir: str | Path, *, settings: Mapping
) -> dict[str, Path]:
    """``realism.{md,csv,json}`` in ``outdir``, each written atomically."""
    outdir = Path(outdir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([_cell(r[c]) for c in COLUMNS] for r in rows)
    clean = [{c: (None if isinstance(r[c], float) and math.isnan(r[c]) else r[c]) for c in COLUMNS}
             for r in rows]  # fmt: skip
    document = {"rows": clean, "settings": dict(settings), "paper_table2": PAPER_TABLE2}
    return {
        "md": atomic_write_text(outdir / "realism.md", markdown_table(rows)),
        "csv": atomic_write_text(outdir / "realism.csv", buffer.getvalue()),
        "json": atomic_write_text(outdir / "realism.json", json.dumps(document, indent=2) + "\n"),
    }
