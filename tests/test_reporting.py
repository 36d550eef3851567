"""Metrics files (JSON / CSV / markdown) written and read back, and the heatmap figure."""

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from wdam_jax import reporting

RESULTS = {
    "bottle": {"i_auroc": 0.9921, "p_auroc": 0.9712, "pro": 0.9106},
    "screw": {"i_auroc": 0.8, "p_auroc": 0.9, "pro": 0.7},
}


def test_markdown_table_percent_and_mean_row():
    table = reporting.markdown_table(RESULTS)
    lines = table.strip().splitlines()
    assert lines[0] == "| Category | I-AUROC | P-AUROC | PRO |"
    assert lines[2] == "| bottle | 99.2 | 97.1 | 91.1 |"
    assert lines[3] == "| screw | 80.0 | 90.0 | 70.0 |"
    # Means: (99.21 + 80) / 2 = 89.605 -> 89.6; (97.12 + 90) / 2 = 93.56; (91.06 + 70) / 2.
    assert lines[4] == "| **mean** | 89.6 | 93.6 | 80.5 |"


def test_missing_metric_shows_dash_and_is_left_out_of_the_mean():
    visa = {"candle": {"i_auroc": 0.9, "p_auroc": 0.95}, "pcb1": {"i_auroc": 0.7, "p_auroc": 0.85}}
    table = reporting.markdown_table(visa)
    assert "| candle | 90.0 | 95.0 | - |" in table
    assert "| **mean** | 80.0 | 90.0 | - |" in table


def test_write_metrics_files_read_back(tmp_path):
    paths = reporting.write_metrics(RESULTS, tmp_path / "out")
    assert set(paths) == {"json", "csv", "markdown"}
    data = json.loads(paths["json"].read_text())
    assert data["bottle"] == RESULTS["bottle"]
    assert data["mean"]["pro"] == pytest.approx((0.9106 + 0.7) / 2)
    assert reporting.read_metrics_json(paths["json"])["screw"] == RESULTS["screw"]
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["category"] for r in rows] == ["bottle", "screw", "mean"]
    assert float(rows[0]["i_auroc"]) == 0.9921
    assert paths["markdown"].read_text() == reporting.markdown_table(RESULTS)


def test_write_metrics_nan_round_trip(tmp_path):
    paths = reporting.write_metrics({"candle": {"i_auroc": 0.9, "p_auroc": 0.8}}, tmp_path)
    assert json.loads(paths["json"].read_text())["candle"]["pro"] is None
    back = reporting.read_metrics_json(paths["json"])
    assert math.isnan(back["candle"]["pro"]) and back["mean"]["i_auroc"] == 0.9
    with pytest.raises(ValueError, match="reserved"):
        reporting.markdown_table({"mean": {"i_auroc": 1.0}})


def test_heatmap_figure_is_a_png_with_one_row_per_method(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((3, 32, 32, 3)).astype(np.float32)
    masks = np.zeros((3, 64, 64), bool)  # ground truth at another resolution
    masks[:, 10:30, 20:40] = True
    maps = rng.random((3, 8, 8)).astype(np.float32)
    one = reporting.save_heatmap_figure(images, masks, maps, tmp_path / "a.png")
    two = reporting.save_heatmap_figure(
        images,
        masks,
        {"CutPaste": maps, "Ours": maps**2},
        tmp_path / "figs" / "b.png",
        max_images=2,
        titles=["good/000.png", "crack/001.png"],
        scores={"CutPaste": np.array([0.1, 0.9]), "Ours": np.array([0.2, 0.8])},
        thresholds={"Ours": 0.5},
    )
    with Image.open(one) as a, Image.open(two) as b:
        assert a.format == "PNG" and b.format == "PNG"
        # 3 rows (image, GT, heatmap) vs 4 rows; 3 vs 2 columns; 1.9 in per panel + a colour
        # bar's 1.2 in, 2 in per row, at 100 dpi.
        assert a.size == (690, 600) and b.size == (500, 800)
        pixels = np.asarray(a.convert("RGB"))
        assert pixels.std() > 10  # something was drawn
    with pytest.raises(ValueError, match="no images"):
        reporting.save_heatmap_figure(images[:0], masks, maps, tmp_path / "c.png")


def test_figure_selection_mixes_defective_and_normal_images():
    labels = np.array([0, 1, 0, 1, 1, 1, 1, 1, 1, 0])
    chosen = reporting.figure_selection(labels, 8)
    assert list(chosen) == [1, 3, 4, 5, 6, 7, 0, 2]  # six defective, two normal, in order
    assert list(reporting.figure_selection(np.zeros(5), 3)) == [0, 1, 2]
    assert list(reporting.figure_selection(np.ones(5), 3)) == [0, 1, 2]
