"""FMAS on a distributed engine: a pool of Ray Data actors (``config.distributed.engine="ray"``).

One element per source image flows through ``Dataset.map_batches`` into an actor pool of
``distributed.num_workers``; each actor builds one :class:`synthesis.worker.Synthesizer` in its
constructor (Ray's counterpart of Beam's ``DoFn.setup``), so the models are loaded once per
worker and stay resident (on its GPU with ``distributed.gpus_per_worker=1``). Results stream
back in the input order (``preserve_order``) to the calling process, which writes them with the
same atomic, resumable writer as the local engine: the records and files equal a sequential
run's, and resume, shard locks and manifests work unchanged.

The same code runs on a laptop (``distributed.address=""`` starts a Ray instance in-process) and
on a cluster (``"auto"`` or ``"ray://head:10001"``, workers with this package installed).
Why Ray Data and not Apache Beam: WORKSPACE.md, "FMAS on a distributed engine".

Nothing here imports TensorFlow, jax or wdam_jax; the actors are fresh processes that import
torch first.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Iterator
from typing import Any

import ml_collections

from synthesis import worker

INSTALL_HELP = "config.distributed.engine='ray' needs Ray Data: pip install -e '.[distributed]'."


class _Worker:
    """One actor: loads the models once, then synthesises one image per call."""

    def __init__(self, config: ml_collections.ConfigDict, prompt_pairs: dict) -> None:
        import torch

        if config.cpu_threads > 0:
            torch.set_num_threads(config.cpu_threads)
        self.synth = worker.Synthesizer(config)
        self.prompt_pairs = prompt_pairs

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        columns = ("source", "record", "foreground", "worker", "device", "load_seconds", "error",
                   "lpips_candidates")  # fmt: skip
        out: dict[str, list] = {k: [] for k in columns}
        for category, source in zip(batch["category"], batch["source"], strict=True):
            item = worker.WorkItem(str(category), str(source))
            try:
                result = self.synth(item, self.prompt_pairs[item.category])
                error = b""
            except Exception as e:  # re-raised as it is by the calling process
                result = worker.Result(item.source, b"", {}, self.synth.worker)
                error = pickle.dumps(e)
            out["source"].append(result.source)
            out["record"].append(result.record)
            out["foreground"].append(json.dumps(result.foreground))
            out["worker"].append(result.worker)
            out["lpips_candidates"].append(json.dumps(list(result.lpips_candidates)))
            out["device"].append(self.synth.device)
            out["load_seconds"].append(self.synth.load_seconds)
            out["error"].append(error)
        return out


def synthesize_ray(
    config: ml_collections.ConfigDict,
    plan: worker.Plan,
    workers: dict[str, dict[str, Any]],
) -> Iterator[worker.Result]:
    """The results for ``plan.todo`` from a Ray Data actor pool, in ``plan.todo``'s order.

    Args:
      config: an FMAS config; ``config.distributed`` sizes the pool.
      plan: the shard's work (:func:`synthesis.pipeline.plan_shard`).
      workers: filled with each actor's ``"<host>:<pid>"`` -> device and model loading time.

    Yields:
      :class:`synthesis.worker.Result` per image.

    Raises:
      ImportError: Ray Data is not installed.
      The exception a worker raised for an image, re-raised here as it is, so errors read as in
      a local run.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError(INSTALL_HELP) from None
    dist = config.distributed
    started_here = not ray.is_initialized()
    if started_here:
        local = not dist.address
        ray.init(
            address=dist.address or None,
            # A local instance gets exactly the pool's logical CPUs, so it starts whatever the
            # machine's core count; a cluster brings its own.
            num_cpus=max(1, math.ceil(dist.num_workers * dist.cpus_per_worker)) if local else None,
            include_dashboard=False,
            configure_logging=False,
        )
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        # Dispatch only once every actor has loaded its models, so work is spread over the pool.
        context.wait_for_min_actors_s = dist.actor_start_timeout_s
        context.enable_progress_bars = False
        rows = [{"category": it.category, "source": it.source} for it in plan.todo]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _Worker,
            fn_constructor_kwargs={"config": config, "prompt_pairs": plan.prompt_pairs},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                size=dist.num_workers, max_tasks_in_flight_per_actor=1
            ),
            num_cpus=dist.cpus_per_worker,
            num_gpus=dist.gpus_per_worker,
        )
        for row in dataset.iter_rows():
            if row["error"]:
                # The worker's own exception (a bad image, a missing file), as a local run raises.
                raise pickle.loads(row["error"])
            actor = str(row["worker"])
            workers.setdefault(
                actor,
                {"device": str(row["device"]), "model_loading_s": float(row["load_seconds"])},
            )
            yield worker.Result(
                str(row["source"]), bytes(row["record"]), json.loads(row["foreground"]), actor,
                tuple(json.loads(row["lpips_candidates"])),
            )  # fmt: skip
    finally:
        if started_here:
            ray.shutdown()
