"""FMAS selector (Sec. 3.1, eq. 3): keep the candidate whose LPIPS to ``I_N`` is closest to tau.

LPIPS is built with the linear calibration weights the ``lpips`` package ships and a backbone
(AlexNet / VGG16 / SqueezeNet 1.1) whose ImageNet weights are read from a local file: nothing is
downloaded. ``backbone_weights="torch_hub"`` means torchvision's cache file
``$TORCH_HOME/hub/checkpoints/<file>`` (where torchvision itself would have put it);
``"random"`` keeps a randomly initialised backbone (tests and the demo only: the distance is then
not perceptual).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

# torchvision's file names for the ImageNet backbones LPIPS uses.
BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
BACKBONE_URL = "https://download.pytorch.org/models/{file}"


def select_closest(distances: np.ndarray, tau: float) -> int:
    """Eq. 3: ``argmin_k |d_k - tau|``; the first candidate wins a tie.

    Args:
      distances: ``[K]`` LPIPS distances of the candidates to ``I_N``.
      tau: the reference distance.

    Returns:
      The index of the selected candidate.
    """
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != 1 or distances.size == 0:
        raise ValueError(f"select_closest needs a non-empty [K] array, got shape {distances.shape}")
    return int(np.argmin(np.abs(distances - tau)))


QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def distance_summary(distances, tau: float) -> dict:
    """Quantiles of eq. 3's distances ``LPIPS(I_A^(k), I_N)``, to choose ``tau`` from.

    Args:
      distances: ``[N]`` distances (any iterable of floats).
      tau: the selector's target, reported with the share of distances below it.

    Returns:
      ``{"n", "mean", "quantiles": {"q0": ..., "q0.05": ..., "q1": ...}, "below_tau"}``;
      ``{"n": 0}`` for no distances.
    """
    d = np.asarray(list(distances), np.float64)
    if d.size == 0:
        return {"n": 0}
    values = np.quantile(d, QUANTILES)
    return {
        "n": int(d.size),
        "mean": float(d.mean()),
        "quantiles": {f"q{q:g}": float(v) for q, v in zip(QUANTILES, values, strict=True)},
        "below_tau": float(np.mean(d < tau)),
    }


def backbone_weights_path(net: str, backbone_weights: str) -> Path | None:
    """Resolves ``selector.backbone_weights`` to a file path (None for ``"random"``)."""
    if backbone_weights == "random":
        return None
    if backbone_weights == "torch_hub":
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]
    return Path(backbone_weights).expanduser()


def load_lpips(*, net: str, backbone_weights: str, device: str, seed: int):
    """Builds ``lpips.LPIPS`` offline.

    Args:
      net: ``"alex"`` (LPIPS default), ``"vgg"`` or ``"squeeze"``.
      backbone_weights: ``"torch_hub"``, ``"random"`` or a path to torchvision's state_dict file.
      device: torch device string.
      seed: torch seed of the random initialisation (what remains random with ``"random"``).

    Returns:
      The LPIPS module in eval mode.

    Raises:
      FileNotFoundError: the backbone weight file is missing (the message says what to get).
    """
    import lpips
    import torch

    if net not in BACKBONE_FILES:
        raise ValueError(f"selector.lpips_net={net!r} must be one of {sorted(BACKBONE_FILES)}.")
    path = backbone_weights_path(net, backbone_weights)
    if path is not None and not path.is_file():
        raise FileNotFoundError(
            f"LPIPS backbone weights not found: {path} (config field selector.backbone_weights). "
            f"Download {BACKBONE_URL.format(file=BACKBONE_FILES[net])} and put it at {path} "
            "(torchvision's cache is $TORCH_HOME/hub/checkpoints/, default "
            "~/.cache/torch/hub/checkpoints/), or set selector.backbone_weights to its path."
        )
    # pnet_rand=True: the package builds the backbone without asking torchvision to download it.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # lpips 0.1.4 still calls torchvision with the deprecated `pretrained=` argument.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        torch.manual_seed(seed)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # LPIPS slices torchvision's `features` into `slice1..sliceN` keeping the layer indices.
        own = model.net.state_dict()
        mapped = {k: state[re.sub(r"^slice\d+\.", "features.", k)] for k in own}
        model.net.load_state_dict(mapped)
    return model.to(device).eval()


def lpips_distances(model, reference: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """LPIPS distance of each candidate to the reference image.

    Args:
      model: from :func:`load_lpips`.
      reference: uint8 ``[H, W, 3]`` (``I_N``).
      candidates: uint8 ``[K, H, W, 3]`` (``I_A^(k)``).

    Returns:
      float64 ``[K]``.
    """
    import torch

    device = next(model.parameters()).device

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(x, copy=True)).to(device=device, dtype=torch.float32)
        return (t.permute(0, 3, 1, 2) / 127.5) - 1.0  # LPIPS expects [-1, 1], NCHW

    ref = to_tensor(reference[None]).expand(len(candidates), -1, -1, -1)
    with torch.inference_mode():
        d = model(to_tensor(candidates), ref)
    return d.reshape(-1).double().cpu().numpy()
