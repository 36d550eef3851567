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


def test_metrics_are_replaced_atomically_and_a_damaged_file_is_named(tmp_path, monkeypatch):
    paths = reporting.write_metrics(RESULTS, tmp_path)
    before = {k: p.read_bytes() for k, p in paths.items()}

    def dies(*args, **kwargs):  # the process dies while writing the new tables
        raise KeyboardInterrupt

    monkeypatch.setattr(reporting.csv, "writer", dies)
    changed = {"bottle": {"i_auroc": 0.5, "p_auroc": 0.5, "pro": 0.5}}
    with pytest.raises(KeyboardInterrupt):
        reporting.write_metrics(changed, tmp_path)
    assert {k: p.read_bytes() for k, p in paths.items()} == before  # never half written
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    paths["json"].write_text('{"bottle": {"i_auroc": 0.9')
    with pytest.raises(ValueError, match=r"metrics\.json is damaged .*launch\.evaluate"):
        reporting.read_metrics_json(paths["json"])


def test_figure_selection_covers_every_defect_type_with_highest_and_lowest():
    labels = np.array([0] * 5 + [1] * 4 + [1] * 3)
    kinds = ["good"] * 5 + ["crack"] * 4 + ["hole"] * 3
    scores = np.array([0.1, 0.5, 0.2, 0.9, 0.3, 2.0, 1.0, 3.0, 0.4, 5.0, 4.0, 6.0])
    # Per group, highest first then lowest: crack 7 (3.0), 8 (0.4); hole 11 (6.0), 10 (4.0);
    # good 3 (0.9, the likeliest false alarm), 0 (0.1). Round 1 takes each group's highest.
    pick = lambda n: list(reporting.figure_selection(labels, n, scores=scores, defect_types=kinds))
    assert pick(3) == [7, 11, 3]
    assert pick(4) == [7, 11, 3, 0]  # round 2 starts with the normal images' lowest
    assert pick(5) == [7, 8, 11, 3, 0]  # then crack's lowest (the likeliest miss)
    assert pick(6) == [7, 8, 11, 10, 3, 0]
    assert sorted(pick(50)) == list(range(12))  # all of them, each once


def test_decision_caption_marks_the_decision_and_wrong_ones():
    assert reporting.decision_caption(2.0, None, True) == ("score 2", "black")
    text, colour = reporting.decision_caption(2.0, 2.0, True)  # score >= threshold: anomalous
    assert text.endswith("-> anomalous") and ">= thr" in text and colour == "black"
    text, colour = reporting.decision_caption(1.5, 2.0, True)  # a missed defect
    assert text.endswith("-> normal (wrong)") and colour == "red"
    assert reporting.decision_caption(3.0, 2.0, False)[1] == "red"  # a false alarm


def test_metrics_per_defect_type_beside_the_category(tmp_path):
    by_defect = {
        "bottle": {
            "broken": {"i_auroc": 1.0, "p_auroc": 0.95, "pro": 0.9},
            "contamination": {"i_auroc": 0.5, "p_auroc": float("nan"), "pro": 0.25},
        }
    }
    table = reporting.markdown_table(RESULTS, by_defect).splitlines()
    bottle = next(i for i, line in enumerate(table) if line.startswith("| bottle |"))
    assert table[bottle + 1] == "| bottle: broken | 100.0 | 95.0 | 90.0 |"
    assert table[bottle + 2] == "| bottle: contamination | 50.0 | - | 25.0 |"
    # The mean is over categories only, as without the defect rows.
    mean = lambda lines: next(line for line in lines if line.startswith("| **mean**"))
    assert mean(table) == mean(reporting.markdown_table(RESULTS).splitlines())
    paths = reporting.write_metrics(RESULTS, tmp_path, by_defect=by_defect)
    stored = json.loads(paths["json"].read_text())[reporting.BY_DEFECT_KEY]
    assert stored["bottle"]["broken"] == by_defect["bottle"]["broken"]
    assert stored["bottle"]["contamination"]["p_auroc"] is None
    assert set(reporting.read_metrics_json(paths["json"])) == {"bottle", "screw", "mean"}
    assert paths["markdown"].read_text() == reporting.markdown_table(RESULTS, by_defect)
