"""XLA settings of the test processes, in a module that imports nothing (conftest.py sets them
before JAX initialises). The tests compile hundreds of tiny programs whose run time is
negligible, so XLA's backend optimisations cost more than they save, and the CPU backend's
older loop emitters compile a fusion faster than its MLIR fusion emitters (about a third less
compile time for a train step). Every test process, in-process or a CLI subprocess, compiles
the same way, so runs stay comparable bit for bit."""

import os

COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def flags(devices: int = 1) -> str:
  """XLA_FLAGS for a test process with `devices` fake CPU devices."""
  return f"{COMPILE} --xla_force_host_platform_device_count={devices}"


def env(devices: int = 1, **extra: str) -> dict[str, str]:
  """The environment of a subprocess a test starts: the CPU backend with `devices` devices."""
  return dict(os.environ, XLA_FLAGS=flags(devices), JAX_PLATFORMS="cpu", **extra)
