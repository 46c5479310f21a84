"""CLIP score: how well images match their prompts, as torchmetrics computes it,
100 x max(cos(image_embeds, text_embeds), 0), averaged over the pairs (Hessel et al., 2021).

The CLIP model comes from a local transformers CLIPModel directory (config.json, its
.safetensors weights and tokenizer files, e.g. a copy of openai/clip-vit-large-patch14;
nothing is downloaded). Images are prepared as CLIPImageProcessor prepares them: the short side
resized to the model's image size with PIL's bicubic filter, centre-cropped square, scaled
to [0, 1] and normalised with CLIP's channel mean and std.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from PIL import Image

from jdiff import errors
from jdiff.interop import clip as clip_io
from jdiff.interop import mapping as M
from jdiff.interop import sd3_pipeline
from jdiff.models import clip

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def preprocess(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, H, W, 3] -> float32 [N, size, size, 3]: short side to `size` (PIL bicubic, the
  long side scaled and truncated to an integer), centre crop, /255, (x - MEAN) / STD."""
  out = np.empty((len(images), size, size, 3), np.float32)
  for i, image in enumerate(np.asarray(images)):
    h, w = image.shape[:2]
    if h <= w:
      new_h, new_w = size, int(size * w / h)
    else:
      new_h, new_w = int(size * h / w), size
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out[i] = resized[top:top + size, left:left + size]
  return (out / 255.0 - MEAN) / STD


def score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
  """Per pair: 100 x max(cosine similarity, 0)."""
  a = image_embeds / np.linalg.norm(image_embeds, axis=-1, keepdims=True)
  b = text_embeds / np.linalg.norm(text_embeds, axis=-1, keepdims=True)
  return 100.0 * np.maximum(np.sum(a * b, axis=-1), 0.0)


class ClipScorer:
  """CLIP image and text embeddings (jitted) and the CLIP score of (image, prompt) pairs."""

  def __init__(self, vision_kwargs: Mapping[str, Any], vision_params: Any, text_kwargs: Mapping[str, Any],
               text_params: Any, tokenizer, batch_size: int = 64):
    if not vision_kwargs.get("projection_dim") or not text_kwargs.get("projection_dim"):
      raise errors.InvalidArgument("the CLIP score compares projected embeddings: the model needs projection_dim")
    self.vision = clip.CLIPVision(**vision_kwargs)
    self.text = clip.CLIPText(**text_kwargs)
    self.vision_params, self.text_params = jax.device_put(vision_params), jax.device_put(text_params)
    self.tokenizer, self.batch_size = tokenizer, batch_size
    self._images = jax.jit(lambda p, x: self.vision.apply({"params": p}, x)["image_embeds"])
    self._texts = jax.jit(lambda p, ids: self.text.apply({"params": p}, ids)["text_embeds"])

  @classmethod
  def load(cls, path: str, batch_size: int = 64) -> "ClipScorer":
    """A transformers CLIPModel directory (config.json, .safetensors, tokenizer files)."""
    if not os.path.isdir(path):
      raise errors.NotFound(f"no CLIP model directory at {path!r} (a transformers CLIPModel saved with its "
                            "tokenizer; jdiff downloads nothing)")
    config, state = M.read_config(path), M.load_safetensors(path)
    vision_kwargs = clip_io.vision_kwargs(config["vision_config"], config.get("projection_dim"))
    text_kwargs, text_params = clip_io.text_from_clip_model(config, state)
    tokenizer = sd3_pipeline.load_tokenizer(path)
    return cls(vision_kwargs, clip_io.vision_to_jdiff(config, state), text_kwargs, text_params, tokenizer, batch_size)

  def _batched(self, fn, params, x: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(x), self.batch_size):
      batch = x[start:start + self.batch_size]
      n = len(batch)
      if n < self.batch_size and len(x) > self.batch_size:  # one compiled shape
        batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - n, axis=0)])
      out.append(np.asarray(fn(params, batch), np.float64)[:n])
    return np.concatenate(out)

  def image_embeds(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, projection_dim]."""
    return self._batched(self._images, self.vision_params, preprocess(images, self.vision.image_size))

  def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> [N, projection_dim] (tokens cut at the model's max length)."""
    ids = np.asarray(self.tokenizer(list(prompts), padding="max_length", max_length=self.text.max_len,
                                    truncation=True).input_ids, np.int32)
    return self._batched(self._texts, self.text_params, ids)

  def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """Per pair CLIP scores [N]; their mean is torchmetrics' CLIPScore."""
    if len(images) != len(prompts):
      raise errors.InvalidArgument(f"{len(images)} images for {len(prompts)} prompts")
    return score(self.image_embeds(np.asarray(images)[..., :3]), self.text_embeds(prompts))
