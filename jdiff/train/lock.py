"""One run per workdir: a lock file that names the host and process holding it.

A second run started into a workdir in use fails at once, naming the holder, instead of
both writing the same checkpoints and logs. A lock left by a process that died (kill -9,
a crash, a lost machine) on this host is taken over with a warning. A lock held on another
host cannot be checked from here: the run fails and says which file to remove if that
process is gone. In a multi-process job, process 0 holds the lock for all of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from typing import Any, Iterator

import jax

from jdiff import errors

log = logging.getLogger(__name__)

FILE = "jdiff.lock"


class WorkdirInUse(errors.UserError, RuntimeError):
  """Another live run holds the workdir's lock."""


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux /proc), to tell a live
  process from a later one that reuses its pid; None where /proc is not available."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _me() -> dict[str, Any]:
  return dict(host=socket.gethostname(), pid=os.getpid(), start=_start_time(os.getpid()),
              since=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv))


def _read(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def alive(holder: dict[str, Any]) -> bool | None:
  """Whether the lock's process still runs: True / False on this host, None (unknown) for
  another host."""
  if holder.get("host") != socket.gethostname():
    return None
  pid = int(holder.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  start = _start_time(pid)
  return start is None or holder.get("start") is None or start == holder["start"]


def _describe(holder: dict[str, Any]) -> str:
  return (f"process {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')}: "
          f"{holder.get('command') or '?'})")


def acquire(workdir: str) -> dict[str, Any]:
  """Creates workdir/jdiff.lock naming this process; returns what it wrote.

  Raises WorkdirInUse when a live process holds it (or one on another host).
  """
  path = os.path.join(workdir, FILE)
  me = _me()
  tmp = f"{path}.{me['host']}.{me['pid']}.tmp"
  with open(tmp, "w") as f:
    json.dump(me, f)
  try:
    for _ in range(3):
      try:
        os.link(tmp, path)  # atomic: fails if the lock exists; the content is complete when it appears
        return me
      except FileExistsError:
        pass
      holder = _read(path)
      if holder is None:  # vanished or unreadable: released meanwhile, or damaged
        if os.path.exists(path) and time.time() - os.path.getmtime(path) > 60:
          log.warning("workdir %s: removing the unreadable lock file %s", workdir, path)
          _remove_if_still(path, None, me)
        continue
      state = alive(holder)
      if state is None:
        raise WorkdirInUse(f"workdir {workdir} is locked by {_describe(holder)}; if that run is no longer "
                           f"running, remove {path}")
      if state:
        raise WorkdirInUse(f"workdir {workdir} is in use by {_describe(holder)}; stop it first or "
                           "choose another --workdir")
      log.warning("workdir %s: taking over the lock of %s, which is no longer running", workdir,
                  _describe(holder))
      _remove_if_still(path, holder, me)
    raise WorkdirInUse(f"workdir {workdir}: could not take the lock {path} (other runs are starting there)")
  finally:
    os.remove(tmp)


def _remove_if_still(path: str, expected: dict[str, Any] | None, me: dict[str, Any]) -> None:
  """Removes the lock file if it still holds `expected` (None: unreadable). It is first
  renamed aside (atomic: of two processes, one succeeds); if what moved is another run's
  lock that replaced the expected one meanwhile, it is put back."""
  aside = f"{path}.stale.{me['host']}.{me['pid']}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:  # another process moved it first
    return
  if _read(aside) != expected:
    with contextlib.suppress(OSError):
      os.link(aside, path)
  os.remove(aside)


def release(workdir: str, me: dict[str, Any]) -> None:
  """Removes the lock if it is still this process's."""
  path = os.path.join(workdir, FILE)
  holder = _read(path)
  if holder is not None and holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
    os.remove(path)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """The workdir's lock for the duration of the block (process 0 of a job takes it)."""
  if jax.process_index() != 0:
    yield
    return
  me = acquire(workdir)
  try:
    yield
  finally:
    release(workdir, me)
