"""Precompute VAE latents and text embeddings of a dataset with a pipeline's frozen encoders
(config.text.encoder: SD3's or Flux's recipe; the format: jdiff/data/latents.py).

  python -m jdiff.cache --config=configs/sd3_tune.py --config.init_from=runs/sd35_base \\
      --out=runs/cache_shapes_256 [--num_records=20000 --batch_size=16]

Then train with --config.data.source=cache --config.data.cache_dir=OUT.
"""

import json
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
import tqdm

from jdiff.data import decode, latents, files, pipeline, pixels, sources
from jdiff import errors
from jdiff.interop import sd3_pipeline

log = logging.getLogger(__name__)



def _batches(source, indices: Sequence[int], batch_size: int, resolution: int | tuple[int, int], seed: int,
             loss_mask: str = "none"):
  """Yields (indices, {'image': uint8 [b, h, w, 3], and 'mask' [b, h, w, 1] under data.loss_mask},
  captions) of decodable records; logs the rest. A record with alternative captions is cached
  with one of them (drawn from seed and index)."""
  keep, decoded, captions = [], [], []
  for i in indices:
    try:
      record = source[int(i)]
      caption = files.caption_choice(record["caption"], seed, int(i))
      decoded.append(decode.decode_image(record, resolution, loss_mask))
      captions.append(caption)
      keep.append(int(i))
    except Exception as e:  # a broken record is skipped, as in training
      log.warning("skipping record %d: %r", i, e)
    if len(keep) == batch_size:
      yield keep, {k: np.stack([d[k] for d in decoded]) for k in decoded[0]}, captions
      keep, decoded, captions = [], [], []
  if keep:
    yield keep, {k: np.stack([d[k] for d in decoded]) for k in decoded[0]}, captions


def write(config, out_dir: str, *, split: str = "train", num_records: int | None = None, batch_size: int = 8,
          records_per_file: int = 4096, dtype: str = "float16") -> dict[str, Any]:
  """Encodes config.data's first `num_records` records (default: all) into `out_dir`."""
  if config.data.source == "cache":
    raise errors.InvalidArgument("config.data.source names the cache itself; set the source to read (e.g. shapes)")
  if not config.autoencoder.path or config.text.encoder not in sd3_pipeline.TEXT_RECIPES:
    raise errors.InvalidArgument(f"the cache needs config.autoencoder.path (a VAE) and text.encoder in "
                                 f"{tuple(sd3_pipeline.TEXT_RECIPES)} with text.pipeline (its text encoders)")
  source = sources.make_source(config.data, split)
  n = len(source) if num_records is None else min(num_records, len(source))
  # (pixel shape, record indices) per group encoded together: one square group, or a group per
  # aspect-ratio bucket (data.buckets), whose records keep their bucket in BUCKETS.
  factor = sd3_pipeline.vae_geometry(config.autoencoder.path)["factor"]  # pixels per latent
  if config.data.buckets.sides:
    raise errors.InvalidArgument(f"data.buckets.sides={tuple(config.data.buckets.sides)}: a latent cache is "
                                 "written at one resolution (data.resolution) or in aspect-ratio buckets "
                                 "(data.buckets.pixels)")
  if config.data.buckets.pixels:
    multiple = factor * config.model.patch_size
    if config.data.buckets.step % multiple:
      raise errors.InvalidArgument(f"data.buckets.step={config.data.buckets.step} must be a multiple of the VAE "
                                   f"factor x model.patch_size = {multiple} pixels")
    shapes, which = pipeline.assign_buckets(config.data.buckets, source)
    which = which[:n]
    groups = [(shape, np.flatnonzero(which == b)) for b, shape in enumerate(shapes) if (which == b).any()]
  else:
    groups = [((config.data.resolution,) * 2, np.arange(n))]
  vae_model, vae_params = sd3_pipeline.load_vae(config.autoencoder.path, config.autoencoder.dtype)
  text = sd3_pipeline.load_text_encoder(config.text.encoder, config.text.pipeline, config.text.t5_len,
                                        config.text.dtype)
  encode_images = jax.jit(lambda p, x: vae_model.apply(p, pixels.from_uint8(x),
                                                       method=vae_model.encode))
  os.makedirs(out_dir, exist_ok=True)
  store = np.dtype(dtype)
  records = latents.RecordWriter(out_dir, records_per_file)
  bar = tqdm.tqdm(total=sum(len(i) for _, i in groups), desc="cache", unit="img", dynamic_ncols=True)
  bucket_of_record = []
  try:
    for number, (shape, indices) in enumerate(groups):
      for idx, decoded, captions in _batches(source, indices, batch_size, shape, config.seed, config.data.loss_mask):
        mean, logvar = jax.device_get(encode_images(vae_params, decoded["image"]))
        cond = text.encode(captions)
        for j in range(len(idx)):
          record = dict(latent_mean=mean[j].astype(store), latent_logvar=logvar[j].astype(store),
                        context=cond["context"][j].astype(store), pooled=np.asarray(cond["pooled"][j]))
          if "mask" in decoded:
            record[latents.MASK_KEY] = latents.latent_mask(decoded["mask"][j], factor)
          records.write(record, captions[j], idx[j])
        bucket_of_record.extend([number] * len(idx))
        bar.update(len(idx))
  finally:
    bar.close()
    records.close()
  written = records.written
  if written == 0:
    raise errors.InvalidArgument(f"no record of {n} could be decoded")
  null = text.encode([""])
  prompts = list(config.sample.prompts)
  pc = text.encode(prompts) if prompts else dict(context=np.zeros((0,) + null["context"].shape[1:]),
                                                 pooled=np.zeros((0,) + null["pooled"].shape[1:]))
  np.savez(os.path.join(out_dir, latents.CONDITIONING), null_context=null["context"][0], null_pooled=null["pooled"][0],
           prompts=np.array(prompts, dtype=np.str_), prompt_context=pc["context"], prompt_pooled=pc["pooled"])
  channels = int(mean.shape[-1])
  bucketed = {}
  if config.data.buckets.pixels:
    np.save(os.path.join(out_dir, latents.BUCKETS), np.asarray(bucket_of_record, np.int16))
    bucketed = dict(buckets=[[h // factor, w // factor] for (h, w), _ in groups],
                    bucket_pixels=[list(shape) for shape, _ in groups])
  side = config.data.resolution // factor  # latent_shape: the square data.resolution's (sampling)
  meta = records.write_meta(
      skipped=n - written, resolution=config.data.resolution, loss_mask=config.data.loss_mask, **bucketed,
      latent_shape=[side, side, channels], context_shape=list(cond["context"].shape[1:]),
      pooled_dim=int(cond["pooled"].shape[-1]), dtype=store.name,
      scaling_factor=float(vae_model.scaling_factor), shift_factor=float(vae_model.shift_factor),
      autoencoder=os.path.abspath(config.autoencoder.path), text_pipeline=os.path.abspath(config.text.pipeline),
      t5_len=config.text.t5_len, text_encoder=config.text.encoder, data=json.loads(config.data.to_json_best_effort()), split=split,
  )
  log.info("cached %d records (%d skipped) in %s", written, n - written, out_dir)
  return meta
