"""Table 1: normalised per-sub-band change between normal images and their FMAS versions.

  python -m launch.subband_analysis --records='workdirs/fmas_mvtec/fmas-*.tfrecord' \
      --data_root=data/mvtec_ad --output_csv=workdirs/fmas_mvtec/table1.csv

Reads the FMAS TFRecords and, for each, the source image ``<data_root>/<image/source>``; prints a
markdown table (classes x LL/LH/HL/HH, each class summing to 1) and writes it as CSV.
"""

import csv
import glob
import io
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image, UnidentifiedImageError

from launch import cli
from synthesis import tfrecord
from synthesis.subband import SUBBANDS, class_table, markdown_table
from wdam_jax.errors import MissingFileError

_RECORDS = flags.DEFINE_string("records", None, "Glob of FMAS TFRecord files.", required=True)
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Dataset root of image/source.", required=True)
_OUTPUT_CSV = flags.DEFINE_string("output_csv", None, "CSV to write.", required=True)


def read_pairs(records: str, data_root: str):
    """Yields ``(category, normal, synthesized)`` float ``[H, W, 3]`` in [0, 1] per record.

    Raises:
      ValueError: a record's ``image/source`` is absolute or leaves ``data_root``, or an image is
        unreadable or too large to decode safely (the message names the record file).
    """
    files = sorted(glob.glob(records))
    if not files:
        raise MissingFileError(f"No TFRecord files match --records={records!r}.")
    root = Path(data_root).resolve()
    names = ("image/encoded", "image/source", "image/category")
    for path in files:
        for raw in tfrecord.read_records(path):
            ex = tfrecord.parse_example(raw, names=names)
            missing = [n for n in names if len(ex.get(n, ())) != 1]
            if missing:
                raise ValueError(f"A record in {path} lacks {missing}: not an FMAS record file.")
            source_text = ex["image/source"][0].decode(errors="replace")
            source = (root / source_text).resolve()
            if Path(source_text).is_absolute() or not source.is_relative_to(root):
                raise ValueError(
                    f"A record in {path} names image/source={source_text!r}, which is outside "
                    f"--data_root={data_root}. Records hold paths relative to the dataset root; "
                    "this file was not written by FMAS for that root."
                )
            yield (
                ex["image/category"][0].decode(errors="replace"),
                _read_rgb(source, what=f"source image of a record in {path}") / 255.0,
                _read_rgb(io.BytesIO(ex["image/encoded"][0]), what=f"a record in {path}") / 255.0,
            )


def _read_rgb(file, *, what: str) -> np.ndarray:
    try:
        with Image.open(file) as im:
            return np.asarray(im.convert("RGB")).astype(np.float64)
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"The image of {what} ({file}) is too large to decode safely ({e}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS only if it is trusted."
        ) from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"The image of {what} ({file}) is unreadable ({e}).") from None


def write_csv(path: str, rows: dict[str, np.ndarray], counts: dict[str, int]) -> None:
    """One line per class: category, pairs, LL, LH, HL, HH."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["category", "pairs", *SUBBANDS])
        for category, row in rows.items():
            w.writerow([category, counts[category], *(f"{v:.6f}" for v in row)])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    rows, counts = class_table(read_pairs(_RECORDS.value, _DATA_ROOT.value))
    write_csv(_OUTPUT_CSV.value, rows, counts)
    print(markdown_table(rows))
    print(f"\n{sum(counts.values())} pairs; CSV written to {_OUTPUT_CSV.value}")


if __name__ == "__main__":
    cli.run(main, config_flag=None)
