"""Learning curves: training loss, validation loss and caption adherence against steps, read
from a workdir's metrics.jsonl and eval.jsonl and drawn into one PNG.

  python -m jdiff.eval.curves WORKDIR [OUT.png]   # default WORKDIR/learning_curve.png

The trainer redraws WORKDIR/learning_curve.png after every evaluation.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from jdiff.data import shapes

FILENAME = "learning_curve.png"
SPLITS = ("seen", "held_out")  # the benchmark splits drawn (new_color only after a tune stage)
CURVES = ("all",) + shapes.ATTRIBUTES


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a JSON-lines file merged by step (the trainer logs a step's training and
  evaluation metrics as separate records), in step order. A step logged again (a run resumed
  from an earlier checkpoint) keeps the latest values; an unfinished last line (a killed run)
  is skipped."""
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict) and "step" in record:
        by_step.setdefault(int(record["step"]), {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def curve_data(workdir: str) -> dict[str, Any]:
  """{'train': (steps, loss), 'val': (steps, val_loss), 'adherence': {split: {attribute: (steps,
  values)}}} from the workdir's logs (arrays; empty where nothing was logged yet)."""
  metrics = [m for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in m]
  evals = read_jsonl(os.path.join(workdir, "eval.jsonl"))
  arr = lambda rows, key: (np.array([r["step"] for r in rows], np.int64), np.array([r[key] for r in rows], float))
  with_val = [e for e in evals if "val_loss" in e]
  adherence = {}
  for split in SPLITS:
    rows = [e for e in evals if split in e]
    adherence[split] = {a: (np.array([r["step"] for r in rows], np.int64),
                            np.array([r[split][a] for r in rows], float)) for a in CURVES}
  return dict(train=arr(metrics, "loss"), val=arr(with_val, "val_loss"), adherence=adherence)


def draw(data: dict[str, Any], title: str = "") -> Figure:
  """Two panels: losses (log scale) and adherence per attribute (seen solid, held-out dashed)."""
  fig = Figure(figsize=(11, 4.2), dpi=100)
  FigureCanvasAgg(fig)
  loss_ax, adh_ax = fig.subplots(1, 2)
  steps, loss = data["train"]
  if len(steps):
    loss_ax.plot(steps, loss, color="0.6", lw=1, label="training loss")
  steps, val = data["val"]
  if len(steps):
    loss_ax.plot(steps, val, "o-", color="C3", lw=1.5, ms=4, label="validation loss")
  loss_ax.set(xlabel="step", ylabel="loss", title="loss")
  if len(data["train"][0]) or len(steps):
    loss_ax.set_yscale("log")
    loss_ax.legend(loc="upper right")
  loss_ax.grid(alpha=0.3)
  for i, name in enumerate(CURVES):
    for split, style in zip(SPLITS, ("-", "--")):
      s, v = data["adherence"][split][name]
      if len(s):
        adh_ax.plot(s, v, style, marker="o", ms=3, color=f"C{i}", lw=2.0 if name == "all" else 1.2,
                    label=name if split == "seen" else None)
  adh_ax.set(xlabel="step", ylabel="fraction right", ylim=(-0.02, 1.02),
             title="caption adherence (solid: seen pairs, dashed: held-out)")
  if any(len(data["adherence"][sp][a][0]) for sp in SPLITS for a in CURVES):
    adh_ax.legend(loc="lower right", fontsize=8)
  adh_ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def write(workdir: str, path: str | None = None, title: str = "") -> tuple[str, np.ndarray]:
  """Draws the workdir's curves into `path` (default workdir/learning_curve.png); returns the
  path and the image (uint8 [H, W, 3], for TensorBoard)."""
  path = path or os.path.join(workdir, FILENAME)
  fig = draw(curve_data(workdir), title or os.path.basename(os.path.normpath(workdir)))
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)  # readers never see a half-written file
  return path, image


def main(argv: list[str]) -> None:
  if len(argv) not in (2, 3):
    raise SystemExit("usage: python -m jdiff.eval.curves WORKDIR [OUT.png]")
  workdir = argv[1]
  if not os.path.isdir(workdir):
    raise SystemExit(f"no workdir {workdir!r}")
  print(write(workdir, argv[2] if len(argv) == 3 else None)[0])


if __name__ == "__main__":
  main(sys.argv)
