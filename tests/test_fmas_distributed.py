"""FMAS on Ray Data (synthesis/distributed.py): two actors write what the local run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import synthesis_fixtures as sf

from synthesis import pipeline, tfrecord, writer


def _config(tmp: Path, env: dict, output: str, **distributed):
    config = sf.make_config(tmp, data_root=env["data"], models=env["models"], output=output)
    # Fewer steps and candidates than the paper's: the plumbing is under test, not the images.
    config.inpaint.steps = 4
    config.inpaint.num_candidates = 2
    config.output.records_per_file = 3
    for key, value in distributed.items():
        config.distributed[key] = value
    return config


def _files(config) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in writer.record_files(config.output_dir)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fmas_ray")
    data = tmp / "data"
    sources = sf.make_mvtec_images(data, per_category=2, size=64, seed=1)
    return {"tmp": tmp, "data": data, "sources": sources, "models": sf.make_models(tmp / "models")}


def test_ray_pool_of_two_writes_the_sequential_runs_records(env):
    local = _config(env["tmp"], env, "local")
    local_manifest = pipeline.run_fmas(local)
    distributed = _config(env["tmp"], env, "ray", engine="ray", num_workers=2)
    manifest = pipeline.run_fmas(distributed)

    # Same images selected, same record bytes, same files (names, chunking and order).
    expected = _files(local)
    assert len(expected) == 2  # 4 records, 3 per file
    assert _files(distributed) == expected
    sources = [
        tfrecord.parse_example(r, names=["image/source"])["image/source"][0].decode()
        for f in writer.record_files(distributed.output_dir)
        for r in tfrecord.read_records(f)
    ]
    assert sources == sorted(env["sources"])
    assert manifest["counts"] == local_manifest["counts"]
    assert manifest["counts"]["foreground"]["sam"] == 2  # the object class went through SAM
    # Two actors, each loaded its models once and made records; the local run is one process.
    workers = manifest["engine"]["workers"]
    assert manifest["engine"]["name"] == "ray" and len(workers) == 2
    assert all(w["records"] >= 1 for w in workers.values())
    assert sum(w["records"] for w in workers.values()) == len(env["sources"])
    assert len(local_manifest["engine"]["workers"]) == 1
    on_disk = Path(distributed.output_dir) / "manifest-00000-of-00001.json"
    assert json.loads(on_disk.read_text())["engine"] == manifest["engine"]

    # A re-run finds everything done and starts no engine.
    again = pipeline.run_fmas(distributed)
    assert again["counts"]["written_this_run"] == 0 and again["engine"]["workers"] == {}


def test_bad_distributed_settings_are_named(env):
    config = _config(env["tmp"], env, "bad", engine="beam", num_workers=0)
    with pytest.raises(ValueError, match=r"distributed\.engine='beam'.*num_workers=0"):
        pipeline.run_fmas(config)
    assert not Path(config.output_dir).exists()
