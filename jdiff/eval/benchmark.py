"""The shapes caption-adherence benchmark: generate from the benchmark prompts, read the
images back with the analyser, report accuracy per attribute for seen and held-out pairs."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jdiff import inference
from jdiff.data import shapes
from jdiff.eval import adherence
from jdiff.eval import render_quality

# seen: trained colour-shape pairs; held_out: unseen pairs of seen words; new_color: a colour
# word absent from pre-training (learned by a tune stage on the 'new_color' data split).
SPLITS = {"seen": "train", "held_out": "held_out", "new_color": "new_color"}
RIGHT, WRONG = (40, 170, 60), (210, 40, 40)  # frame colours of the verdict grids
FRAME = 2  # pixels


def write_verdict_grid(images: np.ndarray, prompts: list[str], verdicts: list[np.ndarray], path: str,
                       columns: int = 8, upscale: int = 4) -> None:
  """`path` (.png): the images framed green where the analyser read all four attributes right
  (`verdicts`: adherence.correct of each image) and red elsewhere; beside it a .txt naming, per
  image, its prompt and what was read wrong. What the analyser accepts and a person would not
  (reward hacking) shows up here."""
  framed, lines = [], []
  for i, (image, prompt, right) in enumerate(zip(images, prompts, verdicts)):
    tile = np.empty((image.shape[0] + 2 * FRAME, image.shape[1] + 2 * FRAME, 3), np.uint8)
    tile[:] = RIGHT if right.all() else WRONG
    tile[FRAME:-FRAME, FRAME:-FRAME] = image
    framed.append(tile)
    wrong = [a for a, r in zip(shapes.ATTRIBUTES, right) if not r]
    lines.append(f"{i}\t{'right' if not wrong else 'wrong: ' + ','.join(wrong)}\t{prompt}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  inference.save_png(inference.grid(np.stack(framed), columns=min(columns, len(framed))), path, upscale)
  with open(os.path.splitext(path)[0] + ".txt", "w") as f:
    f.write("\n".join(lines) + "\n")


def applies(config) -> bool:
  """Whether the benchmark can score a run: a model trained on the embedded shapes data (or
  its preference pairs) with the byte text encoder, whose prompts it can encode."""
  return config.data.source in ("shapes", "preference") and config.text.encoder == "bytes"


def evaluate(model: inference.Model, *, num_samples: int | None = None, num_steps: int | None = None,
             cfg_scale: float | None = None, method: str | None = None, seed: int | None = None,
             grid_dir: str | None = None, grid_images: int = 64, per_image: bool = False) -> dict[str, Any]:
  """{'seen': {color, shape, size, position, all, n, clean, residual, residual_se}, 'held_out':
  {...}, 'new_color': {...}}: adherence (jdiff.eval.adherence) and render quality of the same
  images (jdiff.eval.render_quality: the fraction within CLEAN of a clean render, and the mean
  distance to one in grey levels with its standard error);
  unset settings come from config.eval. `grid_dir`: also writes each split's first
  `grid_images` images as a verdict grid (write_verdict_grid) to grid_dir/<split>.png.
  `per_image`: each split also holds 'per_image': {'verdicts': one string per image of '1'
  (right) and '0' per attribute in shapes.ATTRIBUTES order, 'residual': its render residual},
  for statistics paired over the same prompts and noise (jdiff.recipes.stage_pipeline)."""
  e = model.config.eval
  num_samples = e.num_samples if num_samples is None else num_samples
  num_steps = e.num_steps if num_steps is None else num_steps
  out = {}
  for name, split in SPLITS.items():
    prompts = shapes.benchmark(split, num_samples)
    images = inference.generate(model, [p for p, _ in prompts], num_steps=num_steps,
                                cfg_scale=e.cfg_scale if cfg_scale is None else cfg_scale,
                                method=method or e.method, seed=e.seed if seed is None else seed)
    found = [adherence.analyse(image, with_layout=True) for image in images]  # once: for both scores
    verdicts = [adherence.verdict(f, a) for f, (_, a) in zip(found, prompts)]
    out[name] = adherence.tally(verdicts)
    residuals = render_quality.residuals(images, found)
    quality = render_quality.summarise(residuals)
    out[name].update(clean=quality["clean"], residual=quality["residual"], residual_se=quality["residual_se"])
    if per_image:
      out[name]["per_image"] = dict(verdicts=["".join("1" if r else "0" for r in v) for v in verdicts],
                                    residual=[round(float(r), 4) for r in residuals])
    if grid_dir:
      k = min(grid_images, len(prompts))
      write_verdict_grid(images[:k], [p for p, _ in prompts[:k]], verdicts[:k], os.path.join(grid_dir, f"{name}.png"))
  return out
