"""The row-sharded PatchCore memory bank on four forced host devices (in a subprocess: the device
count is fixed when JAX starts) equals the single-device functions: the same coreset indices,
the same neighbours, the same distances, and through the method's fit/score path
(``patchcore.shard_bank=True``) the same bank and scores."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
import jax
import numpy as np
from test_contract import tiny_config
from wdam_jax.data import sources
from wdam_jax.methods import patchcore as pc, patchcore_sharded as ps, registry

mesh = ps.bank_mesh()
out = {{"devices": jax.local_device_count()}}
rng = np.random.default_rng(0)
# 1001 rows: not a multiple of the 4 devices, so the last block carries padding.
features = rng.normal(size=(1001, 160)).astype(np.float32)
key = jax.random.key(1)
single = pc.greedy_coreset(key, features, 150, proj_dim=32, steps_per_call=64)
shard = ps.greedy_coreset(key, features, 150, mesh=mesh, proj_dim=32, steps_per_call=64)
out["coreset"] = [np.asarray(single).tolist(), np.asarray(shard).tolist()]

bank = features[np.asarray(single)] + 0.0
queries = rng.normal(size=(300, 160)).astype(np.float32)
sharded = ps.ShardedBank(bank, mesh)
out["bank_devices"] = len(sharded.rows.sharding.device_set)
out["block_rows"] = [s.data.shape[0] for s in sharded.rows.addressable_shards]
for k in (1, 7):
    d0, i0 = pc.knn_search(bank, queries, k=k, query_chunk=128, bank_chunk=16)
    d1, i1 = sharded.knn_search(queries, k=k, query_chunk=128, bank_chunk=16)
    out[f"knn{{k}}"] = [np.asarray(i0).tolist(), np.asarray(i1).tolist(),
                        float(np.abs(np.asarray(d0) - np.asarray(d1)).max())]
index = np.array([[0, 149], [37, 38]])
out["take"] = bool(np.array_equal(np.asarray(sharded.take_rows(index)), bank[index]))

# The method's own path: fit (coreset) and score (kNN + reweighting + maps).
results = {{}}
for shard_bank in (False, True):
    config = tiny_config("patchcore", {root!r})
    config.patchcore.shard_bank = shard_bank
    method = registry.get_method(config)
    model = method.create_model()
    train_images = method.train_images()[:6]
    fitted = method.fit(model, train_images, step=0)
    test = sources.load_split(config.data, split="test").images[:4]
    scores = method.score(model, fitted, test, step=0)
    results[shard_bank] = (fitted, scores)
(f0, s0), (f1, s1) = results[False], results[True]
out["fit_equal"] = all(np.array_equal(f0[k], f1[k]) for k in f0)
out["score_diff"] = float(np.abs(s0.image_scores - s1.image_scores).max())
out["map_diff"] = float(np.abs(s0.maps - s1.maps).max())
out["score_scale"] = float(np.abs(s0.image_scores).max())
print(json.dumps(out))
"""


def test_sharded_bank_on_four_devices_equals_one_device(demo_data_root):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    script = _SCRIPT.format(tests=str(REPO / "tests"), root=str(demo_data_root))
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["bank_devices"] == 4
    assert out["block_rows"] == [38, 38, 38, 38]  # 150 rows + 2 of padding
    single, shard = out["coreset"]
    assert shard == single and len(set(shard)) == 150
    for k in (1, 7):
        i_single, i_shard, distance_diff = out[f"knn{k}"]
        assert i_shard == i_single
        assert np.asarray(i_shard).max() < 150  # never a padding row
        assert distance_diff < 1e-4
    assert out["take"]
    assert out["fit_equal"]
    assert out["score_diff"] <= 1e-5 * out["score_scale"] and out["map_diff"] < 1e-3
