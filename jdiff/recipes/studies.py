"""Controlled training studies: the same base config trained in several variants over
several seeds, each model scored on the shapes benchmark (caption adherence, sampled with a
few and with many steps) and by its validation loss, and one table of means and spreads.

  python -m jdiff.study --study=timesteps --workdir=runs/study_timesteps [--seeds=3]
                        [--config=configs/mmdit_256.py:cpu] [--config.x=y ...]

Studies (STUDIES):
  timesteps  training-time densities of SD3's Table 1: uniform, logit-normal(0, 1),
             logit-normal(0.5, 0.6), mode(1.29), cosmap; equal steps.
  shift      a model at twice the base resolution trained with and without the
             resolution-aware shift, each sampled with and without it.
  arch       MMDiT (joint attention over text and image tokens) against DiT (the pooled
             caption through adaLN only) at the same width and depth and equal training
             FLOPs (DiT's cheaper step gets proportionally more steps).

Runs live in WORKDIR/<variant>/seed<k>/ (ordinary training workdirs); a finished run keeps
its scores in result.json there, so the command resumes where it stopped (an interrupted
run resumes from its checkpoint). The table goes to WORKDIR/study.md and
WORKDIR/study.json after every finished run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
import scipy.stats

from jdiff import cli
from jdiff import errors
from jdiff.train import flops as flops_lib
from jdiff import inference
from jdiff import networks as networks_lib
from jdiff.eval import benchmark
from jdiff.eval import validation
from jdiff.train import optim
from jdiff.train import trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """One way of sampling a trained model for the adherence scores."""

  name: str
  num_steps: int
  shift: Mapping[str, Any] | None = None  # overrides of config.diffusion.shift (None: the model's own)


@dataclasses.dataclass(frozen=True)
class Study:
  """Variants (name, config overrides) trained from one base config, scored the same way."""

  description: str
  variants: tuple[tuple[str, Mapping[str, Any]], ...]
  sampling: tuple[Sampling, ...] = (Sampling("5 steps", 5), Sampling("25 steps", 25))
  base: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # overrides of every variant
  equal_compute: bool = False  # scale each variant's steps to the first variant's training FLOPs


def _base_model(field: str):
  """An override that takes the base config's denoiser size (e.g. its width), whatever the
  variant table of the base model gives it."""
  return lambda base: getattr(networks_lib.build_networks(base).denoiser, field)


def _timesteps(kind: str, **kw) -> dict[str, Any]:
  return {"diffusion.timesteps.kind": kind, **{f"diffusion.timesteps.{k}": v for k, v in kw.items()}}


STUDIES = {
    "timesteps": Study(
        "Training timestep density (SD3 Table 1), equal steps",
        (("uniform", _timesteps("uniform")),
         ("lognorm(0.00, 1.00)", _timesteps("logit_normal", mean=0.0, std=1.0)),
         ("lognorm(0.50, 0.60)", _timesteps("logit_normal", mean=0.5, std=0.6)),
         ("mode(1.29)", _timesteps("mode", scale=1.29)),
         ("cosmap", _timesteps("cosmap")))),
    "shift": Study(
        "Resolution-aware shift at twice the base resolution, in training and in sampling",
        (("train shift", {"diffusion.shift.kind": "sd3"}),
         ("train no shift", {"diffusion.shift.kind": "none"})),
        sampling=(Sampling("sample shift, 25 steps", 25, {"kind": "sd3"}),
                  Sampling("sample no shift, 25 steps", 25, {"kind": "none"})),
        base={"data.resolution": 2}),  # a factor: see _resolve
    "arch": Study(
        "MMDiT (joint attention) against DiT (pooled caption in adaLN), equal training FLOPs",
        (("MMDiT", {}),
         ("DiT", {"model.name": "dit", "model.variant": "S/4", "model.depth": _base_model("depth"),
                  "model.width": _base_model("width"), "model.num_heads": _base_model("num_heads")})),
        equal_compute=True),
}


def _resolve(base: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The study's base overrides as absolute values: 'data.resolution' is a factor of the base
  config's resolution (the model's patch grid and shift base stay those of the base)."""
  out = dict(overrides)
  if "data.resolution" in out:
    out["data.resolution"] = int(base.data.resolution * out["data.resolution"])
  return out


def variant_config(base: ml_collections.ConfigDict, study: Study, variant: str, seed: int
                   ) -> ml_collections.ConfigDict:
  """The config of one run: base + the study's overrides + the variant's + seed (locked)."""
  overrides = {k: v(base) if callable(v) else v for k, v in dict(study.variants)[variant].items()}
  config = copy.deepcopy(base)
  config.lock()  # an override naming no config field fails (KeyError)
  # eval.*: scored after training by the study itself (several sampler settings).
  config.update_from_flattened_dict({**_resolve(base, study.base), **overrides, "seed": seed,
                                     "eval.at_end": False, "eval.every": 0})
  if study.equal_compute and variant != study.variants[0][0]:
    reference = variant_config(base, study, study.variants[0][0], seed)
    ratio = train_flops(reference) / train_flops(config)
    config.train.num_steps = max(1, int(round(config.train.num_steps * ratio)))
  return config


def train_flops(config: ml_collections.ConfigDict) -> float:
  """Analytic training FLOPs of a whole run: steps x jdiff.train.flops' count per step."""
  networks = networks_lib.build_networks(config)
  per_step = flops_lib.model_flops(networks, config.train.batch_size, networks.seq_len(),
                                   optim.trains_text(networks, config.optim.trainable))["train_step"]
  return float(per_step) * config.train.num_steps


def score(config: ml_collections.ConfigDict, workdir: str, study: Study) -> dict[str, Any]:
  """Validation loss and, per sampling setting, adherence of the run's final EMA model."""
  model = inference.load(workdir)
  out = dict(val_loss=validation.loss(model.networks, model.params, model.config)["val_loss"],
             train_flops=train_flops(config), num_steps=config.train.num_steps, adherence={})
  for s in study.sampling:
    sampled = model
    if s.shift is not None:
      cfg = copy.deepcopy(model.config)
      cfg.diffusion.shift.update(dict(s.shift))  # existing fields only: a typo fails
      sampled = dataclasses.replace(model, config=cfg)
    out["adherence"][s.name] = benchmark.evaluate(sampled, num_steps=s.num_steps)
  return out


def run(study_name: str, base: ml_collections.ConfigDict, workdir: str, seeds: int) -> dict[str, Any]:
  """Trains and scores every (variant, seed) not yet done, rewriting the table after each."""
  study = STUDIES[study_name]
  if not benchmark.applies(base):
    raise errors.InvalidArgument("a study scores runs on the shapes benchmark: the base config must train on "
                                 "data.source='shapes' with text.encoder='bytes'")
  os.makedirs(workdir, exist_ok=True)
  for seed in range(seeds):  # seed-major: a partial study has every variant at the first seeds
    for variant, _ in study.variants:
      run_dir = os.path.join(workdir, _slug(variant), f"seed{seed}")
      result_path = os.path.join(run_dir, "result.json")
      if os.path.exists(result_path):
        continue
      config = variant_config(base, study, variant, seed)
      log.info("study %s: %s, seed %d (%d steps) in %s", study_name, variant, seed, config.train.num_steps, run_dir)
      summary = trainer.train_and_evaluate(config, run_dir)
      if summary["stopped_by"] != "num_steps":
        raise cli.Resumable(f"run {run_dir} stopped early ({summary['stopped_by']}) after saving a checkpoint; "
                            "run the study again to resume")
      result = dict(variant=variant, seed=seed, **score(config, run_dir, study))
      with open(result_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
      os.replace(result_path + ".tmp", result_path)
      write_table(study_name, workdir, seeds)
  return write_table(study_name, workdir, seeds)


def collect(study_name: str, workdir: str) -> list[dict[str, Any]]:
  """The finished runs' results in the study's variant order, then by seed."""
  study = STUDIES[study_name]
  rows = []
  for variant, _ in study.variants:
    vdir = os.path.join(workdir, _slug(variant))
    seeds = [d for d in os.listdir(vdir) if d.startswith("seed")] if os.path.isdir(vdir) else []
    for d in sorted(seeds, key=lambda s: int(s[4:])):
      path = os.path.join(vdir, d, "result.json")
      if os.path.exists(path):
        with open(path) as f:
          rows.append(json.load(f))
  return rows


def summarize(study_name: str, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per variant: the mean and standard deviation over seeds of the validation loss and of
  the 'all four' adherence (seen, held-out) per sampling setting, and the average rank over
  those metrics (1 = best; lower loss, higher adherence), as in SD3's Table 1."""
  study = STUDIES[study_name]
  metrics = [("val_loss", lambda r: r["val_loss"], False)]
  for s in study.sampling:
    for split in ("seen", "held_out"):
      metrics.append((f"{split} all, {s.name}", lambda r, s=s, sp=split: r["adherence"][s.name][sp]["all"], True))
  table = []
  for variant, _ in study.variants:
    runs = [r for r in rows if r["variant"] == variant]
    if not runs:
      continue
    entry = dict(variant=variant, seeds=len(runs), num_steps=runs[0]["num_steps"],
                 train_flops=runs[0]["train_flops"], metrics={})
    for name, get, _ in metrics:
      values = np.array([get(r) for r in runs], float)
      entry["metrics"][name] = dict(mean=float(values.mean()),
                                    std=float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    table.append(entry)
  for name, _, higher_better in metrics:
    means = np.array([e["metrics"][name]["mean"] for e in table])
    order = -means if higher_better else means
    for e, rank in zip(table, scipy.stats.rankdata(order)):  # 1 = best; ties share their mean rank
      e["metrics"][name]["rank"] = float(rank)
  for e in table:
    e["average_rank"] = float(np.mean([m["rank"] for m in e["metrics"].values()]))
  return table


def write_table(study_name: str, workdir: str, seeds: int) -> dict[str, Any]:
  """study.json (every run and the summary) and study.md (the table) in workdir."""
  rows = collect(study_name, workdir)
  table = summarize(study_name, rows)
  study = STUDIES[study_name]
  out = dict(study=study_name, description=study.description, seeds_requested=seeds, runs=rows, summary=table)
  with open(os.path.join(workdir, "study.json"), "w") as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write(markdown(study_name, table))
  return out


def markdown(study_name: str, table: Sequence[Mapping[str, Any]]) -> str:
  """The summary as a Markdown table: mean ± standard deviation over seeds, rank in brackets."""
  study = STUDIES[study_name]
  if not table:
    return f"# Study: {study.description}\n\nNo finished runs yet.\n"
  names = list(table[0]["metrics"])
  head = ["variant", "seeds", "steps", "train FLOP"] + names + ["average rank"]
  lines = [f"# Study: {study.description}", "",
           "Mean ± standard deviation over seeds; (rank) among the variants, 1 = best. "
           "val_loss: velocity error at 8 evenly spaced t on held-apart images (lower is better); "
           "'all': fraction of benchmark images with colour, shape, size and position all right.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for e in table:
    cells = [e["variant"], str(e["seeds"]), str(e["num_steps"]), f"{e['train_flops']:.3g}"]
    for n in names:
      m = e["metrics"][n]
      digits = 4 if n == "val_loss" else 2
      cells.append(f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f} ({m['rank']:g})")
    cells.append(f"{e['average_rank']:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("_")

