"""The synthesis side's guards (issue 13, item 6): one live worker per shard, unpredictable
temporary files, category names and record paths contained, decompression bombs refused, damaged
caches redone. No models are loaded."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import synthesis_fixtures as sf
from PIL import Image

from synthesis import files, masks, pipeline, tfrecord, writer


def test_a_second_worker_on_the_same_shard_is_refused(tmp_path):
    with writer.shard_lock(tmp_path, shard_index=1, num_shards=2):
        with pytest.raises(writer.ShardBusyError, match=rf"process {os.getpid()}.*shard 1 of 2"):
            with writer.shard_lock(tmp_path, shard_index=1, num_shards=2):
                pass
        with writer.shard_lock(tmp_path, shard_index=0, num_shards=2):  # another shard: fine
            pass
    with writer.shard_lock(tmp_path, shard_index=1, num_shards=2):  # released on exit
        pass
    with pytest.raises(ValueError, match="shard_index"):
        with writer.shard_lock(tmp_path, shard_index=2, num_shards=2):
            pass


def test_a_worker_of_another_split_of_the_folder_is_refused(tmp_path):
    with writer.shard_lock(tmp_path, shard_index=1, num_shards=2):
        # Without shard flags (shard 0 of 1) it would redo shard 1's images beside it.
        with pytest.raises(writer.ShardBusyError, match=r"split into 2 shards.*--num_shards=1"):
            with writer.shard_lock(tmp_path, shard_index=0, num_shards=1):
                pass
        with writer.shard_lock(tmp_path, shard_index=0, num_shards=2):  # the same split: fine
            pass
    with writer.shard_lock(tmp_path, shard_index=0, num_shards=1):  # once that one has ended
        with pytest.raises(writer.ShardBusyError, match=r"split into 1 shards.*--num_shards=2"):
            with writer.shard_lock(tmp_path, shard_index=1, num_shards=2):
                pass


def test_temporary_files_are_unpredictable_and_cleaned(tmp_path):
    seen = []

    def write(fh):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        fh.write(b"x")

    files.atomic_write(tmp_path / "a.json", write)
    (tmp_path / "a.json").unlink()
    files.atomic_write(tmp_path / "a.json", write)
    [first], [second] = seen
    assert first != second and first.startswith(".a.json.") and first.endswith(".tmp")
    with pytest.raises(RuntimeError):
        files.atomic_write(tmp_path / "b.json", lambda fh: (_ for _ in ()).throw(RuntimeError()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "", "a\\b", " bottle", "x\0y"])
def test_category_names_that_leave_their_folder_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match=r"data\.categories"):
        masks.fg_cache_path(tmp_path, name, "train/good/000.png")
    with pytest.raises(ValueError, match=r"data\.categories"):
        pipeline.list_work(tmp_path, categories=(name,), pattern="*", limit_per_category=0)


def test_image_paths_that_leave_the_category_are_refused(tmp_path):
    assert masks.fg_cache_path(tmp_path, "bottle", "train/good/0.jpg").is_relative_to(tmp_path)
    for rel in ("../../x.png", "/etc/passwd"):
        with pytest.raises(ValueError, match="inside its category folder"):
            masks.fg_cache_path(tmp_path, "bottle", rel)


def test_subband_analysis_reads_only_inside_the_data_root(tmp_path):
    from launch import subband_analysis

    root = tmp_path / "data"
    (root / "c").mkdir(parents=True)
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(root / "c" / "0.png")
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(tmp_path / "secret.png")
    good = tmp_path / "good.tfrecord"
    tfrecord.write_records(good, [sf.tiny_record("c/0.png")])
    [(category, normal, synthesized)] = subband_analysis.read_pairs(str(good), str(root))
    assert category == "c" and normal.max() == pytest.approx(9 / 255) and synthesized.max() == 0
    for source in ("../secret.png", str(tmp_path / "secret.png"), "c/../../secret.png"):
        bad = tmp_path / "bad.tfrecord"
        tfrecord.write_records(bad, [sf.tiny_record(source)])
        with pytest.raises(ValueError, match=r"outside --data_root") as err:
            list(subband_analysis.read_pairs(str(bad), str(root)))
        assert str(bad) in str(err.value)


def test_decompression_bombs_are_refused_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)  # > 2x the limit: an error
    with pytest.raises(ValueError, match=r"huge\.png is too large to read safely"):
        pipeline.read_rgb(path)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"junk\.png is not a readable image"):
        pipeline.read_rgb(tmp_path / "junk.png")


def test_a_damaged_cached_foreground_is_redone(tmp_path, caplog):
    provider = masks.ForegroundProvider(
        tmp_path,
        texture_categories=("tile",),
        sam_checkpoint="",
        sam_model_type="tiny",
        sam_prompt="center_point",
        min_fraction=0.01,
        device="cpu",
    )
    path = masks.fg_cache_path(tmp_path, "tile", "train/good/000.png")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x89PNG half a file")
    image = np.zeros((6, 5, 3), np.uint8)
    with caplog.at_level(logging.WARNING):
        fg = provider(image, category="tile", rel_to_category="train/good/000.png")
    assert fg.shape == (6, 5) and fg.all() and "unreadable cached foreground" in caplog.text
    np.testing.assert_array_equal(masks.read_mask(path), fg)  # rewritten whole
