"""Two processes, one folder (issue 27): real command lines started as separate processes beside
each other, with assertions on what ends up on disk.

- a run being trained, frozen (SIGSTOP) at a random moment, mid-step or mid-save: a second
  trainer with another seed is refused naming the first; an evaluation, a prediction and an
  export beside it read a complete checkpoint and write their own outputs; the frozen trainer is
  then killed with SIGKILL, and its re-run takes the stale lock over, resumes and finishes a run
  that restores, with the first trainer's config and one line per logged step;
- two predictions into one ``--out``: the second is refused while the first writes, and the
  folder holds one prediction, never a mixture; ``--overwrite`` replaces it whole; a killed one
  leaves the previous whole; a folder with other files is refused;
- two experiment shards finishing at the same moment: the tables hold every finished run;
- the lock's own behaviour (re-entrant, refused with the holder named, released on exit) and
  publishing (a failure keeps the previous output), in process.

Random moments come from the seed printed with every failure (``WDAM_KILL_SEED``, as
``test_kills.py``).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
from test_kills import REPO, SEED, TINY_CUTPASTE, _command, _env, _steps, _tail

from wdam_jax import checkpoints, runlock, runs
from wdam_jax import state as state_lib

# A longer last stage than test_kills' so that the run is frozen well before its end.
STAGE3 = 6
TOTAL = 2 + 2 + STAGE3
TRAIN = [
    *(a for a in TINY_CUTPASTE if not a.startswith("--config.train.stage3_steps")),
    f"--config.train.stage3_steps={STAGE3}",
    "--config.train.keep_checkpoints=1",
]
HOLD_LOCK = """
import sys, time
from wdam_jax import runlock
with runlock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _start(command: list[str], log: pathlib.Path) -> subprocess.Popen:
    out = open(log, "ab")  # closed with the process, by _finish
    out.write(f"\n$ {' '.join(command)}\n".encode())
    out.flush()
    proc = subprocess.Popen(
        command, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc.log_file = out
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.log_file.close()


def _run(command: list[str], log: pathlib.Path) -> tuple[int, str]:
    """Runs ``command`` to its end; returns its exit code and its own output."""
    before = log.stat().st_size if log.exists() else 0
    code = _finish(_start(command, log))
    return code, log.read_bytes()[before:].decode(errors="replace")


def _wait_for(condition, proc: subprocess.Popen, log: pathlib.Path, what: str) -> None:
    deadline = time.monotonic() + 600
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}\n{_tail(log)}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{_tail(log)}"
        time.sleep(0.02)


def _resume(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _train_log_steps(workdir: pathlib.Path) -> list[int]:
    lines = (workdir / runs.TRAIN_LOG).read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def _leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(
        p.name
        for p in folder.rglob(".*")
        if p.name.startswith((runlock.STAGING_PREFIX, ".wdam")) or p.name.endswith(".wdam.lock")
    )


# --------------------------------------------------------------------------------------------
# One run folder: a trainer, a second trainer, readers, a kill.


def test_one_writer_per_run_readers_beside_it_and_a_stale_lock_taken_over(demo_data_root, tmp_path):
    rng = random.Random(SEED + 27)
    log = tmp_path / "log.txt"
    workdir = tmp_path / "run"
    args = [*TRAIN, f"--config.data.root={demo_data_root}", f"--workdir={workdir}"]
    images = demo_data_root / "mvtec_demo" / "washer" / "test" / "crack"
    k = rng.randint(1, TOTAL - 2)
    delay = rng.uniform(0.0, 0.5)
    why = f"WDAM_KILL_SEED={SEED}: frozen {delay:.2f}s after checkpoint {k}"

    first = _start(_command("launch.train", *args), log)
    try:
        _wait_for(lambda: any(s >= k for s in _steps(workdir)), first, log, f"checkpoint {k}")
        time.sleep(delay)
        os.killpg(first.pid, signal.SIGSTOP)  # alive and holding the lock, mid-whatever
        frozen_steps = _steps(workdir)  # complete ones: orbax renames a step when done
        assert runlock.holder(workdir)["pid"] == first.pid, why

        # A second trainer, with another seed: refused at once, nothing of it written.
        code, out = _run(_command("launch.train", *args, "--config.seed=1"), log)
        assert code == 2, f"{why}\n{out[-3000:]}"
        assert f"is being written by process {first.pid} on " in out, out[-3000:]
        assert "(`python -m launch.train --config=" in out and " UTC)" in out, out[-3000:]
        assert json.loads((workdir / checkpoints.CONFIG_FILE).read_text())["seed"] == 0
        assert not list(workdir.glob("config.*.json"))

        # Readers beside it: each reads the newest complete checkpoint, writes its own output.
        code, out = _run(_command("launch.evaluate", f"--workdir={workdir}"), log)
        assert code == 0, f"{why}\n{out[-3000:]}"
        (report,) = (workdir / "eval").iterdir()
        step = int(report.name.removeprefix("step_"))
        assert step == frozen_steps[-1] < TOTAL, (why, report, frozen_steps)
        assert json.loads((report / "metrics.json").read_text())["washer"]
        assert json.loads((report / "thresholds.json").read_text())["step"] == step
        assert "Left" in out and f"process {first.pid}" in out, out[-3000:]
        assert not (workdir / "thresholds.json").exists()  # the trainer's to write
        predicted = tmp_path / "predicted"
        command = ["launch.predict", f"--workdir={workdir}", f"--images={images}"]
        code, out = _run(_command(*command, f"--out={predicted}"), log)
        assert code == 0, f"{why}\n{out[-3000:]}"
        document = json.loads((predicted / "predictions.json").read_text())
        assert document["step"] == step and document["threshold"]["rule"] == "normal_fpr", why
        assert document["counts"]["files"] == len(list(images.iterdir())) > 0
        exported = tmp_path / "exported"
        command = ["launch.export", f"--workdir={workdir}", f"--out={exported}", "--nosaved_model"]
        code, out = _run(_command(*command), log)
        assert code == 0, f"{why}\n{out[-3000:]}"
        metadata = json.loads((exported / "metadata.json").read_text())
        assert metadata["step"] == step and metadata["thresholds"]["image"], why
        assert _steps(workdir) == frozen_steps  # the readers wrote no checkpoint

        os.killpg(first.pid, signal.SIGKILL)  # power loss, as far as the lock knows
    finally:
        _resume(first)
        _finish(first)
    assert (workdir / runlock.LOCK_FILE).is_file()  # left by the killed holder

    code, out = _run(_command("launch.train", *args), log)
    assert code == 0, f"{why}\n{out[-3000:]}"
    assert "Took over the lock" in out and f"process {first.pid}" in out, out[-3000:]
    assert _steps(workdir) == [TOTAL]
    run = runs.restore(workdir)  # a checkpoint that restores, of the first trainer's config
    assert run.step == TOTAL and run.config.seed == 0
    # One run from step 0 (a second trainer's steps would log step 1 again), resumed once: a
    # step logged but not checkpointed before the kill is logged again by the re-run.
    logged = _train_log_steps(workdir)
    assert logged.count(1) == 1 and logged[-1] == TOTAL and max(logged) == TOTAL, logged
    assert json.loads((workdir / "thresholds.json").read_text())["step"] == TOTAL
    assert json.loads((report / "thresholds.json").read_text())["step"] == step  # kept
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# One output folder: two predictions.


@pytest.fixture(scope="module")
def evaluated_run(demo_data_root, tmp_path_factory):
    from test_contract import tiny_config

    from wdam_jax import evaluate

    config = tiny_config("cutpaste", demo_data_root)
    workdir = tmp_path_factory.mktemp("evaluated_run")
    evaluate.train_and_evaluate(config, workdir)
    return workdir


def _prediction(out: pathlib.Path) -> tuple[set[float], int, int, int]:
    """(thresholds of every row in the CSV and the JSON, CSV rows, JSON rows, overlays)."""
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    document = json.loads((out / "predictions.json").read_text())
    values = {float(r["threshold"]) for r in rows}
    values |= {float(r["threshold"]) for r in document["predictions"]}
    values.add(document["threshold"]["threshold"])
    return values, len(rows), len(document["predictions"]), len(list((out / "overlays").iterdir()))


def test_two_predictions_into_one_folder_never_mix(evaluated_run, demo_data_root, tmp_path):
    log = tmp_path / "log.txt"
    images = demo_data_root / "mvtec_demo" / "washer" / "test" / "good"
    n = len(list(images.iterdir()))
    out = tmp_path / "out"
    base = ["launch.predict", f"--workdir={evaluated_run}", f"--images={images}", f"--out={out}"]
    lock = runlock.lock_path(out, beside=True)

    first = _start(_command(*base, "--threshold=1"), log)
    try:
        _wait_for(lock.exists, first, log, "the first prediction's lock")
        _wait_for(lambda: runlock.holder(out, beside=True), first, log, "its record")
        os.killpg(first.pid, signal.SIGSTOP)  # mid-prediction, holding --out
        code, text = _run(_command(*base, "--threshold=2"), log)
        assert code == 2 and f"is being written by process {first.pid}" in text, text[-3000:]
        assert not out.exists() or not any(out.iterdir())  # nothing published yet
    finally:
        _resume(first)
    assert _finish(first) == 0, _tail(log)
    assert _prediction(out) == ({1.0}, n, n, n)

    # Again into the finished folder: refused without --overwrite, replaced whole with it.
    code, text = _run(_command(*base, "--threshold=3"), log)
    assert code == 2 and "already holds a prediction" in text and "--overwrite" in text, text
    assert _prediction(out) == ({1.0}, n, n, n)
    killed = _start(_command(*base, "--threshold=4", "--overwrite"), log)
    try:
        _wait_for(lambda: runlock.holder(out, beside=True), killed, log, "the lock")
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        _finish(killed)
    # Killed before its rename: the previous prediction as it was; after it: the new one whole.
    assert _prediction(out) in (({1.0}, n, n, n), ({4.0}, n, n, n))
    code, text = _run(_command(*base, "--threshold=5", "--overwrite"), log)
    assert code == 0, text[-3000:]
    assert _prediction(out) == ({5.0}, n, n, n)
    assert _leftovers(tmp_path) == []  # the killed one's staging folder and lock are gone

    # A folder with files predict did not write: refused, with or without --overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    command = [*base[:-1], f"--out={other}", "--threshold=6", "--overwrite"]
    code, text = _run(_command(*command), log)
    assert code == 2 and "holds files that are not a previous prediction" in text, text[-3000:]
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------------------------
# One experiment folder: two shards finishing together.

SHARD = """
import json, pathlib, sys, time
sys.path.insert(0, sys.argv[1])
from test_experiment import _tiny_table3
from wdam_jax import evaluate, experiment

root, workdir, shard, rounds = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), \\
    int(sys.argv[4]), int(sys.argv[5])
config = _tiny_table3(root)


def trained(cfg, run_dir, **kwargs):
    # A stand-in for the training (the tables read done.json only): each shard's last run
    # returns once both shards are there, so both finish at the same moment.
    mine = experiment.shard(experiment.expand(config, run_dir.parents[2]), shard, 2)
    if pathlib.Path(run_dir) == mine[-1].workdir:
        flag = run_dir.parents[2] / f"ready{shard}"
        flag.touch()
        while not (run_dir.parents[2] / f"ready{1 - shard}").exists():
            time.sleep(0.001)
    return {cfg.data.category: {"i_auroc": cfg.seed / 10 + 0.5, "p_auroc": 0.6, "pro": 0.7}}


evaluate.train_and_evaluate = trained
for r in range(rounds):
    experiment.run_experiment(config, workdir / f"round{r}", shard_index=shard, num_shards=2)
"""


def test_two_experiment_shards_finishing_together_lose_no_run(demo_data_root, tmp_path):
    rounds = 8
    log = tmp_path / "log.txt"
    script = [sys.executable, "-c", SHARD, str(REPO / "tests"), str(demo_data_root), str(tmp_path)]
    shards = [_start([*script, str(i), str(rounds)], log) for i in range(2)]
    assert [_finish(p) for p in shards] == [0, 0], _tail(log)
    for r in range(rounds):
        folder = tmp_path / f"round{r}"
        results = json.loads((folder / "results.json").read_text())
        assert results["finished"] == results["runs"] == 4 and not results["missing"], r
        assert "4/4 runs finished" in (folder / "results.md").read_text()
        with (folder / "results.csv").open() as f:
            rows = list(csv.DictReader(f))
        # Every row from the one aggregation of all four runs: one seed per category cell.
        assert rows and all(row["n_seeds"] == "1" for row in rows), r
        assert not _leftovers(folder)


# --------------------------------------------------------------------------------------------
# The lock and publishing, in process.


def test_lock_is_refused_naming_the_holder_and_released_on_exit(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.FolderBusyError) as refused:
            with runlock.hold(folder):
                pass
        message = str(refused.value)
        assert f"process {holder.pid} on " in message and "-c " in message and "since" in message
        assert "another --workdir" in message
    finally:
        holder.kill()
        holder.wait()
    with runlock.hold(folder):  # a dead holder's lock: taken over
        assert runlock.holder(folder)["pid"] == os.getpid()
        with runlock.hold(folder):  # re-entrant in one process
            pass
        assert (folder / runlock.LOCK_FILE).is_file()
    assert runlock.holder(folder) is None and not (folder / runlock.LOCK_FILE).exists()


def test_publish_keeps_the_previous_output_when_writing_fails(tmp_path):
    out = tmp_path / "out"

    def owns(folder):
        return (folder / "made.txt").is_file()

    with runlock.publish(out, owns=owns) as staging:
        (staging / "made.txt").write_text("one")
        assert not out.exists()  # nothing visible until complete
    with pytest.raises(OSError, match="disk full"):
        with runlock.publish(out, owns=owns) as staging:
            (staging / "made.txt").write_text("two")
            raise OSError("disk full")
    assert [p.name for p in out.iterdir()] == ["made.txt"] and (
        out / "made.txt"
    ).read_text() == "one"
    with pytest.raises(runlock.OutputFolderError, match="--overwrite"):
        with runlock.publish(out, owns=owns, overwrite=False):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_checkpoint_deleted_while_read_is_replaced_by_the_newest(tmp_path, monkeypatch):
    """What a reader beside a trainer that keeps one checkpoint meets: the step it chose is
    deleted under it (the trainer saved a newer one); it reads the newer one."""
    import jax.numpy as jnp

    manager = checkpoints.checkpoint_manager(tmp_path)
    mesh = state_lib.data_mesh()
    for step in (1, 2):
        checkpoints.save(manager, step, {"x": jnp.full([3], float(step))})
    real = checkpoints._restore_step
    calls = []

    def trainer_moves_on(manager, step, target):
        calls.append(step)
        if len(calls) == 1:  # while reading step 2, the trainer saves 3 and deletes 2
            checkpoints.save(manager, 3, {"x": jnp.full([3], 3.0)})
            manager.delete(2)
            raise FileNotFoundError("step 2 vanished")
        return real(manager, step, target)

    monkeypatch.setattr(checkpoints, "_restore_step", trainer_moves_on)
    state, _ = checkpoints.restore(manager, {"x": jnp.zeros([3])}, mesh=mesh)
    assert calls == [2, 3] and float(state["x"][0]) == 3.0
