"""Image quality and prompt alignment of a model: FID and KID against reference statistics
(eval/fid.py) and the CLIP score against the prompts (eval/clip_score.py), from one set of
generated images (one per prompt, in chunks, each image's noise fixed by its index)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import tqdm

from jdiff import errors
from jdiff import inference
from jdiff.data import files, sources
from jdiff.eval import clip_score as clip_lib
from jdiff.eval import fid as fid_lib

METRICS = ("fid", "kid", "clip_score")


def source_captions(data_cfg: Mapping[str, Any], num: int, split: str = "train") -> list[str]:
  """The captions of the first `num` records of config.data's source (cycled if it has fewer;
  one of a record's alternatives, drawn as training draws it in its first epoch)."""
  source = sources.make_source(data_cfg, split)
  out = [files.caption_choice(source[i % len(source)].get("caption", ""), 0, i % len(source)) for i in range(num)]
  if not any(out):
    raise errors.InvalidArgument(f"the first {num} records of {source!r} have no caption to prompt with")
  return out


def prompts_for(num_samples: int | None, reference: fid_lib.Reference | None, data_cfg: Mapping[str, Any] | None
                ) -> list[str]:
  """Prompts of the generated images: the reference images' captions when the FID statistics
  hold them (FID then compares like with like), else the captions of config.data; cycled to
  `num_samples` (default: one per reference image, or 1000)."""
  if reference is not None and reference.captions:
    captions = reference.captions
    num = num_samples or len(captions)
    return [captions[i % len(captions)] for i in range(num)]
  if data_cfg is None:
    raise errors.InvalidArgument("no prompts: the FID statistics hold no captions and no data config was given")
  return source_captions(data_cfg, num_samples or 1000)


@dataclasses.dataclass(frozen=True)
class Scorers:
  """What `metrics` need, loaded once: the Inception network and reference statistics (fid,
  kid), the CLIP model (clip_score)."""

  metrics: tuple[str, ...]
  features: fid_lib.Features | None = None
  reference: fid_lib.Reference | None = None
  clip: clip_lib.ClipScorer | None = None

  @classmethod
  def load(cls, metrics: Sequence[str], *, fid_stats: str = "", fid_weights: str = "", clip_model: str = "",
           batch_size: int = 64) -> "Scorers":
    unknown = set(metrics) - set(METRICS)
    if unknown:
      raise errors.InvalidArgument(f"unknown metrics {sorted(unknown)}; expected some of {METRICS}")
    features = reference = clip = None
    inception = sorted({"fid", "kid"} & set(metrics))
    if inception:
      if not (fid_stats and fid_weights):
        raise errors.InvalidArgument(f"{inception} need reference statistics (python -m jdiff.fid_stats) and the "
                                     "FID Inception weights file")
      reference = fid_lib.Reference.load(fid_stats)
      if "kid" in metrics and reference.features is None:
        raise errors.InvalidArgument(f"{fid_stats} holds no features (KID compares feature sets): write it with "
                                     "python -m jdiff.fid_stats")
      features = fid_lib.Features.load(fid_weights, reference.resize, batch_size)
    if "clip_score" in metrics:
      if not clip_model:
        raise errors.InvalidArgument("clip_score needs a CLIP model directory (a transformers CLIPModel)")
      clip = clip_lib.ClipScorer.load(clip_model, batch_size)
    return cls(tuple(m for m in METRICS if m in metrics), features, reference, clip)


def evaluate(model: inference.Model, scorers: Scorers, prompts: Sequence[str], *, seed: int = 0,
             **sampler: Any) -> dict[str, float]:
  """The scorers' metrics of `model`'s images, one per prompt (sampler settings as
  inference.generate; image i's noise from fold_in(seed, i))."""
  metrics, features, reference, clip = scorers.metrics, scorers.features, scorers.reference, scorers.clip
  inception = {"fid", "kid"} & set(metrics)
  chunk = max(features.batch_size if features else 64, model.config.sample.batch_size)
  feats, scores = [], []
  for start in tqdm.trange(0, len(prompts), chunk, desc="generate", unit="batch", dynamic_ncols=True):
    batch = list(prompts[start:start + chunk])
    images = inference.generate(model, batch, seed=seed, first_index=start, **sampler)[..., :3]
    if inception:
      feats.append(features(images))
    if "clip_score" in metrics:
      scores.append(clip(images, batch))
  out: dict[str, float] = {}
  if inception:
    feats = np.concatenate(feats)
    if "fid" in metrics:
      out["fid"] = fid_lib.frechet_distance(*fid_lib.statistics(feats), reference.mu, reference.sigma)
    if "kid" in metrics:
      out["kid"], out["kid_std"] = fid_lib.kid(feats, reference.features)
  if "clip_score" in metrics:
    out["clip_score"] = float(np.mean(np.concatenate(scores)))
  return out
