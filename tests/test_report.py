"""The page a person opens (``report.html``), loaded in a real browser: headless Chromium
(Debian's ``chromium``; ``.ci/run`` installs it) renders the page of a tiny evaluated run and of a
prediction, the test reads the rendered DOM and checks it against the run's own files and a numpy
computation on the same scores, and inspects a screenshot for content."""

import html.parser
import json
import os
import pathlib
import shutil
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest
from PIL import Image
from test_contract import tiny_config

from wdam_jax import evaluate, predict, report, reporting, runs, thresholds
from wdam_jax.data import sources
from wdam_jax.errors import MissingFileError

REPO = pathlib.Path(__file__).resolve().parents[1]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


def chromium() -> str:
    """The browser binary; a missing one fails the test (never a silent skip)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "No chromium on PATH: the report's browser tests need Debian's chromium package. "
        "Install it with `apt-get install -y chromium` (as root; .ci/run does this)."
    )


def browse(page: pathlib.Path, fragment: str, tmp: pathlib.Path, *extra: str) -> str:
    """Loads ``page#fragment`` in headless Chromium; returns stdout (the DOM for --dump-dom)."""
    url = page.resolve().as_uri() + ("#" + fragment if fragment else "")
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",  # as root (CI containers) Chromium refuses its sandbox
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        *extra,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Dom(html.parser.HTMLParser):
    """The rendered DOM as a flat list of elements: ``{"tag", attributes..., "text"}``."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, **{k: v or "" for k, v in attrs}, "text": ""}
        self.elements.append(element)
        if tag not in VOID:
            self._open.append(element)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for element in self._open:
            if element["tag"] != "script":
                element["text"] += data

    def by_id(self, name: str) -> dict:
        found = [e for e in self.elements if e.get("id") == name]
        assert len(found) == 1, f"{len(found)} elements with id {name!r}"
        return found[0]

    def with_class(self, name: str) -> list[dict]:
        return [e for e in self.elements if name in e.get("class", "").split()]


@pytest.fixture(scope="module")
def run(demo_data_root, tmp_path_factory):
    """A tiny CutPaste run, trained and evaluated with a held-out normal split."""
    config = tiny_config("cutpaste", demo_data_root)
    config.data.holdout_fraction = 0.2
    config.score.threshold_fpr = 0.1
    workdir = tmp_path_factory.mktemp("report_run")
    evaluate.train_and_evaluate(config, workdir)
    return workdir


def _between(sorted_scores: np.ndarray, k: int) -> float:
    """A threshold strictly between the k-th and (k+1)-th smallest distinct scores, with few
    digits (a range input keeps about 15 significant digits of what it is given)."""
    distinct = np.unique(sorted_scores)
    lo, hi = distinct[k], distinct[k + 1]
    for digits in range(3, 17):
        t = float(f"{(lo + hi) / 2:.{digits}g}")
        if lo < t < hi:
            return t
    raise AssertionError(f"no short threshold between {lo!r} and {hi!r}")


def test_evaluation_page_in_a_browser(run, tmp_path):
    step = runs.restore(run).step
    outdir = run / "eval" / f"step_{step}"
    page = outdir / report.REPORT_FILE
    assert page.is_file() and f"eval/step_{step}/report.html" in (run / "report.html").read_text()
    text = page.read_text()
    assert "<script src" not in text and "http://" not in text.replace(
        "http://www.w3.org/2000/svg", ""
    ) and "https://" not in text  # fmt: skip
    saved = np.load(outdir / "scores.npz")
    scores, labels = saved["image_scores"].astype(np.float64), saved["labels"]
    stored = json.loads((outdir / thresholds.THRESHOLDS_FILE).read_text())["image"]["threshold"]
    # A threshold other than the stored one, set through the page's own control (the URL
    # fragment is read into the slider and its input event fired).
    t = _between(np.sort(scores), len(np.unique(scores)) // 3)
    assert (scores >= t).sum() != (scores >= stored).sum()
    dom = Dom(browse(page, f"threshold={t!r}", tmp_path, "--dump-dom"))
    assert float(dom.by_id("threshold-section")["data-threshold"]) == t

    # Metrics table = metrics.json, value for value.
    recorded = json.loads((outdir / "metrics.json").read_text())
    recorded.pop(reporting.BY_DEFECT_KEY, None)  # per defect type: the page's own table
    cells = [e for e in dom.elements if "data-key" in e]
    assert len(cells) == sum(len(row) for row in recorded.values())
    for cell in cells:
        value = recorded[cell["data-row"]][cell["data-key"]]
        assert cell["data-value"] == ("null" if value is None else repr(value))
        if value is not None:
            assert float(cell["text"]) == pytest.approx(100 * value, abs=0.051)

    # One card per test image, in the default order (score, highest first), with its decision.
    cards = dom.with_class("card")
    assert len(cards) == len(scores)
    assert [float(c["data-score"]) for c in cards] == pytest.approx(sorted(scores, reverse=True))
    for card in cards:
        expected = "anomalous" if float(card["data-score"]) >= t else "normal"
        assert card["data-decision"] == expected
    for img in (e for e in dom.elements if e["tag"] == "img" and e.get("loading") == "lazy"):
        thumb = Image.open(outdir / urllib.parse.unquote(img["src"]))
        assert thumb.size == (3 * report.THUMB_SIDE, report.THUMB_SIDE)
    assert len([e for e in dom.elements if e.get("loading") == "lazy"]) == len(scores)

    # Counts after moving the threshold = numpy on the same scores.
    flagged = scores >= t
    misses = int(np.sum((labels == 1) & ~flagged))
    alarms = int(np.sum((labels == 0) & flagged))
    assert int(dom.by_id("n-misses")["text"]) == misses
    assert int(dom.by_id("n-false-alarms")["text"]) == alarms
    assert int(dom.by_id("n-flagged")["text"]) == int(flagged.sum())
    assert float(dom.by_id("recall")["text"]) == pytest.approx(
        np.mean(flagged[labels == 1]), abs=6e-4
    )
    assert float(dom.by_id("fpr")["text"]) == pytest.approx(np.mean(flagged[labels == 0]), abs=6e-4)
    changed = int(np.sum(flagged != (scores >= stored)))
    assert int(dom.by_id("n-changed")["text"]) == changed
    # Per defect type: I-AUROC against the good images (the shared metric) and flagged counts.
    defects = [row.split(",")[1] for row in (outdir / "scores.csv").read_text().splitlines()[1:]]
    defects = np.asarray(defects)
    for defect in sorted(set(defects)):
        rows = defects == defect
        assert dom.by_id(f"flagged-{defect}")["text"] == f"{flagged[rows].sum()} / {rows.sum()}"

    # Filters: the false alarms among the good images, through the page's selects.
    dom = Dom(browse(page, f"threshold={t!r}&decision=false_alarms&defect=good", tmp_path,
                     "--dump-dom"))  # fmt: skip
    assert len(dom.with_class("card")) == alarms
    assert dom.by_id("n-shown")["text"] == f"showing {alarms} of {len(scores)}"
    dom = Dom(browse(page, f"threshold={t!r}&decision=misses", tmp_path, "--dump-dom"))
    assert len(dom.with_class("card")) == misses == len(dom.with_class("wrong"))

    # A screenshot with content: not one flat colour, and some red (anomalous) marks.
    shot = tmp_path / "report.png"
    browse(page, "", tmp_path, f"--screenshot={shot}", "--window-size=1280,1800")
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float64)
    assert pixels.shape[:2] == (1800, 1280)
    assert pixels.std() > 20
    background = np.all(np.abs(pixels - pixels[5, 5]) < 8, axis=-1)
    assert 0.05 < 1 - background.mean() < 0.95


def test_prediction_page_in_a_browser(run, tmp_path):
    config = runs.restore(run).config
    test = sources.dataset_root(config.data) / config.data.category / "test"
    folder = tmp_path / "new"
    folder.mkdir()
    for i, defect in enumerate(("good", "crack", "scratch", "hole")):
        shutil.copy(sorted((test / defect).glob("*.png"))[0], folder / f"{i}_{defect}.png")
    (folder / "9_notes.txt").write_text("not an image")
    out = tmp_path / "out"
    rows = predict.predict(run, folder, out, batch_size=2)
    page = out / report.REPORT_FILE
    scores = np.asarray([r["score"] for r in rows if r["status"] == "ok"], np.float64)
    t = _between(np.sort(scores), 1)
    dom = Dom(browse(page, f"threshold={t!r}", tmp_path, "--dump-dom"))
    cards = dom.with_class("card")
    # notes.txt is no image: skipped and listed (not a row), as training skips it.
    assert len(cards) == len(rows) == 4
    skipped = json.loads((out / predict.JSON_FILE).read_text())["skipped"]
    assert len(skipped) == 1 and "9_notes.txt" in json.dumps(skipped)
    assert int(dom.by_id("n-flagged")["text"]) == int(np.sum(scores >= t))
    assert int(dom.by_id("n-normal")["text"]) == int(np.sum(scores < t))
    stored = json.loads((out / predict.JSON_FILE).read_text())["threshold"]["threshold"]
    assert int(dom.by_id("n-changed")["text"]) == int(np.sum((scores >= t) != (scores >= stored)))
    assert "metrics-section" not in {e.get("id") for e in dom.elements}
    assert len([e for e in dom.elements if e.get("loading") == "lazy"]) == 4


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.report", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_launcher_rebuilds_the_page_of_an_existing_run(run, tmp_path):
    step = runs.restore(run).step
    page = run / "eval" / f"step_{step}" / report.REPORT_FILE
    before = page.read_text()
    page.unlink()
    done = _launch(f"--workdir={run}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(page) and page.read_text() == before
    # The data summary's warnings are shown (here one added to the run's recorded summary).
    summary_path = run / report.DATA_SUMMARY
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "warnings": ["3 image(s) are <grayscale>"]}))
    try:
        assert report.build(run) == page
        dom = Dom(browse(page, "", tmp_path, "--dump-dom"))
    finally:
        summary_path.write_text(json.dumps(summary))
        report.build(run)
    assert [e["text"] for e in dom.with_class("warn")] == ["⚠ 3 image(s) are <grayscale>"]
    # Nothing to make a page of: one message naming the fix, exit code 2.
    done = _launch(f"--workdir={tmp_path}")
    assert done.returncode == 2 and "python -m launch.evaluate" in done.stderr
    with pytest.raises(MissingFileError, match=f"evaluated steps: {step}"):
        report.build(run, step=12345)


def test_the_page_escapes_what_it_embeds(tmp_path):
    """A file name holding ``</script>`` cannot end the embedded JSON early."""
    data = {"title": "x", "items": [{"name": "</script><b>bold</b>"}]}
    text = report._write_page(tmp_path / "p.html", data).read_text()
    start = text.index('<script id="report-data" type="application/json">')
    embedded = text[start:].split(">", 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded)["items"][0]["name"] == "</script><b>bold</b>"
    assert report.DATA_SUMMARY == runs.DATA_SUMMARY and report.EVAL_DIR == evaluate.EVAL_DIR


def test_thumbnail_panels_show_the_image_the_map_and_the_truth():
    """A hand-made case: a grey image, a map hot in one square, ground truth in another."""
    side = report.THUMB_SIDE
    image = np.full((32, 32, 3), 0.5, np.float32)
    amap = np.zeros((32, 32), np.float32)
    amap[4:12, 4:12] = 1.0
    mask = np.zeros((32, 32), bool)
    mask[20:28, 20:28] = True
    strip = np.asarray(report.thumbnail(image, amap, mask=mask), np.float64)
    assert strip.shape == (side, 3 * side, 3)
    first, heat, truth = strip[:, :side], strip[:, side : 2 * side], strip[:, 2 * side :]
    assert np.abs(first - 127.5).max() <= 1
    # Jet (dark red at 1, dark blue at 0) half over grey, the squares upscaled 4x.
    assert heat[32, 32, 0] > heat[32, 32, 2] + 40 and heat[100, 100, 2] > heat[100, 100, 0] + 40
    white = truth.min(axis=-1) > 200
    expected = np.zeros((side, side), bool)
    expected[80:112, 80:112] = True
    assert np.mean(white == expected) > 0.99
    red = (truth[..., 0] > 200) & (truth[..., 1] < 60)
    assert red[16:48, 16:48].sum() > 50 and not red[60:, 60:].any()  # outline of the hot square
