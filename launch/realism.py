r"""Table 2: realism of synthetic anomalies (FID, LPIPS) against the real anomalous test images.

  python -m launch.realism --real=data/mvtec_ad/bottle/test \
      --synthetic=fmas,cutpaste,scar,draem --fmas_records='workdirs/fmas_mvtec/fmas-*.tfrecord' \
      --texture_dir=data/dtd/images --out=workdirs/realism/bottle

``--real``: one or more ``<root>/<category>/test`` folders; their defect images (every subfolder
but ``good``) are the real set, pooled over the folders given (one folder: one category's row;
all fifteen: the whole dataset). ``--synthetic``: the sets to compare, one anomalous image per
normal training image (``<root>/<category>/train/good``, or ``--normal``) as the paper's Table 2:

- ``fmas``: the FMAS records of those categories (``--fmas_records``, read without TensorFlow);
- ``cutpaste``, ``scar``: this project's CutPaste and CutPaste-scar (``wdam_jax.data.augment``)
  with ``configs/cutpaste.py``'s parameters (scar sizes are for 256 px, scaled to
  ``--image_size``);
- ``draem``: DRAEM's Perlin-noise anomaly with ``configs/draem.py``'s parameters and textures from
  ``--texture_dir`` (DTD's ``images/``, or ``procedural``), always anomalous (a draw with an empty
  mask is redrawn).

Every image is resized to ``--image_size`` (the training size) with the data loaders' kernel.
FID and LPIPS are computed on the PyTorch side (``synthesis/realism.py``, whose docstring states
how the paper's LPIPS is read); writes ``realism.{md,csv,json}`` to ``--out``.
"""

from __future__ import annotations

import glob
import io
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from PIL import Image

from configs import cutpaste as cutpaste_config
from configs import draem as draem_config
from launch import cli
from synthesis import realism, selector, tfrecord
from wdam_jax.data import augment, datasets
from wdam_jax.data.anomaly_sources import PROCEDURAL, TextureBank
from wdam_jax.errors import InputsError, MissingFileError, UserError
from wdam_jax.progress import Progress

SOURCES = ("fmas", "cutpaste", "scar", "draem")
DRAEM_ATTEMPTS = 20  # redraws of a DRAEM anomaly whose mask came out empty

_REAL = flags.DEFINE_list("real", None, "<root>/<category>/test folders.", required=True)
_SYNTHETIC = flags.DEFINE_list("synthetic", list(SOURCES), f"Sets to compare: {SOURCES}.")
_OUT = flags.DEFINE_string("out", None, "Folder of realism.{md,csv,json}.", required=True)
_NORMAL = flags.DEFINE_list(
    "normal", None, "Normal image folders, one per --real (default <real>/../train/good)."
)
_FMAS_RECORDS = flags.DEFINE_string("fmas_records", "", "Glob of FMAS TFRecord files.")
_TEXTURE_DIR = flags.DEFINE_string(
    "texture_dir",
    draem_config.get_config().data.anomaly_source_dir,
    f"DRAEM's texture folder (DTD images/) or '{PROCEDURAL}'.",
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Side every image is resized to.")
_MAX_IMAGES = flags.DEFINE_integer(
    "max_images", 0, "At most this many images per set (a seeded subset); 0: all."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the augmentations and subsets.")
_INCEPTION = flags.DEFINE_string(
    "inception_weights", realism.DEFAULT_INCEPTION_WEIGHTS, "torch-fidelity InceptionV3 file."
)
_FID_FEATURES = flags.DEFINE_enum(
    "fid_features", "2048", [str(f) for f in realism.FID_FEATURES], "Inception layer of FID."
)
_LPIPS_NET = flags.DEFINE_enum("lpips_net", "alex", list(selector.BACKBONE_FILES), "LPIPS net.")
_LPIPS_BACKBONE = flags.DEFINE_string(
    "lpips_backbone", "torch_hub", "LPIPS backbone weights: 'torch_hub', a path, or 'random'."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per forward pass.")


# --------------------------------------------------------------------------------------------
# Inputs.


def normal_dirs(real_dirs: list[Path], normal: list[str] | None) -> list[Path]:
    """The normal-image folder of each real folder."""
    if normal is None:
        return [d.parent / "train" / "good" for d in real_dirs]
    if len(normal) != len(real_dirs):
        raise UserError(
            f"--normal names {len(normal)} folder(s) for {len(real_dirs)} --real folder(s); "
            "give one per --real, in the same order, or leave --normal out."
        )
    return [Path(p) for p in normal]


def check_inputs(real_dirs: list[Path], normals: list[Path], sources: list[str]) -> None:
    """Every problem with the inputs, in one :class:`InputsError` (nothing is computed)."""
    problems = []
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        problems.append(f"--synthetic: unknown set(s) {unknown}; use some of {list(SOURCES)}.")
    if not sources:
        problems.append(f"--synthetic is empty; use some of {list(SOURCES)}.")
    for d in real_dirs:
        if not d.is_dir():
            problems.append(f"--real={d}: no such folder (expected <root>/<category>/test).")
        elif not [p for p in d.iterdir() if p.is_dir() and p.name != "good"]:
            problems.append(f"--real={d} has no defect folder (only good/ or nothing).")
    if {"cutpaste", "scar", "draem"} & set(sources):
        problems += [
            f"normal images {d} (--normal): no such folder." for d in normals if not d.is_dir()
        ]
    if "fmas" in sources and not glob.glob(_FMAS_RECORDS.value):
        problems.append(
            f"--fmas_records={_FMAS_RECORDS.value!r} matches no file; make the records with "
            "python -m launch.synthesize, or leave fmas out of --synthetic."
        )
    texture_dir = _TEXTURE_DIR.value
    if "draem" in sources and texture_dir != PROCEDURAL and not Path(texture_dir).is_dir():
        problems.append(
            f"--texture_dir={texture_dir} is not a folder: download DTD from "
            "https://www.robots.ox.ac.uk/~vgg/data/dtd/ and pass --texture_dir=<dtd>/images, or "
            f"--texture_dir={PROCEDURAL}, or leave draem out of --synthetic."
        )
    try:
        realism.check_inception_weights(Path(_INCEPTION.value).expanduser())
    except (FileNotFoundError, realism.WeightsError) as e:
        problems.append(str(e))
    backbone = selector.backbone_weights_path(_LPIPS_NET.value, _LPIPS_BACKBONE.value)
    if backbone is not None and not backbone.is_file():
        url = selector.BACKBONE_URL.format(file=selector.BACKBONE_FILES[_LPIPS_NET.value])
        problems.append(
            f"LPIPS backbone weights not found: {backbone} (--lpips_backbone). Download {url} "
            "and put it there, or pass --lpips_backbone=<its path>."
        )
    if _IMAGE_SIZE.value < 32:
        problems.append(f"--image_size={_IMAGE_SIZE.value}: use at least 32.")
    out = Path(_OUT.value)
    if out.exists() and not out.is_dir():
        problems.append(f"--out={out} is a file; choose a folder.")
    if problems:
        raise InputsError(problems, what="launch.realism")


def _subset(items: list, what: str) -> list:
    """At most ``--max_images`` of ``items``, a subset drawn from the seed (order kept)."""
    k = _MAX_IMAGES.value
    if k <= 0 or len(items) <= k:
        return items
    rng = np.random.default_rng([_SEED.value, *what.encode()])
    return [items[i] for i in np.sort(rng.choice(len(items), size=k, replace=False))]


def _uint8(images: list[np.ndarray]) -> np.ndarray:
    return np.clip(np.rint(np.stack(images) * 255.0), 0, 255).astype(np.uint8)


def read_folder_images(paths: list[Path]) -> np.ndarray:
    """float32 ``[N, S, S, 3]`` in [0, 1] at ``--image_size``."""
    size = _IMAGE_SIZE.value
    return np.stack([datasets.resize_image(datasets.read_rgb(p), image_size=size) for p in paths])


def real_images(real_dirs: list[Path]) -> np.ndarray:
    """The defect images of the ``--real`` folders, uint8."""
    paths = [
        p
        for d in real_dirs
        for sub in sorted(d.iterdir())
        if sub.is_dir() and sub.name != "good"
        for p in datasets.list_images(sub)
    ]
    if len(paths) < 2:
        raise UserError(f"--real={_REAL.value}: {len(paths)} defect image(s); FID needs 2 or more.")
    return _uint8(list(read_folder_images(_subset(paths, "real"))))


def fmas_images(categories: set[str]) -> np.ndarray:
    """The FMAS samples of ``categories`` from ``--fmas_records``, uint8."""
    names = ("image/encoded", "image/category")
    encoded = []
    for path in sorted(glob.glob(_FMAS_RECORDS.value)):
        try:
            for raw in tfrecord.read_records(path):
                ex = tfrecord.parse_example(raw, names=names)
                if len(ex.get("image/category", ())) != 1 or len(ex.get(names[0], ())) != 1:
                    raise UserError(f"A record in {path} lacks {list(names)}: not an FMAS record.")
                if ex["image/category"][0].decode(errors="replace") in categories:
                    encoded.append((path, ex["image/encoded"][0]))
        except tfrecord.RecordError as e:
            raise UserError(f"{path} (--fmas_records) is damaged: {e}") from None
    if len(encoded) < 2:
        raise UserError(
            f"--fmas_records={_FMAS_RECORDS.value!r} holds {len(encoded)} sample(s) of "
            f"{sorted(categories)}; FID needs 2 or more (run python -m launch.synthesize for them)."
        )
    images = []
    for path, data in _subset(encoded, "fmas"):
        try:
            rgb = datasets.to_rgb(Image.open(io.BytesIO(data)))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"A record in {path} holds an undecodable image ({e}).") from None
        images.append(datasets.resize_image(rgb, image_size=_IMAGE_SIZE.value))
    return _uint8(images)


def augmentations(source: str, normals: np.ndarray) -> np.ndarray:
    """One ``source`` anomaly per normal image (float [N, S, S, 3]), uint8; image ``i``'s draw is
    a pure function of ``(seed, source, i)``."""
    a = cutpaste_config.get_config().augment
    d = draem_config.get_config().augment
    scale = _IMAGE_SIZE.value / 256.0  # CutPaste's scar sizes are for 256 x 256
    textures = None
    if source == "draem":
        textures = TextureBank(_TEXTURE_DIR.value, image_size=_IMAGE_SIZE.value, seed=_SEED.value)
    out = []
    progress = Progress(f"{source} anomalies", len(normals), unit="images")
    for i, image in enumerate(normals):
        rng = np.random.default_rng([_SEED.value, SOURCES.index(source), i])
        if source == "cutpaste":
            x = augment.cutpaste(rng, image, **augment.cutpaste_options(a))
        elif source == "scar":
            x = augment.cutpaste_scar(rng, image, **augment.scar_options(a, scale=scale))
        else:
            for _ in range(DRAEM_ATTEMPTS):
                x, mask = augment.draem_anomaly(
                    rng,
                    image,
                    textures.get(int(rng.integers(len(textures)))),
                    scale_exponents=tuple(d.perlin_scale_exponents),
                    threshold=d.perlin_threshold,
                    max_beta=d.max_beta,
                    no_anomaly_prob=0.0,
                )
                if mask.any():
                    break
        out.append(x)
        progress.update(i + 1)
    return _uint8(out)


# --------------------------------------------------------------------------------------------
# The command.


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    real_dirs = [Path(p) for p in _REAL.value]
    normals_dirs = normal_dirs(real_dirs, _NORMAL.value)
    sources = list(dict.fromkeys(_SYNTHETIC.value))
    check_inputs(real_dirs, normals_dirs, sources)
    categories = {d.resolve().parent.name for d in real_dirs}

    real = real_images(real_dirs)
    synthetic = {}
    normals = None
    for source in sources:
        if source == "fmas":
            synthetic[source] = fmas_images(categories)
            continue
        if normals is None:
            paths = [p for d in normals_dirs for p in datasets.list_images(d)]
            if len(paths) < 2:
                raise UserError(
                    f"{len(paths)} normal image(s) in {[str(d) for d in normals_dirs]} "
                    "(--normal); the augmented sets need 2 or more for FID."
                )
            normals = read_folder_images(_subset(paths, "normal"))
        synthetic[source] = augmentations(source, normals)
    logging.info("images: real %d, %s", len(real), {k: len(v) for k, v in synthetic.items()})

    try:
        fid = realism.FID(
            _INCEPTION.value, features=int(_FID_FEATURES.value), batch_size=_BATCH_SIZE.value
        )
        lpips_model = selector.load_lpips(
            net=_LPIPS_NET.value, backbone_weights=_LPIPS_BACKBONE.value, device="cpu", seed=0
        )
    except FileNotFoundError as e:
        raise MissingFileError(str(e)) from None
    except realism.WeightsError as e:
        raise UserError(str(e)) from None
    rows = realism.realism_table(
        real,
        synthetic,
        fid=fid,
        lpips_features=realism.LPIPSFeatures(lpips_model, batch_size=_BATCH_SIZE.value),
    )
    settings = {
        "real": [str(d) for d in real_dirs],
        "categories": sorted(categories),
        "normal": [str(d) for d in normals_dirs],
        "fmas_records": _FMAS_RECORDS.value,
        "texture_dir": _TEXTURE_DIR.value,
        "image_size": _IMAGE_SIZE.value,
        "max_images": _MAX_IMAGES.value,
        "seed": _SEED.value,
        "inception_weights": _INCEPTION.value,
        "fid_features": int(_FID_FEATURES.value),
        "lpips_net": _LPIPS_NET.value,
        "lpips_backbone": _LPIPS_BACKBONE.value,
    }
    written = realism.write_report(rows, _OUT.value, settings=settings)
    print(realism.markdown_table(rows))
    print(f"Written: {', '.join(str(p) for p in written.values())}")


if __name__ == "__main__":
    cli.run(main, config_flag=None)
