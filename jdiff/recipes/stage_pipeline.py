"""The whole pipeline: pretrain -> posttrain -> tune -> distill, one stage after another.

  python -m jdiff.stages --config=configs/stages.py:cpu --workdir=runs/stages

The pipeline config (configs/stages.py) holds a base training config and, per stage, the
fields that differ from it. Stage i trains in workdir/<name> with init_from = the previous
stage's workdir (its EMA weights, a fresh optimizer, the lineage recorded), or the workdir of
the earlier stage its own init_from names (a branch: e.g. dpo and grpo both from sft). A stage whose
workdir holds a checkpoint at its last step is done and skipped; an interrupted one resumes
from its latest checkpoint, so re-running the command continues where it stopped.

At the end every stage (plus the distillation teacher at table.teacher_steps) is evaluated
with the shapes caption-adherence benchmark, each with its own sampler settings, and the
table is written to workdir/stages.md and workdir/stages.json: adherence, and sampling
cost as steps x network forwards per step.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from jdiff import cli
from jdiff import config_checks
from jdiff import errors
from jdiff import inference
from jdiff.data import shapes
from jdiff.eval import benchmark
from jdiff.eval import on_policy as pairs_lib
from jdiff.eval import render_quality
from jdiff.train import trainer
from jdiff.workdir import checkpoint as ckpt_lib

log = logging.getLogger(__name__)
PICTURE = "stages.png"


def _apply(config: ml_collections.ConfigDict, overrides: Any, where: str) -> None:
  """Sets every field of `overrides` (nested) in `config`; a field the config lacks fails."""
  for key, value in overrides.items():
    if key not in config:
      raise errors.InvalidArgument(f"{where}.{key}: no such config field")
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      _apply(config[key], value, f"{where}.{key}")
    else:
      config[key] = value


def stage_configs(pipeline: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, str, Any]]:
  """[(name, stage workdir, training config)] in pipeline order, init_from chained."""
  order = [s.strip() for s in pipeline.order.split(",") if s.strip()]
  if not order:
    raise errors.InvalidArgument("config.order names no stage")
  missing = [s for s in order if s not in pipeline.stages]
  if missing:
    raise errors.InvalidArgument(f"config.order names stages {missing} that config.stages does not define")
  on_policy = _pair_stages(pipeline)
  unknown = [s for s in on_policy if s not in order]
  if unknown:
    raise errors.InvalidArgument(f"config.pairs.stages names {unknown}, which config.order does not run")
  if order[0] in on_policy:
    raise errors.InvalidArgument(
        f"config.pairs.stages: the first stage {order[0]!r} has no parent model to sample pairs from")
  out, previous, dirs = [], "", {}
  for name in order:
    c = ml_collections.ConfigDict(pipeline.base.to_dict())
    _apply(c, pipeline.stages[name], f"config.stages.{name}")
    parent = pipeline.stages[name].get("init_from", "")
    if parent and parent not in dirs:
      raise errors.InvalidArgument(f"config.stages.{name}.init_from={parent!r} names no stage that config.order runs "
                                   f"before it (earlier: {list(dirs)})")
    c.init_from = dirs[parent] if parent else previous
    stage_dir = dirs[name] = os.path.join(workdir, name)
    if name in on_policy:  # sampled from the parent by train_all before the stage trains
      c.data.pairs_dir = os.path.join(stage_dir, "pairs")
    c.lock()
    config_checks.validate(c)  # every stage before the first trains (the trainer prepares each again)
    out.append((name, stage_dir, c))
    previous = stage_dir
  return out


def _pair_stages(pipeline: ml_collections.ConfigDict) -> list[str]:
  pairs = pipeline.get("pairs")
  return [s.strip() for s in pairs.stages.split(",") if s.strip()] if pairs else []


def finished(stage_dir: str, num_steps: int) -> bool:
  """Whether `stage_dir` holds a checkpoint at (or past) num_steps."""

  if not os.path.isdir(ckpt_lib.checkpoint_dir(stage_dir)):
    return False
  ckpt = ckpt_lib.Checkpoints(stage_dir, read_only=True)
  latest = ckpt.latest_step()
  ckpt.close()
  return latest is not None and latest >= num_steps


def train_all(pipeline: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, str, Any]]:
  """Trains every stage that is not finished; returns stage_configs."""

  stages = stage_configs(pipeline, workdir)
  on_policy = _pair_stages(pipeline)
  for i, (name, stage_dir, config) in enumerate(stages):
    if finished(stage_dir, config.train.num_steps):
      log.info("stage %d/%d %s: finished in %s, skipped", i + 1, len(stages), name, stage_dir)
      continue
    log.info("stage %d/%d %s (%s, objective %s) in %s", i + 1, len(stages), name, config.stage,
             config.objective, stage_dir)
    if name in on_policy and not os.path.exists(os.path.join(config.data.pairs_dir, pairs_lib.FILE)):
      pairs = pipeline.pairs
      meta = pairs_lib.generate(config.init_from, config.data.pairs_dir, num=pairs.num,
                                preferred=pairs.get("preferred", "render"),
                                samples_per_caption=pairs.get("samples_per_caption", 1),
                                split=pairs.get("split") or None)
      log.info("stage %s: %d on-policy pairs from %d samples of %s", name, meta["num_pairs"], meta["num_sampled"],
               config.init_from)
    summary = trainer.train_and_evaluate(config, stage_dir)
    if summary["stopped_by"] != "num_steps":
      raise cli.Resumable(f"stage {name} stopped early ({summary['stopped_by']}) after saving a checkpoint; "
                          "run the command again to resume")
  return stages


def _row(label: str, model, config, num_samples: int, num_steps: int | None = None) -> dict[str, Any]:
  """One table row: `model` (a loaded stage) scored with its eval sampler (num_steps: override)."""

  e = model.config.eval
  num_steps = e.num_steps if num_steps is None else num_steps
  result = benchmark.evaluate(model, num_samples=num_samples, num_steps=num_steps, cfg_scale=e.cfg_scale,
                              per_image=True)
  forwards = inference.forwards_per_image(model.networks, num_steps, e.cfg_scale, e.method)
  return dict(name=label, stage=config.stage, objective=config.objective, train_steps=config.train.num_steps,
              resolution=config.data.resolution,
              sampler=f"{num_steps} x {forwards // num_steps}", forwards=forwards, cfg_scale=e.cfg_scale,
              guidance_embedded=bool(model.networks.denoiser.guidance_embed), adherence=result)


def picture_prompts(num: int) -> list[str]:
  """The prompts of the stage picture: seen and held-out benchmark prompts, alternating (every
  fifth: the benchmark steps through sizes and positions in order, and these vary both)."""
  seen, held_out = (shapes.benchmark(split, 5 * num)[::5] for split in ("train", "held_out"))
  return [p for pair in zip(seen, held_out) for p, _ in pair][:num]


def _samples(model, prompts: list[str], num_steps: int | None = None) -> np.ndarray:
  """A row of the stage picture: `prompts` drawn by `model` with its eval sampler and seed."""
  e = model.config.eval
  return inference.generate(model, prompts, num_steps=e.num_steps if num_steps is None else num_steps,
                            cfg_scale=e.cfg_scale, method=e.method, seed=e.seed)


def evaluate_all(pipeline: ml_collections.ConfigDict, stages: list[tuple[str, str, Any]]
                 ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
  """The table's rows: each stage with its own eval sampler (and `parent`, the stage it
  started from), plus the teacher row; and each row's samples of the picture prompts (the
  same prompts and noise for every row)."""

  t = pipeline.table
  rows, pictures = [], []
  prompts = picture_prompts(t.picture)
  names = {stage_dir: name for name, stage_dir, _ in stages}
  for name, stage_dir, config in stages:
    model = inference.load(stage_dir)
    rows.append(dict(_row(name, model, config, t.num_samples), parent=names.get(config.init_from)))
    pictures.append(_samples(model, prompts))
    if name == t.teacher:
      rows.append(dict(_row(f"{name} @ {t.teacher_steps} steps", model, config, t.num_samples, t.teacher_steps),
                       parent=name))
      pictures.append(_samples(model, prompts, t.teacher_steps))
  return rows, pictures


def picture(labels: list[str], samples: list[np.ndarray], side: int = 64) -> np.ndarray:
  """One row per stage: its label, then its samples scaled (nearest) to side x side, so
  stages at different resolutions line up. uint8 [rows * (side + 2) + 2, W, 3]."""
  label_width = 8 + 7 * max(len(label) for label in labels)
  scaled = [np.stack([np.asarray(Image.fromarray(x).resize((side, side), Image.Resampling.NEAREST)) for x in row])
            for row in samples]
  rows = []
  for label, row in zip(labels, scaled):
    strip = inference.grid(row, columns=len(row))
    text = Image.new("RGB", (label_width, strip.shape[0]), (255, 255, 255))
    ImageDraw.Draw(text).text((4, strip.shape[0] // 2 - 6), label, fill=(0, 0, 0))
    rows.append(np.concatenate([np.asarray(text), strip], axis=1)[:-2])  # rows share their 2-pixel gaps
  return np.concatenate(rows + [np.full((2,) + rows[0].shape[1:], 255, np.uint8)], axis=0)


def _mean(r: dict[str, float]) -> float:
  return sum(r[a] for a in ("color", "shape", "size", "position")) / 4


def standard_error(p: float, n: int) -> float:
  """Binomial standard error of a fraction p of n images."""
  return math.sqrt(p * (1.0 - p) / n) if n else float("nan")


def _estimate(split: dict[str, float], key: str = "all") -> tuple[float, float]:
  """(value of `key`, its standard error): the residual's own, else binomial."""
  if key == "residual":
    return split[key], split["residual_se"]
  return split[key], standard_error(split[key], split["n"])


def _per_image(row: dict[str, Any], split: str, key: str) -> np.ndarray | None:
  """float64 [N]: each image's score of `key` on `split` ('all', an attribute, or 'residual'),
  or None where the row has no per-image scores (a table written before they were kept)."""
  per_image = row["adherence"][split].get("per_image")
  if per_image is None:
    return None
  if key == "residual":
    return np.asarray(per_image["residual"], np.float64)
  verdicts = per_image["verdicts"]
  if key == "all":
    return np.array([v.count("1") == len(v) for v in verdicts], np.float64)
  i = shapes.ATTRIBUTES.index(key)
  return np.array([v[i] == "1" for v in verdicts], np.float64)


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """(mean of a - b, its standard error) over paired samples: the error of the per-sample
  differences, in which whatever both share (here the prompt and the noise) cancels."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
  return float(d.mean()), se


def effect(row: dict[str, Any], parent: dict[str, Any], split: str, key: str = "all") -> tuple[float, float]:
  """(change of `key` on `split` from the parent stage's row to this one, its standard
  error). Every stage is scored on the same prompts with the same noise, so the error is that
  of the per-prompt differences (`paired_difference`). Rows without per-image scores fall
  back to sqrt(se^2 + se'^2), which ignores the pairing and overstates the error. `key`:
  'all', an attribute, or 'residual' (render quality)."""
  a, b = _per_image(row, split, key), _per_image(parent, split, key)
  if a is not None and b is not None and len(a) == len(b):
    return paired_difference(a, b)
  (a, se_a), (b, se_b) = _estimate(row["adherence"][split], key), _estimate(parent["adherence"][split], key)
  return a - b, math.sqrt(se_a**2 + se_b**2)


def quality_drops(rows: list[dict[str, Any]]) -> list[str]:
  """One line per row whose seen images' artefacts rose from its parent's by more than twice
  the difference's standard error. Where the row of a preference or RL stage raised "all
  four" on a split, the line calls it what it likely is: reward hacking, the reward (or the
  preference) rising while what it does not measure degrades."""
  by_name, lines = {r["name"]: r for r in rows}, []
  for r in rows:
    parent = by_name.get(r.get("parent"))
    if parent is None or "residual" not in r["adherence"]["seen"] or "residual" not in parent["adherence"]["seen"]:
      continue
    q, q0 = r["adherence"]["seen"], parent["adherence"]["seen"]
    d, se = effect(r, parent, "seen", "residual")
    if d <= 2 * se:
      continue
    gains = [(s, effect(r, parent, s)[0]) for s in ("seen", "held_out")]
    gains = [f"{s.replace('_', '-')} all {g:+.3f}" for s, g in gains if g > 0]
    hacked = gains and r["objective"] in ("dpo", "grpo")
    what = f"reward hacking: {', '.join(gains)} while" if hacked else "quality drop:"
    lines.append(f"- {r['name']}: {what} artefacts rose {q0['residual']:.2f} -> {q['residual']:.2f} "
                 f"(+{d:.2f} ± {se:.2f}) from {parent['name']}")
  return lines


def markdown(rows: list[dict[str, Any]]) -> str:
  """The table in Markdown: 'all' = every attribute right (± its standard error); 'attr' =
  mean per-attribute accuracy; 'effect' = the change of 'all' from the stage it started from;
  'clean' and 'artefacts' = render quality of the seen images."""
  head = ("| stage | objective | train steps | resolution | sampling (steps x forwards) | forwards/image "
          "| seen all | effect | seen attr | held-out all | effect | held-out attr | new colour: colour | effect "
          "| clean | artefacts |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  by_name = {r["name"]: r for r in rows}

  def cell(r, split, key="all"):
    value, se = _estimate(r["adherence"][split], key)
    return f"{value:.3f} ± {se:.3f}"

  def change(r, split, key="all"):
    if r.get("parent") not in by_name:
      return ""
    d, se = effect(r, by_name[r["parent"]], split, key)
    return f"{d:+.3f} ± {se:.3f}"

  def quality(split):
    if "clean" not in split:  # a table of rows scored before render quality was
      return " | "
    return (f"{split['clean']:.3f} ± {standard_error(split['clean'], split['n']):.3f} | "
            f"{split['residual']:.2f} ± {split['residual_se']:.2f}")

  for r in rows:
    a = r["adherence"]
    lines.append(f"| {r['name']} | {r['objective']} | {r['train_steps']} | {r['resolution']} | {r['sampler']} | {r['forwards']} | "
                 f"{cell(r, 'seen')} | {change(r, 'seen')} | {_mean(a['seen']):.3f} | "
                 f"{cell(r, 'held_out')} | {change(r, 'held_out')} | {_mean(a['held_out']):.3f} | "
                 f"{cell(r, 'new_color', 'color')} | {change(r, 'new_color', 'color')} | "
                 f"{quality(a['seen'])} |")
  n = rows[0]["adherence"]["seen"]["n"] if rows else 0
  drops = quality_drops(rows)
  if drops:
    lines += ["", "Quality drops (artefacts up by more than two standard errors):", *drops]
  return "\n".join(lines) + (
      f"\n\n{n} prompts per split; ± one standard error (binomial). Effect: the change from the stage "
      "it started from (the teacher row: from the same model with its own sampler), ± the standard "
      "error of the per-prompt differences: every stage is scored on the same prompts and noise, "
      "so what a prompt makes easy or hard cancels (rows scored without per-image results add both "
      "stages' errors in quadrature instead). Guided samplers use CFG (2 forwards) unless guidance is embedded. Clean: "
      f"the fraction of the seen images within {render_quality.CLEAN:g} grey levels of a clean render of "
      "what they show; artefacts: their mean distance from it in grey levels "
      "(jdiff/eval/render_quality.py).\n")


def _write_table(workdir: str, rows: Any, table: str) -> None:
  """workdir/stages.json (the rows) and workdir/stages.md (the Markdown table)."""
  with open(os.path.join(workdir, "stages.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(workdir, "stages.md"), "w") as f:
    f.write(table)


def run(pipeline: ml_collections.ConfigDict, workdir: str) -> tuple[list[dict[str, Any]], str]:
  """Trains what is not finished, evaluates every stage, writes workdir/stages.{json,md} and
  the picture (workdir/stages.png: a row of samples per stage, same prompts and noise).
  Returns (rows, Markdown table)."""
  stages = train_all(pipeline, workdir)  # validates every stage's config before any training
  rows, samples = evaluate_all(pipeline, stages)
  table = markdown(rows)
  _write_table(workdir, rows, table)
  Image.fromarray(picture([r["name"] for r in rows], samples)).save(os.path.join(workdir, PICTURE))
  return rows, table


def _mean_and_error(values: list[float]) -> str:
  """'mean ± standard error of the mean' over seeds (just the mean for one seed)."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return f"{v.mean():.3f}"
  return f"{v.mean():.3f} ± {v.std(ddof=1) / math.sqrt(len(v)):.3f}"


def across_seeds(tables: dict[int, list[dict[str, Any]]]) -> str:
  """The table over seeds in Markdown: each row's 'all' on the seen and held-out splits, the
  new colour's colour accuracy and the seen images' artefacts, each with its effect (the change
  from the stage it started from, per seed), as the mean over seeds ± its standard error
  (sample standard deviation / sqrt(seeds)): the spread of what a run of the command gives,
  which includes the training's own randomness that one run's binomial errors leave out."""
  seeds = sorted(tables)
  names = [r["name"] for r in tables[seeds[0]]]
  for s in seeds:
    if [r["name"] for r in tables[s]] != names:
      raise errors.InvalidArgument(f"seed {s} has rows {[r['name'] for r in tables[s]]}, seed {seeds[0]} {names}")
  by_name = {s: {r["name"]: r for r in tables[s]} for s in seeds}
  columns = (("seen", "all"), ("held_out", "all"), ("new_color", "color"))
  head = ("| stage | sampling (steps x forwards) | seen all | effect | held-out all | effect | new colour: colour "
          "| effect | artefacts | effect |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for name in names:
    rows = [by_name[s][name] for s in seeds]
    parents = [by_name[s].get(r.get("parent")) for s, r in zip(seeds, rows)]
    cells = [name, rows[0]["sampler"]]
    for split, key in columns + (("seen", "residual"),):
      cells.append(_mean_and_error([r["adherence"][split][key] for r in rows]))
      if all(p is not None for p in parents):
        changes = [effect(r, p, split, key)[0] for r, p in zip(rows, parents)]
        cells.append(("+" if np.mean(changes) >= 0 else "") + _mean_and_error(changes))
      else:
        cells.append("")
    lines.append("| " + " | ".join(cells) + " |")
  n = tables[seeds[0]][0]["adherence"]["seen"]["n"]
  return "\n".join(lines) + (
      f"\n\nSeeds {', '.join(map(str, seeds))}, {n} prompts per split each; mean over seeds ± its standard "
      "error (sample standard deviation / sqrt(seeds)). Effect: the change from the stage each row started "
      "from, per seed. Artefacts: the seen images' mean distance from a clean render in grey levels. Each "
      "seed's own table (binomial errors, paired effects, quality drops) is in seed_<seed>/stages.md.\n")


def run_seeds(pipeline: ml_collections.ConfigDict, workdir: str, seeds: list[int]
              ) -> tuple[dict[int, list[dict[str, Any]]], str]:
  """`run` once per seed (pipeline.base.seed = seed) in workdir/seed_<seed>, then the table
  over seeds (`across_seeds`) in workdir/stages.md and every seed's rows in
  workdir/stages.json. Returns ({seed: rows}, Markdown table)."""
  if not seeds or len(set(seeds)) != len(seeds):
    raise errors.InvalidArgument(f"seeds {seeds}: give distinct seeds")
  tables = {}
  for seed in seeds:
    p = pipeline.copy_and_resolve_references()
    p.base.seed = seed
    log.info("seed %d: %s", seed, os.path.join(workdir, f"seed_{seed}"))
    tables[seed] = run(p, os.path.join(workdir, f"seed_{seed}"))[0]
  table = across_seeds(tables)
  _write_table(workdir, {str(s): rows for s, rows in tables.items()}, table)
  return tables, table
