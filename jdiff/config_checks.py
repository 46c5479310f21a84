"""Validation of a jdiff config: every enumerated and numeric field checked before any
compute, so a bad value fails at start with a message that names the field (unknown names
are rejected by ml_collections itself: configs are locked). Like jdiff.config, this imports
nothing heavier than ml_collections."""

from __future__ import annotations

from typing import Any

import ml_collections

from jdiff import config as config_lib
from jdiff import errors


def _validate_buckets(c: ml_collections.ConfigDict) -> None:
  b = c.data.buckets
  if c.objective != "flow":
    raise errors.InvalidArgument(f"data.buckets trains objective 'flow' (got {c.objective!r})")
  if b.sides:
    if b.pixels:
      raise errors.InvalidArgument(f"data.buckets: set pixels={b.pixels} (aspect-ratio buckets) or sides={b.sides} "
                                   "(square resolutions), not both")
    if any(s <= 0 or s % c.model.patch_size for s in b.sides) or len(set(b.sides)) != len(b.sides):
      raise errors.InvalidArgument(f"data.buckets.sides={b.sides} must be distinct positive multiples of "
                                   f"model.patch_size={c.model.patch_size}")
    if c.data.source == "cache":
      raise errors.InvalidArgument("data.buckets.sides: a latent cache keeps the resolution it was written at")
    if b.weights and (len(b.weights) != len(b.sides) or min(b.weights) <= 0):
      raise errors.InvalidArgument(f"data.buckets.weights={b.weights} must be one positive weight per side of "
                                   f"sides={b.sides} (or empty: equal)")
    return
  if c.data.source not in ("folder", "webdataset", "parquet", "arrayrecord", "tfds"):
    raise errors.InvalidArgument(f"data.buckets needs images of their own shapes: data.source={c.data.source!r} "
                                 "gives square ones (folder, webdataset, parquet, arrayrecord or tfds; a latent "
                                 "cache keeps the buckets it was written with; data.buckets.sides trains it at "
                                 "several square resolutions)")
  if b.step <= 0 or b.step % c.model.patch_size:
    raise errors.InvalidArgument(f"data.buckets.step={b.step} must be a positive multiple of "
                                 f"model.patch_size={c.model.patch_size}")
  if b.pixels < b.step**2 or b.max_aspect < 1 or b.max_upscale < 1 or b.max_buckets < 1:
    raise errors.InvalidArgument(f"data.buckets: pixels={b.pixels} must be >= step^2={b.step ** 2}, max_aspect="
                                 f"{b.max_aspect} and max_upscale={b.max_upscale} >= 1, max_buckets={b.max_buckets} "
                                 ">= 1")


def _one_of(name: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise errors.InvalidArgument(f"config.{name}={value!r} is not one of {tuple(allowed)}")


def _positive(name: str, value: Any) -> None:
  if not value > 0:
    raise errors.InvalidArgument(f"config.{name}={value!r} must be > 0")


def validate(c: ml_collections.ConfigDict, *, encoding: bool = False) -> None:
  """Checks every enumerated and numeric field; raises ValueError naming the field.
  encoding: the config of `python -m jdiff.cache`, which reads the images and captions that a
  frozen-encoder run trains on once cached."""
  _one_of("stage", c.stage, config_lib.STAGES)
  if c.model.name == "inherit":
    raise errors.InvalidArgument(
        "config.model.name='inherit' must be resolved first (jdiff.workdir.run_config.prepare)")
  _one_of("model.name", c.model.name, config_lib.MODELS)
  if not c.model.attention.startswith("splash"):
    _one_of("model.attention", c.model.attention, config_lib.ATTENTION)
  elif c.model.attention != "splash" and not (c.model.attention[7:].isdigit() and int(c.model.attention[7:]) % 128 == 0
                                              and c.model.attention[6] == ":"):
    raise errors.InvalidArgument(
        f"config.model.attention={c.model.attention!r}: expected 'splash' or 'splash:<block>' with a "
        "block that is a multiple of 128")
  _one_of("model.remat", c.model.remat, config_lib.REMAT)
  _one_of("text.encoder", c.text.encoder, config_lib.TEXT_ENCODERS)
  _one_of("data.source", c.data.source, config_lib.DATA_SOURCES)
  _one_of("objective", c.objective, config_lib.STAGE_OBJECTIVES[c.stage])
  _one_of("data.shapes_split", c.data.shapes_split, config_lib.SHAPES_SPLITS)
  if set(c.data.web) != set(config_lib.WEB_RATES):
    raise errors.InvalidArgument(f"config.data.web: expected the rates {config_lib.WEB_RATES}, "
                                 f"got {sorted(c.data.web)}")
  for name, rate in c.data.web.items():
    if not 0 <= rate <= 1:
      raise errors.InvalidArgument(f"config.data.web.{name}={rate}: a rate in [0, 1]")
  captions_only = c.objective == "grpo" or (c.objective in ("guidance", "fewstep") and c.distill.states == "student")
  if c.data.shapes_split in ("held_out", "prompts") and not captions_only:
    raise errors.InvalidArgument(
        f"data.shapes_split={c.data.shapes_split!r} holds captions of the benchmark's unseen colour-shape pairs: only "
        "objectives that read captions, never images, may use it: 'grpo', or 'guidance' / 'fewstep' with "
        "distill.states='student'")
  _one_of("data.caption_from", c.data.caption_from, config_lib.CAPTION_FROM)
  _one_of("data.missing_caption", c.data.missing_caption, config_lib.MISSING_CAPTIONS)
  _one_of("data.loss_mask", c.data.loss_mask, config_lib.LOSS_MASKS)
  if c.data.loss_mask != "none":
    if c.data.source == "cache":
      raise errors.InvalidArgument(f"data.loss_mask={c.data.loss_mask!r} names where masks are read when a cache is "
                                   "written (python -m jdiff.cache); a cache written with masks holds them and training "
                                   "on it uses them: leave data.loss_mask='none' with data.source='cache'")
    if c.objective != "flow" or c.data.source in ("shapes", "preference"):
      raise errors.InvalidArgument(f"data.loss_mask={c.data.loss_mask!r} weights the flow loss of images read from "
                                   f"files (objective 'flow'; got {c.objective!r}, data.source={c.data.source!r})")
    if c.data.loss_mask == "file" and (c.data.source != "folder" or not c.data.mask_suffix):
      raise errors.InvalidArgument("data.loss_mask='file' reads NAME + data.mask_suffix beside each image of "
                                   "data.source='folder'")
  if c.data.buckets.pixels or c.data.buckets.sides:
    _validate_buckets(c)
  if c.data.source in ("folder", "webdataset", "parquet") and not c.data.path:
    raise errors.InvalidArgument(f"data.source={c.data.source!r} needs data.path: a directory, a file pattern or a "
                                 "comma-separated list of them")
  if c.data.pairs_dir and c.data.source != "preference":
    raise errors.InvalidArgument(f"data.pairs_dir is set but data.source is {c.data.source!r}; pairs need 'preference'")
  if (c.objective == "dpo") != (c.data.source == "preference"):
    raise errors.InvalidArgument(
        "config.objective='dpo' trains on preference pairs and only on them: set both objective='dpo' and "
        f"data.source='preference' (got {c.objective!r}, {c.data.source!r})")
  if c.objective == "dpo" and c.dpo.beta <= 0:
    raise errors.InvalidArgument(f"config.dpo.beta={c.dpo.beta} must be > 0")
  if c.objective == "grpo":
    _validate_grpo(c)
  if c.objective == "guidance" and not c.model.guidance_embed:
    raise errors.InvalidArgument("config.objective='guidance' trains a student that embeds the guidance scale: set "
                                 "config.model.guidance_embed=True")
  if not 0 <= c.distill.guidance_min <= c.distill.guidance_max:
    raise errors.InvalidArgument(f"config.distill.guidance_min={c.distill.guidance_min} and guidance_max="
                                 f"{c.distill.guidance_max} must satisfy 0 <= min <= max")
  _one_of("distill.states", c.distill.states, ("data", "student"))
  _one_of("diffusion.prediction", c.diffusion.prediction, config_lib.PREDICTIONS)
  _one_of("diffusion.weighting", c.diffusion.weighting, config_lib.WEIGHTINGS)
  _one_of("diffusion.timesteps.kind", c.diffusion.timesteps.kind, config_lib.TIMESTEP_KINDS)
  _one_of("diffusion.shift.kind", c.diffusion.shift.kind, config_lib.SHIFT_KINDS)
  _one_of("optim.schedule", c.optim.schedule, config_lib.SCHEDULES)
  _one_of("optim.mu_dtype", c.optim.mu_dtype, ("", "float32", "bfloat16"))
  _one_of("sample.method", c.sample.method, config_lib.SAMPLERS)
  _one_of("eval.method", c.eval.method, config_lib.SAMPLERS)
  _one_of("wandb.mode", c.wandb.mode, config_lib.WANDB_MODES)
  for metric in c.eval.metrics:
    _one_of("eval.metrics", metric, config_lib.EVAL_METRICS)
  quality = sorted(set(c.eval.metrics) & {"fid", "kid"})
  if quality and not (c.eval.fid_stats and c.eval.fid_weights):
    raise errors.InvalidArgument(f"eval.metrics {quality} need eval.fid_stats (python -m jdiff.fid_stats) and "
                                 "eval.fid_weights (the FID Inception weights file)")
  if "clip_score" in c.eval.metrics and not c.eval.clip_model:
    raise errors.InvalidArgument("eval.metrics 'clip_score' needs eval.clip_model (a transformers CLIPModel "
                                 "directory)")
  _positive("eval.fid_samples", c.eval.fid_samples)
  for dtype_field in ("model.dtype", "model.param_dtype", "text.dtype", "text.param_dtype"):
    section, key = dtype_field.split(".")
    _one_of(dtype_field, c[section][key], ("float32", "bfloat16", "float16"))
  _one_of("lora.param_dtype", c.lora.param_dtype, ("", "float32", "bfloat16", "float16"))
  _one_of("lora.quantize_base", c.lora.quantize_base, ("", "int8", "float8_e4m3fn"))
  if c.lora.quantize_base and not c.lora.rank > 0:
    raise errors.InvalidArgument(f"config.lora.quantize_base={c.lora.quantize_base!r} quantizes the kernels of the "
                                 "adapted layers: set lora.rank > 0")
  for name in ("data.resolution", "train.batch_size", "train.num_steps", "train.grad_accum",
               "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.max_nonfinite", "sample.num_steps", "eval.num_steps", "eval.num_samples",
               "text.max_len", "optim.grad_clip", "model.patch_size", "sample.batch_size",
               "distill.student_steps", "distill.teacher_substeps", "distill.state_steps", "data.worker_chunk",
               "eval.val_examples", "eval.val_times"):
    section, key = name.split(".")
    _positive(name, c[section][key])
  if c.data.read_threads < -1:
    raise errors.InvalidArgument(f"config.data.read_threads={c.data.read_threads}: expected >= 0, or -1 (by source)")
  if c.data.num_workers < 0:
    raise errors.InvalidArgument(f"config.data.num_workers={c.data.num_workers} must be >= 0")
  if c.lora.rank < 0:
    raise errors.InvalidArgument(f"config.lora.rank={c.lora.rank} must be >= 0")
  if c.optim.lr < 0:
    raise errors.InvalidArgument(f"config.optim.lr={c.optim.lr} must be >= 0")
  if not 0.0 <= c.data.caption_dropout < 1.0:
    raise errors.InvalidArgument(f"config.data.caption_dropout={c.data.caption_dropout} must lie in [0, 1)")
  if not 0.0 <= c.optim.ema_decay < 1.0:
    raise errors.InvalidArgument(f"config.optim.ema_decay={c.optim.ema_decay} must lie in [0, 1)")
  if c.train.batch_size % c.train.grad_accum:
    raise errors.InvalidArgument(f"config.train.batch_size={c.train.batch_size} is not divisible by "
                                 f"train.grad_accum={c.train.grad_accum}")
  if c.sample.cfg_scale < 0 or c.eval.cfg_scale < 0 or c.sample.true_cfg_scale < 0:
    raise errors.InvalidArgument("config.sample.cfg_scale, true_cfg_scale and config.eval.cfg_scale must be >= 0")
  if c.text.max_len % c.text.downsample:
    raise errors.InvalidArgument(f"config.text.max_len={c.text.max_len} is not divisible by text.downsample="
                                 f"{c.text.downsample}")
  if c.data.source == "cache":
    if c.text.encoder not in config_lib.FROZEN_TEXT or not c.autoencoder.path:
      raise errors.InvalidArgument(
          f"data.source='cache' holds a pipeline's text embeddings and VAE latents: set text.encoder to one of "
          f"{config_lib.FROZEN_TEXT} and autoencoder.path")
    if not c.data.cache_dir:
      raise errors.InvalidArgument("data.source='cache' needs data.cache_dir")
    if c.objective == "dpo":
      raise errors.InvalidArgument(
          "objective='dpo' reads embedded pixel-space pairs (data.source='preference'), not a cache")
  elif (c.text.encoder in config_lib.FROZEN_TEXT or c.autoencoder.path) and not encoding:
    raise errors.InvalidArgument(f"text.encoder={c.text.encoder!r} and autoencoder.path train on precomputed "
                                 "embeddings and latents: "
                                 "write them with `python -m jdiff.cache` and set data.source='cache', data.cache_dir")


def _validate_grpo(c: ml_collections.ConfigDict) -> None:
  g = c.grpo
  _one_of("grpo.reward", g.reward, config_lib.REWARDS)
  for name in ("num_steps", "updates_per_rollout", "noise_level", "clip_range", "adv_clip"):
    _positive(f"grpo.{name}", g[name])
  if g.group_size < 2:
    raise errors.InvalidArgument(f"config.grpo.group_size={g.group_size}: advantages compare images of one prompt, "
                                 "so a group needs >= 2")
  if g.kl_weight < 0 or g.cfg_scale < 0:
    raise errors.InvalidArgument("config.grpo.kl_weight and config.grpo.cfg_scale must be >= 0")
  steps = g.num_steps if g.train_timesteps is None else g.train_timesteps
  if not 1 <= steps <= g.num_steps:
    raise errors.InvalidArgument(f"config.grpo.train_timesteps={g.train_timesteps} must lie in [1, grpo.num_steps="
                                 f"{g.num_steps}]")
  images = c.train.batch_size * g.group_size
  if images % g.updates_per_rollout or (images // g.updates_per_rollout * steps) % c.train.grad_accum:
    raise errors.InvalidArgument(
        f"config.grpo: train.batch_size x group_size = {images} images must split into updates_per_rollout="
        f"{g.updates_per_rollout} equal slices whose {steps} steps each split into train.grad_accum="
        f"{c.train.grad_accum} micro-batches")
  if c.text.encoder != "bytes" or c.autoencoder.path or c.data.source == "cache":
    raise errors.InvalidArgument("objective='grpo' samples pixel-space images from the byte text encoder's prompts; "
                                 "latent-space models (autoencoder.path, frozen text encoders, data.source='cache') "
                                 "are not supported by it yet")
  if g.reward in ("adherence", "adherence_all") and c.data.source != "shapes":
    raise errors.InvalidArgument(f"config.grpo.reward={g.reward!r} scores shapes captions: set data.source='shapes' "
                                 f"(got {c.data.source!r})")
  if g.reward in ("adherence", "adherence_all") and c.text.max_len < config_lib.SHAPES_CAPTION_TOKENS:
    raise errors.InvalidArgument(f"config.grpo.reward={g.reward!r} reads the attributes back from the caption tokens: "
                                 f"text.max_len={c.text.max_len} cuts shapes captions, set it to >= "
                                 f"{config_lib.SHAPES_CAPTION_TOKENS}")
