"""Table 2's computation: realism of synthetic anomalies (FID, LPIPS) against the real anomalous
test images (``python -m launch.realism`` parses flags and calls :func:`compute`).

The real set is the defect images of ``<root>/<category>/test`` folders; each synthetic set has
one anomalous image per normal training image: FMAS records, this project's CutPaste and scar
(``wdam_jax.data.augment`` with the given CutPaste augmentation settings; scar sizes are for
256 px and scaled to ``image_size``) and DRAEM's Perlin anomaly (redrawn when its mask comes out
empty). FID and LPIPS come from the PyTorch side (:mod:`synthesis.realism`): this module is the
one place on the JAX side that imports ``synthesis`` (``tests/test_layering.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import glob
import io
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from synthesis import realism, selector, tfrecord
from wdam_jax.data import augment, datasets
from wdam_jax.data.anomaly_sources import PROCEDURAL, TextureBank
from wdam_jax.errors import InputsError, MissingFileError, UserError
from wdam_jax.progress import Progress

SOURCES = ("fmas", "cutpaste", "scar", "draem")
DRAEM_ATTEMPTS = 20  # redraws of a DRAEM anomaly whose mask came out empty


@dataclasses.dataclass(frozen=True)
class RealismInputs:
    """What Table 2 is computed from (``launch.realism``'s flags; the messages name them)."""

    real: list[str]
    out: str
    cutpaste_augment: ml_collections.ConfigDict
    draem_augment: ml_collections.ConfigDict
    synthetic: list[str] = dataclasses.field(default_factory=lambda: list(SOURCES))
    normal: list[str] | None = None
    fmas_records: str = ""
    texture_dir: str = PROCEDURAL
    image_size: int = 256
    max_images: int = 0
    seed: int = 0
    inception_weights: str = realism.DEFAULT_INCEPTION_WEIGHTS
    fid_features: int = 2048
    lpips_net: str = "alex"
    lpips_backbone: str = "torch_hub"
    batch_size: int = 16


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


def check_inputs(
    inputs: RealismInputs, real_dirs: list[Path], normals: list[Path], sources: list[str]
) -> None:
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
    if "fmas" in sources and not glob.glob(inputs.fmas_records):
        problems.append(
            f"--fmas_records={inputs.fmas_records!r} matches no file; make the records with "
            "python -m launch.synthesize, or leave fmas out of --synthetic."
        )
    texture_dir = inputs.texture_dir
    if "draem" in sources and texture_dir != PROCEDURAL and not Path(texture_dir).is_dir():
        problems.append(
            f"--texture_dir={texture_dir} is not a folder: download DTD from "
            "https://www.robots.ox.ac.uk/~vgg/data/dtd/ and pass --texture_dir=<dtd>/images, or "
            f"--texture_dir={PROCEDURAL}, or leave draem out of --synthetic."
        )
    try:
        realism.check_inception_weights(Path(inputs.inception_weights).expanduser())
    except (FileNotFoundError, realism.WeightsError) as e:
        problems.append(str(e))
    backbone = selector.backbone_weights_path(inputs.lpips_net, inputs.lpips_backbone)
    if backbone is not None and not backbone.is_file():
        url = selector.BACKBONE_URL.format(file=selector.BACKBONE_FILES[inputs.lpips_net])
        problems.append(
            f"LPIPS backbone weights not found: {backbone} (--lpips_backbone). Download {url} "
            "and put it there, or pass --lpips_backbone=<its path>."
        )
    if inputs.image_size < 32:
        problems.append(f"--image_size={inputs.image_size}: use at least 32.")
    out = Path(inputs.out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out={out} is a file; choose a folder.")
    if problems:
        raise InputsError(problems, what="launch.realism")


def _subset(inputs: RealismInputs, items: list, what: str) -> list:
    """At most ``--max_images`` of ``items``, a subset drawn from the seed (order kept)."""
    k = inputs.max_images
    if k <= 0 or len(items) <= k:
        return items
    rng = np.random.default_rng([inputs.seed, *what.encode()])
    return [items[i] for i in np.sort(rng.choice(len(items), size=k, replace=False))]


def _uint8(images: list[np.ndarray]) -> np.ndarray:
    return np.clip(np.rint(np.stack(images) * 255.0), 0, 255).astype(np.uint8)


def read_folder_images(inputs: RealismInputs, paths: list[Path]) -> np.ndarray:
    """float32 ``[N, S, S, 3]`` in [0, 1] at ``--image_size``."""
    size = inputs.image_size
    return np.stack([datasets.resize_image(datasets.read_rgb(p), image_size=size) for p in paths])


def real_images(inputs: RealismInputs, real_dirs: list[Path]) -> np.ndarray:
    """The defect images of the ``--real`` folders, uint8."""
    paths = [
        p
        for d in real_dirs
        for sub in sorted(d.iterdir())
        if sub.is_dir() and sub.name != "good"
        for p in datasets.list_images(sub)
    ]
    if len(paths) < 2:
        raise UserError(f"--real={inputs.real}: {len(paths)} defect image(s); FID needs 2 or more.")
    return _uint8(list(read_folder_images(inputs, _subset(inputs, paths, "real"))))


def fmas_images(inputs: RealismInputs, categories: set[str]) -> np.ndarray:
    """The FMAS samples of ``categories`` from ``--fmas_records``, uint8."""
    names = ("image/encoded", "image/category")
    encoded = []
    for path in sorted(glob.glob(inputs.fmas_records)):
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
            f"--fmas_records={inputs.fmas_records!r} holds {len(encoded)} sample(s) of "
            f"{sorted(categories)}; FID needs 2 or more (run python -m launch.synthesize for them)."
        )
    images = []
    for path, data in _subset(inputs, encoded, "fmas"):
        try:
            rgb = datasets.to_rgb(Image.open(io.BytesIO(data)))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"A record in {path} holds an undecodable image ({e}).") from None
        images.append(datasets.resize_image(rgb, image_size=inputs.image_size))
    return _uint8(images)


def augmentations(inputs: RealismInputs, source: str, normals: np.ndarray) -> np.ndarray:
    """One ``source`` anomaly per normal image (float [N, S, S, 3]), uint8; image ``i``'s draw is
    a pure function of ``(seed, source, i)``."""
    a, d = inputs.cutpaste_augment, inputs.draem_augment
    scale = inputs.image_size / 256.0  # CutPaste's scar sizes are for 256 x 256
    textures = None
    if source == "draem":
        textures = TextureBank(inputs.texture_dir, image_size=inputs.image_size, seed=inputs.seed)
    out = []
    progress = Progress(f"{source} anomalies", len(normals), unit="images")
    for i, image in enumerate(normals):
        rng = np.random.default_rng([inputs.seed, SOURCES.index(source), i])
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


def compute(inputs: RealismInputs) -> dict[str, Path]:
    """Table 2 for ``inputs``: checks every input first, builds the real and synthetic sets,
    computes FID and LPIPS (``synthesis/realism.py``), writes ``realism.{md,csv,json}`` to
    ``inputs.out`` and prints the table.

    Returns:
      The files written, by kind.
    """
    real_dirs = [Path(p) for p in inputs.real]
    normals_dirs = normal_dirs(real_dirs, inputs.normal)
    sources = list(dict.fromkeys(inputs.synthetic))
    check_inputs(inputs, real_dirs, normals_dirs, sources)
    categories = {d.resolve().parent.name for d in real_dirs}

    real = real_images(inputs, real_dirs)
    synthetic = {}
    normals = None
    for source in sources:
        if source == "fmas":
            synthetic[source] = fmas_images(inputs, categories)
            continue
        if normals is None:
            paths = [p for d in normals_dirs for p in datasets.list_images(d)]
            if len(paths) < 2:
                raise UserError(
                    f"{len(paths)} normal image(s) in {[str(d) for d in normals_dirs]} "
                    "(--normal); the augmented sets need 2 or more for FID."
                )
            normals = read_folder_images(inputs, _subset(inputs, paths, "normal"))
        synthetic[source] = augmentations(inputs, source, normals)
    logging.info("images: real %d, %s", len(real), {k: len(v) for k, v in synthetic.items()})

    try:
        fid = realism.FID(
            inputs.inception_weights, features=inputs.fid_features, batch_size=inputs.batch_size
        )
        lpips_model = selector.load_lpips(
            net=inputs.lpips_net, backbone_weights=inputs.lpips_backbone, device="cpu", seed=0
        )
    except FileNotFoundError as e:
        raise MissingFileError(str(e)) from None
    except realism.WeightsError as e:
        raise UserError(str(e)) from None
    rows = realism.realism_table(
        real,
        synthetic,
        fid=fid,
        lpips_features=realism.LPIPSFeatures(lpips_model, batch_size=inputs.batch_size),
    )
    settings = {
        "real": [str(d) for d in real_dirs],
        "categories": sorted(categories),
        "normal": [str(d) for d in normals_dirs],
        "fmas_records": inputs.fmas_records,
        "texture_dir": inputs.texture_dir,
        "image_size": inputs.image_size,
        "max_images": inputs.max_images,
        "seed": inputs.seed,
        "inception_weights": inputs.inception_weights,
        "fid_features": inputs.fid_features,
        "lpips_net": inputs.lpips_net,
        "lpips_backbone": inputs.lpips_backbone,
    }
    written = realism.write_report(rows, inputs.out, settings=settings)
    print(realism.markdown_table(rows))
    print(f"Written: {', '.join(str(p) for p in written.values())}")
    return written
