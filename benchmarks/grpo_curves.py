"""The training curves of grpo runs side by side: reward, KL to the reference and the share of
groups that scored all alike, against steps, one line per run.

  python benchmarks/grpo_curves.py --workdir=RUN [--workdir=RUN2 ...] --out=curves.png

Reads each run's metrics.jsonl (logged every train.log_every steps) and prints, per run, the
reward's mean over the first and the last fifth of the logged steps. The learning curve that
the trainer draws puts every metric on one axis; here each has its own (the reward linear,
the KL logarithmic).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from jdiff.eval import curves

PANELS = (("reward", "reward (fraction of attributes right)", False), ("kl", "KL to the reference", True),
          ("flat_groups", "groups scoring all alike", False))

def main(argv):
  del argv
  fig, axes = plt.subplots(1, len(PANELS), figsize=(13, 3.6))
  for i, workdir in enumerate(_WORKDIRS.value):
    records = [r for r in curves.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "reward" in r]
    if not records:
      raise app.UsageError(f"{workdir}: no reward logged (not a grpo run?)")
    steps = np.array([r["step"] for r in records])
    for ax, (key, _, _) in zip(axes, PANELS):
      ax.plot(steps, [r[key] for r in records], color=f"C{i}", label=os.path.basename(os.path.normpath(workdir)))
    reward = np.array([r["reward"] for r in records])
    fifth = max(1, len(reward) // 5)
    print(json.dumps(dict(workdir=workdir, reward_first_fifth=round(float(reward[:fifth].mean()), 4),
                          reward_last_fifth=round(float(reward[-fifth:].mean()), 4),
                          kl_last=float(records[-1]["kl"]))))
  for ax, (_, title, log) in zip(axes, PANELS):
    ax.set_title(title)
    ax.set_xlabel("step")
    if log:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=100)

if __name__ == "__main__":  # flags only when run: tests import the module beside others that define them
  _WORKDIRS = flags.DEFINE_multi_string("workdir", None, "grpo run(s).")
  _OUT = flags.DEFINE_string("out", "grpo_curves.png", "PNG to write.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
