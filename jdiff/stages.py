"""The whole pipeline: pretrain -> posttrain -> tune -> distill, one stage after another,
each starting from the one before; then every stage evaluated into one table
(jdiff/recipes/stage_pipeline.py says how stages chain, resume and are scored).

  python -m jdiff.stages --config=configs/stages.py:cpu --workdir=runs/stages

Stage <name> trains in WORKDIR/<name>; running the same command again continues where it
stopped. The table is printed and written to WORKDIR/stages.md and WORKDIR/stages.json.

  python -m jdiff.stages --config=configs/stages.py:cpu --workdir=runs/stages --seeds=0,1,2

runs it once per seed in WORKDIR/seed_<seed> and writes the table over seeds (mean ± its
standard error) to WORKDIR/stages.md.
"""

from absl import flags
from ml_collections import config_flags

from jdiff import cli
from jdiff import errors
from jdiff.recipes import stage_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config, e.g. configs/stages.py:cpu.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory; each stage trains in workdir/<name>.")
_SEEDS = flags.DEFINE_list("seeds", [], "Run the pipeline once per seed (base.seed) in workdir/seed_<seed>, then "
                           "write the table over seeds (mean ± standard error); empty: one run in workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.no_arguments(argv)
  cli.set_log_levels()
  cli.reuse_host_memory()
  if _SEEDS.value:
    try:
      seeds = [int(v) for v in _SEEDS.value]
    except ValueError:
      raise errors.InvalidArgument(f"--seeds={','.join(_SEEDS.value)}: give integers, e.g. --seeds=0,1,2") from None
    print(stage_pipeline.run_seeds(_CONFIG.value, _WORKDIR.value, seeds)[1])
  else:
    print(stage_pipeline.run(_CONFIG.value, _WORKDIR.value)[1])


if __name__ == "__main__":
  cli.run(main)
