"""Controlled training studies: one base config trained in several variants over several
seeds, each scored on the shapes benchmark and by validation loss, into one table of means
and spreads (the studies and their variants: jdiff/recipes/studies.py).

  python -m jdiff.study --study=timesteps --workdir=runs/study_timesteps [--seeds=3]
                        [--config=configs/mmdit_256.py:cpu] [--config.x=y ...]

Studies: timesteps (SD3's Table 1 densities), shift (resolution-aware shift in training and
sampling), arch (MMDiT against DiT at equal FLOPs). Runs live in WORKDIR/<variant>/seed<k>/;
the command resumes where it stopped. The table is printed and written to WORKDIR/study.md.
"""

from absl import flags
from ml_collections import config_flags

from jdiff import cli
from jdiff.workdir import run_config
from jdiff.recipes import studies

_STUDY = flags.DEFINE_enum("study", None, list(studies.STUDIES), "Which study to run.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per variant (config.seed = 0 .. seeds-1).", lower_bound=1)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the study's runs and table.")
_CONFIG = config_flags.DEFINE_config_file("config", "configs/mmdit_256.py:cpu", "Base config.", lock_config=True)
flags.mark_flags_as_required(["study", "workdir"])


def main(argv):
  cli.no_arguments(argv)
  config = run_config.prepare(_CONFIG.value)
  cli.set_log_levels()
  cli.reuse_host_memory()
  out = studies.run(_STUDY.value, config, _WORKDIR.value, _SEEDS.value)
  print(studies.markdown(_STUDY.value, out["summary"]), end="")


if __name__ == "__main__":
  cli.run(main)
