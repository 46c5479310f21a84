"""Multi-process (multi-host) start-up: jax.distributed from flags or the environment.

Order, in `initialize`:
  1. explicit: --coordinator_address, --num_processes, --process_id (or the environment
     variables JDIFF_COORDINATOR_ADDRESS, JDIFF_NUM_PROCESSES, JDIFF_PROCESS_ID);
  2. detected: a Cloud TPU pod slice (more than one worker in TPU_WORKER_HOSTNAMES), a SLURM
     job with more than one task, or an Open MPI job: jax.distributed.initialize() reads
     the rest from the environment;
  3. otherwise one process: nothing to do.
On CPU the cross-process collectives use gloo. Must run before JAX computes anything.
"""

from __future__ import annotations

import logging
import os

import jax

from jdiff import errors

log = logging.getLogger(__name__)


def _detected() -> str | None:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return "tpu"
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return "slurm"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "mpi"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed when this is one of several processes. Returns whether it did."""
  env = os.environ
  coordinator_address = coordinator_address or env.get("JDIFF_COORDINATOR_ADDRESS")
  if num_processes is None and "JDIFF_NUM_PROCESSES" in env:
    num_processes = int(env["JDIFF_NUM_PROCESSES"])
  if process_id is None and "JDIFF_PROCESS_ID" in env:
    process_id = int(env["JDIFF_PROCESS_ID"])
  explicit = coordinator_address is not None or num_processes is not None
  detected = None if explicit else _detected()
  if not explicit and detected is None:
    return False
  if explicit and (coordinator_address is None or num_processes is None or process_id is None):
    raise errors.InvalidArgument("multi-process runs need all of coordinator_address, num_processes and process_id "
                                 f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
  if (env.get("JAX_PLATFORMS") or "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  log.info("process %d of %d (%s), %d local of %d devices", jax.process_index(), jax.process_count(),
           "explicit" if explicit else detected, jax.local_device_count(), jax.device_count())
  return True
