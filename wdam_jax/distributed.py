"""Multi-host runs with JAX's own runtime (``jax.distributed``): one process per host.

Every process runs the same command with the same config and workdir (a folder all hosts see,
e.g. NFS or a GCS FUSE mount), plus where the coordinator is and which process it is::

  python -m launch.train --config=... --workdir=/shared/run \
      --coordinator_address=host0:1234 --num_processes=4 --process_id=<0..3>

(or the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``; a flag wins over its variable). Without any of them the run is the usual
single process. Then (:mod:`wdam_jax.train`):

- the mesh spans every device of every process, ordered by process, so process ``p`` holds the
  contiguous rows ``p`` of ``P`` of the global batch, and builds only those rows
  (``Method.batch(step, part=p, parts=P)``, still a pure function of ``(seed, step)``);
- the state is replicated, gradients and BatchNorm statistics are all-reduced over the global
  batch (on CPU through gloo, JAX's default CPU collectives), so the run trains the same model
  as one process with the same global batch;
- every process takes part in each orbax save and restore; process 0 alone writes the config,
  the logs, the data summary and the checkpoints' checksums (:func:`is_primary`), and holds the
  run folder's writer lock for the job (:mod:`wdam_jax.runlock`, through :func:`on_primary`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from wdam_jax.errors import InputsError, UserError

ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where the coordinator listens (``host:port``), how many processes, and which this is."""

    coordinator_address: str
    num_processes: int
    process_id: int


def resolve(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Cluster | None:
    """The cluster from the flags, else from :data:`ENV`; None for a single-process run.

    Raises:
      InputsError: some but not all of the three are given, or they are inconsistent.
    """
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    problems = []
    for name, value in given.items():
        if value is None and environ.get(ENV[name]):
            value = environ[ENV[name]]
            if name != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    problems.append(f"{ENV[name]}={value!r} is not an integer.")
                    value = None
            given[name] = value
    if problems:
        raise InputsError(problems, what="the multi-host set-up")
    if all(v is None for v in given.values()):
        return None
    missing = [f"--{name} (or {ENV[name]})" for name, value in given.items() if value is None]
    if missing:
        problems.append(
            f"A multi-host run needs all of --coordinator_address, --num_processes and "
            f"--process_id; missing {', '.join(missing)}. Give all three, or none for one process."
        )
    else:
        if ":" not in given["coordinator_address"]:
            problems.append(
                f"--coordinator_address={given['coordinator_address']!r}: expected host:port "
                "(process 0's host, a free port all hosts can reach)."
            )
        if given["num_processes"] < 1:
            problems.append(f"--num_processes={given['num_processes']}: must be at least 1.")
        elif not 0 <= given["process_id"] < given["num_processes"]:
            problems.append(
                f"--process_id={given['process_id']}: must be in [0, {given['num_processes']})."
            )
    if problems:
        raise InputsError(problems, what="the multi-host set-up")
    return Cluster(**given)


def initialize(cluster: Cluster | None) -> None:
    """``jax.distributed.initialize`` for ``cluster`` (nothing for None); call it before any
    other JAX call. Blocks until every process has joined."""
    if cluster is None:
        return
    jax.distributed.initialize(
        coordinator_address=cluster.coordinator_address,
        num_processes=cluster.num_processes,
        process_id=cluster.process_id,
    )
    logging.info(
        "Process %d of %d joined %s: %d local of %d devices.",
        jax.process_index(),
        jax.process_count(),
        cluster.coordinator_address,
        jax.local_device_count(),
        jax.device_count(),
    )


def is_primary() -> bool:
    """True in the process that writes the run's shared files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (nothing in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_copy(tree: Any) -> Any:
    """A pytree of replicated arrays as arrays on this process's first device.

    A multi-host state spans devices this process cannot address; host-side work (validation,
    fitting statistics) runs on this copy with ordinary single-device jit.
    """
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


@contextlib.contextmanager
def on_primary(enter: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Runs the body inside ``enter()``'s context entered by process 0 alone (the others wait
    for it); if process 0 fails to enter, every process raises, so the job stops on every host.

    Raises:
      Whatever ``enter()`` raised, in process 0; :class:`UserError` in the others.
    """
    # Not jax.process_count(), which would start a backend (and take a GPU) for a lock alone.
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        with enter():
            yield
        return
    from jax.experimental import multihost_utils

    with contextlib.ExitStack() as stack:
        failure = None
        if is_primary():
            try:
                stack.enter_context(enter())
            except Exception as e:  # reported below, once every process knows
                failure = e
        failed = multihost_utils.broadcast_one_to_all(np.int32(failure is not None))
        if failure is not None:
            raise failure
        if int(failed):
            raise UserError(
                "Process 0 of this job was refused (its message says why); this process stops "
                "with it."
            )
        yield
