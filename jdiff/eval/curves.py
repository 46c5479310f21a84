"""Learning curves: what a person watches in a run, read from a workdir's metrics.jsonl and
eval.jsonl and drawn into one PNG of six panels against steps: training and validation loss,
the training loss per t bin, the learning rate, the gradient norm, caption adherence per
attribute, and any other evaluation metric (FID, KID, ...) with an objective's own training
metrics (grpo's reward and KL).

  python -m jdiff.curves --workdir=WORKDIR [--out=OUT.png]   # default WORKDIR/learning_curve.png

The trainer redraws WORKDIR/learning_curve.png after every evaluation and at the end of a run.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from PIL import Image

from jdiff import errors
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


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  rows = [r for r in rows if isinstance(r.get(key), (int, float))]
  return np.array([r["step"] for r in rows], np.int64), np.array([r[key] for r in rows], float)


OBJECTIVE_SERIES = ("reward", "kl")  # training metrics of an objective drawn with the evaluation metrics (grpo)
T_BIN = re.compile(r"loss_t\d")  # the training loss per t bin: loss_t0.0, loss_t0.2, ...


def curve_data(workdir: str) -> dict[str, Any]:
  """The series of the workdir's logs, each (steps, values) arrays (empty where nothing was
  logged yet): 'train' (loss), 'val' (val_loss), 't_bins' {loss_tX: ...}, 'lr', 'grad_norm',
  'adherence' {split: {attribute: ...}}, 'other' {eval metric: ...} (numbers of eval.jsonl
  that are neither adherence nor validation loss, the render quality of the seen images, and
  OBJECTIVE_SERIES of metrics.jsonl)."""
  metrics = [m for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in m]
  evals = read_jsonl(os.path.join(workdir, "eval.jsonl"))
  adherence = {}
  for split in SPLITS:
    rows = [e for e in evals if split in e]
    adherence[split] = {a: (np.array([r["step"] for r in rows], np.int64),
                            np.array([r[split][a] for r in rows], float)) for a in CURVES}
  t_bins = sorted({k for m in metrics for k in m if T_BIN.match(k)})
  other = sorted({k for e in evals for k, v in e.items()
                  if isinstance(v, (int, float)) and k != "step" and not k.startswith("val_loss")})
  training = [k for k in OBJECTIVE_SERIES if any(k in m for m in metrics)]
  series = {k: _series(evals, k) for k in other}
  quality = [e for e in evals if "clean" in e.get("seen", {})]  # render quality of the seen images
  if quality:
    series["clean (seen)"] = (np.array([e["step"] for e in quality], np.int64),
                              np.array([e["seen"]["clean"] for e in quality], float))
  return dict(train=_series(metrics, "loss"), val=_series(evals, "val_loss"),
              t_bins={k: _series(metrics, k) for k in t_bins}, lr=_series(metrics, "lr"),
              grad_norm=_series(metrics, "grad_norm"), adherence=adherence,
              other={**series,
                     **{f"{k} (training)": _series(metrics, k) for k in training}})


def _finish(ax, title: str, ylabel: str, log: bool = False, legend: str | None = None) -> None:
  ax.set(xlabel="step", ylabel=ylabel, title=title)
  if log and ax.get_lines():
    ax.set_yscale("log")
  if legend and ax.get_lines():
    ax.legend(loc=legend, fontsize=8)
  ax.grid(alpha=0.3)


def draw(data: dict[str, Any], title: str = "") -> Figure:
  """Six panels: losses (log scale), loss per t bin, learning rate, gradient norm, adherence
  per attribute (seen solid, held-out dashed), other evaluation metrics."""
  fig = Figure(figsize=(15, 8), dpi=100)
  FigureCanvasAgg(fig)
  (loss_ax, bins_ax, lr_ax), (adh_ax, other_ax, grad_ax) = fig.subplots(2, 3)
  steps, loss = data["train"]
  if len(steps):
    loss_ax.plot(steps, loss, color="0.6", lw=1, label="training loss")
  steps, val = data["val"]
  if len(steps):
    loss_ax.plot(steps, val, "o-", color="C3", lw=1.5, ms=4, label="validation loss")
  _finish(loss_ax, "loss", "loss", log=True, legend="upper right")
  for i, (name, (steps, values)) in enumerate(data["t_bins"].items()):
    if len(steps):
      bins_ax.plot(steps, values, color=f"C{i}", lw=1, label=f"t >= {name[len('loss_t'):]}")
  _finish(bins_ax, "training loss per t bin", "loss", log=True, legend="upper right")
  for ax, key, name in ((lr_ax, "lr", "learning rate"), (grad_ax, "grad_norm", "gradient norm")):
    steps, values = data[key]
    if len(steps):
      ax.plot(steps, values, color="C0", lw=1)
    _finish(ax, name, name)
  for i, name in enumerate(CURVES):
    for split, style in zip(SPLITS, ("-", "--")):
      s, v = data["adherence"][split][name]
      if len(s):
        adh_ax.plot(s, v, style, marker="o", ms=3, color=f"C{i}", lw=2.0 if name == "all" else 1.2,
                    label=name if split == "seen" else None)
  adh_ax.set_ylim(-0.02, 1.02)
  _finish(adh_ax, "caption adherence (solid: seen pairs, dashed: held-out)", "fraction right", legend="lower right")
  for i, (name, (steps, values)) in enumerate(data["other"].items()):
    if len(steps):
      other_ax.plot(steps, values, "-" if name.endswith("(training)") else "o-", ms=3, color=f"C{i}", label=name)
  positive = all((v > 0).all() for _, v in data["other"].values())  # metrics of different scales (FID, KID)
  if not other_ax.get_lines():
    other_ax.text(0.5, 0.5, "none logged", ha="center", va="center", color="0.5", transform=other_ax.transAxes)
  _finish(other_ax, "other metrics", "value", log=positive, legend="upper right")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def write(workdir: str, path: str | None = None, title: str = "") -> tuple[str, np.ndarray]:
  """Draws the workdir's curves into `path` (default workdir/learning_curve.png); returns the
  path and the image (uint8 [H, W, 3], for TensorBoard)."""
  if not os.path.isdir(workdir):
    raise errors.NotFound(f"no workdir {workdir!r}")
  path = path or os.path.join(workdir, FILENAME)
  fig = draw(curve_data(workdir), title or os.path.basename(os.path.normpath(workdir)))
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  Image.fromarray(image).save(tmp, format="png")  # the pixels drawn above (savefig would draw again)
  os.replace(tmp, path)  # readers never see a half-written file
  return path, image
