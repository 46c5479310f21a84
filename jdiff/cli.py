"""What every command-line entry point shares."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging


def set_log_levels(jdiff_level: int = logging.INFO) -> None:
  """jdiff's own messages at `jdiff_level`; everything else (Orbax logs each file it reads or
  writes at INFO) at WARNING, unless --verbosity was given on the command line."""
  if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
    absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jdiff").setLevel(jdiff_level)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def reuse_host_memory() -> bool:
  """Keeps freed host memory in the process for reuse instead of returning it to the kernel
  (glibc on Linux; the CPU backend only). Returns whether it changed anything.

  XLA:CPU allocates every execution's temporary buffer afresh; glibc serves any allocation
  above 32 MiB with a new mmap and unmaps it when freed, so each training step faults every
  page of it in again and a small CPU run spends a large share of its time in the kernel.
  With mmap off and no trimming, freed blocks stay in the heap and the next step reuses
  them. Set JDIFF_MALLOC=system to keep glibc's defaults.
  """
  if os.environ.get("JDIFF_MALLOC") == "system" or not sys.platform.startswith("linux"):
    return False
  import jax  # the entry points call this after choosing devices
  if jax.default_backend() != "cpu":
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
