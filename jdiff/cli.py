"""What every command-line entry point shares."""

from __future__ import annotations

import logging

from absl import flags
from absl import logging as absl_logging


def set_log_levels(jdiff_level: int = logging.INFO) -> None:
  """jdiff's own messages at `jdiff_level`; everything else (Orbax logs each file it reads or
  writes at INFO) at WARNING, unless --verbosity was given on the command line."""
  if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
    absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jdiff").setLevel(jdiff_level)
