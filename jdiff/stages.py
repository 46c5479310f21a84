"""The whole pipeline: pretrain -> posttrain -> tune -> distill, one stage after another,
each starting from the one before; then every stage evaluated into one table
(jdiff/recipes/stage_pipeline.py says how stages chain, resume and are scored).

  python -m jdiff.stages --config=configs/stages.py:cpu --workdir=runs/stages

Stage <name> trains in WORKDIR/<name>; running the same command again continues where it
stopped. The table is printed and written to WORKDIR/stages.md and WORKDIR/stages.json.
"""

from absl import flags
from ml_collections import config_flags

from jdiff import cli
from jdiff.recipes import stage_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config, e.g. configs/stages.py:cpu.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory; each stage trains in workdir/<name>.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.no_arguments(argv)
  cli.set_log_levels()
  cli.reuse_host_memory()
  print(stage_pipeline.run(_CONFIG.value, _WORKDIR.value)[1])


if __name__ == "__main__":
  cli.run(main)
