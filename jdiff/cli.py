"""What every command-line entry point shares."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags
from absl import logging as absl_logging

from jdiff import errors

# Exit statuses of the entry points (README, "Exit status").
EXIT_USER_ERROR = 2  # a mistake in the command, its flags, config or files: one line on stderr
EXIT_RESUMABLE = 75  # stopped by SIGTERM/SIGINT after saving a checkpoint (sysexits' EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) before training started, as shells report it


HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull")


class Resumable(Exception):
  """Work stopped early with its progress saved: one line, exit status EXIT_RESUMABLE."""


def run(main: Callable[[list[str]], Any]) -> None:
  """absl's app.run for jdiff's entry points. A mistake of the user's -- a flag or config
  override that does not parse, a config file that does not load, an errors.UserError or
  app.UsageError raised by `main` -- is printed as one line, `error: ...`, with exit status 2;
  Ctrl-C exits with 130 and no traceback. Anything else is a bug and keeps its traceback."""

  def parse(argv: Sequence[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except SystemExit as e:
      # absl's --help, --helpshort and --helpfull print the usage, then exit with 1: asking
      # for help is no failure.
      if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv[1:]):
        sys.exit(0)
      raise
    except flags.Error as e:
      _fail(_one_line(str(e)) + " (--helpfull lists the flags)")
    except (AttributeError, KeyError) as e:  # ml_collections: an override naming no config field
      _fail(_unknown_field(e, argv))

  def guarded(argv: list[str]) -> Any:
    try:
      return main(argv)
    except (errors.UserError, app.UsageError) as e:
      _fail(_one_line(str(e)))
    except Resumable as e:
      print(f"stopped: {e}", file=sys.stderr)
      sys.exit(EXIT_RESUMABLE)
    # stdout piped into a reader that stopped reading (`| head`). An OSError: caught before
    # the clause below, which re-raises.
    except BrokenPipeError:
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
      sys.exit(1)
    except OSError as e:
      if "Failed loading config file" not in str(e):  # ml_collections loads --config on first use
        raise
      _fail(_config_not_loaded(str(e)))
    except KeyboardInterrupt:  # before training (during it, the trainer saves and stops)
      _interrupted()

  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _drop_lost_interrupts
  try:
    app.run(guarded, flags_parser=parse)
  except KeyboardInterrupt:  # during absl's start-up, before main
    _interrupted()


_interrupt_pending = False


def _on_sigint(signum, frame) -> None:
  """Python's own Ctrl-C behaviour, remembered: a KeyboardInterrupt raised while a garbage
  collector callback runs (JAX has one) is swallowed, so the trainer checks
  `interrupt_pending` before it starts training."""
  del signum, frame
  global _interrupt_pending
  _interrupt_pending = True
  raise KeyboardInterrupt


def _drop_lost_interrupts(unraisable) -> None:
  """Two kinds of 'Exception ignored' tracebacks that would only alarm are dropped:
  a KeyboardInterrupt that Python could not raise (inside a gc callback), which is acted on
  through interrupt_pending; and TensorStore's completion callbacks of a failed asynchronous
  checkpoint save (a full disk), which find Orbax's event loop already closed ('Event loop
  is closed') while the save's other writes finish -- the save's own one-line error says it."""
  exc = unraisable.exc_value
  if isinstance(exc, KeyboardInterrupt):
    return
  frames = traceback.extract_tb(unraisable.exc_traceback)
  if (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
      and frames and frames[0].name == "call_soon_threadsafe"):
    return
  sys.__unraisablehook__(unraisable)


def interrupt_pending() -> bool:
  """Whether Ctrl-C was pressed since the entry point started (even if its exception was lost)."""
  return _interrupt_pending


def _interrupted() -> NoReturn:
  """Exits at once once `finally` blocks (the workdir lock) have run: an interpreter shut
  down while XLA's or Orbax's threads are still busy can crash in their teardown."""
  print("interrupted", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(EXIT_INTERRUPTED)


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _one_line(text: str) -> str:
  """A message as one line; a message holding a traceback (a config file that raised) keeps
  its first line and the traceback's last, the exception itself."""
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
  if any(l.startswith("Traceback (most recent call last)") for l in lines):
    return f"{lines[0].rstrip(':')}: {lines[-1]}"
  return " ".join(lines)


def _config_not_loaded(text: str) -> str:
  """ml_collections' 'Failed loading config file ... Attempted [...]: PATH / REASON' as one line."""
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  attempted = next((i for i, l in enumerate(lines) if l.startswith("Attempted")), None)
  if attempted is None or attempted + 2 >= len(lines):
    return _one_line(text)
  return f"cannot load config file {lines[attempted + 1]}: {lines[-1]}"


def _unknown_field(e: BaseException, argv: Sequence[str]) -> str:
  """'--config.train.num_stepz: no such config field (did you mean "num_steps" ...?)' from
  ml_collections' KeyError('\'num_stepz\'\nDid you mean ...') (wrapped in AttributeError)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  first, _, hint = text.partition("\n")
  key = first.strip("'\"")
  flag = next((a.split("=", 1)[0] for a in argv[1:] if a.split("=", 1)[0].endswith("." + key)), key)
  hint = hint.strip()
  return f"{flag}: no such config field" + (f" ({hint[0].lower()}{hint[1:]})" if hint else "")


def no_arguments(argv: Sequence[str]) -> None:
  """Every command takes flags only: a stray word (a flag without its --) is an error."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")


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
