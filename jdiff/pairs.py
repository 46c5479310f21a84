"""On-policy preference pairs: the model's own wrong samples as the rejected images.

  python -m jdiff.pairs --workdir=SFT_DIR --out=PAIRS_DIR [--num=2048 --num_steps=20 --cfg_scale=3]

Samples the workdir's model (EMA weights) for the captions of shapes training records
0..num-1, reads each sample back with the adherence analyser, and keeps those that get at
least one attribute of their caption wrong. A DPO stage with data.source='preference' and
data.pairs_dir=PAIRS_DIR then pairs each kept sample (rejected) with the caption's own
render (preferred): the rejected images are exactly the mistakes the model makes (the
self-play idea of SPIN-Diffusion, judged by the analyser instead of a reward model).

Writes PAIRS_DIR/pairs.npz (index [K] record indices, image_l uint8 [K, R, R, 3], wrong
[K, 4] which attributes were wrong) and PAIRS_DIR/meta.json (source workdir and step,
split, seed, sampler settings, the samples' adherence).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from absl import flags
import numpy as np

from jdiff import cli
from jdiff import errors
from jdiff import inference
from jdiff.data import shapes, sources
from jdiff.eval import adherence

log = logging.getLogger("jdiff.pairs")

FILE = sources.PAIRS_FILE


def generate(workdir: str, out: str, *, num: int = 2048, num_steps: int | None = None,
             cfg_scale: float | None = None, seed: int = 0, batch: int = 256) -> dict[str, Any]:
  """Writes the pairs of `workdir`'s model to `out`; returns the meta dict."""

  model = inference.load(workdir)
  data = model.config.data
  if data.source not in ("shapes", "preference"):
    raise errors.InvalidArgument(
        f"{workdir} trained on data.source={data.source!r}; on-policy pairs need the shapes data")
  split = data.shapes_split
  num_steps = model.config.eval.num_steps if num_steps is None else num_steps
  cfg_scale = model.config.eval.cfg_scale if cfg_scale is None else cfg_scale
  keep_index, keep_images, keep_wrong = [], [], []
  hits = np.zeros(len(shapes.ATTRIBUTES))
  t0 = time.time()
  for start in range(0, num, batch):
    idx = list(range(start, min(start + batch, num)))
    scenes = [shapes.scene_for(data.shapes_seed, split, i) for i in idx]
    images = inference.generate(model, [text for _, text in scenes], num_steps=num_steps, cfg_scale=cfg_scale,
                                seed=seed + start)
    for i, (scene, _), image in zip(idx, scenes, images):
      wrong = ~adherence.correct(image, scene.attributes())
      hits += ~wrong
      if wrong.any():
        keep_index.append(i)
        keep_images.append(image)
        keep_wrong.append(wrong)
    log.info("pairs: sampled %d/%d, kept %d (%.0f s)", idx[-1] + 1, num, len(keep_index), time.time() - t0)
  if not keep_index:
    raise errors.InvalidArgument(f"every one of the {num} samples matched its caption: no rejected images to pair")
  os.makedirs(out, exist_ok=True)
  meta = dict(workdir=os.path.abspath(workdir), step=model.step, split=split, shapes_seed=data.shapes_seed,
              resolution=int(keep_images[0].shape[0]), num_sampled=num, num_pairs=len(keep_index),
              num_steps=num_steps, cfg_scale=cfg_scale, seed=seed,
              adherence={a: float(h / num) for a, h in zip(shapes.ATTRIBUTES, hits)})
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  # Written last and renamed into place: pairs.npz exists only once complete.
  tmp = os.path.join(out, "pairs.tmp.npz")
  np.savez(tmp, index=np.array(keep_index, np.int64), image_l=np.stack(keep_images), wrong=np.stack(keep_wrong))
  os.replace(tmp, os.path.join(out, FILE))
  return meta


def main(argv):
  del argv
  cli.set_log_levels()
  meta = generate(_WORKDIR.value, _OUT.value, num=_NUM.value, num_steps=_NUM_STEPS.value,
                  cfg_scale=_CFG_SCALE.value, seed=_SEED.value)
  print(json.dumps(meta))


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the model whose samples are rejected.")
  _OUT = flags.DEFINE_string("out", None, "Directory to write pairs.npz and meta.json to.")
  _NUM = flags.DEFINE_integer("num", 2048, "Captions to sample (training records 0..num-1).", lower_bound=1)
  _NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Sampler steps (default: config.eval).", lower_bound=1)
  _CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: config.eval).", lower_bound=0)
  _SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.mark_flags_as_required(["workdir", "out"])
  cli.run(main)
