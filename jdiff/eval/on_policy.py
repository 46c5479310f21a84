"""On-policy preference pairs: the model's own wrong samples as the rejected images (the
library behind `python -m jdiff.pairs`).

Samples the workdir's model (EMA weights) for the captions of shapes records 0..num-1 of a
split, reads each sample back with the adherence analyser, and keeps those that get at least
one attribute of their caption wrong as rejected images. The preferred image of each pair is

  render  the caption's own render (default): the rejected images are exactly the mistakes
          the model makes (the self-play idea of SPIN-Diffusion, judged by the analyser
          instead of a reward model). Reads the data's images, so only seen splits.
  sample  another of the model's samples for the same caption that the analyser finds right
          in all four attributes (online DPO with a verifier, the DPO counterpart of GRPO's
          groups): samples_per_caption >= 2 images a caption, and each wrong one is paired
          with a right one of its caption, the cleanest first (render quality: the least
          distance from a clean render of what it shows), so that the preference does not
          also teach the right samples' artefacts; captions with none right give no pair.
          No image of the data is read, so the split may be 'held_out' (its captions as
          prompts).

A DPO stage with data.source='preference' and data.pairs_dir=PAIRS_DIR trains on them.
Writes PAIRS_DIR/pairs.npz (index [K] record indices, image_l uint8 [K, R, R, 3], wrong
[K, 4] which attributes were wrong; preferred=sample also image_w) and PAIRS_DIR/meta.json
(source workdir and step, split, seed, sampler settings, the samples' adherence).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from typing import Any, Sequence

import numpy as np

from jdiff import errors
from jdiff import inference
from jdiff.data import shapes, sources
from jdiff.eval import adherence, render_quality

log = logging.getLogger(__name__)

FILE = sources.PAIRS_FILE
PREFERRED = ("render", "sample")


def select(index: Sequence[int], images: np.ndarray, wrong: np.ndarray, preferred: str,
           artefacts: Sequence[float] | None = None) -> dict[str, np.ndarray]:
  """The pairs among one batch of samples: index [N] caption records (a caption's samples
  next to each other or not), images [N, R, R, 3], wrong bool [N, 4] (the analyser's verdict),
  artefacts [N] (render quality's residual; None: all alike).

  Every sample with an attribute wrong is a rejected image; preferred='sample' pairs the
  j-th wrong sample of a caption with its (j mod r)-th right one in order of artefacts,
  fewest first (r right samples), and drops it when r = 0. Returns the pairs.npz arrays
  ('image_w' with preferred='sample' only)."""
  index, wrong = np.asarray(index), np.asarray(wrong, bool)
  bad = wrong.any(1)
  keep = np.flatnonzero(bad)
  order = np.argsort(np.zeros(len(index)) if artefacts is None else np.asarray(artefacts, np.float64), kind="stable")
  out = {}
  if preferred == "sample":
    winners, kept, seen = [], [], collections.Counter()  # seen: wrong samples of each caption so far
    for i in keep:
      right = order[(index[order] == index[i]) & ~bad[order]]
      j = seen[index[i]]
      seen[index[i]] += 1
      if len(right):
        winners.append(right[j % len(right)])
        kept.append(i)
    keep = np.array(kept, np.int64)
    out["image_w"] = images[np.array(winners, np.int64)].reshape((len(keep),) + images.shape[1:])
  out.update(index=index[keep].astype(np.int64), image_l=images[keep].reshape((len(keep),) + images.shape[1:]),
             wrong=wrong[keep].reshape(len(keep), wrong.shape[1]))
  return out


def generate(workdir: str, out: str, *, num: int = 2048, num_steps: int | None = None,
             cfg_scale: float | None = None, seed: int = 0, batch: int = 256, preferred: str = "render",
             samples_per_caption: int = 1, split: str | None = None) -> dict[str, Any]:
  """Writes the pairs of `workdir`'s model to `out`; returns the meta dict."""
  if preferred not in PREFERRED:
    raise errors.InvalidArgument(f"preferred={preferred!r}: expected one of {PREFERRED}")
  if preferred == "sample" and samples_per_caption < 2:
    raise errors.InvalidArgument("preferred='sample' pairs a caption's right and wrong samples: samples_per_caption "
                                 f"must be >= 2 (got {samples_per_caption})")
  model = inference.load(workdir)
  data = model.config.data
  if data.source not in ("shapes", "preference"):
    raise errors.InvalidArgument(
        f"{workdir} trained on data.source={data.source!r}; on-policy pairs need the shapes data")
  split = split or data.shapes_split
  if split not in shapes.SPLITS:
    raise errors.InvalidArgument(f"split={split!r}: expected one of {shapes.SPLITS}")
  if split == "held_out" and preferred == "render":
    raise errors.InvalidArgument("split='held_out' holds the benchmark's unseen colour-shape pairs: a render of its "
                                 "captions would train on them; use preferred='sample' (the model's own right samples)")
  num_steps = model.config.eval.num_steps if num_steps is None else num_steps
  cfg_scale = model.config.eval.cfg_scale if cfg_scale is None else cfg_scale
  k = samples_per_caption
  parts = []
  hits = np.zeros(len(shapes.ATTRIBUTES))
  captions_per_batch = max(1, batch // k)
  t0 = time.time()
  for start in range(0, num, captions_per_batch):
    idx = np.repeat(np.arange(start, min(start + captions_per_batch, num)), k)  # a caption's samples side by side
    scenes = [shapes.scene_for(data.shapes_seed, split, int(i)) for i in idx[::k]]
    texts = [text for _, text in scenes for _ in range(k)]
    images = inference.generate(model, texts, num_steps=num_steps, cfg_scale=cfg_scale, seed=seed,
                                first_index=start * k)
    # One analysis per image serves the verdict and, for the right samples a pair may
    # prefer, the render quality (the wrong ones' is never read).
    found = [adherence.analyse(image, with_layout=preferred == "sample") for image in images]
    wrong = np.stack([~adherence.verdict(f, scenes[n // k][0].attributes()) for n, f in enumerate(found)])
    hits += (~wrong).sum(0)
    artefacts = None
    if preferred == "sample":
      artefacts = [0.0 if w.any() else render_quality.residual(image, f) for image, f, w in zip(images, found, wrong)]
    parts.append(select(idx, images, wrong, preferred, artefacts))
    log.info("pairs: sampled %d/%d captions x %d, %d pairs so far (%.0f s)", idx[-1] + 1, num, k,
             sum(len(p["index"]) for p in parts), time.time() - t0)
  found = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
  if not len(found["index"]):
    raise errors.InvalidArgument(
        f"no pairs among the {num * k} samples: " + ("every sample matched its caption" if preferred == "render" else
                                                     "no caption had both a right and a wrong sample"))
  os.makedirs(out, exist_ok=True)
  meta = dict(workdir=os.path.abspath(workdir), step=model.step, split=split, shapes_seed=data.shapes_seed,
              resolution=int(found["image_l"].shape[1]), num_sampled=num, samples_per_caption=k,
              preferred=preferred, num_pairs=len(found["index"]), num_steps=num_steps, cfg_scale=cfg_scale,
              seed=seed, adherence={a: float(h / (num * k)) for a, h in zip(shapes.ATTRIBUTES, hits)})
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  # Written last and renamed into place: pairs.npz exists only once complete.
  tmp = os.path.join(out, "pairs.tmp.npz")
  np.savez(tmp, **found)
  os.replace(tmp, os.path.join(out, FILE))
  return meta
