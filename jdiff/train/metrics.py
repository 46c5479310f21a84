"""What a run writes as it trains: metrics.jsonl, TensorBoard events and a Weights & Biases
run (MetricWriter), from the host-side averages of the steps since the last log (summarize)."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from typing import Any

import jax
import numpy as np

from jdiff import errors


@dataclasses.dataclass
class MetricWriter:
  """metrics.jsonl + TensorBoard events under workdir, and a Weights & Biases run when
  config.wandb.project is set (process 0 only)."""

  workdir: str
  config: Any = None

  WANDB_ID = "wandb_id"  # WORKDIR/wandb_id: the W&B run a resumed run continues

  def __post_init__(self):
    self.enabled = jax.process_index() == 0
    self._wandb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      os.makedirs(self.workdir, exist_ok=True)
      self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a")
      self._tb = SummaryWriter(os.path.join(self.workdir, "tb"))
      if self.config is not None and self.config.wandb.project:
        self._wandb = self._start_wandb(self.config)

  def _start_wandb(self, config):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise errors.InvalidArgument("config.wandb.project is set but wandb is not installed: pip install "
                                   "'jdiff[wandb]' (or pip install wandb)") from e
    id_path = os.path.join(self.workdir, self.WANDB_ID)
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(4)  # W&B run ids are [a-z0-9]
      with open(id_path, "w") as f:
        f.write(run_id + "\n")
    w = config.wandb
    return wandb.init(project=w.project, entity=w.entity or None, name=w.name or os.path.basename(
        os.path.normpath(self.workdir)), mode=w.mode, tags=list(w.tags), id=run_id, resume="allow",
                      dir=self.workdir, config=json.loads(config.to_json_best_effort()))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(values, step=step)

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(name, image, step, dataformats="HWC")
      if self._wandb is not None:
        import wandb  # pylint: disable=g-import-not-at-top
        self._wandb.log({name: wandb.Image(image)}, step=step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()


def summarize(h: list[dict[str, Any]], seconds: float, batch_size: int) -> dict[str, float]:
  """Host-side averages of the (fetched) metrics of the steps since the last log; loss and
  grad norm average the finite steps (non-finite ones are counted separately)."""
  stack = lambda k: np.stack([m[k] for m in h])
  finite_mean = lambda x: float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else float("nan")
  out = dict(loss=finite_mean(stack("loss")), grad_norm=finite_mean(stack("grad_norm")),
             lr=float(h[-1]["lr"]), nonfinite_steps=int(stack("nonfinite").sum()),
             nonfinite_streak=int(h[-1]["nonfinite_streak"]))
  sums, counts = stack("t_bin_loss_sum").sum(0), stack("t_bin_count").sum(0)
  for i, (s, c) in enumerate(zip(sums, counts)):
    if c > 0:
      out[f"loss_t{i / len(sums):.1f}"] = float(s / c)
  for k in h[-1]["objective"]:  # the objective's diagnostics (dpo_accuracy, ...)
    out[k] = float(np.mean([m["objective"][k] for m in h]))
  out["steps_per_s"] = len(h) / seconds
  out["images_per_s"] = len(h) * batch_size / seconds
  return out
