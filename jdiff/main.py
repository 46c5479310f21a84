"""Train a text-to-image diffusion transformer.

  python -m jdiff.main --config=configs/mmdit_256.py[:variant] --workdir=DIR [--config.x=y ...]

Several processes (hosts): the same command on each; TPU pods, SLURM and Open MPI are
detected, elsewhere add --coordinator_address=HOST:PORT --num_processes=N --process_id=I
(jdiff/train/distributed.py, launch/).

The config is locked: an unknown --config key fails at once, naming it; bad values fail
in validation before any compute. --print_config lists every field, its value and what it
does. Everything here is importable: jdiff.train.trainer.train_and_evaluate(config, workdir).
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from jdiff import cli
from jdiff import config as config_lib
from jdiff.train import distributed
from jdiff.workdir import run_config
from jdiff.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mmdit_256.py:cpu.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 "
                                   "(TPU pods, SLURM and Open MPI are detected without it).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print every config field with its value (after the "
                                  "--config.x=y overrides) and what it does, then exit.")
flags.mark_flags_as_required(["config"])


def main(argv):
  cli.no_arguments(argv)
  if _PRINT_CONFIG.value:
    print(config_lib.describe(_CONFIG.value))
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: the directory for checkpoints, logs and samples")
  config = run_config.prepare(_CONFIG.value)  # before JAX starts any work
  cli.set_log_levels()

  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cli.reuse_host_memory()

  summary = trainer.train_and_evaluate(config, _WORKDIR.value)
  evaluation = dict(summary["eval"] or {})
  adherence = {k: v for k, v in evaluation.items() if isinstance(v, dict)}  # per benchmark split
  quality = {k: evaluation[k] for k in ("fid", "kid", "clip_score") if k in evaluation}
  print(json.dumps({"step": summary["step"], "stopped_by": summary["stopped_by"],
                    "loss": summary["last_metrics"].get("loss"), "val_loss": evaluation.get("val_loss"),
                    "samples": summary["samples"][-1:], "adherence": adherence or None, **quality}))
  if summary["stopped_by"] != "num_steps":  # a signal: saved, and the same command resumes
    sys.exit(cli.EXIT_RESUMABLE)


if __name__ == "__main__":
  cli.run(main)
