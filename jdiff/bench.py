"""Training-step benchmark: one JSON line with step time, throughput, FLOPs and MFU (the
fields: jdiff/train/speed.py).

  python -m jdiff.bench --config=configs/mmdit_256.py[:variant] [--steps=20 --warmup=3] [--config.x=y ...]
                        [--profile_dir=DIR]   # then: python benchmarks/profile_summary.py DIR

Runs the real jitted, sharded, donated train step of the config on synthetic batches of
the config's shapes (no input pipeline: its throughput is measured by benchmarks/loader.py).
"""

import json
import logging

from absl import flags
from ml_collections import config_flags

from jdiff import cli
from jdiff.workdir import run_config
from jdiff.train import speed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mmdit_256.py:cpu.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.", lower_bound=0)
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "If set, trace 2 more steps there with jax.profiler.")
flags.mark_flags_as_required(["config"])


def main(argv):
  cli.no_arguments(argv)
  config = run_config.prepare(_CONFIG.value)
  cli.set_log_levels(logging.WARNING)
  cli.reuse_host_memory()
  print(json.dumps(speed.run(config, _STEPS.value, _WARMUP.value, _PROFILE_DIR.value)))


if __name__ == "__main__":
  cli.run(main)
