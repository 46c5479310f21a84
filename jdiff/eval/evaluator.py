"""The evaluation a training run does every config.eval.every steps and at its end: the
metrics config.eval.metrics names, built from the registry below.

Each registry entry is a family of metric names that are loaded and scored together (FID,
KID and the CLIP score share one sampling pass and the reference statistics). A family
that scores only runs over the shapes data is skipped on other data with a log line. A
new metric is one `Family` added to METRICS (and its name to config.EVAL_METRICS, which
the config validates against, since the config may not import this package).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax

from jdiff import errors
from jdiff import inference
from jdiff.eval import benchmark
from jdiff.eval import curves
from jdiff.eval import quality as quality_lib
from jdiff.eval import validation

log = logging.getLogger(__name__)

# model -> (result, scalars): the result as eval.jsonl records it, and the flat scalars
# for the metric writers.
Score = Callable[[inference.Model], tuple[dict[str, Any], dict[str, float]]]


@dataclasses.dataclass(frozen=True)
class Family:
  names: tuple[str, ...]
  build: Callable[[Any, list[str]], Score]  # (config, the names it asks for) -> Score; loads now
  shapes_only: bool = False


def _adherence(config, names: list[str]) -> Score:
  del config, names
  def score(model):
    result = benchmark.evaluate(model)
    return result, {f"adherence/{split}/{k}": v for split, r in result.items() for k, v in r.items() if k != "n"}
  return score


def _val_loss(config, names: list[str]) -> Score:
  del names
  def score(model):
    val = validation.loss(model.networks, model.params, config)
    return val, val
  return score


def _image_quality(config, names: list[str]) -> Score:
  e = config.eval
  scorers = quality_lib.Scorers.load(names, fid_stats=e.fid_stats, fid_weights=e.fid_weights, clip_model=e.clip_model)
  prompts = quality_lib.prompts_for(e.fid_samples, scorers.reference, config.data)
  def score(model):
    q = quality_lib.evaluate(model, scorers, prompts, seed=e.seed, num_steps=e.num_steps, cfg_scale=e.cfg_scale,
                             method=e.method)
    return q, q
  return score


METRICS = (
    Family(("adherence",), _adherence, shapes_only=True),
    Family(("val_loss",), _val_loss, shapes_only=True),
    Family(quality_lib.METRICS, _image_quality),
)
NAMES = tuple(n for family in METRICS for n in family.names)


class Evaluator:
  """config.eval.metrics of a run's weights. Whatever a metric loads (reference statistics,
  the Inception network, the CLIP model) is loaded when the Evaluator is built, before any
  training, so a wrong path fails at once; nothing is loaded when the run never evaluates."""

  def __init__(self, config):
    asked = set(config.eval.metrics)  # names checked by config_checks against config.EVAL_METRICS (= NAMES)
    shapes = benchmark.applies(config)
    evaluates = bool(config.eval.every or config.eval.at_end)
    self.scores: list[Score] = []
    skipped = []
    for family in METRICS:
      names = [n for n in family.names if n in asked]
      if not names:
        continue
      if family.shapes_only and not shapes:
        skipped += names
      elif evaluates:
        self.scores.append(family.build(config, names))
    if skipped and evaluates:
      log.info("eval.metrics %s score runs on the shapes data: not computed for data.source=%r", sorted(skipped),
               config.data.source)

  @property
  def on(self) -> bool:
    return bool(self.scores)

  def __call__(self, config, networks, params, workdir: str, step: int, writer) -> dict[str, Any]:
    """The metrics of `params`, logged, appended to workdir/eval.jsonl, given to `writer`
    (scalars and image, as jdiff.train.metrics.MetricWriter) and drawn into
    workdir/learning_curve.png."""
    t0 = time.time()
    model = inference.Model(networks, jax.device_get(params), config, step)
    result, scalars = {}, {}
    for score in self.scores:
      r, s = score(model)
      result.update(r)
      scalars.update(s)
    log.info("step %d evaluation (%.0fs): %s", step, time.time() - t0, json.dumps(result))
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **result}) + "\n")
      writer.scalars(step, scalars)
      _, image = curves.write(workdir)
      writer.image(step, "learning_curve", image)
    return result


def evaluated(workdir: str, step: int) -> bool:
  """Whether workdir/eval.jsonl holds an evaluation of `step`."""
  return any(e["step"] == step for e in curves.read_jsonl(os.path.join(workdir, "eval.jsonl")))


COMMAND_METRICS = ("adherence",) + quality_lib.METRICS  # what `python -m jdiff.evaluate` scores


def evaluate_workdir(workdir: str, metrics: Sequence[str] = ("adherence",), *, step: int | None = None,
                     num_samples: int | None = None, num_steps: int | None = None, cfg_scale: float | None = None,
                     method: str | None = None, seed: int | None = None, grid_dir: str | None = None,
                     grid_images: int = 64, fid_stats: str = "", fid_weights: str = "", clip_model: str = "",
                     height: int | None = None, width: int | None = None) -> dict[str, Any]:
  """`metrics` (of COMMAND_METRICS) of a workdir's checkpoint (default: the latest), sampled
  with the run's config.eval settings unless given. Everything a metric loads, and every
  flag that does not fit, is checked before the model is loaded."""
  unknown = set(metrics) - set(COMMAND_METRICS)
  if unknown:
    raise errors.InvalidArgument(f"unknown --metrics {sorted(unknown)}; expected some of {list(COMMAND_METRICS)}")
  quality = [m for m in metrics if m in quality_lib.METRICS]
  if {"fid", "kid"} & set(quality) and not (fid_stats and fid_weights):
    raise errors.InvalidArgument(f"--metrics={','.join(quality)} needs --fid_stats (python -m jdiff.fid_stats) and "
                                 "--fid_weights (the FID Inception weights file)")
  if "clip_score" in quality and not clip_model:
    raise errors.InvalidArgument("--metrics=clip_score needs --clip_model (a transformers CLIPModel directory)")
  if grid_dir and "adherence" not in metrics:
    raise errors.InvalidArgument("--grids draws the shapes benchmark's images: add adherence to --metrics")
  if (height or width) and not quality:
    raise errors.InvalidArgument("--height/--width size the images of fid, kid and clip_score; the shapes "
                                 "benchmark (adherence) is square at the training resolution")
  scorers = quality_lib.Scorers.load(quality, fid_stats=fid_stats or "", fid_weights=fid_weights or "",
                                     clip_model=clip_model or "") if quality else None
  model = inference.load(workdir, step)
  result = {}
  if "adherence" in metrics:
    result.update(benchmark.evaluate(model, num_samples=num_samples, num_steps=num_steps, cfg_scale=cfg_scale,
                                     method=method, seed=seed, grid_dir=grid_dir, grid_images=grid_images))
  if scorers:
    e = model.config.eval
    side = model.networks.resolution
    size = inference.check_size(model, (height or side, width or side))
    prompts = quality_lib.prompts_for(num_samples, scorers.reference, model.config.data)
    result.update(n=len(prompts))
    if scorers.reference is not None:
      result.update(resize=scorers.reference.resize)
    result.update(quality_lib.evaluate(
        model, scorers, prompts, seed=e.seed if seed is None else seed,
        num_steps=e.num_steps if num_steps is None else num_steps,
        cfg_scale=e.cfg_scale if cfg_scale is None else cfg_scale, method=method or e.method, resolution=size))
  return result
