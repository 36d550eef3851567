"""Table 1: normalised per-sub-band change between normal images and their FMAS versions.

  python -m launch.subband_analysis --records='workdirs/fmas_mvtec/fmas-*.tfrecord' \
      --data_root=data/mvtec_ad --output_csv=workdirs/fmas_mvtec/table1.csv

Reads the FMAS TFRecords and, for each, the source image ``<data_root>/<image/source>``; prints a
markdown table (classes x LL/LH/HL/HH, each class summing to 1) and writes it as CSV.
"""

import csv
import glob
import os
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

from launch import cli
from synthesis.subband import SUBBANDS, class_table, markdown_table

_RECORDS = flags.DEFINE_string("records", None, "Glob of FMAS TFRecord files.", required=True)
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Dataset root of image/source.", required=True)
_OUTPUT_CSV = flags.DEFINE_string("output_csv", None, "CSV to write.", required=True)


def read_pairs(records: str, data_root: str):
    """Yields ``(category, normal, synthesized)`` float ``[H, W, 3]`` in [0, 1] per record."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    files = sorted(glob.glob(records))
    if not files:
        raise FileNotFoundError(f"No TFRecord files match --records={records!r}.")
    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/source": tf.io.FixedLenFeature([], tf.string),
        "image/category": tf.io.FixedLenFeature([], tf.string),
    }
    for raw in tf.data.TFRecordDataset(files):
        ex = tf.io.parse_single_example(raw, spec)
        synthesized = tf.io.decode_png(ex["image/encoded"], channels=3).numpy()
        source = Path(data_root) / ex["image/source"].numpy().decode()
        with Image.open(source) as im:
            normal = np.asarray(im.convert("RGB"))
        yield (
            ex["image/category"].numpy().decode(),
            normal.astype(np.float64) / 255.0,
            synthesized.astype(np.float64) / 255.0,
        )


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
