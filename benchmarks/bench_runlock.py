"""What the writer lock and atomic publishing cost (issue 27), against a write every run does.

    python benchmarks/bench_runlock.py [--repeats=200] [--dir=workdirs]

Times, in a folder on the file system the runs use (``--dir``):

- ``runlock.hold`` on a run folder: acquire + release (open, flock, record, unlink, close);
- ``runlock.publish`` of an evaluation-report-sized folder (8 small files): its lock, the
  staging folder, the rename into place, the swap and deletion of the previous report, against
  deleting the previous folder and writing the same files directly into a new one;
- the reference: ``checkpoints.atomic_write_text`` of a 2 KB ``config.json``, which every run
  does several times.

A demo run (``make demo``) takes the run lock once (``launch.train``: training, fit, final
evaluation) and publishes one report, so its cost is one of each; the last line sets that
against the demo's 183 s (README.md).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile
import time

from wdam_jax import checkpoints, runlock

DEMO_S = 183.0  # make demo from a quiet fresh clone (README.md, 2026-11-24)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--dir", default="workdirs")
    args = parser.parse_args()
    base = pathlib.Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix="bench_runlock_") as tmp:
        tmp = pathlib.Path(tmp)
        run = tmp / "run"
        run.mkdir()
        text = "x" * 2048
        files = {f"file{i}.json": text for i in range(8)}

        def hold():
            with runlock.hold(run):
                pass

        def reference():
            checkpoints.atomic_write_text(run / "config.json", text)

        def direct():  # into a new folder, as a first evaluation of a step (and as publish)
            out = run / "direct"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            for name, content in files.items():
                (out / name).write_text(content)

        def publish():
            with runlock.publish(run / "report", owns=lambda f: True) as staging:
                for name, content in files.items():
                    (staging / name).write_text(content)

        t_ref = _time(reference, args.repeats)
        t_hold = _time(hold, args.repeats)
        t_direct = _time(direct, args.repeats)
        t_publish = _time(publish, args.repeats)
    print(f"file system of {base.resolve()}; {args.repeats} repeats each")
    print(f"reference atomic_write_text(config.json, 2 KB): {t_ref * 1e3:8.3f} ms")
    print(f"runlock.hold acquire + release:                 {t_hold * 1e3:8.3f} ms "
          f"({t_hold / t_ref:.2f}x the reference)")  # fmt: skip
    print(f"report of 8 files written directly:             {t_direct * 1e3:8.3f} ms")
    extra = t_publish - t_direct
    print(f"the same published (staging, rename, swap):     {t_publish * 1e3:8.3f} ms "
          f"({t_publish / t_direct:.2f}x direct; +{extra * 1e3:.3f} ms)")  # fmt: skip
    per_run = t_hold + extra
    print(f"per demo run (one lock, one report): {per_run * 1e3:.2f} ms = "
          f"{per_run / DEMO_S:.1e} of its {DEMO_S:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
